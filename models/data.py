"""tf.data input pipelines over Transform's output: decode, augment per step, batch, prefetch.

Augmentation lives here, not in Transform, so every step sees fresh random views.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from models import augment
from models.config import UNLABELED_SPLIT
from transform import preprocessing as tp

AUTOTUNE = tf.data.AUTOTUNE


@dataclass(frozen=True)
class ImageSpec:
    """How images are stored by Transform and what size the model sees.

    `stored_size` is the side of the stored square for 'raw' and the shorter side of the
    stored (aspect-preserving) image for 'jpeg'; see `transform.preprocessing`.
    """

    stored_size: int
    image_format: str
    image_size: int


# The training shuffle holds the whole split when its files are at most this large (CIFAR-10's
# transformed train split: 137 MB), else a window of WINDOW_SHUFFLE_RECORDS records.
FULL_SHUFFLE_BYTES = 256 * 2**20
WINDOW_SHUFFLE_RECORDS = 10_000


def _file_list(files: Sequence[str] | str) -> list[str]:
    pattern = [files] if isinstance(files, str) else list(files)
    file_list = sorted({f for p in pattern for f in tf.io.gfile.glob(p)})
    if not file_list:
        raise ValueError(f"no transformed examples found at {pattern}")
    return file_list


def shuffle_buffer_size(size_bytes: int, num_records: int) -> int:
    """Records the training shuffle holds, for a split of `size_bytes` (`split_bytes`).

    A window smaller than the split only mixes neighbouring records, so a split stored in class
    order (one class folder after another, or hand-made TFRecords) would give batches of two or
    three classes: supervised training then chases the latest classes and contrastive negatives
    come from the positive's own class. Small splits are therefore shuffled whole; large ones
    rely on the ingestion writing records in a seeded random order.
    """
    if size_bytes <= FULL_SHUFFLE_BYTES:
        return max(1, num_records)
    return max(1, min(num_records, WINDOW_SHUFFLE_RECORDS))


def split_bytes(files: Sequence[str] | str) -> int:
    """Bytes of a split's (compressed) transformed record files."""
    return sum(tf.io.gfile.stat(f).length for f in _file_list(files))


def _record_dataset(files: Sequence[str] | str, shuffle: bool, seed: int) -> tf.data.Dataset:
    file_list = _file_list(files)
    ds = tf.data.Dataset.from_tensor_slices(file_list)
    if shuffle:
        ds = ds.shuffle(len(file_list), seed=seed, reshuffle_each_iteration=True)
    return ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP"),
        cycle_length=min(8, len(file_list)),
        num_parallel_calls=AUTOTUNE,
        deterministic=True,
    )


