"""Runs preprocessing_fn through tf.Transform's Beam implementation on real image files."""

import functools
import io
import pathlib

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform as tft
import tensorflow_transform.beam as tft_beam
from PIL import Image
from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

from transform import preprocessing as pp

_RNG = np.random.default_rng(7)


def _smooth_rgb(width: int, height: int) -> np.ndarray:
    """Gradients plus mild noise: realistic enough for JPEG, distinct per channel."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.stack(
        [255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), 128 + 60 * np.sin(x / 3.0)],
        axis=-1,
    )
    image += _RNG.normal(0, 4, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _pil_rgb(data: bytes) -> np.ndarray:
    """Independent decoding: PIL, first frame, converted to RGB (alpha dropped)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _pil_resize(data: bytes, size: int) -> np.ndarray:
    """Independent aspect-preserving resize: PIL bicubic (antialiased), shorter side -> size."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    return np.asarray(image.resize((round(width * scale), round(height * scale)), Image.BICUBIC))


def _pil_resize_crop(data: bytes, size: int) -> np.ndarray:
    image = _pil_resize(data, size)
    top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return image[top : top + size, left : left + size]


CORNER_COLOURS = ((230, 30, 30), (30, 230, 30), (30, 30, 230), (230, 230, 30))
CORNERS = ((0, 0), (0, -1), (-1, 0), (-1, -1))


def _tall_with_corners(width: int, height: int) -> np.ndarray:
    """A smooth background with a distinctly coloured quarter-width patch in each corner."""
    image = _smooth_rgb(width, height)
    patch = width // 4
    for (row, col), colour in zip(CORNERS, CORNER_COLOURS, strict=True):
        rows = slice(0, patch) if row == 0 else slice(-patch, None)
        cols = slice(0, patch) if col == 0 else slice(-patch, None)
        image[rows, cols] = colour
    return image


def _image_files() -> dict[str, bytes]:
    gif_frames = [
        Image.fromarray(_RNG.integers(0, 255, (32, 32, 3), dtype=np.uint8)).quantize(16)
        for _ in range(2)
    ]
    return {
        "rgb.jpg": _encode(Image.fromarray(_smooth_rgb(32, 32)), "JPEG", quality=90),
        "gray.png": _encode(
            Image.fromarray(_RNG.integers(0, 256, (32, 32), dtype=np.uint8), "L"), "PNG"
        ),
        "rgba.png": _encode(
            Image.fromarray(_RNG.integers(0, 256, (32, 32, 4), dtype=np.uint8), "RGBA"), "PNG"
        ),
        "anim.gif": _encode(gif_frames[0], "GIF", save_all=True, append_images=gif_frames[1:]),
        "rgb.bmp": _encode(
            Image.fromarray(_RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)), "BMP"
        ),
        "wide.jpg": _encode(Image.fromarray(_smooth_rgb(50, 40)), "JPEG", quality=95),
        "tall.png": _encode(Image.fromarray(_tall_with_corners(24, 48)), "PNG"),
    }


FILES = _image_files()
NAMES = list(FILES)


def _run_transform(
    tmp_path: pathlib.Path, instances: list[dict], feature_spec: dict, custom_config: dict
) -> tuple[list[tf.train.Example], tft.TFTransformOutput]:
    """Analyzes and transforms in-memory instances; returns tf.Examples and the transform output."""
    metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(feature_spec))
    output_dir = str(tmp_path / "transform_fn")
    data_prefix = str(tmp_path / "transformed")
    fn = functools.partial(pp.preprocessing_fn, custom_config=custom_config)
    with beam.Pipeline() as pipeline:
        with tft_beam.Context(temp_dir=str(tmp_path / "tmp")):
            raw = pipeline | beam.Create(instances, reshuffle=False)
            transformed, transform_fn = (raw, metadata) | tft_beam.AnalyzeAndTransformDataset(fn)
            _ = transform_fn | tft_beam.WriteTransformFn(output_dir)
            _ = (
                transformed
                | tft_beam.EncodeTransformedDataset()
                | beam.io.WriteToTFRecord(data_prefix, shard_name_template="")
            )
    records = tf.data.TFRecordDataset(data_prefix).as_numpy_iterator()
    return [tf.train.Example.FromString(r) for r in records], tft.TFTransformOutput(output_dir)


def _feature(example: tf.train.Example, name: str):
    feature = example.features.feature[name]
    values = feature.bytes_list.value or feature.int64_list.value
    assert len(values) == 1
    return values[0]


def _vocab_lines(output: tft.TFTransformOutput) -> list[str]:
    path = output.vocabulary_file_by_name(pp.LABEL_NAMES_VOCAB)
    return pathlib.Path(path).read_text().splitlines()


@pytest.fixture(scope="module")
def raw_run(tmp_path_factory):
    """Integer labels, `filename` keys, names from the config, raw storage at 32x32."""
    labels = [3, 0, 3, 1, 0, 5, 1]
    instances = [
        {"image": FILES[n], "label": lab, "filename": n.encode()}
        for n, lab in zip(NAMES, labels, strict=True)
    ]
    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "filename": tf.io.FixedLenFeature([], tf.string),
    }
    root = tmp_path_factory.mktemp("raw")
    # The class names come from a labels file that Transform itself reads when it runs.
    (root / "labels.txt").write_text("cat\ndog\nbird\n")
    config = {"image_size": 32, "labels_file": str(root / "labels.txt")}
    examples, output = _run_transform(root, instances, spec, config)
    by_key = {_feature(e, pp.KEY_KEY).decode(): e for e in examples}
    return by_key, dict(zip(NAMES, labels, strict=True)), output


def _stored_image(example: tf.train.Example, size: int, fmt: str) -> np.ndarray:
    return pp.decode_stored_image(tf.constant(_feature(example, pp.IMAGE_KEY)), size, fmt).numpy()


@pytest.mark.parametrize("name", ["gray.png", "rgba.png", "anim.gif", "rgb.bmp"])
def test_lossless_formats_match_pil_exactly(raw_run, name):
    by_key, _, _ = raw_run
    np.testing.assert_array_equal(_stored_image(by_key[name], 32, "raw"), _pil_rgb(FILES[name]))


def test_gif_uses_first_frame(raw_run):
    by_key, _, _ = raw_run
    stored = _stored_image(by_key["anim.gif"], 32, "raw")
    second = Image.open(io.BytesIO(FILES["anim.gif"]))
    second.seek(1)
    assert not np.array_equal(stored, np.asarray(second.convert("RGB")))


def test_jpeg_inputs_close_to_pil(raw_run):
    by_key, _, _ = raw_run
    stored = _stored_image(by_key["rgb.jpg"], 32, "raw").astype(int)
    assert np.abs(stored - _pil_rgb(FILES["rgb.jpg"])).max() <= 3


def test_non_square_is_resized_on_short_side_and_center_cropped(raw_run):
    by_key, _, _ = raw_run
    stored = _stored_image(by_key["wide.jpg"], 32, "raw").astype(int)
    reference = _pil_resize_crop(FILES["wide.jpg"], 32).astype(int)
    assert stored.shape == (32, 32, 3)
    assert np.abs(stored - reference).mean() < 1.5
    # A crop off-centre by one column would be far off on the horizontal gradient channel.
    shifted = _pil_resize_crop(FILES["wide.jpg"], 32)[:, 1:, 0].astype(int)
    assert np.abs(stored[:, :-1, 0] - shifted).mean() > np.abs(stored - reference).mean() + 2


def test_raw_storage_is_compact(raw_run):
    by_key, _, _ = raw_run
    raw_pixels = 32 * 32 * 3
    for example in by_key.values():
        assert len(_feature(example, pp.IMAGE_KEY)) >= raw_pixels
        assert len(example.SerializeToString()) < 2 * raw_pixels


def test_integer_labels_pass_through(raw_run):
    by_key, labels, _ = raw_run
    assert {n: _feature(e, pp.LABEL_KEY) for n, e in by_key.items()} == labels


def test_label_names_vocabulary_from_config(raw_run):
    _, _, output = raw_run
    assert sorted(_vocab_lines(output)) == ["0\tcat", "1\tdog", "3\t3", "5\t5"]
    assert pp.read_label_names(output) == ["cat", "dog", "2", "3", "4", "5"]
    assert pp.num_classes(output) == 6


def test_decode_stored_image_in_tf_data(raw_run):
    """Inside tf.data (graph mode), raw storage decodes to the source pixels, statically 32x32."""
    by_key, _, _ = raw_run
    names = ["gray.png", "rgba.png", "anim.gif", "rgb.bmp"]
    blobs = [_feature(by_key[n], pp.IMAGE_KEY) for n in names]
    dataset = tf.data.Dataset.from_tensor_slices(blobs).map(
        lambda s: pp.decode_stored_image(s, 32, "raw")
    )
    assert dataset.element_spec.shape == (32, 32, 3)
    assert dataset.element_spec.dtype == tf.uint8
    for name, image in zip(names, dataset.as_numpy_iterator(), strict=True):
        np.testing.assert_array_equal(image, _pil_rgb(FILES[name]), err_msg=name)


@pytest.fixture(scope="module")
def jpeg_run(tmp_path_factory):
    """String labels given as [batch, 1], no identity feature, JPEG storage at 16x16."""
    labels = ["truck", "airplane", "cat", "airplane", "dog", "cat", "truck"]
    instances = [
        {"image": FILES[n], "label": [lab.encode()]} for n, lab in zip(NAMES, labels, strict=True)
    ]
    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([1], tf.string),
    }
    config = {"image_size": 16, "image_format": "jpeg"}
    examples, output = _run_transform(tmp_path_factory.mktemp("jpeg"), instances, spec, config)
    return examples, labels, output


def test_string_labels_get_sorted_ids(jpeg_run):
    examples, labels, output = jpeg_run
    # Frequency order would put dog last; ids must follow sorted names instead.
    expected = {"airplane": 0, "cat": 1, "dog": 2, "truck": 3}
    assert [_feature(e, pp.LABEL_KEY) for e in examples] == [expected[lab] for lab in labels]
    assert sorted(_vocab_lines(output)) == ["0\tairplane", "1\tcat", "2\tdog", "3\ttruck"]
    assert pp.read_label_names(output) == ["airplane", "cat", "dog", "truck"]
    assert pp.num_classes(output) == 4


def test_key_falls_back_to_image_fingerprint(jpeg_run):
    examples, _, _ = jpeg_run
    for name, example in zip(NAMES, examples, strict=True):
        expected = bytes(tf.fingerprint(tf.constant([FILES[name]]))[0].numpy()).hex()
        assert _feature(example, pp.KEY_KEY).decode() == expected


def test_jpeg_storage_decodes_close_to_reference(jpeg_run):
    """JPEG storage is the whole image with its shorter side scaled (aspect kept), not a crop."""
    examples, _, _ = jpeg_run
    for name, example in zip(NAMES, examples, strict=True):
        assert _feature(example, pp.IMAGE_KEY)[:2] == b"\xff\xd8"  # JPEG start-of-image marker
        stored = _stored_image(example, 16, "jpeg").astype(int)
        reference = _pil_resize(FILES[name], 16).astype(int)
        assert stored.shape == reference.shape, name
        # Colour noise suffers from JPEG chroma subsampling; judge fidelity on natural-like images.
        if name in ("rgb.jpg", "wide.jpg", "gray.png", "tall.png"):
            assert np.abs(stored - reference).mean() < 6, name


def test_jpeg_storage_keeps_aspect_ratio_and_corners(jpeg_run):
    """A wide and a tall image keep their aspect ratio, and every corner of the tall one
    survives: random crops in the Trainer can reach the whole image, as the reference's do."""
    examples, _, _ = jpeg_run
    by_name = dict(zip(NAMES, examples, strict=True))
    assert _stored_image(by_name["wide.jpg"], 16, "jpeg").shape == (16, 20, 3)  # 50x40 source
    tall = _stored_image(by_name["tall.png"], 16, "jpeg").astype(int)
    assert tall.shape == (32, 16, 3)  # 24x48 source
    palette = np.array(CORNER_COLOURS)
    for corner, colour in zip(CORNERS, CORNER_COLOURS, strict=True):
        distances = np.abs(tall[corner] - palette).max(axis=1)
        assert np.argmin(distances) == CORNER_COLOURS.index(colour), corner
        assert distances.min() < 20, corner


