"""What each Trainer stage reads when the data hold an unlabeled pool (`models/tasks/`).

Transformed splits are written as TFX lays them out (`<artifact>/Split-<name>/*.gz`) with a
label and a key per record; the stages' counts, label selections and epoch recipes are read
back from the tasks before any image is decoded.
"""

from __future__ import annotations

import pathlib
import types

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from models.config import (
    AugmentConfig,
    DistillConfig,
    InputConfig,
    ModelConfig,
    PretrainConfig,
    RuntimeConfig,
    StageConfig,
    TrainerConfig,
    semi_supervised_epochs,
)
from models.split_records import SplitSize
from models.tasks import TASKS, StageInputs
from models.tasks.base import Task
from models.tasks.distill import DistillTask
from models.tasks.finetune import FinetuneTask
from models.tasks.pretrain import PretrainTask
from pipeline.configs import build_config, trainer_config

NUM_CLASSES = 10


def _write_split(artifact: pathlib.Path, split: str, labels: list[int]) -> str:
    folder = artifact / f"Split-{split}"
    folder.mkdir(parents=True)
    options = tf.io.TFRecordOptions(compression_type="GZIP")
    with tf.io.TFRecordWriter(str(folder / "part-00000.gz"), options) as writer:
        for i, label in enumerate(labels):
            feature = {
                "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x"])),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                "key": tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[f"{split}/{i:05d}.png".encode()])
                ),
            }
            writer.write(
                tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
            )
    return str(folder / "*.gz")


def _data(tmp_path: pathlib.Path, per_class: int, pool: int) -> dict[str, str]:
    artifact = tmp_path / "transformed_examples"
    files = {
        "train": _write_split(
            artifact, "train", [c for c in range(NUM_CLASSES) for _ in range(per_class)]
        )
    }
    files["test"] = _write_split(artifact, "test", list(range(NUM_CLASSES)))
    if pool:
        files["unlabeled"] = _write_split(artifact, "unlabeled", [-1] * pool)
    return files


def _task(
    stage: str,
    flags: dict,
    files: dict[str, str],
    splits: list[str],
    sizes: dict[str, SplitSize] | None = None,
):
    config = build_config({"dataset": "digits", **flags})
    inputs = StageInputs(
        train_files=[files[s] for s in splits],
        eval_files=[files["test"]],
        transform_output_dir="",
        num_classes=NUM_CLASSES,
        split_sizes=sizes,
    )
    return TASKS[stage](trainer_config(config, stage), inputs, 1)


def _subset(tmp_path: pathlib.Path, name: str, keys: list[str]) -> str:
    path = tmp_path / name
    path.write_text("".join(f"{k.rsplit('/', 1)[-1]}\n" for k in keys))
    return str(path)


def test_the_recipe_counts_the_labeled_fraction_not_the_list_name(tmp_path, capsys):
    files = _data(tmp_path, per_class=20, pool=0)  # 200 labeled train examples
    # 2 of 200 (1%) in a list whose name says nothing: the 1% recipe.
    one_percent = _subset(tmp_path, "my_labels.txt", ["train/00000.png", "train/00100.png"])
    task = _task("finetune", {"label_subset": one_percent}, files, ["train"])
    assert (task.num_examples, task.train_epochs) == (2, semi_supervised_epochs(0.01)) == (2, 60)
    assert task.total_steps == 2 * 60 // task.batch_size + 1
    assert "2 labeled of the 200 examples pretraining read (1.00%): 60 epochs" in (
        capsys.readouterr().out
    )
    # 20 of 200 (10%) in a list named like the 1% list: the 10% recipe.
    ten_percent = _subset(
        tmp_path, "1percent.txt", [f"train/{i:05d}.png" for i in range(0, 200, 10)]
    )
    task = _task("finetune", {"label_subset": ten_percent}, files, ["train"])
    assert (task.num_examples, task.train_epochs) == (20, 30)
    # Epochs given on the command line are kept.
    task = _task(
        "finetune", {"label_subset": one_percent, "finetune_train_epochs": 7}, files, ["train"]
    )
    assert task.train_epochs == 7


@pytest.mark.parametrize("pool, epochs", [(1800, 30), (4000, 60)])
def test_an_unlabeled_pool_makes_fine_tuning_semi_supervised(tmp_path, pool, epochs):
    files = _data(tmp_path, per_class=20, pool=pool)
    flags = {"unlabeled_dir": str(tmp_path)}
    finetune = _task("finetune", flags, files, ["train"])
    assert finetune.config.train.finetune_protocol == "fine_tune"
    # All 200 labels of 200 + pool examples pretraining read: 10% (30 epochs) or 4.8% (60).
    assert (finetune.num_examples, finetune.num_unlabeled(), finetune.train_epochs) == (
        200,
        0,
        epochs,
    )
    pretrain = _task("pretrain", flags, files, ["train", "unlabeled"])
    assert (pretrain.num_examples, pretrain.num_unlabeled()) == (200 + pool, pool)
    t = pretrain.config.train
    assert pretrain.total_steps == (200 + pool) * t.train_epochs // pretrain.batch_size + 1


