"""The exported SavedModel as a client sees it: loaded in a process that imports only TensorFlow,
fed raw JPEG tf.Examples and float images, compared with the same weights run in-process; and
the serving input pipeline's pixels for JPEG storage, through a model that echoes its input."""

from __future__ import annotations

import functools
import io
import json
import pathlib

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform as tft
import tensorflow_transform.beam as tft_beam
import tf_keras as keras
from PIL import Image
from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

from models import export
from models.model import ENDPOINTS, SimCLRModel
from tests.models import fixtures
from tests.models import image_reference as ref
from transform import preprocessing as tp

# Only TensorFlow (and the standard library): outputs go to disk as serialized tensors.
_CLIENT = """
import json, pathlib, sys
import tensorflow as tf

export_dir, out_dir, images_file, *jpegs = sys.argv[1:]
loaded = tf.saved_model.load(export_dir)

def example(data):
    feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[data]))
    return tf.train.Example(
        features=tf.train.Features(feature={"image": feature})
    ).SerializeToString()

examples = tf.constant([example(pathlib.Path(p).read_bytes()) for p in jpegs])
images = tf.io.parse_tensor(tf.io.read_file(images_file), tf.float32)
outputs = {
    "serving_default": loaded.signatures["serving_default"](examples=examples),
    "serving_images": loaded.signatures["serving_images"](images=images),
}
for signature, tensors in outputs.items():
    for name, value in tensors.items():
        tf.io.write_file(f"{out_dir}/{signature}.{name}", tf.io.serialize_tensor(value))
project = ("models", "transform", "pipeline", "tensorflow_transform", "tfx")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in project)))
"""


def _read(path: pathlib.Path, dtype: tf.DType) -> np.ndarray:
    return tf.io.parse_tensor(tf.io.read_file(str(path)), dtype).numpy()


def _restored_model(run, num_classes: int) -> SimCLRModel:
    """The stage's network rebuilt from this project's code with the exported variables."""
    cfg = run.config
    model = SimCLRModel(
        cfg.model,
        num_classes,
        cfg.data.image_size,
        pretraining=False,
        fine_tune_after_block=cfg.finetune.fine_tune_after_block,
    )
    model.build_for()
    status = tf.train.Checkpoint(model=model).read(
        str(pathlib.Path(run.serving_model_dir) / "variables" / "variables")
    )
    status.expect_partial().assert_existing_objects_matched()
    return model


@pytest.fixture(scope="module")
def served(finetune_run, transformed, tmp_path_factory):
    """Outputs of both signatures computed by a fresh TensorFlow-only process."""
    out_dir = tmp_path_factory.mktemp("served")
    jpegs = transformed.eval_jpegs
    images = np.stack(
        [tf.io.decode_jpeg(p.read_bytes()).numpy() / np.float32(255.0) for p in jpegs]
    ).astype(np.float32)
    images_file = out_dir / "images.pb"
    tf.io.write_file(str(images_file), tf.io.serialize_tensor(images))
    proc = fixtures.run_python(
        _CLIENT,
        finetune_run.serving_model_dir,
        str(out_dir),
        str(images_file),
        *map(str, jpegs),
    )
    imported = json.loads(proc.stdout.strip().splitlines()[-1])
    return out_dir, images, imported


def test_client_process_needs_only_tensorflow(served):
    _, _, imported = served
    assert imported == []


def test_serving_images_returns_every_endpoint_of_the_model(served, finetune_run):
    out_dir, images, _ = served
    model = _restored_model(finetune_run, 10)
    expected = model(tf.constant(images), training=False)
    got = {p.name.split(".", 1)[1] for p in out_dir.glob("serving_images.*")}
    assert got == set(ENDPOINTS)
    for name in ENDPOINTS:
        served_value = _read(out_dir / f"serving_images.{name}", tf.float32)
        assert served_value.shape == tuple(expected[name].shape), name
        np.testing.assert_allclose(served_value, expected[name], rtol=1e-5, atol=1e-5)


def test_serving_default_classifies_raw_jpeg_examples(served, finetune_run, transformed):
    out_dir, images, _ = served
    model = _restored_model(finetune_run, 10)
    # The JPEG files decoded independently of Transform: at 32x32 the stored pixels are the file's.
    logits = model(tf.constant(images), training=False)["logits_sup"].numpy().astype(np.float64)
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)

    served_probs = _read(out_dir / "serving_default.probabilities", tf.float32)
    ids = _read(out_dir / "serving_default.top_k_ids", tf.int64)
    scores = _read(out_dir / "serving_default.top_k_scores", tf.float32)
    names = _read(out_dir / "serving_default.top_k_names", tf.string)
    n = len(transformed.eval_jpegs)
    assert served_probs.shape == (n, 10) and ids.shape == scores.shape == names.shape == (n, 5)
    np.testing.assert_allclose(served_probs, probabilities, rtol=1e-5, atol=1e-5)
    # The served ids are the five most probable classes in descending order. Near-ties (a head
    # that barely left its zero init) may come in either order, so ids are checked through the
    # reference probabilities they point at, not against one argsort.
    picked = np.take_along_axis(probabilities, ids, 1)
    sixth = -np.sort(-probabilities, axis=1)[:, 5]
    assert (np.diff(picked, axis=1) <= 1e-6).all() and (picked[:, -1] >= sixth - 1e-6).all()
    assert all(len(set(row)) == 5 for row in ids.tolist())
    np.testing.assert_allclose(scores, picked, atol=1e-5)
    class_names = np.array(transformed.class_names)
    assert [[s.decode() for s in row] for row in names] == class_names[ids].tolist()
    assert class_names.tolist() == sorted(class_names.tolist()) and len(class_names) == 10


