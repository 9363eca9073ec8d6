"""Input pipelines over a real (tiny) Transform output: subsets, shapes, order, coverage."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow as tf

from models import data as data_lib
from tests.models import fixtures

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


def test_finetune_batches_are_full_images_and_labels(transformed):
    ds = _train(transformed, 12, contrastive=False)
    image_spec, label_spec = ds.element_spec
    assert image_spec.shape == (12, 32, 32, 3) and label_spec.shape == (12,)
    # 80 examples are not a multiple of 12: batches still never come short, across epochs.
    for images, labels in ds.take(15):
        assert images.shape == (12, 32, 32, 3) and labels.shape == (12,)
        assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 1.0


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


def test_steps_per_epoch_floors_but_is_at_least_one():
    assert data_lib.steps_per_epoch(80, 16) == 5
    assert data_lib.steps_per_epoch(81, 16) == 5
    assert data_lib.steps_per_epoch(10, 16) == 1