def _parse(spec: ImageSpec) -> Callable:
    features = {
        tp.IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
        tp.LABEL_KEY: tf.io.FixedLenFeature([], tf.int64),
        tp.KEY_KEY: tf.io.FixedLenFeature([], tf.string),
    }

    def parse(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        ex = tf.io.parse_single_example(serialized, features)
        image = tp.decode_stored_image(ex[tp.IMAGE_KEY], spec.stored_size, spec.image_format)
        return {"image": image, "label": ex[tp.LABEL_KEY], "key": ex[tp.KEY_KEY]}

    return parse


def read_labels_and_keys(files: Sequence[str] | str) -> tuple[np.ndarray, np.ndarray]:
    """All (label, key) pairs of a split, without decoding images: counts and label fractions."""
    features = {
        tp.LABEL_KEY: tf.io.FixedLenFeature([], tf.int64),
        tp.KEY_KEY: tf.io.FixedLenFeature([], tf.string),
    }
    ds = (
        _record_dataset(files, shuffle=False, seed=0)
        .batch(4096)
        .map(lambda s: tf.io.parse_example(s, features), num_parallel_calls=AUTOTUNE)
    )
    labels, keys = [], []
    for batch in ds.as_numpy_iterator():
        labels.append(batch[tp.LABEL_KEY])
        keys.append(batch[tp.KEY_KEY])
    if not labels:
        return np.zeros([0], np.int64), np.zeros([0], object)
    return np.concatenate(labels), np.concatenate(keys)


def select_label_fraction(
    labels: np.ndarray, keys: np.ndarray, fraction: float, seed: int
) -> np.ndarray:
    """Keys of a stratified, seeded subset: round(fraction * n_c) (at least 1) per class c.

    The order within a class comes from a hash of (seed, key), so the subset depends only on
    the data and the seed, not on file order or the number of workers.
    """
    if fraction >= 1.0:
        return keys
    chosen = []
    for label in np.unique(labels):
        class_keys = keys[labels == label]
        ranked = sorted(
            class_keys,
            key=lambda k: hashlib.sha256(f"{seed}:".encode() + bytes(k)).hexdigest(),
        )
        count = max(1, int(round(fraction * len(class_keys))))
        chosen.extend(ranked[:count])
    return np.array(chosen, dtype=object)


def select_listed(keys: np.ndarray, list_file: str) -> np.ndarray:
    """Keys whose base name is listed in `list_file` (one file name a line; local or gs://).

    Keys are paths relative to the split folder (`n01440764/n01440764_10026.JPEG`) or TFDS
    file names (`n01440764_10026.JPEG`); the published ImageNet subset lists hold base names.
    """
    with tf.io.gfile.GFile(list_file) as f:
        listed = {line.strip() for line in f.read().splitlines() if line.strip()}
    if not listed:
        raise ValueError(f"--label_subset: {list_file} lists no files")
    chosen = [k for k in keys if bytes(k).decode().rsplit("/", 1)[-1] in listed]
    if not chosen:
        raise ValueError(
            f"--label_subset: none of the {len(listed)} files listed in {list_file} is in the "
            f"training split ({len(keys)} examples)"
        )
    return np.array(chosen, dtype=object)


def _membership(keys: np.ndarray) -> Callable[[dict], tf.Tensor]:
    """Predicate on a parsed example: is its key one of `keys`?"""
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(list(keys), tf.string), tf.ones([len(keys)], tf.int64)
        ),
        default_value=0,
    )
    return lambda ex: tf.equal(table.lookup(ex["key"]), 1)


def train_dataset(
    files: Sequence[str] | str,
    spec: ImageSpec,
    batch_size: int,
    *,
    contrastive: bool,
    color_jitter_strength: float,
    color_jitter_impl: str,
    use_blur: bool,
    seed: int,
    skip_examples: int = 0,
    keep_keys: np.ndarray | None = None,
    labeled_keys: np.ndarray | None = None,
    cache: bool = False,
    shard: tuple[int, int] = (1, 0),
    shuffle_buffer: int = WINDOW_SHUFFLE_RECORDS,
) -> tf.data.Dataset:
    """Endless shuffled batches for one replica.

    contrastive=True yields (view1, view2, label) with two independent SimCLR views; otherwise
    (image, label) with crop+flip only, as the reference fine-tunes. Random crops are drawn from
    the whole stored image (for 'jpeg' storage, the full non-square image). `skip_examples`
    resumes the deterministic record order after a restart without decoding the skipped records.
    `keep_keys` drops every other example; `labeled_keys` keeps them all but sets label -1
    outside the set (distillation's unlabeled images). `shard` is (number of input pipelines,
    this pipeline's index) for multi-worker training. `shuffle_buffer`: see
    `shuffle_buffer_size`.
    """
    ds = _record_dataset(files, shuffle=True, seed=seed)
    if shard[0] > 1:
        ds = ds.shard(*shard)
    if keep_keys is not None:
        # Before the shuffle and the cache, and before decoding any image: a 1% subset picked
        # out of the shuffled whole split read 100 records for every one trained on, at every
        # step; filtered first (and cached, when `cache`), the subset is read from the files once.
        is_kept = _membership(keep_keys)
        key_only = {tp.KEY_KEY: tf.io.FixedLenFeature([], tf.string)}
        ds = ds.filter(
            lambda s: is_kept({"key": tf.io.parse_single_example(s, key_only)[tp.KEY_KEY]})
        )
        shuffle_buffer = max(1, min(shuffle_buffer, len(keep_keys)))
    if cache:
        ds = ds.cache()
    # Skip counts consumed (kept) examples of this seeded order, so a resumed run goes on.
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    if skip_examples:
        ds = ds.skip(skip_examples)
    ds = ds.map(_parse(spec), num_parallel_calls=AUTOTUNE)
    if labeled_keys is not None:
        is_labeled = _membership(labeled_keys)
        ds = ds.map(
            lambda ex: {
                **ex,
                "label": tf.where(is_labeled(ex), ex["label"], tf.constant(-1, tf.int64)),
            },
            num_parallel_calls=AUTOTUNE,
        )

    def view(image: tf.Tensor) -> tf.Tensor:
        return augment.preprocess_for_train(
            image,
            spec.image_size,
            color_distort=contrastive,
            color_jitter_strength=color_jitter_strength,
            color_jitter_impl=color_jitter_impl,
            use_blur=use_blur and contrastive,
        )

    if contrastive:
        ds = ds.map(
            lambda ex: (view(ex["image"]), view(ex["image"]), ex["label"]),
            num_parallel_calls=AUTOTUNE,
        )
    else:
        ds = ds.map(lambda ex: (view(ex["image"]), ex["label"]), num_parallel_calls=AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)


