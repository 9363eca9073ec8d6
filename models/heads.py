"""SimCLR heads: the projection MLP feeding the contrastive loss and the linear classifier."""

import tensorflow as tf
import tf_keras as keras

from models.resnet import batch_normalization

PROJ_HEAD_MODES = ("none", "linear", "nonlinear")


def _dense_initializer() -> keras.initializers.Initializer:
    # Small-scale normal init, as SimCLR initializes its dense layers.
    return keras.initializers.RandomNormal(stddev=0.01)


class DenseBatchNorm(keras.layers.Layer):
    """Bias-free dense + BatchNorm (+ ReLU): BN's beta makes a dense bias redundant.

    ``center=False`` drops beta too, as SimCLR does for the projection output layer.
    """

    def __init__(
        self,
        units: int,
        center: bool,
        relu: bool,
        batch_norm_decay: float,
        global_bn: bool,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.use_relu = relu
        self.dense = keras.layers.Dense(
            units, use_bias=False, kernel_initializer=_dense_initializer()
        )
        self.batch_normalization = batch_normalization(batch_norm_decay, global_bn, center=center)

    def call(self, inputs: tf.Tensor, training: bool = False) -> tf.Tensor:
        outputs = self.batch_normalization(self.dense(inputs), training=training)
        return tf.nn.relu(outputs) if self.use_relu else outputs


class ProjectionHead(keras.layers.Layer):
    """Maps backbone features to the space where the contrastive loss is computed.

    'none' passes features through; 'linear' is one dense+BN layer to ``out_dim``;
    'nonlinear' stacks ``num_layers`` dense+BN layers, hidden ones as wide as the input and
    followed by ReLU, the last one to ``out_dim`` without ReLU or BN offset. ``call`` also returns
    every intermediate representation (index 0 = input, i = output of layer i) so fine-tuning can
    attach the classifier to a chosen depth of the head (SimCLRv2's ``ft_proj_selector``).
    """

    def __init__(
        self,
        mode: str,
        out_dim: int,
        num_layers: int,
        batch_norm_decay: float = 0.9,
        global_bn: bool = False,
        name: str = "projection_head",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        if mode not in PROJ_HEAD_MODES:
            raise ValueError(f"proj_head_mode must be one of {PROJ_HEAD_MODES}, got {mode!r}")
        if mode != "none" and out_dim < 1:
            raise ValueError(f"proj_out_dim must be >= 1, got {out_dim}")
        if mode == "nonlinear" and num_layers < 1:
            raise ValueError(f"num_proj_layers must be >= 1 in nonlinear mode, got {num_layers}")
        self.mode = mode
        self.out_dim = out_dim
        self.num_layers = {"none": 0, "linear": 1, "nonlinear": num_layers}[mode]
        self.batch_norm_decay = batch_norm_decay
        self.global_bn = global_bn

    def build(self, input_shape: tf.TensorShape) -> None:
        # Hidden widths equal the input width, which is only known here.
        in_dim = int(input_shape[-1])
        self.linear_layers = [
            DenseBatchNorm(
                units=self.out_dim if i == self.num_layers - 1 else in_dim,
                center=i != self.num_layers - 1,
                relu=i != self.num_layers - 1,
                batch_norm_decay=self.batch_norm_decay,
                global_bn=self.global_bn,
                name=f"layer_{i}",
            )
            for i in range(self.num_layers)
        ]
        super().build(input_shape)

    def call(self, inputs: tf.Tensor, training: bool = False) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """Returns (projection output, [input, output of layer 1, ..., output of layer n])."""
        hiddens = [inputs]
        for layer in self.linear_layers:
            hiddens.append(layer(hiddens[-1], training=training))
        return hiddens[-1], hiddens


class SupervisedHead(keras.layers.Layer):
    """Linear classifier producing logits.

    Named 'head_supervised' because the optimizer and weight decay treat its variables specially
    by that name. ``zero_init`` starts from all-zero logits so linear evaluation does not begin
    from a random classifier.
    """

    def __init__(
        self, num_classes: int, zero_init: bool = False, name: str = "head_supervised", **kwargs
    ):
        super().__init__(name=name, **kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.dense = keras.layers.Dense(
            num_classes,
            use_bias=True,
            kernel_initializer="zeros" if zero_init else _dense_initializer(),
            bias_initializer="zeros",
        )

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        return self.dense(inputs)