def test_label_selections_ignore_the_pool(tmp_path):
    files = _data(tmp_path, per_class=20, pool=300)
    flags = {"unlabeled_dir": str(tmp_path), "label_fraction": 0.1}
    distill = _task("distill", flags, files, ["train", "unlabeled"])
    # Stratified over the 10 labeled classes only (the pool's -1 is not a class).
    chosen = distill.labeled_keys
    assert len(chosen) == 20 and all(k.startswith(b"train/") for k in chosen)
    assert (distill.num_examples, distill.num_unlabeled()) == (500, 300)
    finetune = _task("finetune", flags, files, ["train"])
    assert sorted(finetune.training_keys()) == sorted(chosen)


def test_fine_tuning_never_trains_on_label_minus_one(tmp_path):
    artifact = tmp_path / "transformed_examples"
    files = {
        "train": _write_split(artifact, "train", [0, 1, -1, 2, -1]),
        "test": _write_split(artifact, "test", [0, 1, 2]),
    }
    task = _task("finetune", {}, files, ["train"])
    assert task.num_examples == 3 and task.num_unlabeled() == 0
    assert np.array_equal(
        np.sort(task.training_keys()), [b"train/00000.png", b"train/00001.png", b"train/00003.png"]
    )


def _stats(labels: dict[str, list[int]]) -> dict[str, SplitSize]:
    """What StatisticsGen reports of each split: its size and its label range."""
    return {s: SplitSize(len(v), min(v), max(v)) for s, v in labels.items()}


STAGE_READS = {
    "pretrain": ["train", "unlabeled"],
    "distill": ["train", "unlabeled"],
    "finetune": ["train"],
    "baseline": ["train"],
}


@pytest.mark.parametrize("stage", sorted(STAGE_READS))
@pytest.mark.parametrize("label_fraction", [1.0, 0.1])
def test_split_sizes_from_the_statistics_spare_reading_the_records(tmp_path, stage, label_fraction):
    labels = {"train": [c for c in range(NUM_CLASSES) for _ in range(20)], "unlabeled": [-1] * 300}
    files = _data(tmp_path, per_class=20, pool=300)
    flags = {"unlabeled_dir": str(tmp_path), "label_fraction": label_fraction}
    if stage == "baseline":
        flags["baseline"] = "supervised"
    splits = STAGE_READS[stage]
    read = _task(stage, flags, files, splits)
    sized = _task(stage, flags, files, splits, _stats({**labels, "test": list(range(10))}))
    # The same counts, schedule and shuffle either way ...
    answers = [
        (t.num_examples, t.num_unlabeled(), t.pretraining_read, t.total_steps, t.shuffle_buffer)
        for t in (read, sized)
    ]
    assert answers[0] == answers[1]
    assert read.pretraining_read == 500  # the pool counts in what pretraining read, always
    # ... but with the statistics the records are read only to select a label subset.
    assert read.records.reads >= 1
    assert sized.records.reads == (0 if sized.labeled_keys is None else 1)
    if label_fraction < 1 and stage != "pretrain":
        assert sized.records.reads == 1


def test_statistics_that_cannot_settle_the_labels_lead_to_reading_them(tmp_path):
    """A labeled split whose label range spans -1 holds some unlabeled records: only reading
    them tells how many."""
    artifact = tmp_path / "transformed_examples"
    files = {
        "train": _write_split(artifact, "train", [0, 1, -1, 2, -1]),
        "test": _write_split(artifact, "test", [0, 1, 2]),
    }
    task = _task("finetune", {}, files, ["train"], {"train": SplitSize(5, -1, 2)})
    assert task.num_examples == 3 and task.records.reads == 1
    task = _task("pretrain", {}, files, ["train"], {"train": SplitSize(5, None, None)})
    assert (task.num_examples, task.num_unlabeled(), task.records.reads) == (5, 2, 1)


def test_the_knn_memory_bank_is_the_labeled_train_split_only(tmp_path):
    files = _data(tmp_path, per_class=2, pool=5)
    flags = {"unlabeled_dir": str(tmp_path), "knn_every_epochs": 1}
    task = _task("pretrain", flags, files, ["train", "unlabeled"])
    monitor = task.monitor(types.SimpleNamespace(image_size=32), checkpoint_every=1)
    assert monitor.train_files == [files["train"]] and monitor.eval_files == [files["test"]]