def eval_image(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """The deterministic view evaluated and served: float32 [image_size, image_size, 3] in [0, 1].

    Above 32 px, the reference's centre crop (`augment.CROP_PROPORTION` of the shorter side) of
    the whole stored image, resized. At 32 px and below the reference crops nothing; a non-square
    input (a JPEG-stored small dataset) is then cut to its centred square first so that the
    resize does not squash it.
    """
    if image_size <= augment.EVAL_CROP_MIN_SIZE:
        shape = tf.shape(image)
        side = tf.minimum(shape[0], shape[1])
        # Same rounding of odd margins as augment.center_crop_and_resize.
        image = tf.image.crop_to_bounding_box(
            image, (shape[0] - side + 1) // 2, (shape[1] - side + 1) // 2, side, side
        )
    return augment.preprocess_for_eval(image, image_size)


def eval_dataset(files: Sequence[str] | str, spec: ImageSpec, batch_size: int) -> tf.data.Dataset:
    """One pass over a split in file order, preprocessed by `eval_image` as at serving time."""
    ds = _record_dataset(files, shuffle=False, seed=0).map(
        _parse(spec), num_parallel_calls=AUTOTUNE
    )
    ds = ds.map(
        lambda ex: (eval_image(ex["image"], spec.image_size), ex["label"]),
        num_parallel_calls=AUTOTUNE,
    )
    return ds.batch(batch_size).prefetch(AUTOTUNE)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Steps between epoch-based checkpoints, rounded as the reference rounds them."""
    return max(1, int(round(num_examples / batch_size)))


# ----- the unlabeled pool (the ExampleGen split 'unlabeled', label -1 on every record) -----


def split_name(pattern: str) -> str:
    """The split of a TFX split file pattern `<artifact uri>/Split-<name>/*`."""
    folder = posixpath.basename(posixpath.dirname(pattern.rstrip("/")))
    return folder.removeprefix("Split-") if folder.startswith("Split-") else ""


def labeled_split_files(files: Sequence[str]) -> list[str]:
    """`files` without the unlabeled pool's: what a labeled-only reader (the kNN bank) reads."""
    return [f for f in files if split_name(f) != UNLABELED_SPLIT]


def pool_files_beside(files: Sequence[str]) -> list[str]:
    """The unlabeled split's file patterns in the artifacts `files` come from (those present).

    Fine-tuning reads only the labeled train split, yet its semi-supervised recipe needs the
    size of everything pretraining read, pool included.
    """
    out = []
    for f in files:
        artifact = posixpath.dirname(posixpath.dirname(f.rstrip("/")))
        pattern = posixpath.join(artifact, f"Split-{UNLABELED_SPLIT}", posixpath.basename(f))
        if split_name(f) and pattern not in out and tf.io.gfile.glob(pattern):
            out.append(pattern)
    return out


def count_records(files: Sequence[str] | str) -> int:
    """Records in GZIP TFRecord files, without parsing them."""
    ds = _record_dataset(files, shuffle=False, seed=0)
    return int(ds.reduce(np.int64(0), lambda count, _: count + 1).numpy())
