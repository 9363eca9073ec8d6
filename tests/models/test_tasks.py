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

from models.config import semi_supervised_epochs
from models.tasks import TASKS, StageInputs
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


def _task(stage: str, flags: dict, files: dict[str, str], splits: list[str]):
    config = build_config({"dataset": "digits", **flags})
    inputs = StageInputs(
        train_files=[files[s] for s in splits],
        eval_files=[files["test"]],
        transform_output_dir="",
        num_classes=NUM_CLASSES,
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


def test_the_knn_memory_bank_is_the_labeled_train_split_only(tmp_path):
    files = _data(tmp_path, per_class=2, pool=5)
    flags = {"unlabeled_dir": str(tmp_path), "knn_every_epochs": 1}
    task = _task("pretrain", flags, files, ["train", "unlabeled"])
    monitor = task.monitor(types.SimpleNamespace(image_size=32), checkpoint_every=1)
    assert monitor.train_files == [files["train"]] and monitor.eval_files == [files["test"]]