# ----- the one training step every stage shares (`Task.train_step`) -----


class _Linear(keras.Model):
    """logits = images (flattened) @ w: small enough to differentiate by hand."""

    def __init__(self, w: np.ndarray):
        super().__init__()
        self.w = tf.Variable(w, dtype=tf.float32)

    def call(self, images, training=False):
        flat = tf.reshape(images, [tf.shape(images)[0], -1])
        out = flat @ self.w
        return {"logits_sup": out, "proj_head_output": out}


class _Toy(Task):
    """Two weighted terms, a differentiable one that is only recorded, and an accuracy."""

    metric_names = ("total_loss", "mse", "mean", "monitor", "acc", "weight_decay")
    progress_metrics = ("total_loss", "acc")
    loss_weights = types.MappingProxyType({"mse": 1.0, "mean": 0.25})

    def losses(self, model, batch, training):
        x, y = batch
        pred = model(x, training=training)["logits_sup"][:, 0]
        return {
            "mse": tf.reduce_mean((pred - y) ** 2),
            "mean": tf.reduce_mean(pred),
            "monitor": 100.0 * tf.reduce_sum(model.w**2),  # would dominate if it were trained on
            "acc": tf.reduce_mean(tf.cast(pred > 0, tf.float32)),
        }


def _step_config(stage: str, train):
    return TrainerConfig(
        stage, InputConfig(), AugmentConfig(), ModelConfig(), train, RuntimeConfig()
    )


def _step(task: Task, model, lr: float, *batch) -> dict[str, float]:
    metrics = task.build_metrics()
    optimizer = keras.optimizers.SGD(lr)
    tf.function(task.train_step(model, optimizer, metrics), autograph=False)(*batch)
    return {n: float(m.result()) for n, m in metrics.items() if m.count.numpy() > 0}


def test_the_step_is_one_sgd_update_on_the_weighted_terms_plus_weight_decay():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3)).astype(np.float32)
    y = rng.normal(size=6).astype(np.float32)
    w = rng.normal(size=(3, 1)).astype(np.float32)
    lr, wd = 0.1, 0.3
    task = _Toy.without_inputs(
        _step_config("toy", StageConfig(weight_decay=wd, optimizer="momentum"))
    )
    model = _Linear(w)
    recorded = _step(task, model, lr, tf.constant(x), tf.constant(y))

    x64, y64, w64 = x.astype(np.float64), y.astype(np.float64), w[:, 0].astype(np.float64)
    pred = x64 @ w64
    mse, mean, decay = np.mean((pred - y64) ** 2), np.mean(pred), wd * np.sum(w64**2) / 2
    grad = 2 / 6 * x64.T @ (pred - y64) + 0.25 * x64.mean(axis=0) + wd * w64
    np.testing.assert_allclose(model.w.numpy()[:, 0], w64 - lr * grad, rtol=1e-5, atol=1e-6)
    expected = {
        "total_loss": mse + 0.25 * mean + decay,
        "mse": mse,
        "mean": mean,  # recorded unweighted
        "monitor": 100.0 * np.sum(w64**2),
        "acc": np.mean(pred > 0),
        "weight_decay": decay,
    }
    assert recorded == pytest.approx(expected, rel=1e-5)
    assert list(recorded) == list(_Toy.metric_names)