@pytest.fixture(scope="module")
def named_run(tmp_path_factory):
    """Sparse `file_name` and `label_name` features, both present in every example."""
    pairs = [("rgb.bmp", 2, "bird"), ("gray.png", 0, "plane"), ("rgba.png", 2, "bird")]
    instances = [
        {
            "image": FILES[n],
            "label": lab,
            "file_name": [b"f/" + n.encode()],
            "label_name": [t.encode()],
        }
        for n, lab, t in pairs
    ]
    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "file_name": tf.io.VarLenFeature(tf.string),
        "label_name": tf.io.VarLenFeature(tf.string),
    }
    config = {"image_size": 8, "label_names": ["x", "y", "z"]}
    examples, output = _run_transform(tmp_path_factory.mktemp("named"), instances, spec, config)
    return examples, pairs, output


def test_file_name_key_and_label_name_feature(named_run):
    examples, pairs, output = named_run
    assert [_feature(e, pp.KEY_KEY).decode() for e in examples] == [f"f/{n}" for n, _, _ in pairs]
    assert [_feature(e, pp.LABEL_KEY) for e in examples] == [lab for _, lab, _ in pairs]
    # 32x32 noise shrunk to 8x8: antialiased bicubic like PIL's, not a plain subsampling.
    stored = _stored_image(examples[0], 8, "raw").astype(int)
    assert np.abs(stored - _pil_resize(FILES["rgb.bmp"], 8)).max() <= 2
    # label_name wins over the configured names.
    assert pp.read_label_names(output) == ["plane", "1", "bird"]


def test_sparse_feature_with_two_values_in_a_row_is_rejected():
    two_in_row = tf.sparse.SparseTensor([[0, 0], [0, 1], [1, 0]], ["a", "b", "c"], [2, 2])
    with pytest.raises(tf.errors.InvalidArgumentError, match="more than one value"):
        pp._as_vector(two_in_row, "filename")
    empty_row = tf.sparse.SparseTensor([[0, 0]], ["a"], [2, 1])
    with pytest.raises(tf.errors.InvalidArgumentError, match="exactly one value"):
        pp._as_vector(empty_row, "filename")


def test_unknown_image_format_is_rejected():
    with pytest.raises(ValueError, match="image_format"):
        pp.decode_stored_image(tf.constant(b""), 8, "png")


def test_jpeg_of_another_stored_size_is_rejected():
    """A Trainer configured with another stored size than Transform used fails with one line."""
    jpeg = tf.io.encode_jpeg(tf.zeros([24, 40, 3], tf.uint8))
    assert pp.decode_stored_image(jpeg, 24, "jpeg").shape == (24, 40, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="shorter side 24, but the stored"):
        pp.decode_stored_image(jpeg, 32, "jpeg")
