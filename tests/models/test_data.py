"""Input pipelines over a real (tiny) Transform output and over hand-made stored images:
subsets, order, coverage, and the pixel values of training and evaluation views."""

from __future__ import annotations

import collections
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from models import data as data_lib
from tests.models import fixtures
from tests.models import image_reference as ref
from transform import preprocessing as tp

SPEC = data_lib.ImageSpec(stored_size=32, image_format="raw", image_size=32)


def _train(transformed, batch_size: int, *, contrastive: bool, **kwargs) -> tf.data.Dataset:
    return data_lib.train_dataset(
        transformed.train_files,
        SPEC,
        batch_size,
        contrastive=contrastive,
        color_jitter_strength=0.5,
        color_jitter_impl="v2",
        use_blur=False,
        seed=kwargs.pop("seed", 3),
        **kwargs,
    )


def _label_sequence(dataset: tf.data.Dataset, batches: int) -> list[int]:
    return [int(x) for _, labels in dataset.take(batches) for x in labels.numpy()]


# ----- select_label_fraction -----


def _synthetic(sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    labels = np.concatenate([np.full(n, c, np.int64) for c, n in enumerate(sizes)])
    keys = np.array([f"img-{i:05d}".encode() for i in range(len(labels))], dtype=object)
    return labels, keys


def test_label_fraction_is_stratified_with_at_least_one_per_class():
    sizes = [50, 23, 7, 1, 2, 130]
    labels, keys = _synthetic(sizes)
    chosen = data_lib.select_label_fraction(labels, keys, 0.1, seed=0)
    label_of = dict(zip(keys, labels, strict=True))
    counts = collections.Counter(int(label_of[k]) for k in chosen)
    assert dict(counts) == {0: 5, 1: 2, 2: 1, 3: 1, 4: 1, 5: 13}
    assert len(set(chosen)) == len(chosen)


def test_label_fraction_is_seeded_and_independent_of_input_order():
    labels, keys = _synthetic([40, 60, 25])
    first = data_lib.select_label_fraction(labels, keys, 0.2, seed=5)
    again = data_lib.select_label_fraction(labels, keys, 0.2, seed=5)
    other = data_lib.select_label_fraction(labels, keys, 0.2, seed=6)
    perm = np.random.default_rng(0).permutation(len(keys))
    shuffled = data_lib.select_label_fraction(labels[perm], keys[perm], 0.2, seed=5)
    assert list(first) == list(again)
    assert sorted(first) == sorted(shuffled)
    assert sorted(first) != sorted(other)
    assert len(other) == len(first) == 8 + 12 + 5


def test_full_label_fraction_keeps_every_key():
    labels, keys = _synthetic([3, 4])
    assert list(data_lib.select_label_fraction(labels, keys, 1.0, seed=0)) == list(keys)


# ----- reading a Transform output -----


def test_read_labels_and_keys_counts(transformed):
    labels, keys = data_lib.read_labels_and_keys(transformed.train_files)
    assert len(labels) == len(keys) == 10 * fixtures.TRAIN_PER_CLASS
    assert sorted(zip(keys, labels, strict=True)) == sorted(
        zip(transformed.train_keys, transformed.train_labels, strict=True)
    )
    eval_labels, _ = data_lib.read_labels_and_keys(transformed.eval_files)
    assert collections.Counter(eval_labels.tolist()) == collections.Counter(transformed.eval_labels)


def test_contrastive_batches_have_two_different_views(transformed):
    ds = _train(transformed, 8, contrastive=True)
    view1_spec, view2_spec, label_spec = ds.element_spec
    # drop_remainder gives every batch a static, full batch dimension.
    assert view1_spec.shape == view2_spec.shape == (8, 32, 32, 3)
    assert label_spec.shape == (8,)
    for view1, view2, labels in ds.take(3):
        for view in (view1, view2):
            assert view.dtype == tf.float32
            assert 0.0 <= float(tf.reduce_min(view)) and float(tf.reduce_max(view)) <= 1.0
        assert labels.dtype == tf.int64
        assert set(labels.numpy()) <= set(range(10))
        per_image_diff = tf.reduce_mean(tf.abs(view1 - view2), axis=[1, 2, 3]).numpy()
        assert (per_image_diff > 1e-3).all()


def test_finetune_batches_never_come_short(transformed):
    """A short last batch would change the per-replica batch (and the compiled step) on TPUs."""
    ds = _train(transformed, 12, contrastive=False)
    image_spec, label_spec = ds.element_spec
    assert image_spec.shape == (12, 32, 32, 3) and label_spec.shape == (12,)
    # 80 examples are not a multiple of 12: batches still never come short, across epochs.
    seen = collections.Counter()
    for images, labels in ds.take(15):
        assert images.shape == (12, 32, 32, 3) and labels.shape == (12,)
        seen.update(labels.numpy().tolist())
    # 180 draws over 2+ epochs of 8 examples per class: every class comes back.
    assert set(seen) == set(range(10))


def test_keep_keys_yields_only_kept_examples(transformed):
    keys = np.array(transformed.train_keys, dtype=object)
    labels = np.array(transformed.train_labels)
    kept = np.concatenate([keys[labels == 2][:3], keys[labels == 7][:1]])
    ds = _train(transformed, 4, contrastive=False, keep_keys=kept)
    # Shuffling happens before repeat, so every 4 consecutive kept records form one epoch.
    for _, batch_labels in ds.take(5):
        assert sorted(batch_labels.numpy().tolist()) == [2, 2, 2, 7]


@pytest.mark.parametrize("keep", [False, True])
def test_skip_examples_continues_the_same_record_order(transformed, keep):
    keys = np.array(transformed.train_keys, dtype=object)
    keep_keys = keys[::3] if keep else None
    kwargs = {"contrastive": False, "keep_keys": keep_keys}
    full = _label_sequence(_train(transformed, 1, **kwargs), 70)
    skipped = _label_sequence(_train(transformed, 1, skip_examples=23, **kwargs), 47)
    assert skipped == full[23:]
    # The order is a property of the seed, not a fixed file order.
    other_seed = _label_sequence(_train(transformed, 1, seed=4, **kwargs), 70)
    assert other_seed != full


def test_eval_dataset_covers_every_example_once(transformed):
    ds = data_lib.eval_dataset(transformed.eval_files, SPEC, batch_size=7)
    sizes, labels = [], []
    for images, batch_labels in ds:
        assert images.shape[1:] == (32, 32, 3) and images.dtype == tf.float32
        sizes.append(int(images.shape[0]))
        labels.extend(batch_labels.numpy().tolist())
    total = 10 * fixtures.EVAL_PER_CLASS
    assert sizes == [7] * (total // 7) + [total % 7]
    assert collections.Counter(labels) == collections.Counter(transformed.eval_labels)
    assert sum(sizes) == total
    # Same images as decoding the stored pixels directly (no crop at 32x32).
    first_images = next(iter(ds))[0].numpy()
    record = next(
        iter(
            tf.data.TFRecordDataset(
                tf.io.gfile.glob(transformed.eval_files[0]), compression_type="GZIP"
            )
        )
    )
    stored = tf.io.parse_single_example(record, {"image": tf.io.FixedLenFeature([], tf.string)})[
        "image"
    ]
    pixels = tf.io.parse_tensor(stored, tf.uint8).numpy()
    np.testing.assert_allclose(first_images[0], pixels / 255.0, atol=1e-6)


# ----- pixel values of training and evaluation views -----


def _write_stored(path: pathlib.Path, stored: list[bytes], labels: list[int] | None = None) -> str:
    """Transformed examples as Transform writes them (stored image, label, key), GZIP; the
    labels default to each record's index."""
    labels = list(range(len(stored))) if labels is None else labels
    with tf.io.TFRecordWriter(str(path), options="GZIP") as writer:
        for i, (blob, label) in enumerate(zip(stored, labels, strict=True)):
            feature = {
                tp.IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[blob])),
                tp.LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                tp.KEY_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"k%d" % i])),
            }
            example = tf.train.Example(features=tf.train.Features(feature=feature))
            writer.write(example.SerializeToString())
    return str(path)