def test_a_step_whose_terms_and_metrics_disagree_stops_in_one_line():
    class Unweighted(_Toy):
        loss_weights = types.MappingProxyType({})

    class Unrecorded(_Toy):
        metric_names = ("total_loss", "mse", "mean", "acc", "weight_decay")

    config = _step_config("toy", StageConfig(weight_decay=0.0, optimizer="momentum"))
    batch = (tf.zeros([2, 3]), tf.zeros([2]))
    with pytest.raises(ValueError, match="^toy: loss_weights names no loss to train on$"):
        _step(Unweighted.without_inputs(config), _Linear(np.ones([3, 1])), 0.1, *batch)
    with pytest.raises(ValueError, match="^toy: losses.. and metric_names disagree on monitor$"):
        _step(Unrecorded.without_inputs(config), _Linear(np.ones([3, 1])), 0.1, *batch)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_distillation_weights_the_label_loss_in_the_total_only():
    rng = np.random.default_rng(1)
    k, temperature, label_weight, lr = 4, 2.0, 0.7, 0.5
    x = rng.normal(size=(5, 3)).astype(np.float32)
    labels = np.array([0, -1, 3, 1, -1])
    w = rng.normal(size=(3, k)).astype(np.float32)
    teacher_logits = rng.normal(size=(5, k)).astype(np.float32)
    train = DistillConfig(
        weight_decay=0.0,
        optimizer="momentum",
        distill_temperature=temperature,
        distill_label_weight=label_weight,
    )
    task = DistillTask.without_inputs(_step_config("distill", train))
    calls = []

    def teacher(images, trainable):
        calls.append(trainable)
        return {"logits_sup": tf.constant(teacher_logits)}

    task.teacher = teacher
    model = _Linear(w)
    recorded = _step(task, model, lr, tf.constant(x), tf.constant(labels))
    assert calls and set(calls) == {False}  # traced once or twice; always as not trainable

    s = x.astype(np.float64) @ w.astype(np.float64)
    targets = _softmax(teacher_logits / temperature)
    student = _softmax(s / temperature)
    distill = temperature**2 * np.mean(-np.sum(targets * np.log(student), axis=1))
    labeled = labels >= 0
    onehot = np.eye(k)[np.maximum(labels, 0)]
    probs = _softmax(s)
    sup = np.mean(-np.log(probs[labeled, labels[labeled]]))
    grad_logits = temperature * (student - targets) / 5
    grad_logits[labeled] += label_weight * (probs - onehot)[labeled] / labeled.sum()
    np.testing.assert_allclose(model.w.numpy(), w - lr * x.T @ grad_logits, rtol=1e-4, atol=1e-6)
    assert recorded == pytest.approx(
        {
            "total_loss": distill + label_weight * sup,
            "distill_loss": distill,
            "supervised_loss": sup,  # unweighted, as the reference logs it
            "supervised_acc": np.mean(np.argmax(s[labeled], 1) == labels[labeled]),
            "weight_decay": 0.0,
        },
        rel=1e-5,
    )


@pytest.mark.parametrize("probe", [True, False])
def test_pretraining_trains_on_the_contrastive_loss_and_the_probe_only_when_on(probe):
    rng = np.random.default_rng(2)
    temperature = 0.5
    view1 = rng.normal(size=(4, 2, 2, 1)).astype(np.float32)
    view2 = (view1 + rng.normal(scale=0.3, size=view1.shape)).astype(np.float32)
    labels = np.array([0, 1, -1, 2])
    w = rng.normal(size=(4, 3)).astype(np.float32)
    train = PretrainConfig(
        temperature=temperature,
        weight_decay=0.0,
        optimizer="momentum",
        lineareval_while_pretraining=probe,
    )
    task = PretrainTask.without_inputs(_step_config("pretrain", train))
    assert dict(task.loss_weights) == (
        {"contrast_loss": 1.0, "supervised_loss": 1.0} if probe else {"contrast_loss": 1.0}
    )
    recorded = _step(task, _Linear(w), 0.0, *map(tf.constant, (view1, view2, labels)))

    def unit(v: np.ndarray) -> np.ndarray:
        h = v.reshape(4, -1).astype(np.float64) @ w
        return h / np.linalg.norm(h, axis=1, keepdims=True)

    # The reference's logged statistics: view-1 anchors against the view-2 block.
    ab = unit(view1) @ unit(view2).T / temperature
    p = _softmax(ab)
    assert recorded["contrast_acc"] == pytest.approx(np.mean(ab.argmax(1) == np.arange(4)))
    assert recorded["contrast_entropy"] == pytest.approx(
        np.mean(-np.sum(p * np.log(p + 1e-8), axis=1)), rel=1e-5
    )
    shown = [n for n in task.metric_names if n in recorded]
    if probe:
        assert shown == list(task.metric_names)
        total = recorded["contrast_loss"] + recorded["supervised_loss"]
    else:
        assert "supervised_loss" not in recorded and "supervised_acc" not in recorded
        total = recorded["contrast_loss"]
    assert recorded["total_loss"] == pytest.approx(total, rel=1e-6)


def test_each_stage_shows_its_progress_metrics_in_recording_order():
    shown = {
        "pretrain": ("total_loss", "contrast_loss", "contrast_acc", "supervised_acc"),
        "finetune": ("total_loss", "supervised_acc"),
        "distill": ("total_loss", "distill_loss", "supervised_acc"),
    }
    tasks = {"pretrain": PretrainTask, "finetune": FinetuneTask, "distill": DistillTask}
    for stage, names in shown.items():
        task = tasks[stage]
        assert task.progress_metrics == names
        assert tuple(n for n in task.metric_names if n in names) == names
