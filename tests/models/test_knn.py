"""kNN monitor: weighted vote against a numpy implementation, features, schedule, Trainer wiring."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from models import data as data_lib
from models import knn
from tests.models import fixtures
from transform import preprocessing as tp


def _numpy_knn(
    bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, classes: int, k: int, t: float
) -> np.ndarray:
    """Per query: the k most cosine-similar bank rows vote exp(sim / t) for their class."""
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    predictions = []
    for q in queries.astype(np.float64):
        sim = bank.astype(np.float64) @ q
        nearest = np.argsort(-sim, kind="stable")[: min(k, len(bank))]
        votes = np.zeros(classes)
        for i in nearest:
            votes[bank_labels[i]] += np.exp(sim[i] / t)
        predictions.append(int(np.argmax(votes)))
    return np.array(predictions)


def _normalized(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("k", [1, 7, 200])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_predictions_match_numpy(k, temperature, monkeypatch):
    monkeypatch.setattr(knn, "QUERY_CHUNK", 16)  # several chunks, the last one partial
    rng = np.random.default_rng(k)
    classes = 5
    # Class-dependent means so neighbours carry signal and votes are not all ties.
    centers = _normalized(rng, classes, 12)
    bank_labels = rng.integers(0, classes, 150)
    bank = centers[bank_labels] + 0.8 * _normalized(rng, 150, 12)
    query_labels = rng.integers(0, classes, 37)
    queries = centers[query_labels] + 0.8 * _normalized(rng, 37, 12)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    got = knn.weighted_knn_predict(bank, bank_labels, queries, classes, k, temperature).numpy()
    expected = _numpy_knn(bank, bank_labels, queries, classes, k, temperature)
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.int64 and got.shape == (37,)


def test_similarity_weights_beat_majority():
    # Two close neighbours of class 0 against three distant ones of class 1: a plain majority
    # vote says 1, the exp(sim / T) weights say 0 at T = 0.1 (and 1 at a large T).
    angles = np.array([0.05, 0.1, 1.2, 1.25, 1.3])
    bank = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 1])
    query = np.array([[1.0, 0.0]], np.float32)
    assert knn.weighted_knn_predict(bank, labels, query, 2, k=5, temperature=0.1).numpy()[0] == 0
    assert knn.weighted_knn_predict(bank, labels, query, 2, k=5, temperature=100.0).numpy()[0] == 1
    assert knn.weighted_knn_predict(bank, labels, query, 2, k=2, temperature=100.0).numpy()[0] == 0


def test_bad_arguments_are_rejected():
    bank = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn.weighted_knn_predict(bank, [0, 1, 2], bank, 3, k=0)
    with pytest.raises(ValueError, match="temperature must be positive"):
        knn.weighted_knn_predict(bank, [0, 1, 2], bank, 3, temperature=0.0)


@pytest.mark.parametrize(
    ("every", "checkpoint_every", "total", "due_steps"),
    [
        (5, 5, 20, [5, 10, 15, 20]),
        (10, 5, 23, [10, 20, 23]),  # every second checkpoint, plus the last step
        (5, 3, 16, [6, 12, 15, 16]),  # first checkpoint at or after 5, 10, 15
        (50, 10, 30, [30]),  # no epoch boundary reached: only the final step
    ],
)
def test_schedule(every, checkpoint_every, total, due_steps):
    checkpoints = sorted({*range(checkpoint_every, total + 1, checkpoint_every), total})
    due = [s for s in checkpoints if knn.knn_due(s, every, checkpoint_every, total)]
    assert due == due_steps


def _stored_split(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels read straight from the TFRecords, without the input pipeline."""
    images, labels = [], []
    for pattern in files:
        for path in sorted(tf.io.gfile.glob(pattern)):
            for record in tf.data.TFRecordDataset(path, compression_type="GZIP"):
                ex = tf.train.Example.FromString(record.numpy()).features.feature
                image = tf.io.parse_tensor(ex[tp.IMAGE_KEY].bytes_list.value[0], tf.uint8)
                images.append(image.numpy())
                labels.append(ex[tp.LABEL_KEY].int64_list.value[0])
    return np.stack(images), np.array(labels)


def test_features_are_normalized_backbone_outputs(transformed):
    from models.model import SimCLRModel

    config = fixtures.tiny_config(pathlib.Path("."))
    model = SimCLRModel(config.model, 10, fixtures.IMAGE_SIZE, pretraining=True)
    model.build_for()
    spec = data_lib.ImageSpec(fixtures.IMAGE_SIZE, "raw", fixtures.IMAGE_SIZE)
    features, labels = knn.extract_features(
        model, data_lib.eval_dataset(transformed.eval_files, spec, batch_size=7)
    )
    images, expected_labels = _stored_split(transformed.eval_files)
    # 32x32 evaluation preprocessing is the identity on [0, 1] floats (no crop at CIFAR size).
    raw = model.resnet(tf.constant(images / 255.0, tf.float32), training=False)
    expected = raw["final_avg_pool"].numpy()
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)

    assert features.dtype == tf.float32 and features.shape == expected.shape
    np.testing.assert_array_equal(labels.numpy(), expected_labels)
    np.testing.assert_allclose(features.numpy(), expected, atol=1e-5)


def _scalars(event_dir: pathlib.Path, tag: str) -> dict[int, float]:
    values = {}
    for path in event_dir.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return values


def test_trainer_logs_knn_every_epoch(cifar_dir, transformed, tmp_path, capsys):
    # 80 training images at batch 16: 5 steps per epoch. Checkpoints at 3, 6 and 7, so the
    # monitor runs at 6 (first checkpoint after the epoch boundary at 5) and at the end.
    config = fixtures.tiny_config(
        cifar_dir,
        **{
            "pretrain.train_steps": 7,
            "pretrain.checkpoint_steps": 3,
            "pretrain.knn_every_epochs": 1,
            "runtime.log_every_steps": 7,
        },
    )
    kwargs = fixtures.run_stage_args(transformed, tmp_path)
    fixtures.run_stage(config, "pretrain", **kwargs)
    out = capsys.readouterr().out

    lines = [line for line in out.splitlines() if knn.METRIC in line]
    assert [line.split(":")[0] for line in lines] == ["pretrain step 6", "pretrain step 7"]
    logged = _scalars(pathlib.Path(kwargs["model_run_dir"]) / "train", knn.METRIC)
    assert sorted(logged) == [6, 7]
    assert all(0.0 <= v <= 1.0 for v in logged.values())
    results = json.loads((pathlib.Path(kwargs["model_run_dir"]) / "results.json").read_text())
    assert results[knn.METRIC] == pytest.approx(logged[7])
    # 30 eval images: accuracy is a multiple of 1/30.
    assert results[knn.METRIC] * 30 == pytest.approx(round(results[knn.METRIC] * 30))
