"""The residual blocks' element-wise work, compiled by XLA on CPUs in bfloat16 training.

TensorFlow's own CPU kernels for element-wise ops on bfloat16 (Eigen's) run far below memory
speed: in the CIFAR ResNet-18 bfloat16 step the block outputs' add and ReLU, the ReLU gradients
and the gradient sums at each block's input took a sixth of the step, more than any convolution
direction but one (docs/benchmarks.md, "Where the bfloat16 step's time goes, op by op"). XLA
compiles each of these into one vectorized loop. Only these small functions are compiled: the
convolutions and batch norm stay on oneDNN's kernels, which XLA's CPU backend would replace with
far slower ones. Inference, float32, GPUs and TPUs keep TensorFlow's ops.
"""

import functools
from collections.abc import Callable

import tensorflow as tf

from models.strategy import runs_on_cpu

_enabled = True


def set_enabled(enabled: bool) -> None:
    """A process-wide kernel choice, read when a step is traced (benchmarks compare both)."""
    global _enabled
    _enabled = enabled


def applies(x: tf.Tensor, training: object) -> bool:
    """Whether `x`'s element-wise work takes the compiled path: bfloat16 training on a CPU."""
    return _enabled and training is True and x.dtype == tf.bfloat16 and runs_on_cpu()


def compiled(fn: Callable[..., tf.Tensor]) -> Callable[..., tf.Tensor]:
    """`fn` as one XLA-compiled function while the switch is on (read when the caller is
    traced), as TensorFlow's own ops otherwise; for data movement that sits beside a
    convolution (the side-by-side rows of `models.side_by_side`)."""
    xla = tf.function(fn, jit_compile=True, autograph=False)

    @functools.wraps(fn)
    def call(*args):
        return xla(*args) if _enabled else fn(*args)

    return call


@tf.function(jit_compile=True, autograph=False)
def _add_relu(x: tf.Tensor, shortcut: tf.Tensor) -> tf.Tensor:
    return tf.nn.relu(x + shortcut)


@tf.function(jit_compile=True, autograph=False)
def _relu_grad(dy: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    return tf.raw_ops.ReluGrad(gradients=dy, features=y)


@tf.function(jit_compile=True, autograph=False)
def _sum_relu_grad(dy_a: tf.Tensor, dy_b: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    return tf.raw_ops.ReluGrad(gradients=dy_a + dy_b, features=y)


def add_relu(x: tf.Tensor, shortcut: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """relu(x + shortcut), one compiled loop each way, returned twice: a block's output feeds
    two consumers (the next block's shortcut and its first convolution), and the gradients that
    come back from both are summed inside the compiled ReLU gradient instead of by a separate
    pass over the activation. A copy nothing reads gets no gradient. The gradient of both inputs
    is one tensor, the summed gradient where the output is positive."""

    @tf.custom_gradient
    def fn(x: tf.Tensor, shortcut: tf.Tensor):
        y = _add_relu(x, shortcut)

        def grad(dy_a: tf.Tensor | None, dy_b: tf.Tensor | None):
            if dy_a is None or dy_b is None:
                g = _relu_grad(dy_b if dy_a is None else dy_a, y)
            else:
                g = _sum_relu_grad(dy_a, dy_b, y)
            return g, g

        return (y, tf.identity(y)), grad

    return fn(x, shortcut)


def relu(x: tf.Tensor) -> tf.Tensor:
    """tf.nn.relu, whose gradient is one compiled loop; the forward op stays TensorFlow's, so
    that grappler still fuses it into the batch norm before it."""

    @tf.custom_gradient
    def fn(x: tf.Tensor):
        y = tf.nn.relu(x)
        return y, lambda dy: _relu_grad(dy, y)

    return fn(x)
