"""Builders shared by the Trainer-side tests: a tiny tf.Transform output from real CIFAR-10 JPEGs
and a tiny model config, so `models.driver.run_stage` runs without the TFX pipeline.

The raw examples carry the same features as the project's image-folder ExampleGen (image bytes,
integer label, label_name, filename); Transform is analyzed on the train split only and both
splits are written as GZIP TFRecords, as the TFX Transform component does.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys
from dataclasses import dataclass

import apache_beam as beam
import pytest
import tensorflow as tf
import tensorflow_transform as tft
import tensorflow_transform.beam as tft_beam
from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

from models.config import BLOCKS_PER_GROUP
from pipeline.configs import SimCLRConfig, trainer_config
from transform import preprocessing as tp

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
IMAGE_SIZE = 32
TRAIN_PER_CLASS = 8
EVAL_PER_CLASS = 3

RAW_FEATURE_SPEC = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "label_name": tf.io.FixedLenFeature([], tf.string),
    "filename": tf.io.FixedLenFeature([], tf.string),
}


@dataclass(frozen=True)
class TransformedData:
    """Paths of a Transform output plus what the tests compare against."""

    transform_output: str
    train_files: list[str]
    eval_files: list[str]
    class_names: list[str]
    train_keys: list[bytes]
    train_labels: list[int]
    eval_jpegs: list[pathlib.Path]
    eval_labels: list[int]


def _raw_split(cifar_dir: pathlib.Path, split: str, per_class: int) -> list[dict]:
    classes = sorted(p.name for p in (cifar_dir / split).iterdir() if p.is_dir())
    rows = []
    for label, name in enumerate(classes):
        for path in sorted((cifar_dir / split / name).glob("*.jpg"))[:per_class]:
            rows.append(
                {
                    "image": path.read_bytes(),
                    "label": label,
                    "label_name": name.encode(),
                    "filename": f"{split}/{name}/{path.name}".encode(),
                    "path": path,
                }
            )
    return rows


def build_transformed(cifar_dir: pathlib.Path, out_dir: pathlib.Path) -> TransformedData:
    """Runs preprocessing_fn with tf.Transform's Beam implementation over a few CIFAR images."""
    train = _raw_split(cifar_dir, "train", TRAIN_PER_CLASS)
    evals = _raw_split(cifar_dir, "test", EVAL_PER_CLASS)
    metadata = dataset_metadata.DatasetMetadata(
        schema_utils.schema_from_feature_spec(RAW_FEATURE_SPEC)
    )
    transform_output = out_dir / "transform_graph"
    examples_dir = out_dir / "transformed_examples"
    fn = functools.partial(
        tp.preprocessing_fn, custom_config={"image_size": IMAGE_SIZE, "image_format": "raw"}
    )

    def instances(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "path"} for row in rows]

    with beam.Pipeline() as pipeline:
        with tft_beam.Context(temp_dir=str(out_dir / "tmp")):
            raw_train = pipeline | "Train" >> beam.Create(instances(train), reshuffle=False)
            raw_eval = pipeline | "Eval" >> beam.Create(instances(evals), reshuffle=False)
            transform_fn = (raw_train, metadata) | tft_beam.AnalyzeDataset(fn)
            _ = transform_fn | tft_beam.WriteTransformFn(str(transform_output))
            _ = metadata | tft_beam.WriteMetadata(
                str(transform_output / tft.TFTransformOutput.RAW_METADATA_DIR), pipeline
            )
            for split, raw, shards in (("train", raw_train, 2), ("eval", raw_eval, 1)):
                transformed = ((raw, metadata), transform_fn) | f"Transform{split}" >> (
                    tft_beam.TransformDataset()
                )
                _ = (
                    transformed
                    | f"Encode{split}" >> tft_beam.EncodeTransformedDataset()
                    | f"Write{split}"
                    >> beam.io.WriteToTFRecord(
                        str(examples_dir / f"Split-{split}" / "transformed_examples"),
                        file_name_suffix=".gz",
                        num_shards=shards,
                    )
                )
    return TransformedData(
        transform_output=str(transform_output),
        train_files=[str(examples_dir / "Split-train" / "*.gz")],
        eval_files=[str(examples_dir / "Split-eval" / "*.gz")],
        class_names=sorted({row["label_name"].decode() for row in train}),
        train_keys=[row["filename"] for row in train],
        train_labels=[row["label"] for row in train],
        eval_jpegs=[row["path"] for row in evals],
        eval_labels=[row["label"] for row in evals],
    )