def test_restore_backbone_takes_resnet_and_projection_head_only(pretrain_run):
    cfg = pretrain_run.config
    variables = str(pathlib.Path(pretrain_run.serving_model_dir) / "variables" / "variables")
    pretrained = SimCLRModel(cfg.model, 10, cfg.data.image_size, pretraining=True)
    pretrained.build_for()
    tf.train.Checkpoint(model=pretrained).read(variables).assert_existing_objects_matched()

    model = SimCLRModel(cfg.model, 10, cfg.data.image_size, pretraining=False)
    model.build_for()
    head_before = [w.copy() for w in model.supervised_head.get_weights()]
    export.restore_backbone(model, pretrain_run.serving_model_dir)

    for part in ("resnet", "projection_head"):
        got, want = getattr(model, part).get_weights(), getattr(pretrained, part).get_weights()
        assert len(got) == len(want) > 0
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
    for g, before, trained in zip(
        model.supervised_head.get_weights(),
        head_before,
        pretrained.supervised_head.get_weights(),
        strict=True,
    ):
        np.testing.assert_array_equal(g, before)
        if before.ndim == 2:
            assert not np.allclose(g, trained)


# ----- serving input for JPEG storage -----


class _Echo(keras.Model):
    """Its logits are the flattened input images, so the served probabilities reveal the exact
    pixels the serving signature fed to the model (log p = pixel - constant)."""

    def __init__(self, image_size: int):
        super().__init__()
        self.image_size = image_size
        self.num_classes = image_size * image_size * 3
        self.traces = 0  # Python calls, i.e. how often a tf.function traced the network

    def call(self, images: tf.Tensor, training: bool = False) -> dict[str, tf.Tensor]:
        self.traces += 1
        return {"logits_sup": tf.reshape(images, [tf.shape(images)[0], -1])}


def _jpeg_transform_output(out_dir: pathlib.Path, stored_size: int) -> tft.TFTransformOutput:
    """A Transform graph that stores JPEGs, analyzed with tf.Transform's Beam implementation."""
    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
    }
    metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(spec))
    png = tf.io.encode_png(tf.zeros([8, 8, 3], tf.uint8)).numpy()
    fn = functools.partial(
        tp.preprocessing_fn, custom_config={"image_size": stored_size, "image_format": "jpeg"}
    )
    with beam.Pipeline() as pipeline:
        with tft_beam.Context(temp_dir=str(out_dir / "tmp")):
            raw = pipeline | beam.Create([{"image": png, "label": 0}], reshuffle=False)
            transform_fn = (raw, metadata) | tft_beam.AnalyzeDataset(fn)
            _ = transform_fn | tft_beam.WriteTransformFn(str(out_dir))
            _ = metadata | tft_beam.WriteMetadata(
                str(out_dir / tft.TFTransformOutput.RAW_METADATA_DIR), pipeline
            )
    return tft.TFTransformOutput(str(out_dir))


def test_serving_default_center_crops_the_whole_stored_jpeg(tmp_path):
    """serving_default of a JPEG-storing pipeline decodes the stored (aspect-preserving) image
    and feeds the model the reference's eval view: the centred square of 0.875 of the shorter
    side, bicubic-resized; compared with PIL decoding and a NumPy crop + resize."""
    stored_size, image_size = 48, 40
    source = np.random.default_rng(0).integers(0, 256, [60, 90, 3], dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(source).save(buffer, "PNG")
    data = buffer.getvalue()
    model = _Echo(image_size)
    module = export.ServingModule(
        model,
        _jpeg_transform_output(tmp_path / "transform", stored_size),
        [str(i) for i in range(model.num_classes)],
        stored_size,
        "jpeg",
    )
    # The function exported as serving_default (the SavedModel round trip is tested above).
    feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[data]))
    example = tf.train.Example(features=tf.train.Features(feature={"image": feature}))
    probabilities = module.serve_examples(tf.constant([example.SerializeToString()]))[
        "probabilities"
    ]
    served = np.log(probabilities.numpy()[0].astype(np.float64))
    # Both signatures reuse __call__'s inference trace: the network is traced twice in all
    # (training and inference), not once more per signature.
    module.serve_images(tf.zeros([1, image_size, image_size, 3]))
    assert model.traces == 2

    # What Transform stores for this file, decoded independently: 48x72, the whole image.
    stored = ref.decode(tp._encode_images(tf.constant([data]), stored_size, "jpeg").numpy()[0])
    assert stored.shape == (48, 72, 3)
    expected = ref.resize(ref.center_crop(stored / 255.0, 0.875), image_size, image_size)
    expected = np.clip(expected, 0.0, 1.0).reshape(-1)
    np.testing.assert_allclose(served - served.mean(), expected - expected.mean(), atol=2e-3)


def _function_names(saved_model_dir: pathlib.Path) -> list[str]:
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((saved_model_dir / "saved_model.pb").read_bytes())
    return [f.signature.name for f in proto.meta_graphs[0].graph_def.library.function]


def test_exports_leave_keras_layer_traces_out(finetune_run, tmp_path):
    """Pins tf_keras's private `keras_option_scope` (no public switch exists for a tf.Module
    holding Keras layers): on a tf-keras without it the import fails, and if it stops taking
    effect the layer traces come back into the export."""
    layer = keras.Sequential([keras.layers.Dense(3)])
    layer.build([None, 2])

    class Holder(tf.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        @tf.function(input_signature=[tf.TensorSpec([None, 2])])
        def __call__(self, x):
            return self.layer(x)

    tf.saved_model.save(Holder(), str(tmp_path / "plain"))
    traced = "call_and_return_conditional_losses"
    assert any(traced in name for name in _function_names(tmp_path / "plain"))
    assert not any(
        traced in name for name in _function_names(pathlib.Path(finetune_run.serving_model_dir))
    )
