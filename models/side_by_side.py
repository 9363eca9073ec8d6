"""Convolutions on narrow maps, computed over the images laid side by side.

oneDNN's AMX convolution kernels work along rows of output pixels, and the rows of a 4x4 map are
too short for them: in the CIFAR ResNet-18 bfloat16 step each direction of a 512-channel 3x3
convolution on 4x4 maps took 2-3x the time of the same work on 8x8 maps. Laid side by side, the
4x4 forward pass and input gradient took half the time and the kernel gradient a quarter, and
the 8x8 kernel gradient two thirds (docs/benchmarks.md, "Narrow maps side by side"). Laying g
images next to each other along the width, with the zero columns the padding needs between
them, gives oneDNN rows g times as long for the price of those columns, and is exact: every
output pixel sums the same products as the plain convolution. The rearrangement is one XLA
loop (`cpu_elementwise.compiled`) each way."""

import dataclasses

import tensorflow as tf

from models import cpu_elementwise

# Kernel gradients of convolutions with output maps at most this wide are computed side by side
# (`set_max_width`); 16x16 maps gained nothing when measured.
MAX_WIDTH = 8
# The forward convolution and the input gradient only up to this width: on 8x8 maps laid side by
# side they ran as fast or slower than oneDNN's plain kernels.
MAX_FORWARD_WIDTH = 4
# The side-by-side row, in output pixels, that oneDNN's kernels need to run at full speed.
MIN_ROW = 64
# Convolutions of fewer input channels stay as they are: they are not where the time goes, and
# oneDNN's weight gradient of 1x1 strided convolutions with 8 or fewer input channels corrupts
# the heap or returns wrong values on some wide maps (measured in float32 in TensorFlow 2.16).
MIN_CHANNELS = 16
_max_width = MAX_WIDTH


def set_max_width(width: int) -> None:
    """A process-wide kernel choice, like TensorFlow's own `tf.config` switches, read when a step
    is traced: 0 leaves every convolution to oneDNN as it is (benchmarks compare the two)."""
    global _max_width
    _max_width = width


@dataclasses.dataclass(frozen=True)
class Layout:
    """g images per row; each takes `block` input columns (the image and the zeros after it) and
    `out_block` output columns, of which the first `out_width` are its output; `tail` zero
    columns end the input row. `whole`: the forward convolution and the input gradient run side
    by side too, not only the kernel gradient."""

    g: int
    block: int
    out_block: int
    out_width: int
    tail: int
    stride: int
    padding: str
    whole: bool


def layout(shape: tf.TensorShape, kernel: int, stride: int, padding: str) -> Layout | None:
    """How a square-kernel convolution of NHWC `shape` runs side by side, or None where it does
    not pay or does not fit (an unknown batch, a map too wide, few channels, one image a
    step)."""
    n, w = shape[0], shape[2]
    if n is None or w is None or shape[3] is None or shape[3] < MIN_CHANNELS:
        return None
    if padding == "SAME":
        # Stride 1 and an odd kernel: the (k - 1) / 2 zero columns after each image are the right
        # padding of that image and the left padding of the next; "SAME" on the row pads its ends.
        if stride != 1 or kernel % 2 == 0:
            return None
        block, tail = w + (kernel - 1) // 2, 0
        out_block, out_width = block, w
    else:
        # VALID (inputs padded beforehand, as `FixedPaddingConv2D` does): images side by side with
        # nothing between them; each starts on the stride's grid, and the tail completes the last
        # image's windows.
        if w % stride != 0 or w < kernel:
            return None
        block, tail = w, max(kernel - stride, 0)
        out_block, out_width = w // stride, (w - kernel) // stride + 1
    if out_width > _max_width:
        return None
    g = _images_per_row(n, out_block)
    if g < 2:
        return None
    whole = out_width <= min(MAX_FORWARD_WIDTH, _max_width)
    return Layout(g, block, out_block, out_width, tail, stride, padding, whole)


def _images_per_row(n: int, out_block: int) -> int:
    """The fewest images, dividing the batch, whose row reaches MIN_ROW output pixels."""
    for g in range(1, n + 1):
        if n % g == 0 and g * out_block >= MIN_ROW:
            return g
    return n


def conv2d(inputs: tf.Tensor, kernel: tf.Tensor, lay: Layout) -> tf.Tensor:
    """tf.nn.conv2d(inputs, kernel, lay.stride, lay.padding), with its kernel gradient (and, where
    `lay.whole`, the convolution and its input gradient) computed side by side."""
    s, pad = lay.stride, lay.padding
    strides = [1, s, s, 1]

    @tf.custom_gradient
    def conv(x: tf.Tensor, w: tf.Tensor):
        x_rows = to_rows(x, lay.g, lay.block, lay.tail) if lay.whole else None
        if lay.whole:
            y = from_rows(tf.nn.conv2d(x_rows, w, s, pad), lay.g, lay.out_block, lay.out_width, 0)
        else:
            y = tf.nn.conv2d(x, w, s, pad)

        def grad(dy: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            dy_rows = to_rows(dy, lay.g, lay.out_block, 0)
            rows = x_rows if lay.whole else to_rows(x, lay.g, lay.block, lay.tail)
            dw = tf.raw_ops.Conv2DBackpropFilter(
                input=rows,
                filter_sizes=w.shape.as_list(),
                out_backprop=dy_rows,
                strides=strides,
                padding=pad,
            )
            if not lay.whole:
                return input_grad(x, dy), dw
            dx_rows = input_grad(rows, dy_rows)
            return from_rows(dx_rows, lay.g, lay.block, x.shape[2], lay.tail), dw

        def input_grad(like: tf.Tensor, out_grad: tf.Tensor) -> tf.Tensor:
            return tf.raw_ops.Conv2DBackpropInput(
                input_sizes=like.shape.as_list(),
                filter=w,
                out_backprop=out_grad,
                strides=strides,
                padding=pad,
            )

        return y, grad

    return conv(inputs, kernel)


@cpu_elementwise.compiled
def to_rows(x: tf.Tensor, g: int, block: int, tail: int) -> tf.Tensor:
    """[N, H, W, C] → [N/g, H, g*block + tail, C]: g images per row, each followed by
    block - W zero columns, then `tail` more."""
    n, h, w, c = x.shape
    x = tf.pad(x, [[0, 0], [0, 0], [0, block - w], [0, 0]])
    x = tf.transpose(tf.reshape(x, [n // g, g, h, block, c]), [0, 2, 1, 3, 4])
    x = tf.reshape(x, [n // g, h, g * block, c])
    return tf.pad(x, [[0, 0], [0, 0], [0, tail], [0, 0]]) if tail else x


@cpu_elementwise.compiled
def from_rows(y: tf.Tensor, g: int, block: int, width: int, tail: int) -> tf.Tensor:
    """The inverse arrangement and the adjoint of `to_rows`: [N/g, H, g*block + tail, C] →
    [N, H, width, C], each image's first `width` of its `block` columns."""
    rows, h, _, c = y.shape
    y = tf.reshape(y[:, :, : g * block, :], [rows, h, g, block, c])
    y = tf.reshape(tf.transpose(y, [0, 2, 1, 3, 4]), [rows * g, h, block, c])
    return y[:, :, :width, :]