def _store(image: np.ndarray, stored_size: int, image_format: str) -> bytes:
    """What Transform stores for a (lossless PNG) file holding `image`."""
    png = tf.io.encode_png(tf.constant(image))
    return tp._encode_images(png[tf.newaxis], stored_size, image_format).numpy()[0]


def _coordinate_image(size: int) -> np.ndarray:
    """R = 20 + 5x and G = 20 + 5y encode each pixel's position, so a view's crop box can be read
    back; B is a 2-px checkerboard that any blur smears. Values stay well inside (0, 255), so
    bicubic overshoot is never clipped."""
    y, x = np.mgrid[0:size, 0:size]
    checker = 60 + 130 * ((x // 2 + y // 2) % 2)
    return np.stack([20 + 5 * x, 20 + 5 * y, checker], axis=-1).astype(np.uint8)


def _locate(profile: np.ndarray, source: np.ndarray) -> tuple[int, int]:
    """(offset, length) of the window of the 1-D `source` whose bicubic resize to len(profile)
    is closest to `profile`, found by trying every window."""
    best = (np.inf, 0, 0)
    for length in range(1, len(source) + 1):
        windows = np.lib.stride_tricks.sliding_window_view(source, length)
        errors = np.abs(windows @ ref.bicubic_matrix(length, len(profile)).T - profile).max(1)
        i = int(np.argmin(errors))
        if errors[i] < best[0]:
            best = (errors[i], i, length)
    return best[1], best[2]


def _explain_view(view: np.ndarray, source: np.ndarray) -> tuple[bool, tuple, float]:
    """Reads the crop box and flip of a view of `_coordinate_image` from its R and G channels and
    returns (flipped, box, largest difference from the NumPy crop + resize of that box)."""
    flipped = bool(view[0, 0, 0] > view[0, -1, 0])
    if flipped:
        view = view[:, ::-1]
    height, width = view.shape[:2]
    left, crop_width = _locate(view[height // 2, :, 0], source[0, :, 0] / 255.0)
    top, crop_height = _locate(view[:, width // 2, 1], source[:, 0, 1] / 255.0)
    window = source[top : top + crop_height, left : left + crop_width] / 255.0
    error = float(np.abs(view - ref.resize(window, height, width)).max())
    return flipped, (top, left, crop_height, crop_width), error


def test_finetune_views_are_crops_without_colour_distortion_or_blur(tmp_path):
    """Fine-tuning views are random crop + bicubic resize + flip and nothing else, as in the
    reference, even when colour jitter and blur are configured for pretraining: each view must
    equal the NumPy crop + resize of some window of the stored image, possibly mirrored."""
    source = _coordinate_image(40)
    files = _write_stored(tmp_path / "t.gz", [_store(source, 40, "raw")] * 4)
    spec = data_lib.ImageSpec(stored_size=40, image_format="raw", image_size=32)

    def views(contrastive: bool, batches: int) -> np.ndarray:
        ds = data_lib.train_dataset(
            files,
            spec,
            16,
            contrastive=contrastive,
            color_jitter_strength=1.0,
            color_jitter_impl="v2",
            use_blur=True,
            seed=0,
        )
        return np.concatenate([v.numpy() for b in ds.take(batches) for v in b[:-1]])

    explained = [_explain_view(v, source) for v in views(contrastive=False, batches=3)]
    assert max(error for _, _, error in explained) < 2e-3
    # Random crops and flips are really drawn: many boxes, both orientations.
    assert {flipped for flipped, _, _ in explained} == {False, True}
    assert len({box for _, box, _ in explained}) >= 10
    # The same check rejects pretraining views: colour jitter (p=0.8), grayscale (p=0.2) and
    # blur (p=0.5) leave few of them pure crops.
    pretrain = [_explain_view(v, source)[2] < 2e-3 for v in views(contrastive=True, batches=1)]
    assert np.mean(pretrain) < 0.5


_CORNER_COLOURS = {
    "top left": (230, 30, 30),
    "top right": (30, 230, 30),
    "bottom left": (30, 30, 230),
    "bottom right": (230, 230, 30),
}


def _cornered_image(height: int, width: int) -> np.ndarray:
    """Grey, with a distinctly coloured patch of 1/8 x 1/8 of the image in each corner."""
    image = np.full([height, width, 3], 128, np.uint8)
    ph, pw = height // 8, width // 8
    corners = [np.s_[:ph, :pw], np.s_[:ph, -pw:], np.s_[-ph:, :pw], np.s_[-ph:, -pw:]]
    for corner, colour in zip(corners, _CORNER_COLOURS.values(), strict=True):
        image[corner] = colour
    return image


def _shows(images: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Per image: does it hold at least 4 pixels of `colour` (JPEG and resampling tolerated)?"""
    near = np.abs(images - np.array(colour) / 255.0).max(axis=-1) < 0.12
    return near.sum(axis=(-2, -1)) >= 4


def test_training_crops_reach_every_corner_of_a_non_square_image(tmp_path):
    """JPEG storage keeps the whole image (shorter side scaled), so the training crops (the same
    for pretraining and fine-tuning) can show each corner of a non-square photo, as the
    reference's crops of the original file do. A centre-square storage cuts those corners off."""
    stored = _store(_cornered_image(96, 160), 64, "jpeg")
    pixels = ref.decode(stored) / 255.0
    assert pixels.shape == (64, 107, 3)
    centre = pixels[:, (107 - 64) // 2 :][:, :64]
    assert not any(_shows(centre, colour) for colour in _CORNER_COLOURS.values())

    files = _write_stored(tmp_path / "t.gz", [stored] * 4)
    spec = data_lib.ImageSpec(stored_size=64, image_format="jpeg", image_size=32)
    ds = data_lib.train_dataset(
        files,
        spec,
        64,
        contrastive=False,
        color_jitter_strength=1.0,
        color_jitter_impl="v2",
        use_blur=False,
        seed=0,
    )
    views = np.concatenate([images.numpy() for images, _ in ds.take(4)])
    for name, colour in _CORNER_COLOURS.items():
        assert _shows(views, colour).any(), f"no crop reached the {name} corner"


def _eval_reference(pixels: np.ndarray, image_size: int) -> np.ndarray:
    """The reference's eval view: above 32 px the centred square of 0.875 of the shorter side,
    else the whole centred square; then a bicubic resize to image_size."""
    window = ref.center_crop(pixels / 255.0, 0.875 if image_size > 32 else 1.0)
    return ref.resize(window, image_size, image_size)


@pytest.mark.parametrize(
    "image_format,source_hw,stored_size,image_size",
    [
        ("raw", (40, 40), 40, 32),  # CIFAR-style square stored larger than the model input
        ("jpeg", (64, 96), 64, 48),  # wide: centre crop of the whole image, then downscale
        ("jpeg", (64, 96), 64, 56),  # centre crop without resize: exact window placement
        ("jpeg", (48, 32), 32, 32),  # tall and small: centred square, not a squash
    ],
)
def test_eval_pixels_of_an_image_of_another_size(
    tmp_path, image_format, source_hw, stored_size, image_size
):
    """Evaluation (and serving, which shares `eval_image`) sees the reference's centre crop of
    the whole stored image; the values are compared with a NumPy crop + bicubic resize."""
    source = np.random.default_rng(0).integers(0, 256, [*source_hw, 3], dtype=np.uint8)
    stored = _store(source, stored_size, image_format)
    pixels = source if image_format == "raw" else ref.decode(stored)
    assert pixels.shape == (*source_hw, 3)
    spec = data_lib.ImageSpec(stored_size, image_format, image_size)
    images, labels = next(
        iter(data_lib.eval_dataset(_write_stored(tmp_path / "e.gz", [stored]), spec, 4))
    )
    assert labels.numpy().tolist() == [0]
    expected = np.clip(_eval_reference(pixels, image_size), 0.0, 1.0)
    np.testing.assert_allclose(images.numpy()[0], expected, atol=2e-3)


def test_eval_rejects_a_stored_size_other_than_transforms(tmp_path):
    stored = _store(np.zeros([64, 96, 3], np.uint8), 64, "jpeg")
    spec = data_lib.ImageSpec(stored_size=48, image_format="jpeg", image_size=32)
    files = _write_stored(tmp_path / "e.gz", [stored])
    with pytest.raises(tf.errors.InvalidArgumentError, match="shorter side 64, but the stored"):
        next(iter(data_lib.eval_dataset(files, spec, 1)))


def test_steps_per_epoch_floors_but_is_at_least_one():
    assert data_lib.steps_per_epoch(80, 16) == 5
    assert data_lib.steps_per_epoch(81, 16) == 5
    assert data_lib.steps_per_epoch(10, 16) == 1


# ----- shuffling a split stored in class order -----


def _write_class_sorted(path: pathlib.Path, classes: int, per_class: int) -> str:
    """Records one class after another, as class-folder ingestion used to write them."""
    blob = _store(np.full((4, 4, 3), 128, np.uint8), 4, "raw")
    count = classes * per_class
    return _write_stored(path, [blob] * count, [i // per_class for i in range(count)])


def test_a_small_split_stored_in_class_order_is_shuffled_whole(tmp_path):
    """12,000 records in class order, more than a 10,000-record window: the first 2,000 drawn
    must hold every class in about its share. A window would not have reached the last classes."""
    files = _write_class_sorted(tmp_path / "sorted.gz", classes=10, per_class=1200)
    buffer = data_lib.shuffle_buffer_size(data_lib.split_bytes(files), 12_000)
    assert buffer == 12_000
    ds = data_lib.train_dataset(
        files,
        data_lib.ImageSpec(stored_size=4, image_format="raw", image_size=4),
        250,
        contrastive=False,
        color_jitter_strength=0.5,
        color_jitter_impl="v2",
        use_blur=False,
        seed=0,
        shuffle_buffer=buffer,
    )
    labels = np.array(_label_sequence(ds, 8))
    shares = np.bincount(labels, minlength=10) / len(labels)
    assert shares.min() > 0.06 and shares.max() < 0.14, shares
    # Every batch mixes the classes, not two or three of them.
    assert min(len(set(labels[i : i + 250])) for i in range(0, 2000, 250)) == 10


def test_shuffle_buffer_is_a_window_when_the_split_is_large(tmp_path, monkeypatch):
    files = _write_class_sorted(tmp_path / "sorted.gz", classes=2, per_class=10)
    size = data_lib.split_bytes(files)
    assert data_lib.shuffle_buffer_size(size, 20) == 20
    monkeypatch.setattr(data_lib, "FULL_SHUFFLE_BYTES", 10)
    assert data_lib.shuffle_buffer_size(size, 20) == 20  # fewer records than the window
    assert data_lib.shuffle_buffer_size(size, 50_000) == data_lib.WINDOW_SHUFFLE_RECORDS


def test_a_small_labeled_subset_is_read_from_the_files_once(cifar_dir, transformed, tmp_path):
    """A 1% subset used to be picked out of the shuffled whole split at every step (100 records
    read per labeled one); filtered first and kept in memory, later epochs read no file."""
    import shutil

    from models.tasks.base import StageInputs
    from models.tasks.finetune import FinetuneTask
    from pipeline.configs import trainer_config

    copies = []
    for i, path in enumerate(
        sorted(f for p in transformed.train_files for f in tf.io.gfile.glob(p))
    ):
        copies.append(str(tmp_path / f"part-{i}.gz"))
        shutil.copy(path, copies[-1])
    config = fixtures.tiny_config(cifar_dir, **{"finetune.label_fraction": 0.25})
    inputs = StageInputs(copies, transformed.eval_files, transformed.transform_output, 10)
    task = FinetuneTask(trainer_config(config, "finetune"), inputs)
    kept = len(task.labeled_keys)
    assert 0 < kept < len(transformed.train_keys) and task.subset_fits_in_memory(kept)
    batches = iter(task.build_inputs(tf.distribute.InputContext(), 0))
    first = collections.Counter()
    for _ in range(2 * kept // task.batch_size + 1):
        first.update(next(batches)[1].numpy().tolist())
    for path in copies:
        pathlib.Path(path).unlink()
    later = collections.Counter()
    for _ in range(3 * kept // task.batch_size):
        later.update(next(batches)[1].numpy().tolist())
    # The same subset, from memory: its classes in the same proportions as before.
    assert set(later) == set(first)
