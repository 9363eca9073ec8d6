"""ResNet v1.5 backbone for SimCLR: plain, wide, selective-kernel (SimCLRv2) and SE variants.

Everything is a subclassed layer held in named attributes (``stem``, ``block_groups[i].blocks[j]``)
so object-based checkpoints address weights by stable paths instead of generated layer names.
Images go in as floats in [0, 1] without mean/std normalization, matching how SimCLR feeds it.
"""

import functools
from collections.abc import Callable

import tensorflow as tf
import tf_keras as keras

from models import cpu_elementwise, side_by_side
from models.config import BLOCKS_PER_GROUP
from models.strategy import runs_on_cpu

BATCH_NORM_EPSILON = 1e-5
BOTTLENECK_EXPANSION = 4
ENDPOINTS = (
    "initial_conv",
    "initial_max_pool",
    "block_group1",
    "block_group2",
    "block_group3",
    "block_group4",
    "final_avg_pool",
)


def batch_normalization(
    momentum: float,
    global_bn: bool,
    center: bool = True,
    zero_init: bool = False,
    name: str = "batch_normalization",
    fused: bool | None = None,
) -> keras.layers.BatchNormalization:
    """BatchNorm with SimCLR's epsilon.

    The name keeps 'batch_normalization' in every variable name: the optimizer exempts variables
    from weight decay by that substring. ``global_bn`` synchronizes batch statistics across
    replicas, which contrastive training needs because negatives come from the global batch.
    ``fused=None`` lets Keras pick the fused kernel where it applies (4-D inputs, no sync);
    ``False`` is the reference's unfused form, kept so the step benchmark can compare the two.
    """
    return keras.layers.BatchNormalization(
        momentum=momentum,
        epsilon=BATCH_NORM_EPSILON,
        center=center,
        gamma_initializer="zeros" if zero_init else "ones",
        synchronized=global_bn,
        fused=fused,
        name=name,
    )


