"""Tests for convolutions computed over images laid side by side: the layout chosen for each
shape, the rows themselves, and the convolution with both gradients against numpy formulas."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from models import cpu_elementwise, side_by_side
from models.resnet import FixedPaddingConv2D, ResNet

ON_GPU = bool(tf.config.list_logical_devices("GPU"))


def _np_conv(x: np.ndarray, w: np.ndarray, stride: int, padding: str) -> np.ndarray:
    """NHWC convolution by its definition: every output pixel is its window times the kernel."""
    k = w.shape[0]
    if padding == "SAME":
        before = (k - 1) // 2
        x = np.pad(x, [(0, 0), (before, k - 1 - before), (before, k - 1 - before), (0, 0)])
    n, h, width, _ = x.shape
    oh, ow = (h - k) // stride + 1, (width - k) // stride + 1
    out = np.zeros((n, oh, ow, w.shape[3]))
    for i in range(oh):
        for j in range(ow):
            window = x[:, i * stride : i * stride + k, j * stride : j * stride + k, :]
            out[:, i, j, :] = np.tensordot(window, w, axes=([1, 2, 3], [0, 1, 2]))
    return out


def _np_grads(x: np.ndarray, w: np.ndarray, dy: np.ndarray, stride: int, padding: str):
    """dL/dx and dL/dw of `_np_conv` for L = sum(y * dy): each window's share, added back."""
    k = w.shape[0]
    before = (k - 1) // 2 if padding == "SAME" else 0
    after = k - 1 - before if padding == "SAME" else 0
    xp = np.pad(x, [(0, 0), (before, after), (before, after), (0, 0)])
    dxp, dw = np.zeros_like(xp), np.zeros_like(w)
    for i in range(dy.shape[1]):
        for j in range(dy.shape[2]):
            rows, cols = slice(i * stride, i * stride + k), slice(j * stride, j * stride + k)
            window = xp[:, rows, cols, :]
            dw += np.einsum("nabc,nd->abcd", window, dy[:, i, j, :])
            dxp[:, rows, cols, :] += np.einsum("abcd,nd->nabc", w, dy[:, i, j, :])
    return dxp[:, before : before + x.shape[1], before : before + x.shape[2], :], dw


# (batch, size, kernel, stride, padding): the CIFAR ResNet's narrow convolutions (stride 1 on
# 4x4 maps, the strided ones after explicit padding, the 1x1 projection shortcuts), an 8x8 map
# (kernel gradient only), a 7x7 map (odd width) and a batch no row size divides evenly.
CASES = [
    (32, 4, 3, 1, "SAME"),
    (8, 8, 3, 1, "SAME"),
    (8, 10, 3, 2, "VALID"),
    (8, 18, 3, 2, "VALID"),
    (8, 8, 1, 2, "VALID"),
    (6, 7, 3, 1, "SAME"),
    (5, 4, 1, 1, "VALID"),
]


@pytest.mark.parametrize(("batch", "size", "kernel", "stride", "padding"), CASES)
def test_convolution_and_both_gradients_match_numpy(batch, size, kernel, stride, padding):
    rng = np.random.default_rng(size * 10 + kernel)
    x = rng.normal(size=(batch, size, size, side_by_side.MIN_CHANNELS))
    w = rng.normal(size=(kernel, kernel, side_by_side.MIN_CHANNELS, 24))
    lay = side_by_side.layout(tf.TensorShape(x.shape), kernel, stride, padding)
    assert lay is not None and lay.g >= 2
    xt, wt = tf.constant(x, tf.float32), tf.constant(w, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch([xt, wt])
        y = side_by_side.conv2d(xt, wt, lay)
    expected = _np_conv(x, w, stride, padding)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-4, atol=1e-4)
    dy = rng.normal(size=expected.shape)
    dx, dw = tape.gradient(y, [xt, wt], output_gradients=tf.constant(dy, tf.float32))
    np_dx, np_dw = _np_grads(x, w, dy, stride, padding)
    np.testing.assert_allclose(dx.numpy(), np_dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw.numpy(), np_dw, rtol=1e-4, atol=1e-3)


def test_layouts_of_the_cifar_resnet_at_batch_256():
    """Two views of 256 images; rows of at least MIN_ROW output pixels."""

    def lay(size, kernel, stride, padding):
        return side_by_side.layout(tf.TensorShape([512, size, size, 64]), kernel, stride, padding)

    four = lay(4, 3, 1, "SAME")  # 16 images of 4 columns and 1 zero column: 80 per row
    assert (four.g, four.block, four.out_block, four.out_width, four.tail) == (16, 5, 5, 4, 0)
    assert four.whole
    eight = lay(8, 3, 1, "SAME")
    assert (eight.g, eight.block, eight.out_width) == (8, 9, 8) and not eight.whole
    strided = lay(10, 3, 2, "VALID")  # 8x8 padded to 10x10, stride 2: 4x4 out
    assert (strided.block, strided.out_block, strided.out_width, strided.tail) == (10, 5, 4, 1)
    assert strided.whole
    shortcut = lay(8, 1, 2, "VALID")
    assert (shortcut.out_block, shortcut.out_width, shortcut.tail) == (4, 4, 0)
    assert lay(16, 3, 1, "SAME") is None  # wide enough for oneDNN as it is
    assert lay(34, 3, 2, "VALID") is None


