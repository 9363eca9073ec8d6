import math

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from models.schedule import (
    WarmUpAndCosineDecay,
    scaled_learning_rate,
    total_train_steps,
    warmup_steps,
)


def _numpy_schedule(step, peak, warmup, total):
    if step < warmup:
        return peak * step / warmup
    done = min(step - warmup, total - warmup) / (total - warmup)
    return peak * 0.5 * (1.0 + np.cos(np.pi * done))


def test_scaling_rules():
    assert scaled_learning_rate(0.3, 512, "linear") == pytest.approx(0.6)
    assert scaled_learning_rate(0.075, 4096, "sqrt") == pytest.approx(0.075 * 64)
    with pytest.raises(ValueError, match="learning_rate_scaling"):
        scaled_learning_rate(0.1, 256, "cubic")
    with pytest.raises(ValueError, match="learning_rate_scaling"):
        WarmUpAndCosineDecay(0.1, 1000, 100, 1, 50, learning_rate_scaling="log")


def test_step_counts():
    # 10 epochs * 50000 // 4096 = 122 (floor), not 122.07 rounded.
    assert warmup_steps(10, 50000, 4096) == 122
    # Fractional epochs: 0.5 * 1000 // 64 = 7.
    assert warmup_steps(0.5, 1000, 64) == 7
    assert warmup_steps(0, 1000, 64) == 0
    # 1000 * 3 // 64 + 1 = 47 when no explicit step count is given.
    assert total_train_steps(1000, 64, 3, 0) == 47
    assert total_train_steps(1024, 64, 2, 0) == 33
    assert total_train_steps(1000, 64, 3, 5) == 5


@pytest.mark.parametrize("scaling", ["linear", "sqrt"])
def test_values_follow_warmup_then_cosine(scaling):
    base, examples, batch, warmup_epochs, total = 0.3, 1000, 128, 2, 40
    schedule = WarmUpAndCosineDecay(base, examples, batch, warmup_epochs, total, scaling)
    peak = base * batch / 256 if scaling == "linear" else base * math.sqrt(batch)
    warmup = 2 * 1000 // 128  # 15
    for step in [0, 1, 7, 14, 15, 16, 27, 39, 40, 41, 100]:
        expected = _numpy_schedule(step, peak, warmup, total)
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(schedule(warmup)), peak, rtol=1e-6)
    assert abs(float(schedule(total))) < 1e-7 and abs(float(schedule(10 * total))) < 1e-7


def test_no_warmup_starts_at_peak():
    schedule = WarmUpAndCosineDecay(1.0, 1000, 256, 0, 10, "linear")
    for step in [0, 3, 10, 12]:
        expected = _numpy_schedule(step, 1.0, 0, 10)
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5, atol=1e-7)
    assert float(schedule(0)) == pytest.approx(1.0)


def test_total_not_after_warmup_stays_finite():
    schedule = WarmUpAndCosineDecay(0.1, 100, 10, 1, 5, "linear")  # warmup 10 > total 5
    values = [float(schedule(step)) for step in range(15)]
    assert np.all(np.isfinite(values))
    np.testing.assert_allclose(values[5], 0.1 * 10 / 256 * 5 / 10, rtol=1e-6)
    assert values[11] == pytest.approx(0.0, abs=1e-9)


def test_config_round_trip_and_optimizer_use():
    schedule = WarmUpAndCosineDecay(0.2, 500, 64, 1.5, 30, "sqrt", name="lr")
    clone = WarmUpAndCosineDecay.from_config(schedule.get_config())
    for step in [0, 5, 11, 29]:
        assert float(clone(step)) == pytest.approx(float(schedule(step)))
    restored = keras.optimizers.schedules.deserialize(
        keras.optimizers.schedules.serialize(schedule)
    )
    assert isinstance(restored, WarmUpAndCosineDecay)
    # An optimizer steps with the rate at its own counter (warmup is 1.5 * 500 // 64 = 11 steps).
    optimizer = keras.optimizers.SGD(restored)
    weight = tf.Variable([0.0, 0.0])
    for step in [5, 20]:
        optimizer.iterations.assign(step)
        before = weight.numpy()
        optimizer.apply_gradients([(tf.constant([1.0, -1.0]), weight)])
        expected = _numpy_schedule(step, 0.2 * 8, 11, 30)
        np.testing.assert_allclose(before - weight.numpy(), [expected, -expected], rtol=1e-5)
