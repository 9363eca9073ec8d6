"""kNN monitor: weighted vote against a numpy implementation, features, schedule, the two floors
(random-init backbone, raw pixels) and their Trainer wiring, resume included."""

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


def _numpy_pixel_top1(
    bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, labels: np.ndarray, k: int
) -> float:
    """Raw-pixel kNN top-1: images flattened, then `_numpy_knn` (which L2-normalizes)."""
    flat = lambda x: x.reshape(len(x), -1).astype(np.float64)  # noqa: E731
    predicted = _numpy_knn(flat(bank), bank_labels, flat(queries), 2, k, knn.DEFAULT_TEMPERATURE)
    return float(np.mean(predicted == labels))


def _pixel_top1(bank, bank_labels, queries, labels, k: int) -> float:
    return knn.knn_top1(
        knn.pixel_embedding(tf.constant(bank)),
        bank_labels,
        knn.pixel_embedding(tf.constant(queries)),
        labels,
        num_classes=2,
        k=k,
    )


@pytest.mark.parametrize("k", [1, 5, 200])
def test_raw_pixels_separate_two_well_separated_clusters(k):
    # Class 0 is bright on the left half of the image, class 1 on the right half.
    rng = np.random.default_rng(0)
    left = np.zeros((8, 8, 3), np.float32)
    left[:, :4] = 1.0
    templates = np.stack([left, left[:, ::-1]])
    bank_labels, labels = rng.integers(0, 2, 40), rng.integers(0, 2, 25)
    bank = templates[bank_labels] + 0.1 * rng.random((40, 8, 8, 3), np.float32)
    queries = templates[labels] + 0.1 * rng.random((25, 8, 8, 3), np.float32)

    expected = _numpy_pixel_top1(bank, bank_labels, queries, labels, k)
    assert expected == 1.0
    assert _pixel_top1(bank, bank_labels, queries, labels, k) == expected


@pytest.mark.parametrize("k", [1, 5, 200])
def test_raw_pixels_are_at_chance_when_the_class_is_only_brightness(k):
    # The class sets the brightness (x0.25 or x1) of an otherwise random pattern; L2
    # normalization removes brightness, so the vote cannot see the class. Each query pattern
    # comes once per class and gets one prediction: exactly half of the queries are right.
    rng = np.random.default_rng(1)
    scale = np.array([0.25, 1.0], np.float32)[:, None, None, None]
    bank_labels = rng.integers(0, 2, 60)
    bank = rng.random((60, 6, 6, 3), np.float32) * scale[bank_labels]
    patterns = rng.random((20, 6, 6, 3), np.float32)
    labels = np.repeat([0, 1], 20)
    queries = np.concatenate([patterns * scale[0], patterns * scale[1]])

    expected = _numpy_pixel_top1(bank, bank_labels, queries, labels, k)
    assert expected == 0.5
    assert _pixel_top1(bank, bank_labels, queries, labels, k) == expected


def test_pixel_embedding_is_the_normalized_flattened_image():
    images = np.random.default_rng(2).random((3, 4, 4, 3)).astype(np.float32)
    flat = images.reshape(3, -1)
    expected = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    np.testing.assert_allclose(knn.pixel_embedding(tf.constant(images)).numpy(), expected, 1e-6)


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


def _tiny_monitor(model, transformed) -> knn.KnnMonitor:
    spec = data_lib.ImageSpec(fixtures.IMAGE_SIZE, "raw", fixtures.IMAGE_SIZE)
    return knn.KnnMonitor(
        model,
        transformed.train_files,
        transformed.eval_files,
        spec,
        batch_size=7,
        num_classes=10,
        every_steps=5,
        checkpoint_every=5,
        total_steps=10,
    )


