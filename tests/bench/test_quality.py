"""bench/quality.py: the time accounting that turns minutes into steps and a kNN curve, the
data subset, the stage configurations of each arm, the verdicts and the report; and a smoke run
of the whole benchmark on a tiny Transform output with a budget of seconds."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from bench import quality
from models import data as data_lib
from models import knn
from tests.models import fixtures
from transform import preprocessing as tp

# ----- helpers -----


def _event(wall: float, step: int, tag: str = "", value: float = 0.0) -> tf.compat.v1.Event:
    event = tf.compat.v1.Event(wall_time=wall, step=step)
    if tag:
        event.summary.value.add(tag=tag, tensor=tf.make_tensor_proto(value, dtype=tf.float32))
    else:
        event.file_version = "brain.Event:2"
    return event


def _write_events(directory: pathlib.Path, events: list[tf.compat.v1.Event]) -> None:
    """An events file as TensorBoard writes one: TFRecords of Event protos."""
    directory.mkdir(parents=True)
    with tf.io.TFRecordWriter(str(directory / "events.out.tfevents.1.test")) as writer:
        for event in events:
            writer.write(event.SerializeToString())


def _example(label: int, key: str, image: bytes = b"pixels") -> bytes:
    feature = {
        tp.LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        tp.KEY_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode()])),
        tp.IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _records(path: pathlib.Path, examples: list[bytes]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path), options="GZIP") as writer:
        for example in examples:
            writer.write(example)
    return str(path)


def _read(files: list[str]) -> list[bytes]:
    pattern = sorted({f for p in files for f in tf.io.gfile.glob(p)})
    return list(tf.data.TFRecordDataset(pattern, compression_type="GZIP").as_numpy_iterator())


# ----- time accounting -----


@pytest.fixture
def timeline(tmp_path) -> quality.Timeline:
    """Writer created at t=1000; floors logged at step 0 at 1030; steps 5..20 every 10 s,
    with a 30 s kNN pause after step 10 and a final kNN after step 20."""
    _write_events(
        tmp_path / "train",
        [
            _event(1000.0, 0),
            _event(1030.0, 0, knn.RANDOM_INIT_METRIC, 0.2),
            _event(1030.0, 0, knn.RAW_PIXELS_METRIC, 0.25),
            _event(1050.0, 5, quality.LOSS_TAG, 3.0),
            _event(1060.0, 10, quality.LOSS_TAG, 2.0),
            _event(1090.0, 10, quality.KNN_TAG, 0.4),
            _event(1100.0, 15, quality.LOSS_TAG, 1.5),
            _event(1110.0, 20, quality.LOSS_TAG, 1.0),
            _event(1200.0, 20, quality.KNN_TAG, 0.5),
        ],
    )
    return quality.read_timeline(tmp_path / "train")


def test_training_time_leaves_out_the_floors_and_knn_pauses(timeline):
    # Training starts after the step-0 floors, and the 30 s kNN pause at step 10 is not training.
    assert timeline.training_seconds(10) == pytest.approx(30.0)
    assert timeline.training_seconds(20) == pytest.approx(50.0)
    assert timeline.last_step == 20 and timeline.minutes() == pytest.approx(50 / 60)
    assert timeline.curve() == [
        {"step": 10, "minutes": pytest.approx(0.5), "knn_top1": pytest.approx(0.4)},
        {"step": 20, "minutes": pytest.approx(50 / 60, abs=1e-4), "knn_top1": pytest.approx(0.5)},
    ]


def test_step_cost_separates_the_warm_up_from_the_rate(timeline):
    # After step 5 (20 s in), 15 steps took 30 s: 2 s/step; the first 5 cost 10 s extra.
    cost = quality.StepCost.measure(timeline, warmup_steps=5)
    assert cost.step_seconds == pytest.approx(2.0)
    assert cost.overhead_seconds == pytest.approx(10.0)
    assert cost.steps_for(1.0) == 25  # (60 s - 10 s) / 2 s
    assert quality.StepCost(0.5).steps_for(2.0) == 240
    assert quality.StepCost(1.0, overhead_seconds=100.0).steps_for(1.0) == 1


def test_a_timeline_needs_exactly_one_run(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="expected one events file"):
        quality.read_timeline(tmp_path / "empty")
    _write_events(tmp_path / "floors_only", [_event(1.0, 0), _event(2.0, 0, knn.METRIC, 0.1)])
    with pytest.raises(ValueError, match="no training summaries"):
        quality.read_timeline(tmp_path / "floors_only")


# ----- data -----


def test_stratified_subset_spreads_over_classes_and_depends_on_keys_only():
    labels = np.array([0, 1, 2] * 4)
    keys = np.array([f"k{i:02d}".encode() for i in range(12)], dtype=object)
    chosen = quality.stratified_subset(labels, keys, 7)
    per_class = sorted(sum(1 for k in chosen if labels[list(keys).index(k)] == c) for c in range(3))
    assert per_class == [2, 2, 3]
    order = np.random.default_rng(0).permutation(12)
    assert quality.stratified_subset(labels[order], keys[order], 7) == chosen


def test_subsample_rewrites_the_chosen_records_unchanged(tmp_path):
    examples = [_example(i % 2, f"c{i % 2}/{i:03d}.jpg", bytes([i]) * 8) for i in range(10)]
    files = [
        _records(tmp_path / "in" / "a.gz", examples[:6]),
        _records(tmp_path / "in" / "b.gz", examples[6:]),
    ]
    subset = quality.subsample(files, 4, tmp_path / "out")
    kept = _read(subset)
    assert len(kept) == 4 and set(kept) <= set(examples)
    labels, keys = data_lib.read_labels_and_keys(subset)
    assert sorted(labels.tolist()) == [0, 0, 1, 1]
    assert sorted(keys.tolist()) == [b"c0/000.jpg", b"c0/002.jpg", b"c1/001.jpg", b"c1/003.jpg"]
    assert quality.subsample(files, 0, tmp_path / "all") == files
    assert quality.subsample(files, 10, tmp_path / "all") == files


def test_fingerprint_tells_splits_with_the_same_file_names_apart(tmp_path):
    # CIFAR-10's train and test folders both hold 0000.jpg: the keys alone do not identify images.
    a = [_example(0, "cat/0000.jpg", b"one"), _example(1, "dog/0000.jpg", b"two")]
    b = [_example(0, "cat/0000.jpg", b"three"), _example(1, "dog/0000.jpg", b"two")]
    fa = quality.split_fingerprint([_records(tmp_path / "a.gz", a)])
    fb = quality.split_fingerprint([_records(tmp_path / "b.gz", b)])
    reordered = quality.split_fingerprint([_records(tmp_path / "r.gz", a[::-1])])
    assert fa["examples"] == 2 and fa["classes"] == 2
    assert fa["records_sha256"] != fb["records_sha256"]
    assert fa == reordered


# ----- the arms' configurations -----


@pytest.fixture
def bench(tmp_path) -> quality.Bench:
    """A Bench over 200 label/key-only records (10 classes), as if from Transform."""
    (tmp_path / "data" / "train").mkdir(parents=True)
    train = _records(
        tmp_path / "train.gz", [_example(i % 10, f"c{i % 10}/{i:04d}.jpg") for i in range(200)]
    )
    test = _records(tmp_path / "test.gz", [_example(i % 10, f"c{i % 10}/t{i}") for i in range(30)])
    args = quality.parse_args(
        [f"--data_dir={tmp_path / 'data'}", f"--out={tmp_path / 'out'}", "--batch_size=20"]
    )
    data = quality.TransformedData(str(tmp_path / "graph"), [train], [test], "test")
    return quality.Bench(args, data)


def test_each_arm_is_configured_as_the_command_line_configures_it(bench):
    pretrain = bench.pretrain(100, knn_every_epochs=2)
    assert pretrain.stage == "pretrain" and pretrain.train.train_steps == 100
    assert pretrain.train.knn_every_epochs == 2 and pretrain.train.checkpoint_epochs == 2
    # The CIFAR-10 recipe, the benchmark's model, warm-up a share of the 10 epochs.
    assert pretrain.train.optimizer == "lars" and pretrain.train.temperature == 0.5
    assert pretrain.augment.color_jitter_strength == 0.5 and not pretrain.augment.use_blur
    assert pretrain.model.resnet_depth == 18 and pretrain.model.width_multiplier == 0.25
    assert pretrain.train.warmup_epochs == pytest.approx(0.05 * 100 * 20 / 200)

    linear = bench.linear_eval(50)
    assert linear.stage == "finetune" and linear.train.train_steps == 50
    assert linear.train.finetune_protocol == "linear_eval"
    assert linear.train.fine_tune_after_block == 4 and linear.train.zero_init_logits_layer
    assert linear.model.ft_proj_selector == 0 and linear.labels.label_fraction == 1.0

    tuned = bench.fine_tune(30, 0.01)
    assert tuned.train.finetune_protocol == "fine_tune" and tuned.train.train_steps == 30
    assert tuned.train.fine_tune_after_block == -1 and tuned.model.ft_proj_selector == 1
    assert tuned.labels.label_fraction == 0.01

    scratch = bench.supervised(200, 0.01)  # the pipeline's supervised baseline stage
    assert scratch.stage == "baseline" and scratch.train.train_steps == 200
    assert scratch.train.baseline_budget == "epochs" and not scratch.matched
    assert scratch.model.ft_proj_selector == 0 and scratch.labels.label_fraction == 0.01
    assert scratch.train.optimizer == "momentum" and scratch.train.weight_decay == 5e-4
    # 5% of the steps warm up, counted in epochs of the batch the Trainer fits to 10 examples.
    assert scratch.train.warmup_epochs == pytest.approx(0.05 * 200 * 10 / 10)
    # Both semi-supervised arms train on the same labeled subset the Trainer selects.
    assert tuned.labels == scratch.labels
    assert bench.labeled_count(0.01) == 10 and bench.labeled_count(0.1) == 20


def test_arguments(tmp_path):
    (tmp_path / "train").mkdir()
    args = quality.parse_args([f"--data_dir={tmp_path}", "--budget_minutes=30"])
    # Fine-tuning and linear evaluation default to shares of the pretraining budget.
    assert args.finetune_minutes == pytest.approx(3.0)
    assert args.linear_eval_minutes == pytest.approx(4.5)
    assert args.label_fractions == [0.1, 0.01] and args.step_seconds == {}
    assert quality.parse_step_seconds("pretrain=1,supervised=0.5,linear=0.25") == {
        "pretrain": 1.0,
        "supervised": 0.5,
        "linear": 0.25,
    }
    for bad in ("pretrain=1", "pretrain=1,supervised=1,linear=0", "x=1,supervised=1,linear=1"):
        with pytest.raises(ValueError):
            quality.parse_step_seconds(bad)
    for bad in ("", "0", "1.5", "0.1,-0.2"):
        with pytest.raises(ValueError):
            quality.parse_fractions(bad)
    with pytest.raises(SystemExit):
        quality.parse_args([f"--data_dir={tmp_path}", "--transform_graph=/g"])


def test_pool_tree_moves_the_share_the_label_fraction_would_mask(tmp_path):
    source = tmp_path / "cifar"
    for split, count in (("train", 10), ("test", 2)):
        for c in ("cat", "dog"):
            (source / split / c).mkdir(parents=True)
            for i in range(count):
                (source / split / c / f"{i:04d}.jpg").write_bytes(b"x")
    tree = quality.pool_tree(str(source), 0.8, 3, tmp_path / "tree")
    labeled = sorted(p.relative_to(tree / "train").as_posix() for p in tree.glob("train/*/*"))
    pooled = sorted(
        p.relative_to(tree / "unlabeled").as_posix() for p in tree.glob("unlabeled/*/*")
    )
    assert len(labeled) == 4 and len(pooled) == 16 and not set(labeled) & set(pooled)
    # The same labeled images --label_fractions=0.2 with seed 3 keeps.
    keys = np.array([f"{c}/{i:04d}.jpg".encode() for c in ("cat", "dog") for i in range(10)])
    chosen = data_lib.select_label_fraction(np.repeat([0, 1], 10), keys.astype(object), 0.2, 3)
    assert labeled == sorted(k.decode() for k in chosen)
    assert (tree / "train" / labeled[0]).resolve() == source / "train" / labeled[0]
    assert (tree / "test").resolve() == source / "test"
    assert quality.arm_id(1.0, 0.9) == "10pct_pool" and quality.arm_id(0.01, 0.0) == "1pct"
    args = quality.parse_args([f"--data_dir={source}", "--unlabeled_share=0.9"])
    assert args.label_fractions == [1.0]
    with pytest.raises(SystemExit):
        quality.parse_args([f"--data_dir={source}", "--unlabeled_share=0.9", "--train_images=5"])


# ----- verdicts and report -----


def _row(row_id: str, value: float) -> quality.Row:
    return quality.Row(row_id, row_id, "top1", value, 30, ["test"])


def test_verdicts_compare_with_the_higher_floor_and_the_1pct_arms():
    rows = {
        r.id: r
        for r in (
            _row("knn/simclr", 0.50),
            _row("knn/random_init", 0.30),
            _row("knn/raw_pixels", 0.36),
            _row("finetune_1pct/simclr", 0.25),
            _row("finetune_1pct/supervised", 0.27),
        )
    }
    verdict = quality.verdicts(rows)
    assert verdict["knn_margin_over_higher_floor"] == pytest.approx(0.14)
    assert verdict["knn_target_met"] is False
    assert verdict["finetune_1pct_margin"] == pytest.approx(-0.02)
    assert verdict["finetune_1pct_target_met"] is False
    rows["knn/raw_pixels"] = _row("knn/raw_pixels", 0.20)
    rows["finetune_1pct/supervised"] = _row("finetune_1pct/supervised", 0.2)
    verdict = quality.verdicts(rows)
    assert verdict["knn_margin_over_higher_floor"] == pytest.approx(0.20)
    assert verdict["knn_target_met"] is True and verdict["finetune_1pct_target_met"] is True


def test_report_shows_every_row_and_draws_the_curve(tmp_path):
    values = {
        "knn/simclr": 0.4321,
        "knn/random_init": 0.2345,
        "knn/raw_pixels": 0.3456,
        "linear/simclr": 0.4567,
        "linear/random_init": 0.2678,
        "finetune_10pct/simclr": 0.3789,
        "finetune_10pct/supervised": 0.3890,
        "finetune_1pct/simclr": 0.2901,
        "finetune_1pct/supervised": 0.2012,
    }
    rows = {k: _row(k, v) for k, v in values.items()}
    rows["knn/simclr"].train_minutes = 2.01
    result = {
        "config": {"label_fractions": [0.1, 0.01], "model": "ResNet-18 x0.25"},
        "data": {"train_examples": 500, "test": {"examples": 30}},
        "budget": {
            "pretrain_minutes": 2,
            "pretrain_actual_minutes": 2.01,
            "linear_eval_minutes": 0.3,
            "finetune_minutes": 0.2,
            "supervised_minutes": 2.2,
        },
        "rows": [r.__dict__ for r in rows.values()],
        "curve": [
            {"step": 0, "minutes": 0.0, "knn_top1": 0.2345},
            {"step": 10, "minutes": 1.0, "knn_top1": 0.40},
            {"step": 20, "minutes": 2.0, "knn_top1": 0.4321},
        ],
        "targets": quality.verdicts(rows),
    }
    text = quality.markdown(result)
    for value in values.values():
        assert f"{value:.4f}" in text
    assert "| 10% | 0.3789 | 0.3890 |" in text and "| 1% | 0.2901 | 0.2012 |" in text
    assert "(target +0.15: missed)" in text and "(target > 0: met)" in text
    assert "Measured training minutes: knn/simclr 2.01." in text
    quality.plot_curve(result, tmp_path / "curve.png")
    png = (tmp_path / "curve.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


# ----- the smoke run -----


def _raw_pixel_knn(train_files: list[str], test_files: list[str], classes: int) -> float:
    """Raw-pixel weighted kNN (k=200, T=0.1) in numpy over the evaluation view."""

    def pixels(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        spec = data_lib.ImageSpec(fixtures.IMAGE_SIZE, "raw", fixtures.IMAGE_SIZE)
        batches = list(data_lib.eval_dataset(files, spec, 64).as_numpy_iterator())
        x = np.concatenate([b[0] for b in batches]).reshape(-1, 32 * 32 * 3).astype(np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True), np.concatenate([b[1] for b in batches])

    bank, bank_labels = pixels(train_files)
    queries, labels = pixels(test_files)
    correct = 0
    for q, label in zip(queries, labels, strict=True):
        sim = bank @ q
        nearest = np.argsort(-sim, kind="stable")[: min(knn.DEFAULT_K, len(bank))]
        votes = np.zeros(classes)
        np.add.at(votes, bank_labels[nearest], np.exp(sim[nearest] / knn.DEFAULT_TEMPERATURE))
        correct += int(np.argmax(votes) == label)
    return correct / len(labels)


@pytest.mark.e2e
def test_smoke_run_reports_every_row_on_the_same_test_images(transformed, tmp_path):
    data = transformed
    out = tmp_path / "report"
    quality.main(
        [
            f"--transform_graph={data.transform_output}",
            f"--train_examples={data.train_files[0]}",
            f"--test_examples={data.eval_files[0]}",
            f"--out={out}",
            "--budget_minutes=0.1",
            "--finetune_minutes=0.05",
            "--linear_eval_minutes=0.05",
            "--step_seconds=pretrain=1,supervised=1,linear=1",
            "--width_multiplier=0.125",
            "--proj_out_dim=16",
            "--batch_size=16",
            "--finetune_batch_size=16",
            "--label_fractions=0.01",
            "--eval_batch_size=64",
            "--log_every_steps=2",
        ]
    )
    result = json.loads((out / "results.json").read_text())
    n_test = 10 * fixtures.EVAL_PER_CLASS
    rows = {r["id"]: r for r in result["rows"]}
    assert set(rows) == {
        "knn/simclr",
        "knn/random_init",
        "knn/raw_pixels",
        "linear/simclr",
        "linear/random_init",
        "finetune_1pct/simclr",
        "finetune_1pct/supervised",
    }
    for row in rows.values():
        assert 0.0 <= row["value"] <= 1.0, row
        # Every number, floors included, is about the same test images.
        assert row["test_examples"] == n_test and row["test_files"] == data.eval_files, row
    assert result["data"]["test"]["examples"] == n_test
    # The raw-pixel floor is the vote over those test images' pixels.
    expected = _raw_pixel_knn(data.train_files, data.eval_files, 10)
    assert rows["knn/raw_pixels"]["value"] == pytest.approx(expected, abs=1 / n_test + 1e-9)

    # Budget: 0.1 min at 1 s/step is 6 pretraining steps; supervised gets pretrain + fine-tune.
    assert result["budget"]["steps"] == {"pretrain": 6, "linear": 3, "finetune": 3, "supervised": 9}
    assert result["stages"]["pretrain"]["steps"] == 6
    curve = result["curve"]
    assert curve[0] == {"step": 0, "minutes": 0.0, "knn_top1": rows["knn/random_init"]["value"]}
    assert [p["step"] for p in curve] == sorted({p["step"] for p in curve}) and curve[-1][
        "step"
    ] == 6
    assert all(a["minutes"] <= b["minutes"] for a, b in zip(curve, curve[1:], strict=False))
    assert curve[-1]["knn_top1"] == pytest.approx(rows["knn/simclr"]["value"])
    assert set(result["targets"]) >= {"knn_target_met", "finetune_1pct_target_met"}

    text = (out / "results.md").read_text()
    for row in rows.values():
        assert f"{row['value']:.4f}" in text
    assert (out / "curve.png").read_bytes().startswith(b"\x89PNG")
    # Only the pretrained encoder, which the other arms restore, is exported.
    exported = (out / "work" / "runs").glob("*/serving_model/saved_model.pb")
    assert [p.parent.parent.name for p in exported] == ["pretrain"]


def _quality_result(dtype: str, steps: int, values: dict[str, float]) -> dict:
    floors = max(values["knn/random_init"], values["knn/raw_pixels"])
    return {
        "machine": {"precision": {"dtype": dtype, "reason": "r"}, "cpu": "Xeon", "amx": True},
        "budget": {"steps": {"pretrain": steps}, "pretrain_epochs": steps / 10},
        "rows": [{"id": k, "value": v} for k, v in values.items()],
        "targets": {"knn_margin_over_higher_floor": round(values["knn/simclr"] - floors, 4)},
    }


def test_precision_comparison_judges_margin_and_every_trained_arm():
    from bench import precision_quality

    base = {"knn/random_init": 0.30, "knn/raw_pixels": 0.31, "knn/simclr": 0.42}
    float32 = _quality_result("float32", 476, {**base, "linear/simclr": 0.394})
    auto = _quality_result(
        "bfloat16",
        729,
        {**base, "knn/simclr": 0.441, "linear/simclr": 0.370, "knn/raw_pixels": 0.2},
    )
    c = precision_quality.compare(auto, float32, noise=0.01)
    assert c["pretrain_steps"] == {"auto": 729, "float32": 476}
    assert c["knn_margin_over_higher_floor"] == {"auto": 0.141, "float32": 0.11}
    assert c["knn_margin_grew"] is True
    # Linear evaluation fell 2.4 points; a floor moving is not an arm falling.
    assert c["arms_fallen_beyond_noise"] == ["linear/simclr"]
    rows = {r["id"]: r["delta"] for r in c["rows"]}
    assert rows["knn/simclr"] == 0.021 and rows["linear/simclr"] == -0.024
    text = precision_quality.markdown(c, auto["machine"])
    assert "auto = bfloat16" in text and "| linear/simclr | 0.3700 | 0.3940 | -0.0240 |" in text
    with pytest.raises(SystemExit):
        precision_quality.parse_args(["--mixed_precision=float32"])
    with pytest.raises(SystemExit):  # calibration decides the steps each precision fits
        precision_quality.parse_args(["--step_seconds=pretrain=1,supervised=1,linear=1"])
    args, rest = precision_quality.parse_args(["--same_steps", "--step_seconds=pretrain=1"])
    assert args.same_steps and rest == ["--step_seconds=pretrain=1"]
    # An existing pipeline's Transform output serves both arms (not handed on twice).
    args, rest = precision_quality.parse_args(["--pipeline_dir=/runs/cifar", "--budget_minutes=5"])
    assert args.pipeline_dir == "/runs/cifar" and rest == ["--budget_minutes=5"]
