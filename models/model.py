"""The SimCLR network: ResNet backbone + projection head + supervised (linear) head."""

from __future__ import annotations

import re

import tensorflow as tf
import tf_keras as keras

from models.config import ModelConfig
from models.heads import ProjectionHead, SupervisedHead
from models.resnet import ENDPOINTS as BACKBONE_ENDPOINTS
from models.resnet import ResNet

ENDPOINTS = (*BACKBONE_ENDPOINTS, "proj_head_input", "proj_head_output", "logits_sup")


class SavedModelBackbone(keras.layers.Layer):
    """A backbone from a SavedModel in the released SimCLR TF2 format.

    That format is `loaded(images, trainable=bool)` → dict with `final_avg_pool` and the block
    endpoints, plus `trainable_variables_list`; our own exports follow it too. With `frozen`
    (fine_tune_after_block=4) the backbone runs in inference mode and gets no gradient.
    """

    def __init__(self, path: str, frozen: bool = False, **kwargs):
        super().__init__(name="resnet", **kwargs)
        self._module = tf.saved_model.load(path)
        if not hasattr(self._module, "trainable_variables_list"):
            raise ValueError(
                f"--checkpoint: {path} is not a SimCLR TF2 SavedModel (no trainable_variables_list)"
            )
        self.frozen = frozen
        # Assigning the variables to the layer makes Keras track (and train) them.
        self.backbone_variables = list(self._module.trainable_variables_list)
        if frozen:
            self.trainable = False

    def call(self, images: tf.Tensor, training: bool = False) -> dict[str, tf.Tensor]:
        trainable = bool(training) and not self.frozen
        outputs = self._module(images, trainable=trainable)
        missing = [k for k in ("final_avg_pool", "block_group4") if k not in outputs]
        if missing:
            raise ValueError(f"--checkpoint: the SavedModel returns no {missing}")
        endpoints = {k: outputs[k] for k in BACKBONE_ENDPOINTS if k in outputs}
        if self.frozen:
            endpoints = {k: tf.stop_gradient(v) for k, v in endpoints.items()}
        return endpoints


class SimCLRModel(keras.Model):
    """Returns every endpoint the exported image signature serves, keyed by the reference's names.

    In pretraining the supervised head reads stop_gradient features (online linear evaluation),
    so it measures the representation without shaping it. In fine-tuning gradients flow from the
    supervised head into the projection-head layers it reads and the unfrozen backbone blocks.
    """

    def __init__(
        self,
        config: ModelConfig,
        num_classes: int,
        image_size: int,
        *,
        pretraining: bool,
        fine_tune_after_block: int = -1,
        zero_init_logits_layer: bool = False,
        backbone: keras.layers.Layer | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.pretraining = pretraining
        self.ft_proj_selector = config.ft_proj_selector
        self.resnet = backbone or ResNet(
            depth=config.resnet_depth,
            width_multiplier=config.width_multiplier,
            cifar_stem=image_size <= 32,
            sk_ratio=config.sk_ratio,
            se_ratio=config.se_ratio,
            batch_norm_decay=config.batch_norm_decay,
            global_bn=config.global_bn,
            fine_tune_after_block=-1 if pretraining else fine_tune_after_block,
        )
        self.projection_head = ProjectionHead(
            mode=config.proj_head_mode,
            out_dim=config.proj_out_dim,
            num_layers=config.num_proj_layers,
            batch_norm_decay=config.batch_norm_decay,
            global_bn=config.global_bn,
        )
        self.supervised_head = SupervisedHead(num_classes, zero_init=zero_init_logits_layer)
        self.num_classes = num_classes
        self.image_size = image_size

    def call(self, images: tf.Tensor, training: bool = False) -> dict[str, tf.Tensor]:
        outputs = dict(self.resnet(images, training=training))
        features = outputs["final_avg_pool"]
        projection, hiddens = self.projection_head(features, training=training)
        head_input = hiddens[self.ft_proj_selector]
        if self.pretraining:
            head_input = tf.stop_gradient(head_input)
        outputs["proj_head_input"] = features
        outputs["proj_head_output"] = projection
        outputs["logits_sup"] = self.supervised_head(head_input, training=training)
        return outputs

    def build_for(self, batch: int = 1) -> None:
        """Creates all variables with one forward pass on zeros (needed before restoring)."""
        self(tf.zeros([batch, self.image_size, self.image_size, 3]), training=False)


def saved_model_dir(path: str) -> str:
    """TFX points base_model at <artifact>/Format-Serving; an imported model is the uri itself."""
    if tf.io.gfile.exists(tf.io.gfile.join(path, "saved_model.pb")):
        return path
    parent = path.rstrip("/").rsplit("/", 1)[0]
    if tf.io.gfile.exists(tf.io.gfile.join(parent, "saved_model.pb")):
        return parent
    raise ValueError(f"base model: no SavedModel at {path}")


# How a projection-head layer's variables are named: ours (`projection_head/layer_<i>/...`) and
# the released SimCLR TF2 format's (`.../nl_<i>/...`).
_HEAD_LAYER = re.compile(r"(?:projection_head/layer_|head_projection/nl_|/nl_)(\d+)/(.+)$")


def _head_key(name: str) -> tuple[int, str] | None:
    """(layer index, the variable's name inside that layer without scopes), or None."""
    match = _HEAD_LAYER.search(name.split(":")[0])
    if not match:
        return None
    inner = match.group(2)
    # Only the leaf matters (kernel, bias, gamma, beta, moving_mean, moving_variance): layer
    # internals are named differently across the formats.
    return int(match.group(1)), inner.rsplit("/", 1)[-1]


def import_projection_head(head: ProjectionHead, path: str, selector: int) -> int:
    """Copies the first `selector` projection layers of a released-format SavedModel into `head`.

    SimCLRv2 fine-tunes from the first projection layer (ft_proj_selector=1): those layers must
    start from their pretrained values, not from a random initialization. As in the reference
    (`hiddens_list[ft_proj_selector]`), -1 selects the head's output, so every layer is copied.
    Returns the number of layers copied; a layer missing from the SavedModel is a one-line error.
    """
    if selector < 0:
        selector = head.num_layers + 1 + selector
    if selector <= 0:
        return 0
    loaded = tf.saved_model.load(path)
    source: dict[tuple[int, str], tf.Variable] = {}
    # A loaded SavedModel is no tf.Module: find its variables by walking the object graph.
    variables = (t for t in tf.train.TrackableView(loaded).descendants())
    for variable in (v for v in variables if isinstance(v, tf.Variable)):
        key = _head_key(variable.name)
        if key is not None:
            source[key] = variable
    for index in range(selector):
        targets = [v for v in head.weights if (k := _head_key(v.name)) and k[0] == index]
        if not targets:
            raise ValueError(f"--ft_proj_selector: the model has no projection layer {index}")
        for target in targets:
            key = _head_key(target.name)
            if key not in source:
                raise ValueError(
                    f"--checkpoint: {path} has no pretrained projection layer {index} "
                    f"({key[1]}) for --ft_proj_selector={selector}"
                )
            target.assign(tf.cast(source[key], target.dtype))
    return selector