def test_floors_match_numpy_and_a_resumed_monitor_reads_them_back(
    transformed, tmp_path, monkeypatch
):
    from models.model import SimCLRModel

    config = fixtures.tiny_config(pathlib.Path("."))
    model = SimCLRModel(config.model, 10, fixtures.IMAGE_SIZE, pretraining=True)
    model.build_for()
    floors = _tiny_monitor(model, transformed).floors(0, save_dir=str(tmp_path))

    # References straight from the stored pixels (32x32 evaluation preprocessing is x / 255).
    bank, bank_labels = _stored_split(transformed.train_files)
    queries, labels = _stored_split(transformed.eval_files)

    def top1(features) -> float:
        votes = _numpy_knn(features(bank), bank_labels, features(queries), 10, knn.DEFAULT_K, 0.1)
        return float(np.mean(votes == labels))

    def pixels(images: np.ndarray) -> np.ndarray:
        return (images / 255.0).reshape(len(images), -1)

    def backbone(images: np.ndarray) -> np.ndarray:
        scaled = tf.constant(images / 255.0, tf.float32)
        return model.resnet(scaled, training=False)["final_avg_pool"].numpy()

    assert floors == {
        knn.RANDOM_INIT_METRIC: pytest.approx(top1(backbone), abs=1e-9),
        knn.RAW_PIXELS_METRIC: pytest.approx(top1(pixels), abs=1e-9),
    }
    assert json.loads((tmp_path / knn.FLOORS_FILE).read_text()) == floors

    # Resumed past step 0: the saved values, nothing recomputed, nothing logged again.
    def no_pass(*args, **kwargs):
        raise AssertionError("a resumed monitor recomputed its floors")

    monkeypatch.setattr(knn, "collect", no_pass)
    resumed = _tiny_monitor(model, transformed)
    assert resumed.floors(4, save_dir=str(tmp_path / "scratch"), restore_dir=str(tmp_path)) == {}
    assert resumed.last == floors and resumed.floor_values == floors


def test_raw_pixel_floor_is_left_out_above_the_bank_limit(transformed, monkeypatch, capsys):
    from models.model import SimCLRModel

    config = fixtures.tiny_config(pathlib.Path("."))
    model = SimCLRModel(config.model, 10, fixtures.IMAGE_SIZE, pretraining=True)
    model.build_for()
    # 80 training images of 32x32x3 float32 (12,288 bytes each) against a limit one short.
    monkeypatch.setattr(knn, "MAX_PIXEL_BANK_BYTES", 80 * 12_288 - 1)
    floors = _tiny_monitor(model, transformed).floors(0)
    assert set(floors) == {knn.RANDOM_INIT_METRIC}
    assert "no raw-pixel floor: 80 training images" in capsys.readouterr().out


def _scalars(event_dir: pathlib.Path, tag: str) -> dict[int, float]:
    values = {}
    for path in event_dir.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return values


def _counting(monkeypatch, name: str) -> list[int]:
    """Counts calls of KnnMonitor.<name> (one entry per call)."""
    calls: list[int] = []
    original = getattr(knn.KnnMonitor, name)

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(knn.KnnMonitor, name, counted)
    return calls