class BatchNormRelu(keras.layers.Layer):
    """BatchNorm optionally followed by ReLU; ``zero_init`` starts gamma at 0 (see blocks)."""

    def __init__(
        self,
        momentum: float,
        global_bn: bool,
        relu: bool = True,
        zero_init: bool = False,
        center: bool = True,
        fused: bool | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.use_relu = relu
        self.batch_normalization = batch_normalization(
            momentum, global_bn, center, zero_init, fused=fused
        )

    def call(self, inputs: tf.Tensor, training: bool = False) -> tf.Tensor:
        outputs = self.batch_normalization(inputs, training=training)
        if not self.use_relu:
            return outputs
        if cpu_elementwise.applies(outputs, training):
            return cpu_elementwise.relu(outputs)
        return tf.nn.relu(outputs)


NormFactory = Callable[..., BatchNormRelu]


BlockInput = tf.Tensor | tuple[tf.Tensor, tf.Tensor]


def residual_relu(x: tf.Tensor, shortcut: tf.Tensor, training: bool) -> BlockInput:
    """A block's output, relu(x + shortcut). In bfloat16 training on a CPU it is compiled by
    XLA and comes twice, once for the next block's shortcut and once for its convolution, so
    that their gradients are summed inside the compiled ReLU gradient."""
    if not cpu_elementwise.applies(x, training):
        return tf.nn.relu(x + shortcut)
    return cpu_elementwise.add_relu(x, shortcut)


def _shortcut_and_conv_inputs(inputs: BlockInput) -> tuple[tf.Tensor, tf.Tensor]:
    if isinstance(inputs, (tuple, list)):
        return inputs[0], inputs[1]
    return inputs, inputs


def _one(x: BlockInput) -> tf.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def _conv_initializer() -> keras.initializers.Initializer:
    # Fan-in truncated normal with scale 1, as SimCLR initializes its convolutions.
    return keras.initializers.VarianceScaling()


class Conv2D(keras.layers.Conv2D):
    """Keras' Conv2D (same variables, same outputs) that, in bfloat16 on a CPU, computes
    convolutions on narrow maps over the images laid side by side (`models.side_by_side`):
    oneDNN's AMX kernels are slow on rows of 4 or 8 pixels. GPUs and TPUs keep their kernels."""

    def convolution_op(self, inputs: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
        if (
            inputs.dtype == tf.bfloat16
            and self.kernel_size[0] == self.kernel_size[1]
            and self.strides[0] == self.strides[1]
            and self.dilation_rate == (1, 1)
            and runs_on_cpu()
        ):
            lay = side_by_side.layout(
                inputs.shape, self.kernel_size[0], self.strides[0], self.padding.upper()
            )
            if lay is not None:
                # A tensor (the variable read and cast to bfloat16), so the gradient reaches the
                # variable through that cast rather than being asked of the custom gradient.
                return side_by_side.conv2d(inputs, tf.convert_to_tensor(kernel), lay)
        return super().convolution_op(inputs, kernel)


class FixedPaddingConv2D(keras.layers.Layer):
    """Bias-free convolution whose strided form pads explicitly and symmetrically.

    'SAME' padding with stride > 1 pads more at the end than at the start; padding
    (k - 1) // 2 in front keeps the sampling grid aligned with the input's top-left corner.
    """

    def __init__(self, filters: int, kernel_size: int, strides: int, **kwargs):
        super().__init__(**kwargs)
        self.kernel_size = kernel_size
        self.strides = strides
        self.conv = Conv2D(
            filters=filters,
            kernel_size=kernel_size,
            strides=strides,
            padding="same" if strides == 1 else "valid",
            use_bias=False,
            kernel_initializer=_conv_initializer(),
        )

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        if self.strides > 1:
            before = (self.kernel_size - 1) // 2
            after = self.kernel_size - 1 - before
            inputs = tf.pad(inputs, [[0, 0], [before, after], [before, after], [0, 0]])
        return self.conv(inputs)


class SelectiveKernelConv2D(keras.layers.Layer):
    """Selective-kernel 3x3 convolution (SKNet, as used in SimCLRv2).

    Two 3x3 streams come from one convolution with twice the filters; a squeezed global
    descriptor produces per-channel softmax weights that mix the two streams.
    """

    def __init__(
        self,
        filters: int,
        strides: int,
        sk_ratio: float,
        norm: NormFactory,
        min_dim: int = 32,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.streams_conv = FixedPaddingConv2D(2 * filters, 3, strides)
        self.streams_norm = norm()
        self.squeeze_conv = keras.layers.Conv2D(
            max(int(filters * sk_ratio), min_dim),
            1,
            use_bias=False,
            kernel_initializer=_conv_initializer(),
        )
        self.squeeze_norm = norm()
        self.mixing_conv = keras.layers.Conv2D(
            2 * filters, 1, use_bias=False, kernel_initializer=_conv_initializer()
        )

    def call(self, inputs: tf.Tensor, training: bool = False) -> tf.Tensor:
        streams = self.streams_norm(self.streams_conv(inputs), training=training)
        streams = tf.stack(tf.split(streams, 2, axis=-1))  # [2, N, H, W, C]
        descriptor = tf.reduce_mean(tf.reduce_sum(streams, axis=0), [1, 2], keepdims=True)
        descriptor = self.squeeze_norm(self.squeeze_conv(descriptor), training=training)
        logits = tf.stack(tf.split(self.mixing_conv(descriptor), 2, axis=-1))  # [2, N, 1, 1, C]
        return tf.reduce_sum(streams * tf.nn.softmax(logits, axis=0), axis=0)


class SqueezeExcitation(keras.layers.Layer):
    """Channel gating from globally pooled features (SENet)."""

    def __init__(self, channels: int, squeeze_channels: int, **kwargs):
        super().__init__(**kwargs)
        self.reduce = keras.layers.Conv2D(
            squeeze_channels, 1, use_bias=True, kernel_initializer=_conv_initializer()
        )
        self.expand = keras.layers.Conv2D(
            channels, 1, use_bias=True, kernel_initializer=_conv_initializer()
        )

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        pooled = tf.reduce_mean(inputs, [1, 2], keepdims=True)
        return tf.sigmoid(self.expand(tf.nn.relu(self.reduce(pooled)))) * inputs


class ProjectionShortcut(keras.layers.Layer):
    """1x1 conv + BN shortcut matching a block's output shape.

    With ``resnet_d`` (used together with selective kernels) the downsampling is done by a 2x2
    average pool before a stride-1 conv, so the shortcut sees every input pixel (ResNet-D).
    """

    def __init__(self, filters: int, strides: int, resnet_d: bool, norm: NormFactory, **kwargs):
        super().__init__(**kwargs)
        self.strides = strides
        self.avg_pool = (
            keras.layers.AveragePooling2D(2, strides, padding="same" if strides == 1 else "valid")
            if resnet_d
            else None
        )
        self.conv = FixedPaddingConv2D(filters, 1, 1 if resnet_d else strides)
        self.norm = norm(relu=False)

    def call(self, inputs: tf.Tensor, training: bool = False) -> tf.Tensor:
        if self.avg_pool is not None:
            if self.strides > 1:
                inputs = tf.pad(inputs, [[0, 0], [0, 1], [0, 1], [0, 0]])
            inputs = self.avg_pool(inputs)
        return self.norm(self.conv(inputs), training=training)


def _squeeze_excitation(channels: int, filters: int, se_ratio: float) -> SqueezeExcitation | None:
    if se_ratio <= 0:
        return None
    return SqueezeExcitation(channels, max(1, int(filters * se_ratio)))


class BasicBlock(keras.layers.Layer):
    """Two 3x3 convs (ResNet-18/34).

    The last BN's gamma starts at zero so each residual branch starts as the identity mapping,
    which stabilizes early training of deep/wide nets.
    """

    expansion = 1

    def __init__(
        self,
        filters: int,
        strides: int,
        use_projection: bool,
        sk_ratio: float,
        se_ratio: float,
        norm: NormFactory,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.shortcut = (
            ProjectionShortcut(filters, strides, sk_ratio > 0, norm) if use_projection else None
        )
        self.conv1 = FixedPaddingConv2D(filters, 3, strides)
        self.norm1 = norm()
        self.conv2 = FixedPaddingConv2D(filters, 3, 1)
        self.norm2 = norm(relu=False, zero_init=True)
        self.squeeze_excitation = _squeeze_excitation(filters, filters, se_ratio)

    def call(self, inputs: BlockInput, training: bool = False) -> BlockInput:
        shortcut_in, conv_in = _shortcut_and_conv_inputs(inputs)
        shortcut = (
            shortcut_in if self.shortcut is None else self.shortcut(shortcut_in, training=training)
        )
        x = self.norm1(self.conv1(conv_in), training=training)
        x = self.norm2(self.conv2(x), training=training)
        if self.squeeze_excitation is not None:
            x = self.squeeze_excitation(x)
        return residual_relu(x, shortcut, training)


class BottleneckBlock(keras.layers.Layer):
    """1x1 reduce, 3x3 (or selective-kernel), 1x1 expand; stride on the 3x3 (ResNet v1.5).

    The last BN's gamma starts at zero so each residual branch starts as the identity mapping.
    """

    expansion = BOTTLENECK_EXPANSION

    def __init__(
        self,
        filters: int,
        strides: int,
        use_projection: bool,
        sk_ratio: float,
        se_ratio: float,
        norm: NormFactory,
        **kwargs,
    ):
        super().__init__(**kwargs)
        out_filters = BOTTLENECK_EXPANSION * filters
        self.shortcut = (
            ProjectionShortcut(out_filters, strides, sk_ratio > 0, norm) if use_projection else None
        )
        self.conv1 = FixedPaddingConv2D(filters, 1, 1)
        self.norm1 = norm()
        if sk_ratio > 0:
            # The selective-kernel conv applies its own BN + ReLU.
            self.conv2 = SelectiveKernelConv2D(filters, strides, sk_ratio, norm)
            self.norm2 = None
        else:
            self.conv2 = FixedPaddingConv2D(filters, 3, strides)
            self.norm2 = norm()
        self.conv3 = FixedPaddingConv2D(out_filters, 1, 1)
        self.norm3 = norm(relu=False, zero_init=True)
        self.squeeze_excitation = _squeeze_excitation(out_filters, filters, se_ratio)

    def call(self, inputs: BlockInput, training: bool = False) -> BlockInput:
        shortcut_in, conv_in = _shortcut_and_conv_inputs(inputs)
        shortcut = (
            shortcut_in if self.shortcut is None else self.shortcut(shortcut_in, training=training)
        )
        x = self.norm1(self.conv1(conv_in), training=training)
        if self.norm2 is None:
            x = self.conv2(x, training=training)
        else:
            x = self.norm2(self.conv2(x), training=training)
        x = self.norm3(self.conv3(x), training=training)
        if self.squeeze_excitation is not None:
            x = self.squeeze_excitation(x)
        return residual_relu(x, shortcut, training)


class BlockGroup(keras.layers.Layer):
    """A stage of residual blocks; the first one changes resolution/width via a projection."""

    def __init__(
        self,
        block_cls: type[BasicBlock] | type[BottleneckBlock],
        filters: int,
        num_blocks: int,
        strides: int,
        sk_ratio: float,
        se_ratio: float,
        norm: NormFactory,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.blocks = [
            block_cls(
                filters,
                strides if i == 0 else 1,
                use_projection=i == 0,
                sk_ratio=sk_ratio,
                se_ratio=se_ratio,
                norm=norm,
            )
            for i in range(num_blocks)
        ]

    def call(self, inputs: BlockInput, training: bool = False) -> BlockInput:
        for block in self.blocks:
            inputs = block(inputs, training=training)
        return inputs


class Stem(keras.layers.Layer):
    """Input convolutions; returns (initial_conv, initial_max_pool).

    ImageNet-style: 7x7/2 conv, BN-ReLU, 3x3/2 max pool. With ``deep`` (ResNet-D, used with
    selective kernels) the 7x7 becomes three 3x3 convs. The CIFAR stem is a single 3x3/1 conv
    without pooling so 32x32 inputs keep their resolution. ``initial_conv`` is the last conv's
    raw output; ``initial_max_pool`` is the stem output after BN-ReLU (and pooling).
    """

    def __init__(self, width: int, cifar: bool, deep: bool, norm: NormFactory, **kwargs):
        super().__init__(**kwargs)
        if cifar:
            self.convs = [FixedPaddingConv2D(width, 3, 1)]
        elif deep:
            self.convs = [
                FixedPaddingConv2D(width // 2, 3, 2),
                FixedPaddingConv2D(width // 2, 3, 1),
                FixedPaddingConv2D(width, 3, 1),
            ]
        else:
            self.convs = [FixedPaddingConv2D(width, 7, 2)]
        self.norms = [norm() for _ in self.convs]
        self.max_pool = None if cifar else keras.layers.MaxPooling2D(3, 2, padding="same")

    def call(self, images: tf.Tensor, training: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
        x = images
        for conv, norm in zip(self.convs[:-1], self.norms[:-1], strict=True):
            x = norm(conv(x), training=training)
        initial_conv = self.convs[-1](x)
        x = self.norms[-1](initial_conv, training=training)
        if self.max_pool is not None:
            x = self.max_pool(x)
        return initial_conv, x


class ResNet(keras.Model):
    """ResNet-{18,34,50,101,152,200} backbone returning SimCLR's named endpoints.

    ``fine_tune_after_block`` = k freezes the stem (k >= 0) and block groups 1..k: they are
    non-trainable, run with BN in inference mode (moving statistics are left untouched) and
    their outputs pass through ``tf.stop_gradient``. -1 trains everything.
    """

    def __init__(
        self,
        depth: int,
        width_multiplier: float = 1,
        cifar_stem: bool = False,
        sk_ratio: float = 0.0,
        se_ratio: float = 0.0,
        batch_norm_decay: float = 0.9,
        global_bn: bool = False,
        fine_tune_after_block: int = -1,
        fused_batch_norm: bool | None = None,
        name: str = "resnet",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        if depth not in BLOCKS_PER_GROUP:
            raise ValueError(f"resnet_depth must be one of {sorted(BLOCKS_PER_GROUP)}, got {depth}")
        if width_multiplier <= 0 or not (
            width_multiplier < 1 or float(width_multiplier).is_integer()
        ):
            raise ValueError(
                f"width_multiplier must be a positive integer or a fraction below 1, "
                f"got {width_multiplier}"
            )
        if sk_ratio < 0:
            raise ValueError(f"sk_ratio must be >= 0, got {sk_ratio}")
        if se_ratio < 0:
            raise ValueError(f"se_ratio must be >= 0, got {se_ratio}")
        if not -1 <= fine_tune_after_block <= 4:
            raise ValueError(
                f"fine_tune_after_block must be in [-1, 4], got {fine_tune_after_block}"
            )
        self.depth = depth
        self.width_multiplier = width_multiplier
        self.fine_tune_after_block = fine_tune_after_block

        norm = functools.partial(BatchNormRelu, batch_norm_decay, global_bn, fused=fused_batch_norm)
        block_cls = BasicBlock if depth < 50 else BottleneckBlock
        self._expansion = block_cls.expansion
        # Fractions below 1 are our extension for tiny CPU models; SimCLR itself uses 1, 2, 4.
        width = max(1, int(round(64 * width_multiplier)))
        self._base_width = width
        self.stem = Stem(width, cifar=cifar_stem, deep=sk_ratio > 0, norm=norm, name="stem")
        self.block_groups = [
            BlockGroup(
                block_cls,
                filters=width * 2**i,
                num_blocks=num_blocks,
                strides=1 if i == 0 else 2,
                sk_ratio=sk_ratio,
                se_ratio=se_ratio,
                norm=norm,
                name=f"block_group{i + 1}",
            )
            for i, num_blocks in enumerate(BLOCKS_PER_GROUP[depth])
        ]
        for layer in self._frozen_layers():
            layer.trainable = False

    @property
    def output_dim(self) -> int:
        """Channels of ``final_avg_pool``."""
        return self._base_width * 8 * self._expansion

    def _frozen_layers(self) -> list[keras.layers.Layer]:
        stages = [self.stem, *self.block_groups]
        return stages[: self.fine_tune_after_block + 1]

    def call(self, images: tf.Tensor, training: bool = False) -> dict[str, tf.Tensor]:
        """Maps [N, H, W, 3] images in [0, 1] to the endpoint tensors named in ENDPOINTS."""
        frozen = self.fine_tune_after_block >= 0
        initial_conv, x = self.stem(images, training=False if frozen else training)
        if frozen:
            initial_conv, x = tf.stop_gradient(initial_conv), tf.stop_gradient(x)
        endpoints = {"initial_conv": initial_conv, "initial_max_pool": x}
        for i, group in enumerate(self.block_groups, start=1):
            frozen = i <= self.fine_tune_after_block
            x = group(x, training=False if frozen else training)
            if frozen:
                x = tf.nest.map_structure(tf.stop_gradient, x)
            endpoints[f"block_group{i}"] = _one(x)
        endpoints["final_avg_pool"] = tf.reduce_mean(_one(x), [1, 2])
        return endpoints
