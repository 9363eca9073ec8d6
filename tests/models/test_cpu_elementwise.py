"""Tests for the compiled element-wise work of the residual blocks: values and gradients against
numpy formulas, and where the compiled path applies."""

import numpy as np
import pytest
import tensorflow as tf

from models import cpu_elementwise

ON_GPU = bool(tf.config.list_logical_devices("GPU"))


def _bf16(shape: tuple[int, ...], seed: int) -> tf.Tensor:
    return tf.cast(
        tf.constant(np.random.default_rng(seed).normal(size=shape), tf.float32), tf.bfloat16
    )


def _np(x: tf.Tensor) -> np.ndarray:
    return tf.cast(x, tf.float32).numpy()


SHAPE = (4, 6, 6, 8)


def test_add_relu_and_its_gradient_match_numpy():
    x, s, dy = _bf16(SHAPE, 0), _bf16(SHAPE, 1), _bf16(SHAPE, 2)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, s])
        y, _ = cpu_elementwise.add_relu(x, s)  # the copy nothing reads: no gradient
    dx, ds = tape.gradient(y, [x, s], output_gradients=dy)
    total = _np(x) + _np(s)
    np.testing.assert_allclose(_np(y), np.maximum(total, 0), rtol=1e-2, atol=1e-2)
    expected = np.where(total > 0, _np(dy), 0)
    np.testing.assert_array_equal(_np(dx), expected)
    np.testing.assert_array_equal(_np(ds), expected)


def test_fork_sums_both_consumers_gradients_inside_the_relu_gradient():
    x, s = _bf16(SHAPE, 0), _bf16(SHAPE, 1)
    wa, wb = _bf16(SHAPE, 3), _bf16(SHAPE, 4)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, s])
        ya, yb = cpu_elementwise.add_relu(x, s)
        both = tf.reduce_sum(tf.cast(ya * wa, tf.float32)) + tf.reduce_sum(
            tf.cast(yb * wb, tf.float32)
        )
        one = tf.reduce_sum(tf.cast(yb * wb, tf.float32))
    np.testing.assert_array_equal(_np(ya), _np(yb))
    positive = _np(x) + _np(s) > 0
    dx, ds = tape.gradient(both, [x, s])
    expected = np.where(positive, _np(wa) + _np(wb), 0)
    np.testing.assert_allclose(_np(dx), expected, rtol=1e-2, atol=1e-2)
    np.testing.assert_array_equal(_np(dx), _np(ds))
    # Only one of the two outputs used: its gradient alone.
    np.testing.assert_array_equal(_np(tape.gradient(one, x)), np.where(positive, _np(wb), 0))


def test_relu_gradient_matches_numpy():
    x, dy = _bf16(SHAPE, 5), _bf16(SHAPE, 6)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = cpu_elementwise.relu(x)
    np.testing.assert_array_equal(_np(y), np.maximum(_np(x), 0))
    dx = tape.gradient(y, x, output_gradients=dy)
    np.testing.assert_array_equal(_np(dx), np.where(_np(x) > 0, _np(dy), 0))


@pytest.mark.skipif(ON_GPU, reason="a GPU is visible")
def test_applies_to_bfloat16_training_on_a_cpu_only():
    bf16, f32 = _bf16(SHAPE, 0), tf.zeros(SHAPE)
    assert cpu_elementwise.applies(bf16, True)
    assert not cpu_elementwise.applies(f32, True)
    assert not cpu_elementwise.applies(bf16, False)
    assert not cpu_elementwise.applies(bf16, None)
    assert not cpu_elementwise.applies(bf16, tf.constant(True))  # a traced flag: unknown
    cpu_elementwise.set_enabled(False)
    try:
        assert not cpu_elementwise.applies(bf16, True)
    finally:
        cpu_elementwise.set_enabled(True)