def tiny_config(cifar_dir: pathlib.Path, **overrides) -> SimCLRConfig:
    """A ResNet-18 at 1/8 width on 32x32 images; `overrides` maps dotted config paths to values."""
    config = SimCLRConfig()
    values = {
        "data.dataset": "cifar10",
        "data.data_dir": str(cifar_dir),
        "data.image_size": IMAGE_SIZE,
        "model.resnet_depth": 18,
        "model.width_multiplier": 0.125,
        "model.proj_out_dim": 16,
        "model.global_bn": False,
        "augment.color_jitter_strength": 0.5,
        "augment.use_blur": False,
        "pretrain.train_batch_size": 16,
        "pretrain.train_steps": 4,
        "pretrain.checkpoint_steps": 2,
        "pretrain.learning_rate": 1.0,
        "pretrain.temperature": 0.5,
        "pretrain.warmup_epochs": 0.0,
        # The linear-eval recipe's optimizer (what the pipeline's default protocol applies).
        "finetune.optimizer": "momentum",
        "finetune.learning_rate": 0.1,
        "finetune.weight_decay": 0.0,
        "finetune.warmup_epochs": 0.0,
        "finetune.train_batch_size": 16,
        "finetune.train_steps": 3,
        "finetune.checkpoint_steps": 3,
        "runtime.strategy": "default",
        # Pinned: tests that compare numbers must not depend on whether the CPU has AMX.
        "runtime.mixed_precision": "float32",
        "runtime.eval_batch_size": 64,
        "runtime.log_every_steps": 1,
        **overrides,
    }
    for path, value in values.items():
        section, name = path.split(".")
        setattr(getattr(config, section), name, value)
    return config


def one_block_per_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """Until the test ends, a ResNet-18 is built with one residual block per group instead of
    two: every kind of layer (stem, projection shortcuts, batch norms, heads) at half the depth,
    so its steps and exports trace in about half the time. For checks that do not depend on the
    backbone's depth."""
    monkeypatch.setitem(BLOCKS_PER_GROUP, 18, (1, 1, 1, 1))


def step_task(train, stage: str = "pretrain"):
    """The `stage` task with `train` (a StageConfig) and default other sections, for running its
    step on hand-made batches (no input files)."""
    from models import config as mc
    from models.tasks.distill import DistillTask
    from models.tasks.finetune import FinetuneTask
    from models.tasks.pretrain import PretrainTask

    tasks = {"pretrain": PretrainTask, "finetune": FinetuneTask, "distill": DistillTask}
    trainer = mc.TrainerConfig(
        stage, mc.InputConfig(), mc.AugmentConfig(), mc.ModelConfig(), train, mc.RuntimeConfig()
    )
    return tasks[stage].without_inputs(trainer)


def run_stage(config: SimCLRConfig, stage: str, **kwargs) -> dict[str, float]:
    """Runs one Trainer stage of `config` the way the pipeline configures it."""
    from models.driver import run_stage as drive

    return drive(trainer_config(config, stage), **kwargs)


def run_stage_args(
    data: TransformedData, run_dir: pathlib.Path, base_model: str | None = None
) -> dict:
    """Keyword arguments of run_stage for a run whose outputs all live under run_dir."""
    return {
        "train_files": data.train_files,
        "eval_files": data.eval_files,
        "transform_output_dir": data.transform_output,
        "serving_model_dir": str(run_dir / "serving_model"),
        "model_run_dir": str(run_dir / "model_run"),
        "base_model": base_model,
    }


def read_scalars(summary_dir: pathlib.Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from every TensorBoard event file directly under summary_dir."""
    out: dict[str, dict[int, float]] = {}
    for path in sorted(summary_dir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    return out


# Runs one Trainer stage in its own Python process; argv[1] is a JSON file of its arguments.
_STAGE_SCRIPT = """
import json, os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
from models.config import TrainerConfig
from models.driver import run_stage
spec = json.load(open(sys.argv[1]))
run_stage(TrainerConfig.from_json(spec["trainer"]), **spec["kwargs"])
"""


def stage_command(
    config: SimCLRConfig, stage: str, kwargs: dict, spec_file: pathlib.Path
) -> list[str]:
    """The command line that runs run_stage(config, stage, **kwargs) in a fresh interpreter."""
    trainer = trainer_config(config, stage).to_json()
    spec_file.write_text(json.dumps({"trainer": trainer, "kwargs": kwargs}))
    return [sys.executable, "-c", _STAGE_SCRIPT, str(spec_file)]


def subprocess_env() -> dict[str, str]:
    """Keras 2, quiet logs and the repository importable in a child interpreter."""
    env = dict(os.environ)
    env.update(
        TF_USE_LEGACY_KERAS="1",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")])),
    )
    return env


def run_python(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter outside the repository; fails with its output."""
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**subprocess_env(), "PYTHONPATH": ""},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc
