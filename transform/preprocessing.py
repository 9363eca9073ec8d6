"""tf.Transform preprocessing: decode images once, store them compactly, make labels ids.

Decoding and resizing arbitrary image files is done once here rather than every training step.
Images are stored either as a serialized uint8 square tensor (smallest decode cost, fine for
small square images such as CIFAR) or as a quality-95 JPEG of the whole image with its shorter
side scaled to the stored size (keeps ImageNet-size datasets small on disk, and lets the
Trainer's random crops and eval centre crop see the whole image, as in the reference).
Random augmentation is deliberately absent: anything applied here would be frozen per example,
while SimCLR needs fresh augmentations at every step.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf
import tensorflow_transform as tft

IMAGE_KEY = "image"
LABEL_KEY = "label"
KEY_KEY = "key"
LABEL_NAMES_VOCAB = "label_names"

IMAGE_FORMATS = ("raw", "jpeg")
JPEG_QUALITY = 95

_LABEL_NAME_FEATURE = "label_name"
# Identity candidates in order of preference; the image fingerprint is the last resort.
_KEY_FEATURES = ("filename", "file_name", "id")
_HEX_DIGITS = tuple("0123456789abcdef")


def _as_vector(tensor: tf.Tensor | tf.SparseTensor, name: str) -> tf.Tensor:
    """Returns a [batch] dense tensor for a feature that has exactly one value per example."""
    if isinstance(tensor, tf.SparseTensor):
        rows, cols = tensor.dense_shape[0], tensor.dense_shape[1]
        # At most one column and as many values as rows means exactly one value in every row.
        checks = [
            tf.debugging.assert_less_equal(
                cols, tf.constant(1, tf.int64), message=f"{name}: more than one value in a row"
            ),
            tf.debugging.assert_equal(
                tf.size(tensor.values, out_type=tf.int64),
                rows,
                message=f"{name}: every example needs exactly one value",
            ),
        ]
        with tf.control_dependencies(checks):
            return tf.reshape(tf.sparse.to_dense(tensor), [rows])
    return tf.reshape(tensor, [tf.shape(tensor)[0]])


def _resize_shorter_side(image: tf.Tensor, size: int) -> tf.Tensor:
    """Scales uint8 [H, W, 3] so that its shorter side is `size`, keeping the aspect ratio."""
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    shorter = tf.minimum(height, width)

    def resize() -> tf.Tensor:
        scale = size / tf.cast(shorter, tf.float64)
        new_height = tf.maximum(
            size, tf.cast(tf.round(tf.cast(height, tf.float64) * scale), tf.int32)
        )
        new_width = tf.maximum(
            size, tf.cast(tf.round(tf.cast(width, tf.float64) * scale), tf.int32)
        )
        # Antialiasing matters when shrinking large photos; bicubic may overshoot, hence the clip.
        resized = tf.image.resize(image, [new_height, new_width], method="bicubic", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)

    return tf.cond(tf.equal(shorter, size), lambda: image, resize)


def _center_square(image: tf.Tensor, size: int) -> tf.Tensor:
    """The centred size x size window of an image whose shorter side is `size`."""
    top = (tf.shape(image)[0] - size) // 2
    left = (tf.shape(image)[1] - size) // 2
    return tf.ensure_shape(image[top : top + size, left : left + size, :], [size, size, 3])


def _store_image(image: tf.Tensor, image_size: int, image_format: str) -> tf.Tensor:
    """uint8 [H, W, 3] -> the stored scalar string (see `decode_stored_image`).

    'raw' keeps a fixed image_size² square (shorter side scaled, centre cropped): small images
    such as CIFAR are square already, and a fixed shape is the cheapest to decode. 'jpeg' keeps
    the whole image with its shorter side scaled to image_size, so the Trainer's random crops
    can reach every part of a non-square photo, as when cropping from the original file.
    """
    image = _resize_shorter_side(image, image_size)
    if image_format == "jpeg":
        return tf.io.encode_jpeg(image, quality=JPEG_QUALITY)
    return tf.io.serialize_tensor(_center_square(image, image_size))


def _encode_images(encoded: tf.Tensor, image_size: int, image_format: str) -> tf.Tensor:
    """Decodes a batch of JPEG/PNG/GIF/BMP files to RGB and stores each with `_store_image`."""

    def one(data: tf.Tensor) -> tf.Tensor:
        image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
        return _store_image(image, image_size, image_format)

    return tf.map_fn(one, encoded, fn_output_signature=tf.TensorSpec([], tf.string))


def decode_stored_image(serialized: tf.Tensor, image_size: int, image_format: str) -> tf.Tensor:
    """Inverse of the stored encoding: a scalar string -> uint8 RGB image.

    'raw' gives [image_size, image_size, 3]; 'jpeg' gives [H, W, 3] with min(H, W) == image_size
    and the source's aspect ratio. A JPEG of another shorter side means the Trainer was given
    another stored size than Transform used, and fails with one line.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if image_format == "raw":
        image = tf.io.parse_tensor(serialized, out_type=tf.uint8)
        return tf.ensure_shape(image, [image_size, image_size, 3])
    # The accurate integer IDCT (libjpeg's default, as PIL decodes): TensorFlow's default fast
    # IDCT adds errors of several levels to the quality-95 pixels.
    image = tf.io.decode_jpeg(serialized, channels=3, dct_method="INTEGER_ACCURATE")
    shorter = tf.reduce_min(tf.shape(image)[:2])
    message = tf.strings.format(
        "stored JPEG has shorter side {}, but the stored image size is " + str(image_size),
        shorter,
    )
    check = tf.debugging.Assert(tf.equal(shorter, image_size), [message])
    with tf.control_dependencies([check]):
        image = tf.identity(image)
    return tf.ensure_shape(image, [None, None, 3])