def test_trainer_logs_knn_every_epoch_and_the_floors_once(
    cifar_dir, transformed, tmp_path, capsys, monkeypatch
):
    # 80 training images at batch 16: 5 steps per epoch. Checkpoints at 3, 6 and 7, so the
    # monitor runs at 6 (first checkpoint after the epoch boundary at 5) and at the end; the
    # floors before the first step.
    overrides = {
        "pretrain.train_steps": 7,
        "pretrain.checkpoint_steps": 3,
        "pretrain.knn_every_epochs": 1,
        "runtime.log_every_steps": 7,
    }
    # What is checked (when the monitor runs, what it logs and keeps) does not depend on the
    # backbone's depth: a shallower one traces and exports both runs faster.
    fixtures.one_block_per_group(monkeypatch)
    config = fixtures.tiny_config(cifar_dir, **overrides)
    kwargs = fixtures.run_stage_args(transformed, tmp_path / "first")
    fixtures.run_stage(config, "pretrain", **kwargs)
    out = capsys.readouterr().out

    lines = [line for line in out.splitlines() if knn.METRIC in line]
    assert [line.split(":")[0] for line in lines] == ["pretrain step 6", "pretrain step 7"]
    train_dir = pathlib.Path(kwargs["model_run_dir"]) / "train"
    logged = _scalars(train_dir, knn.METRIC)
    assert sorted(logged) == [6, 7]
    assert all(0.0 <= v <= 1.0 for v in logged.values())
    results = json.loads((pathlib.Path(kwargs["model_run_dir"]) / "results.json").read_text())
    assert results[knn.METRIC] == pytest.approx(logged[7])
    # 30 eval images: accuracy is a multiple of 1/30.
    assert results[knn.METRIC] * 30 == pytest.approx(round(results[knn.METRIC] * 30))

    # The floors: logged at step 0 only, printed on one line, kept in results.json and beside
    # the checkpoints.
    floor_tags = (knn.RANDOM_INIT_METRIC, knn.RAW_PIXELS_METRIC)
    floors = {tag: _scalars(train_dir, tag) for tag in floor_tags}
    assert all(sorted(points) == [0] for points in floors.values()), floors
    [line] = [line for line in out.splitlines() if line.startswith("pretrain step 0:")]
    assert line == (
        f"pretrain step 0: {floor_tags[0]} {results[floor_tags[0]]:.4f}, "
        f"{floor_tags[1]} {results[floor_tags[1]]:.4f}"
    )
    for tag in floor_tags:
        assert results[tag] == pytest.approx(floors[tag][0])
        assert results[tag] * 30 == pytest.approx(round(results[tag] * 30))
    checkpoints = pathlib.Path(kwargs["model_run_dir"]) / "checkpoints"
    saved = json.loads((checkpoints / knn.FLOORS_FILE).read_text())
    assert saved == {tag: results[tag] for tag in floor_tags}

    # A rerun with two more steps resumes at step 7: the floors come from the first run, are
    # not measured or logged again, and only the final kNN runs.
    raw_pixel_calls = _counting(monkeypatch, "raw_pixel_accuracy")
    accuracy_calls = _counting(monkeypatch, "accuracy")
    config = fixtures.tiny_config(cifar_dir, **{**overrides, "pretrain.train_steps": 9})
    rerun = fixtures.run_stage_args(transformed, tmp_path / "rerun")
    fixtures.run_stage(config, "pretrain", **rerun, checkpoint_dir=str(checkpoints))
    out = capsys.readouterr().out
    assert "pretrain: resuming from" in out and "step 0:" not in out
    assert raw_pixel_calls == [] and len(accuracy_calls) == 1
    rerun_train = pathlib.Path(rerun["model_run_dir"]) / "train"
    assert all(_scalars(rerun_train, tag) == {} for tag in floor_tags)
    assert sorted(_scalars(rerun_train, knn.METRIC)) == [9]
    resumed = json.loads((pathlib.Path(rerun["model_run_dir"]) / "results.json").read_text())
    assert {tag: resumed[tag] for tag in floor_tags} == saved
    assert knn.METRIC in resumed


def test_a_warm_started_encoder_logs_where_it_starts_not_a_random_init_floor(
    transformed, tmp_path, monkeypatch
):
    from models.model import SimCLRModel

    config = fixtures.tiny_config(pathlib.Path("."))
    model = SimCLRModel(config.model, 10, fixtures.IMAGE_SIZE, pretraining=True)
    model.build_for()
    monitor = _tiny_monitor(model, transformed)
    monitor.starts_trained = True
    monkeypatch.setattr(monitor, "accuracy", lambda: 0.75)
    monkeypatch.setattr(monitor, "raw_pixel_accuracy", lambda: 0.25)
    logged = monitor.floors(0, save_dir=str(tmp_path))
    assert logged == {knn.METRIC: 0.75, knn.RAW_PIXELS_METRIC: 0.25}
    # Only the raw-pixel floor is a floor: saved for a resumed run, never overwriting later kNN.
    assert json.loads((tmp_path / knn.FLOORS_FILE).read_text()) == {knn.RAW_PIXELS_METRIC: 0.25}
    monkeypatch.setattr(monitor, "accuracy", lambda: 0.8)
    monkeypatch.setattr(knn, "knn_due", lambda *args: True)
    assert monitor(2) == {knn.METRIC: 0.8}
    assert monitor.last == {knn.METRIC: 0.8, knn.RAW_PIXELS_METRIC: 0.25}