def test_layout_declines_what_it_cannot_lay_out():
    def lay(shape, kernel=3, stride=1, padding="SAME"):
        return side_by_side.layout(tf.TensorShape(shape), kernel, stride, padding)

    assert lay([8, 4, 4, 16]) is not None
    assert lay([None, 4, 4, 16]) is None
    assert lay([1, 4, 4, 16]) is None
    assert lay([8, 4, 4, 8]) is None  # too few channels
    assert lay([8, 4, 4, 16], kernel=2) is None  # an even kernel
    assert lay([8, 8, 8, 16], stride=2) is None  # SAME with a stride
    assert lay([8, 9, 9, 16], stride=2, padding="VALID") is None  # off the stride's grid
    side_by_side.set_max_width(0)
    try:
        assert lay([8, 4, 4, 16]) is None
    finally:
        side_by_side.set_max_width(side_by_side.MAX_WIDTH)


@pytest.mark.parametrize("compiled", [True, False])
def test_rows_are_the_images_side_by_side_and_back(compiled):
    x = np.arange(4 * 2 * 3 * 1, dtype=np.float32).reshape(4, 2, 3, 1) + 1
    cpu_elementwise.set_enabled(compiled)
    try:
        rows = side_by_side.to_rows(tf.constant(x), 2, 4, 1).numpy()
        back = side_by_side.from_rows(tf.constant(rows), 2, 4, 3, 1).numpy()
    finally:
        cpu_elementwise.set_enabled(True)
    # Images 0 and 1 in the first row, 2 and 3 in the second, each followed by one zero column,
    # then the tail's zero column.
    zero = np.zeros((2, 1, 1))
    for r in range(2):
        expected = np.concatenate([x[2 * r], zero, x[2 * r + 1], zero, zero], axis=1)
        np.testing.assert_array_equal(rows[r], expected)
    np.testing.assert_array_equal(back, x)
    # Each is the other's adjoint: <to_rows(x), y> == <x, from_rows(y)>.
    y = np.random.default_rng(0).normal(size=rows.shape).astype(np.float32)
    lhs = float(np.sum(rows * y))
    rhs = float(np.sum(x * side_by_side.from_rows(tf.constant(y), 2, 4, 3, 1).numpy()))
    assert lhs == pytest.approx(rhs, rel=1e-5)


def _bf16_layer_step(max_width: int) -> tuple[list[np.ndarray], set[str]]:
    """Output, input and kernel gradients of the project's bfloat16 Conv2D on 4x4 maps, and the
    input shapes of the convolution ops its step runs."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    keras.utils.set_random_seed(7)  # the same kernel in every call
    side_by_side.set_max_width(max_width)
    try:
        conv = FixedPaddingConv2D(16, 3, 1)
        x = tf.cast(np.random.default_rng(2).normal(size=(32, 4, 4, 16)), tf.bfloat16)
        conv(x)

        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = conv(x)
                loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2)
            return [y, *tape.gradient(loss, [x, conv.trainable_variables[0]])]

        graph = step.get_concrete_function(x).graph
        shapes = {
            f"{op.type}:{op.inputs[0].shape}"
            for op in graph.get_operations()
            if op.type.startswith("Conv2D")
        }
        return [tf.cast(t, tf.float32).numpy() for t in step(x)], shapes
    finally:
        side_by_side.set_max_width(side_by_side.MAX_WIDTH)
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.skipif(ON_GPU, reason="a GPU is visible")
def test_bfloat16_conv2d_on_narrow_maps_runs_side_by_side_with_the_same_results():
    got, shapes = _bf16_layer_step(side_by_side.MAX_WIDTH)
    expected, plain_shapes = _bf16_layer_step(0)
    # 32 views of 4x4: two rows of 16 images, 5 columns each.
    assert "Conv2D:(2, 4, 80, 16)" in shapes and "Conv2D:(32, 4, 4, 16)" in plain_shapes
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=0.02, atol=0.02 * np.abs(e).max())


@pytest.mark.skipif(ON_GPU, reason="a GPU is visible")
def test_bfloat16_resnet_gradients_side_by_side_match_onednn_as_it_is():
    def grads(max_width: int) -> list[np.ndarray]:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        keras.utils.set_random_seed(3)
        side_by_side.set_max_width(max_width)
        try:
            model = ResNet(depth=18, width_multiplier=0.25, cifar_stem=True)
            images = tf.constant(np.random.default_rng(5).uniform(size=(8, 16, 16, 3)), tf.float32)
            model(images)
            rng = np.random.default_rng(4)  # zero gammas would leave the branches no gradient
            for v in model.variables:
                if "gamma" in v.name:
                    v.assign(rng.uniform(0.5, 1.5, size=v.shape))

            @tf.function
            def step(images):
                with tf.GradientTape() as tape:
                    pooled = model(images, training=True)["final_avg_pool"]
                    loss = tf.reduce_sum(tf.cast(pooled, tf.float32) ** 2)
                return tape.gradient(loss, model.trainable_variables)

            return [g.numpy() for g in step(images)]
        finally:
            side_by_side.set_max_width(side_by_side.MAX_WIDTH)
            keras.mixed_precision.set_global_policy("float32")

    for got, expected in zip(grads(side_by_side.MAX_WIDTH), grads(0), strict=True):
        scale = max(np.abs(expected).max(), 1e-6)
        np.testing.assert_allclose(got, expected, rtol=0.03, atol=0.03 * scale)