def _hex_fingerprint(data: tf.Tensor) -> tf.Tensor:
    """16-character lowercase hex of the 64-bit fingerprint of each string."""
    fingerprint = tf.cast(tf.fingerprint(data), tf.int32)  # [batch, 8] bytes
    nibbles = tf.stack([fingerprint // 16, fingerprint % 16], axis=-1)
    digits = tf.gather(tf.constant(_HEX_DIGITS), tf.reshape(nibbles, [-1, 16]))
    return tf.strings.reduce_join(digits, axis=-1)


def _example_key(inputs: Mapping[str, Any], encoded_images: tf.Tensor) -> tf.Tensor:
    for feature in _KEY_FEATURES:
        if feature in inputs:
            key = _as_vector(inputs[feature], feature)
            return key if key.dtype == tf.string else tf.strings.as_string(key)
    return _hex_fingerprint(encoded_images)


def _sorted_class_ids(names: tf.Tensor) -> tf.Tensor:
    """Maps class names to their rank among all class names of the analyzed data, sorted bytewise.

    tft vocabularies only order by frequency, so ids would depend on class counts. Instead the
    distinct names are collected by an analyzer and sorted with a set operation (its output is
    sorted), which reproduces the usual "sorted class folder names" numbering. Names unseen
    during analysis map to -1.
    """
    distinct, _ = tft.count_per_key(names, name="class_names")
    vocabulary = tf.sets.union(distinct[tf.newaxis], distinct[tf.newaxis]).values
    matches = tf.equal(names[:, tf.newaxis], vocabulary[tf.newaxis, :])
    found = tf.reduce_any(matches, axis=1)
    return tf.where(found, tf.argmax(tf.cast(matches, tf.int32), axis=1), tf.constant(-1, tf.int64))


def _configured_names(ids: tf.Tensor, label_names: Sequence[str]) -> tf.Tensor:
    """Looks ids up in a configured name list; ids outside it are named by their number."""
    if not label_names:
        return tf.strings.as_string(ids)
    table = tf.constant(list(label_names), tf.string)
    in_range = tf.logical_and(ids >= 0, ids < len(label_names))
    looked_up = tf.gather(table, tf.clip_by_value(ids, 0, len(label_names) - 1))
    return tf.where(in_range, looked_up, tf.strings.as_string(ids))


def _label_names(custom_config: dict) -> list[str]:
    if custom_config.get("labels_file"):
        with tf.io.gfile.GFile(custom_config["labels_file"]) as f:
            return [line.strip() for line in f if line.strip()]
    return list(custom_config.get("label_names") or ())


def preprocessing_fn(inputs: dict, custom_config: dict) -> dict:
    """Decodes and stores images, assigns integer labels and emits the id->name vocabulary.

    custom_config: `image_size` (stored size: the square's side for 'raw', the shorter side for
    'jpeg'), `image_format` ('raw' or 'jpeg', default 'raw'), optional `label_names` or
    `labels_file` (names for integer ids when the data carries none; the file, one name a line,
    is read here, when Transform runs, so compiling a pipeline reads nothing from storage).
    """
    image_size = int(custom_config["image_size"])
    image_format = custom_config.get("image_format", "raw")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")

    encoded = _as_vector(inputs[IMAGE_KEY], IMAGE_KEY)
    raw_label = _as_vector(inputs[LABEL_KEY], LABEL_KEY)
    if raw_label.dtype == tf.string:
        label = _sorted_class_ids(raw_label)
        names = raw_label
    elif raw_label.dtype.is_integer:
        label = tf.cast(raw_label, tf.int64)
        names = _configured_names(label, _label_names(custom_config))
    else:
        raise TypeError(f"label must be an integer id or a string name, got {raw_label.dtype}")
    if _LABEL_NAME_FEATURE in inputs:
        names = _as_vector(inputs[_LABEL_NAME_FEATURE], _LABEL_NAME_FEATURE)

    # Written as a side output; the Trainer reads it to name classes at serving time.
    id_name_pairs = tf.strings.join([tf.strings.as_string(label), names], separator="\t")
    tft.vocabulary(id_name_pairs, vocab_filename=LABEL_NAMES_VOCAB, name=LABEL_NAMES_VOCAB)

    return {
        IMAGE_KEY: _encode_images(encoded, image_size, image_format),
        LABEL_KEY: label,
        KEY_KEY: _example_key(inputs, encoded),
    }


def read_label_names(tf_transform_output: tft.TFTransformOutput) -> list[str]:
    """Class names indexed by id; ids never seen are named by their number.

    The vocabulary lists the most frequent pair first, so if an id was seen with several names,
    its most frequent name wins.
    """
    names: dict[int, str] = {}
    for entry in tf_transform_output.vocabulary_by_name(LABEL_NAMES_VOCAB):
        text = entry.decode("utf-8") if isinstance(entry, bytes) else str(entry)
        class_id, _, name = text.partition("\t")
        index = int(class_id)
        if index >= 0:
            names.setdefault(index, name)
    size = max(names) + 1 if names else 0
    return [names.get(index, str(index)) for index in range(size)]


def num_classes(tf_transform_output: tft.TFTransformOutput) -> int:
    """Largest class id seen during analysis plus one."""
    return len(read_label_names(tf_transform_output))
