"""SavedModel export: what the Pusher ships and what the next Trainer stage restores from.

Two signatures:
- `serving_default`: serialized tf.Example with the raw encoded image as ingested → class
  probabilities, top-5 ids and names. It runs Transform's graph, so TFMA evaluates exactly what
  is served.
- `serving_images`: float32 images [N, H, W, 3] in [0, 1] → the reference's named endpoints.

Calling the loaded object, `loaded(images, trainable=False)`, returns the same endpoint dict, as
the released SimCLR TF2 SavedModels do, so our exports and the released checkpoints can both
serve as `--checkpoint` base models (see `SavedModelBackbone` in models/model.py).

The module keeps the Keras model at attribute `model`, so the SavedModel's variables form an
object-based checkpoint whose paths (`model/resnet/...`) the finetune stage restores directly.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_transform as tft
import tf_keras as keras
from tf_keras.src.saving.legacy.saved_model import utils as keras_saving_utils

from models import data as data_lib
from models.model import ENDPOINTS
from transform import preprocessing as tp

SERVING_IMAGES = "serving_images"


class ServingModule(tf.Module):
    def __init__(
        self,
        model: keras.Model,
        tf_transform_output: tft.TFTransformOutput,
        label_names: list[str],
        stored_size: int,
        image_format: str,
    ):
        super().__init__()
        self.model = model
        self.tft_layer = tf_transform_output.transform_features_layer()
        self._raw_image_spec = {tp.IMAGE_KEY: tf_transform_output.raw_feature_spec()[tp.IMAGE_KEY]}
        self.label_names = tf.constant(label_names, dtype=tf.string)
        self._stored_size = stored_size
        self._image_format = image_format
        size = model.image_size
        # No autograph below: nothing here branches on tensors, and converting Transform's Keras
        # layer and its loaded graph, or the model's layers, costs seconds at every export.
        # The released-checkpoint calling convention: a `__call__` with a Python bool
        # `trainable`, traced once for each value, plus the variables a fine-tuner trains.
        self.trainable_variables_list = model.trainable_variables
        endpoints = tf.function(self._endpoints, autograph=False)
        image_spec = tf.TensorSpec([None, None, None, 3], tf.float32)
        for trainable in (True, False):
            endpoints.get_concrete_function(image_spec, trainable=trainable)
        self.__call__ = endpoints
        # Both signatures call the inference trace above instead of tracing the network again:
        # each trace of the model costs seconds at export and again when the model is loaded.
        self.serve_examples = tf.function(
            self._serve_examples,
            input_signature=[tf.TensorSpec([None], tf.string, name="examples")],
            autograph=False,
        )
        self.serve_images = tf.function(
            self._serve_images,
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="images")],
            autograph=False,
        )

    def _endpoints(self, images: tf.Tensor, trainable: bool) -> dict[str, tf.Tensor]:
        outputs = self.model(images, training=trainable)
        return {name: tf.cast(outputs[name], tf.float32) for name in ENDPOINTS if name in outputs}

    def _serve_images(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        return self.__call__(images, trainable=False)

    def _serve_examples(self, examples: tf.Tensor) -> dict[str, tf.Tensor]:
        raw = tf.io.parse_example(examples, self._raw_image_spec)
        stored = self.tft_layer(raw)[tp.IMAGE_KEY]
        size = self.model.image_size

        def prepare(serialized: tf.Tensor) -> tf.Tensor:
            image = tp.decode_stored_image(serialized, self._stored_size, self._image_format)
            return data_lib.eval_image(image, size)

        images = tf.map_fn(
            prepare,
            tf.reshape(stored, [-1]),
            fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32),
        )
        logits = self.__call__(images, trainable=False)["logits_sup"]
        probabilities = tf.nn.softmax(logits)
        k = min(5, self.model.num_classes)
        top = tf.math.top_k(probabilities, k=k)
        return {
            "probabilities": probabilities,
            "top_k_ids": tf.cast(top.indices, tf.int64),
            "top_k_scores": top.values,
            "top_k_names": tf.gather(self.label_names, top.indices),
        }


def export_serving_model(module: ServingModule, export_dir: str) -> None:
    """Saves `module` with both signatures.

    Keras would also trace every layer's call functions into the SavedModel (for
    `keras.models.load_model`, which nothing here uses: clients call the signatures or
    `__call__`, and later stages read the variables), which took most of the save time, so
    those traces are left out as `model.save(save_traces=False)` does.
    """
    signatures = {
        "serving_default": module.serve_examples.get_concrete_function(),
        SERVING_IMAGES: module.serve_images.get_concrete_function(),
    }
    with keras_saving_utils.keras_option_scope(save_traces=False, in_tf_saved_model_scope=False):
        tf.saved_model.save(module, export_dir, signatures=signatures)


def restore_backbone(model: keras.Model, saved_model_dir: str) -> None:
    """Loads backbone and projection-head weights of a SavedModel exported by this module.

    The supervised head is left as initialized: a pretrain model's online linear-eval head is
    not a starting point for fine-tuning (and may have another number of classes).
    """
    partial = tf.train.Checkpoint(
        model=tf.train.Checkpoint(resnet=model.resnet, projection_head=model.projection_head)
    )
    path = tf.io.gfile.join(saved_model_dir, "variables", "variables")
    status = partial.read(path)
    status.expect_partial()
    status.assert_existing_objects_matched()
