"""Quality of SimCLR pretraining on CIFAR-10 under a fixed wall-clock budget.

    python bench/quality.py [--budget_minutes=20] [--out=output/quality]

Everything runs through this project's own code: the Transform output of a `local_runner.py`
run (made once, or reused with --pipeline_dir), Trainer stages configured as the command line
configures them (`pipeline.configs.build_config` → `trainer_config`) and run by
`models.driver.run_stage`, and the kNN of `models/knn.py`. What it measures on the test split:

- SimCLR pretraining for --budget_minutes of training time: weighted kNN top-1 (k=200, T=0.1,
  normalized `final_avg_pool` features), and linear evaluation top-1 (the `linear_eval`
  protocol: a linear head on the frozen backbone) trained for --linear_eval_minutes;
- two floors measured the same way on the same test images: the same encoder at random
  initialization (kNN and linear evaluation), and kNN on raw pixels;
- semi-supervised, per --label_fractions: SimCLR pretraining + the `fine_tune` protocol for
  --finetune_minutes on that fraction of the labels, against supervised training from scratch on
  the same labels for the same total (budget + fine-tune minutes);
- a curve of kNN top-1 against training minutes (`curve.png`).

With --unlabeled_share=S the labels are not masked: S of every train class is moved (as
symbolic links) into `unlabeled/`, a real unlabeled pool the pipeline ingests as its own split.
Pretraining then reads the pool and the labeled rest; fine-tuning and the supervised arm read
the labeled rest with all its labels (the same images --label_fractions=1-S with the same seed
would select), and the kNN memory bank holds the labeled rest only.

Minutes become step counts (the learning-rate schedules need them) through step times measured
by short calibration runs of the same stages (or --step_seconds). Training time is read back
from each Trainer's TensorBoard events; what the kNN monitor takes (the floors before the first
step, each evaluation with its checkpoint) is left out of it. Writes results.json, results.md
and curve.png under --out.
"""

from __future__ import annotations

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import dataclasses
import hashlib
import json
import math
import pathlib
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from models import data as data_lib  # noqa: E402
from models import knn, precision  # noqa: E402
from models.config import RESNET_DEPTHS, UNLABELED_SPLIT, TrainerConfig  # noqa: E402
from models.tasks import registry  # noqa: E402
from pipeline.configs import build_config, trainer_config  # noqa: E402
from transform import preprocessing as tp  # noqa: E402

KNN_TAG = knn.METRIC
LOSS_TAG = "train/total_loss"
# The quality targets (CIFAR-10 after 20 minutes): SimCLR kNN top-1 this far above the higher
# floor, and SimCLR + fine-tune above supervised from scratch on this fraction of the labels.
KNN_MARGIN_TARGET = 0.15
TARGET_FRACTION = 0.01
# Step kinds with their own step time: two views (pretrain), all layers on one view (fine-tune
# and supervised), a head on a frozen backbone (linear evaluation).
STEP_KINDS = ("pretrain", "supervised", "linear")


# ----- command line -----


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget_minutes", type=float, default=20.0, help="Pretraining time.")
    p.add_argument(
        "--finetune_minutes",
        type=float,
        default=-1.0,
        help="Fine-tuning time per label fraction; -1: a tenth of the budget.",
    )
    p.add_argument(
        "--linear_eval_minutes",
        type=float,
        default=-1.0,
        help="Linear-evaluation time per encoder; -1: 15%% of the budget.",
    )
    p.add_argument("--label_fractions", default="0.1,0.01", help="Comma-separated fractions.")
    p.add_argument(
        "--unlabeled_share",
        type=float,
        default=0.0,
        help="Move this share of every train class into an unlabeled pool (instead of masking "
        "labels with --label_fractions); 0 = off.",
    )
    p.add_argument("--data_dir", default=str(REPO_ROOT.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--out", default=str(REPO_ROOT / "output" / "quality"), help="Report folder.")
    p.add_argument(
        "--work_dir", default="", help="Pipeline output and stage runs; default <out>/work."
    )
    p.add_argument(
        "--pipeline_dir",
        default="",
        help="A local_runner.py --model_dir whose Transform output to reuse (no new run).",
    )
    p.add_argument(
        "--transform_graph",
        default="",
        help="An existing Transform graph directory, used with --train_examples and "
        "--test_examples (globs of its transformed GZIP TFRecords) instead of a pipeline run.",
    )
    p.add_argument("--train_examples", default="", help="See --transform_graph.")
    p.add_argument("--test_examples", default="", help="See --transform_graph.")
    p.add_argument("--train_images", type=int, default=0, help="Subsample the train split; 0=all.")
    p.add_argument("--test_images", type=int, default=0, help="Subsample the test split; 0=all.")
    p.add_argument("--resnet_depth", type=int, default=18, choices=RESNET_DEPTHS)
    p.add_argument("--width_multiplier", type=float, default=0.25)
    p.add_argument("--proj_out_dim", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=256, help="Pretraining batch.")
    p.add_argument("--finetune_batch_size", type=int, default=256, help="Supervised batches.")
    p.add_argument("--learning_rate", type=float, default=1.0, help="Pretraining LARS rate.")
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument(
        "--warmup_fraction", type=float, default=0.05, help="Warm-up share of a stage's steps."
    )
    p.add_argument("--supervised_optimizer", default="momentum", choices=("momentum", "lars"))
    p.add_argument("--supervised_learning_rate", type=float, default=0.1)
    p.add_argument("--supervised_weight_decay", type=float, default=5e-4)
    p.add_argument(
        "--mixed_precision",
        default="auto",
        choices=precision.PRECISIONS,
        help="auto (the pipeline's default): bfloat16 on CPUs with AMX, else float32.",
    )
    p.add_argument("--knn_points", type=int, default=8, help="kNN evaluations along pretraining.")
    p.add_argument("--eval_batch_size", type=int, default=512)
    p.add_argument("--log_every_steps", type=int, default=10)
    p.add_argument(
        "--calibration_steps", type=int, default=20, help="Timed steps per calibration run."
    )
    p.add_argument(
        "--step_seconds",
        default="",
        help="Skip calibration: 'pretrain=S,supervised=S,linear=S' seconds per step.",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.finetune_minutes < 0:
        args.finetune_minutes = args.budget_minutes / 10
    if args.linear_eval_minutes < 0:
        args.linear_eval_minutes = args.budget_minutes * 0.15
    for name in ("budget_minutes", "finetune_minutes", "linear_eval_minutes"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive")
    for name in ("batch_size", "finetune_batch_size", "knn_points", "log_every_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be positive")
    try:
        args.label_fractions = parse_fractions(args.label_fractions)
        args.step_seconds = parse_step_seconds(args.step_seconds)
    except ValueError as e:
        p.error(str(e))
    given = [args.transform_graph, args.train_examples, args.test_examples]
    if any(given) and not all(given):
        p.error("--transform_graph, --train_examples and --test_examples go together")
    if not 0 <= args.unlabeled_share < 1:
        p.error("--unlabeled_share must be in [0, 1)")
    if args.unlabeled_share and (any(given) or args.train_images):
        p.error("--unlabeled_share builds its own pipeline run over the whole train split")
    if args.unlabeled_share:
        args.label_fractions = [1.0]  # every label of the labeled rest
    if not (pathlib.Path(args.data_dir) / "train").is_dir():
        p.error(f"--data_dir: no train/ class folders under {args.data_dir}")
    # Absolute, since the pipeline run works from the repository root.
    args.work_dir = args.work_dir or str(pathlib.Path(args.out) / "work")
    paths = ("data_dir", "out", "work_dir", "pipeline_dir", "transform_graph")
    for name in (*paths, "train_examples", "test_examples"):
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    return args


def parse_fractions(text: str) -> list[float]:
    """'0.1,0.01' → [0.1, 0.01]; each in (0, 1)."""
    fractions = [float(part) for part in text.split(",") if part.strip()]
    if not fractions or not all(0 < f < 1 for f in fractions):
        raise ValueError(f"--label_fractions: fractions in (0, 1) expected, got {text!r}")
    return fractions


def parse_step_seconds(text: str) -> dict[str, float]:
    """'pretrain=0.5,supervised=0.3,linear=0.2' → seconds per step of each kind; '' → {}."""
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        kind, _, value = part.partition("=")
        if kind.strip() not in STEP_KINDS or float(value) <= 0:
            raise ValueError(f"--step_seconds: expected {'=S,'.join(STEP_KINDS)}=S, got {text!r}")
        out[kind.strip()] = float(value)
    if set(out) != set(STEP_KINDS):
        raise ValueError(f"--step_seconds: give all of {STEP_KINDS}")
    return out


# ----- data: the pipeline's Transform output -----


@dataclass(frozen=True)
class TransformedData:
    """What the Transform component hands the Trainer: its graph and the transformed splits."""

    transform_graph: str
    train_files: list[str]
    test_files: list[str]
    source: str
    # The unlabeled pool's transformed split, which only pretraining reads.
    unlabeled_files: list[str] = field(default_factory=list)


def run_pipeline_for_transform(data_dir: str, model_dir: pathlib.Path, per_class: int) -> None:
    """Runs `local_runner.py` on the dataset with a one-step supervised Trainer, for its
    Transform output (cached on reruns); the Trainer and Evaluator results are not used."""
    cmd = [
        sys.executable,
        str(REPO_ROOT / "local_runner.py"),
        "--dataset=cifar10",
        f"--data_dir={data_dir}",
        f"--model_dir={model_dir}",
        "--train_mode=finetune",
        "--train_steps=1",
        "--train_batch_size=16",
        "--width_multiplier=0.125",
        "--min_top1=0",
        "--enable_cache",
    ]
    if per_class:
        cmd.append(f"--max_images_per_class={per_class}")
    print("transform: " + " ".join(cmd[1:]), flush=True)
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1")
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"local_runner.py failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def transform_from_pipeline(model_dir: str, eval_split: str = "test") -> TransformedData:
    """The Transform outputs of the newest Transform execution recorded in a local_runner.py
    --model_dir's ML Metadata (a cached execution points at the artifacts it reused)."""
    import ml_metadata as mlmd
    from ml_metadata.proto import metadata_store_pb2 as pb

    path = os.path.join(model_dir, "metadata.sqlite")
    if not os.path.exists(path):
        raise ValueError(f"no ML Metadata at {path}: run local_runner.py with --model_dir first")
    connection = pb.ConnectionConfig()
    connection.sqlite.filename_uri = path
    connection.sqlite.connection_mode = pb.SqliteMetadataSourceConfig.READONLY
    store = mlmd.MetadataStore(connection)
    done = (pb.Execution.COMPLETE, pb.Execution.CACHED)
    executions = [
        e
        for ctx in store.get_contexts_by_type("node")
        if ctx.name.split(".")[-1] == "Transform"
        for e in store.get_executions_by_context(ctx.id)
        if e.last_known_state in done
    ]
    if not executions:
        raise ValueError(f"{model_dir}: no finished Transform execution")
    latest = max(executions, key=lambda e: (e.create_time_since_epoch, e.id))
    uris: dict[str, str] = {}
    for event in store.get_events_by_execution_ids([latest.id]):
        if event.type == pb.Event.OUTPUT and event.path.steps:
            [artifact] = store.get_artifacts_by_id([event.artifact_id])
            uris[event.path.steps[0].key] = artifact.uri
    examples = uris["transformed_examples"]
    pool = os.path.join(examples, f"Split-{UNLABELED_SPLIT}")
    return TransformedData(
        transform_graph=uris["transform_graph"],
        train_files=[os.path.join(examples, "Split-train", "*")],
        test_files=[os.path.join(examples, f"Split-{eval_split}", "*")],
        source=f"Transform output of the local_runner.py run in {model_dir}",
        unlabeled_files=[os.path.join(pool, "*")] if tf.io.gfile.isdir(pool) else [],
    )


def pool_tree(data_dir: str, share: float, seed: int, out: pathlib.Path) -> pathlib.Path:
    """`data_dir` as symbolic links with `share` of every train class moved into `unlabeled/`.

    The labeled rest is the stratified subset `select_label_fraction` picks for 1 - share with
    `seed` (keys '<class>/<file>', as the ExampleGen writes them), so the label-masking run
    with --label_fractions=1-share fine-tunes on the same images.
    """
    source = pathlib.Path(data_dir)
    classes = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    files = [(c, f.name) for c in classes for f in sorted((source / "train" / c).iterdir())]
    labels = np.array([classes.index(c) for c, _ in files])
    keys = np.array([f"{c}/{name}".encode() for c, name in files], dtype=object)
    labeled = set(data_lib.select_label_fraction(labels, keys, 1 - share, seed).tolist())
    if out.exists():
        shutil.rmtree(out)
    for c, name in files:
        folder = "train" if f"{c}/{name}".encode() in labeled else UNLABELED_SPLIT
        (out / folder / c).mkdir(parents=True, exist_ok=True)
        (out / folder / c / name).symlink_to(source / "train" / c / name)
    for split in (p for p in source.iterdir() if p.is_dir() and p.name != "train"):
        (out / split.name).symlink_to(split)
    return out


def stratified_subset(labels: np.ndarray, keys: np.ndarray, count: int) -> set[bytes]:
    """Keys of `count` examples spread over the classes as evenly as possible (the first by
    key within each class, so the subset depends on the data only)."""
    classes = np.unique(labels)
    chosen: set[bytes] = set()
    for i, label in enumerate(classes):
        share = count // len(classes) + (1 if i < count % len(classes) else 0)
        chosen.update(sorted(bytes(k) for k in keys[labels == label])[:share])
    return chosen


def subsample(files: list[str], count: int, out_dir: pathlib.Path) -> list[str]:
    """`files` reduced to a stratified `count` examples, rewritten unchanged (GZIP TFRecords);
    the files themselves when count is 0 or not smaller than the split."""
    labels, keys = data_lib.read_labels_and_keys(files)
    if count <= 0 or count >= len(keys):
        return files
    keep = stratified_subset(labels, keys, count)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "examples.gz"
    features = {tp.KEY_KEY: tf.io.FixedLenFeature([], tf.string)}
    pattern = sorted({f for p in files for f in tf.io.gfile.glob(p)})
    with tf.io.TFRecordWriter(str(target), options="GZIP") as writer:
        for record in tf.data.TFRecordDataset(pattern, compression_type="GZIP"):
            key = tf.io.parse_single_example(record, features)[tp.KEY_KEY].numpy()
            if key in keep:
                writer.write(record.numpy())
    return [str(target)]


def split_fingerprint(files: list[str]) -> dict[str, Any]:
    """Which images a number is about: their count, classes, and a hash of the transformed
    records themselves (keys alone repeat across CIFAR-10's splits: both have 0000.jpg)."""
    labels, _ = data_lib.read_labels_and_keys(files)
    pattern = sorted({f for p in files for f in tf.io.gfile.glob(p)})
    digests = sorted(
        hashlib.sha256(record).digest()
        for record in tf.data.TFRecordDataset(pattern, compression_type="GZIP").as_numpy_iterator()
    )
    return {
        "examples": len(digests),
        "classes": len(set(labels.tolist())),
        "records_sha256": hashlib.sha256(b"".join(digests)).hexdigest(),
    }


def prepare_data(args: argparse.Namespace) -> TransformedData:
    """The Transform output to train on: given, reused from a pipeline run, or made by one;
    then subsampled when asked."""
    work = pathlib.Path(args.work_dir)
    if args.transform_graph:
        data = TransformedData(
            args.transform_graph,
            [args.train_examples],
            [args.test_examples],
            "given Transform output",
        )
    elif args.pipeline_dir:
        data = transform_from_pipeline(args.pipeline_dir)
    elif args.unlabeled_share:
        tree = pool_tree(args.data_dir, args.unlabeled_share, args.seed, work / "pool_tree")
        key = f"{os.path.abspath(args.data_dir)}:pool:{args.unlabeled_share}:{args.seed}"
        model_dir = work / f"pipeline-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        run_pipeline_for_transform(str(tree), model_dir, 0)
        data = transform_from_pipeline(str(model_dir))
    else:
        classes = [p for p in (pathlib.Path(args.data_dir) / "train").iterdir() if p.is_dir()]
        wanted = max(args.train_images, args.test_images)
        per_class = math.ceil(wanted / len(classes)) if wanted else 0
        if args.train_images == 0 or args.test_images == 0:
            per_class = 0  # one split whole: ingest everything
        key = hashlib.sha256(f"{os.path.abspath(args.data_dir)}:{per_class}".encode()).hexdigest()
        model_dir = work / f"pipeline-{key[:12]}"
        run_pipeline_for_transform(args.data_dir, model_dir, per_class)
        data = transform_from_pipeline(str(model_dir))
    return dataclasses.replace(
        data,
        train_files=subsample(data.train_files, args.train_images, work / "subset" / "train"),
        test_files=subsample(data.test_files, args.test_images, work / "subset" / "test"),
    )


# ----- the Trainer's own timeline -----


@dataclass
class Timeline:
    """A Trainer stage's training time, read back from its TensorBoard events.

    `start` is when training began: the loop's summary writer is created just before the first
    step (its first event carries that time, to the second), and when the kNN floors are
    measured before the first step, training begins once they are logged at step 0. `train`
    maps each summary step to when its chunk of steps ended; `knn` maps a step to (when its kNN
    evaluation was logged, accuracy). The time between a chunk's end and its kNN result
    (checkpoint and kNN) is not training.
    """

    start: float
    train: dict[int, float]
    knn: dict[int, tuple[float, float]] = field(default_factory=dict)

    def training_seconds(self, step: int) -> float:
        """Training time from the start to the end of `step`'s chunk, kNN pauses left out."""
        paused = sum(end - self.train[s] for s, (end, _) in self.knn.items() if s < step)
        return self.train[step] - self.start - paused

    @property
    def last_step(self) -> int:
        return max(self.train)

    def minutes(self) -> float:
        """Training minutes of the whole run."""
        return self.training_seconds(self.last_step) / 60

    def curve(self) -> list[dict[str, float]]:
        """kNN top-1 against training minutes, in step order."""
        return [
            {"step": s, "minutes": round(self.training_seconds(s) / 60, 4), "knn_top1": acc}
            for s, (_, acc) in sorted(self.knn.items())
        ]


def read_timeline(summary_dir: str | pathlib.Path) -> Timeline:
    """The Timeline of the one training run whose events are in `summary_dir`."""
    files = sorted(pathlib.Path(summary_dir).glob("events.out.tfevents.*"))
    if len(files) != 1:
        raise ValueError(f"{summary_dir}: expected one events file, found {len(files)}")
    created: float | None = None
    before_first_step: list[float] = []
    train: dict[int, float] = {}
    knn_points: dict[int, tuple[float, float]] = {}
    for event in tf.compat.v1.train.summary_iterator(str(files[0])):
        created = event.wall_time if created is None else min(created, event.wall_time)
        for value in event.summary.value:
            if event.step == 0:
                before_first_step.append(event.wall_time)
            elif value.tag == LOSS_TAG:
                train[event.step] = event.wall_time
            elif value.tag == KNN_TAG:
                knn_points[event.step] = (event.wall_time, float(tf.make_ndarray(value.tensor)))
    if created is None or not train:
        raise ValueError(f"{summary_dir}: no training summaries")
    return Timeline(max([created, *before_first_step]), train, knn_points)


@dataclass(frozen=True)
class StepCost:
    """Seconds per training step, and the once-per-run seconds before steady state (tracing
    the step, filling the input pipeline)."""

    step_seconds: float
    overhead_seconds: float = 0.0

    @classmethod
    def measure(cls, timeline: Timeline, warmup_steps: int) -> StepCost:
        """From a calibration run: the rate after `warmup_steps`, and what the warm-up cost
        beyond that rate."""
        steps = sorted(s for s in timeline.train if s >= warmup_steps)
        if len(steps) < 2:
            raise ValueError("calibration: too few summary steps after the warm-up")
        first, last = steps[0], steps[-1]
        rate = (timeline.training_seconds(last) - timeline.training_seconds(first)) / (last - first)
        overhead = timeline.training_seconds(first) - first * rate
        return cls(rate, max(0.0, overhead))

    def steps_for(self, minutes: float) -> int:
        """Training steps that fit in `minutes` of wall-clock training (at least one)."""
        return max(1, int((minutes * 60 - self.overhead_seconds) / self.step_seconds))


# ----- stages, configured as the command line configures them -----


@dataclass
class StageRun:
    """One Trainer stage: its eval results, its results.json, timeline and exported model
    (empty when the stage was not exported)."""

    results: dict[str, float]
    record: dict[str, Any]
    timeline: Timeline
    serving_model_dir: str


class Bench:
    """Runs the benchmark's stages on one Transform output."""

    def __init__(self, args: argparse.Namespace, data: TransformedData):
        self.args = args
        self.data = data
        self.runs = pathlib.Path(args.work_dir) / "runs"
        self.train_labels, self.train_keys = data_lib.read_labels_and_keys(data.train_files)
        self.num_train = len(self.train_keys)
        # Pretraining reads the unlabeled pool too (when there is one).
        self.pretrain_files = list(data.train_files) + list(data.unlabeled_files)
        pool = data_lib.count_records(data.unlabeled_files) if data.unlabeled_files else 0
        self.num_pretrain = self.num_train + pool
        self.test = split_fingerprint(data.test_files)

    def flags(self, **stage: Any) -> dict[str, Any]:
        """local_runner.py flags of one stage: the model and data, plus the stage's own."""
        a = self.args
        return {
            "dataset": "cifar10",
            "data_dir": a.data_dir,
            "resnet_depth": a.resnet_depth,
            "width_multiplier": a.width_multiplier,
            "proj_out_dim": a.proj_out_dim,
            "mixed_precision": a.mixed_precision,
            "eval_batch_size": a.eval_batch_size,
            "log_every_steps": a.log_every_steps,
            "cache_dataset": True,
            "seed": a.seed,
            **stage,
        }

    def pretrain(self, steps: int, knn_every_epochs: int = 0) -> TrainerConfig:
        """The SimCLR CIFAR-10 recipe (LARS, T=0.5, jitter 0.5, no blur) for `steps` steps."""
        a = self.args
        # The Trainer shrinks a batch larger than the data to the data (one replica).
        epochs = steps * min(a.batch_size, self.num_pretrain) / self.num_pretrain
        flags = self.flags(
            train_batch_size=a.batch_size,
            train_steps=steps,
            learning_rate=a.learning_rate,
            temperature=a.temperature,
            warmup_epochs=a.warmup_fraction * epochs,
        )
        if knn_every_epochs:
            flags.update(knn_every_epochs=knn_every_epochs, checkpoint_epochs=knn_every_epochs)
        else:
            flags.update(checkpoint_steps=steps)
        return trainer_config(build_config(flags), "pretrain")

    def linear_eval(self, steps: int) -> TrainerConfig:
        """The `linear_eval` protocol: a zero-initialized linear head on the frozen backbone."""
        flags = self.flags(
            finetune_protocol="linear_eval",
            finetune_train_steps=steps,
            finetune_train_batch_size=self.args.finetune_batch_size,
            finetune_checkpoint_steps=steps,
        )
        return trainer_config(build_config(flags), "finetune")

    def fine_tune(self, steps: int, fraction: float) -> TrainerConfig:
        """The `fine_tune` protocol (SimCLRv2) on a stratified fraction of the labels."""
        flags = self.flags(
            finetune_protocol="fine_tune",
            label_fraction=fraction,
            label_fraction_seed=self.args.seed,
            finetune_train_steps=steps,
            finetune_train_batch_size=self.args.finetune_batch_size,
            finetune_checkpoint_steps=steps,
        )
        return trainer_config(build_config(flags), "finetune")

    def supervised(self, steps: int, fraction: float = 1.0) -> TrainerConfig:
        """The pipeline's supervised baseline (--baseline=supervised: random initialization, the
        same labels) for `steps` steps, the same minutes as the SimCLR arm it is compared with."""
        a = self.args
        labeled = self.labeled_count(fraction)
        flags = self.flags(
            baseline="supervised",
            baseline_budget="epochs",
            label_fraction=fraction,
            label_fraction_seed=a.seed,
            baseline_train_steps=steps,
            baseline_train_batch_size=a.finetune_batch_size,
            baseline_checkpoint_steps=steps,
            baseline_optimizer=a.supervised_optimizer,
            baseline_learning_rate=a.supervised_learning_rate,
            baseline_weight_decay=a.supervised_weight_decay,
            baseline_warmup_epochs=a.warmup_fraction
            * steps
            * min(a.finetune_batch_size, labeled)
            / labeled,
        )
        return trainer_config(build_config(flags), "baseline")

    def labeled_count(self, fraction: float) -> int:
        """Size of the labeled subset the Trainer selects for `fraction` (both semi-supervised
        arms select it with the same seed, so they train on the same labels)."""
        if fraction >= 1.0:
            return self.num_train
        chosen = data_lib.select_label_fraction(
            self.train_labels, self.train_keys, fraction, self.args.seed
        )
        return len(chosen)

    def run(
        self,
        name: str,
        config: TrainerConfig,
        base_model: str | None = None,
        export: bool = False,
    ) -> StageRun:
        """One Trainer stage through models.driver.run_stage, in a fresh folder (so never
        resumed from an earlier run's checkpoints), evaluated on the test split. Its model is
        exported (to <run>/serving_model) only with `export`: the arms report their evaluation,
        only the pretrained encoder is restored by later stages."""
        from models.driver import run_stage

        run_dir = self.runs / name
        shutil.rmtree(run_dir, ignore_errors=True)
        serving = str(run_dir / "serving_model") if export else ""
        print(f"== {name}", flush=True)
        reads_pool = registry.get(config.stage).reads_unlabeled
        results = run_stage(
            config,
            train_files=self.pretrain_files if reads_pool else self.data.train_files,
            eval_files=self.data.test_files,
            transform_output_dir=self.data.transform_graph,
            serving_model_dir=serving,
            model_run_dir=str(run_dir / "model_run"),
            base_model=base_model,
        )
        record = json.loads((run_dir / "model_run" / "results.json").read_text())
        return StageRun(results, record, read_timeline(run_dir / "model_run" / "train"), serving)

    def calibrate(self) -> dict[str, StepCost]:
        """The cost of each kind of step, from short runs of the real stages."""
        a = self.args
        warm = a.log_every_steps
        total = warm + max(a.calibration_steps, a.log_every_steps)
        configs = {
            "pretrain": self.pretrain(total),
            # At the smallest fraction: picking the labeled examples out of the stream
            # costs most there, so no arm is given steps it cannot take in time.
            "supervised": self.supervised(total, min(a.label_fractions)),
            "linear": self.linear_eval(total),
        }
        return {
            kind: StepCost.measure(self.run(f"calibrate_{kind}", config).timeline, warm)
            for kind, config in configs.items()
        }


# ----- the report -----


@dataclass
class Row:
    """One number on the test split and what it was measured on."""

    id: str
    method: str
    metric: str
    value: float
    test_examples: int
    test_files: list[str]
    train_minutes: float | None = None


def row_from_eval(
    row_id: str, method: str, metric: str, results: dict, data: TransformedData, minutes: float
) -> Row:
    """A row from a Trainer stage's evaluation of its supervised head on the test split."""
    return Row(
        row_id,
        method,
        metric,
        float(results["eval/label_top_1_accuracy"]),
        int(results["eval/num_examples"]),
        list(data.test_files),
        round(minutes, 3),
    )


def pct(fraction: float) -> str:
    """0.01 → '1%', as tables show a label fraction."""
    return f"{fraction * 100:g}%"


def fraction_id(fraction: float) -> str:
    """0.01 → '1pct', as row ids and folder names carry a label fraction."""
    return f"{fraction * 100:g}pct"


def arm_id(fraction: float, unlabeled_share: float) -> str:
    """A semi-supervised arm's id: its label fraction, of the whole train split ('10pct') or,
    with an unlabeled pool, the labeled share of pool + labeled rest ('10pct_pool')."""
    if unlabeled_share:
        return f"{fraction_id(fraction * (1 - unlabeled_share))}_pool"
    return fraction_id(fraction)


def verdicts(rows: dict[str, Row]) -> dict[str, Any]:
    """The two quality targets, judged on the measured rows; a target whose rows were not
    measured is left out."""
    out: dict[str, Any] = {}
    floors = [rows[k].value for k in ("knn/random_init", "knn/raw_pixels") if k in rows]
    if "knn/simclr" in rows and floors:
        margin = round(rows["knn/simclr"].value - max(floors), 4)
        out["knn_margin_over_higher_floor"] = margin
        out["knn_target_met"] = margin >= KNN_MARGIN_TARGET
    tag = fraction_id(TARGET_FRACTION)
    simclr, supervised = rows.get(f"finetune_{tag}/simclr"), rows.get(f"finetune_{tag}/supervised")
    if simclr and supervised:
        out["finetune_1pct_margin"] = round(simclr.value - supervised.value, 4)
        out["finetune_1pct_target_met"] = simclr.value > supervised.value
    return out


def _machine_line(machine: dict[str, Any]) -> str:
    p = machine.get("precision") or {}
    amx = "AMX" if machine.get("amx") else "no AMX"
    return (
        f"Machine: {machine.get('cpu', 'unknown CPU')} ({amx}), {machine.get('cpu_cores')} cores; "
        f"precision {p.get('dtype', 'float32')} ({p.get('reason', 'not recorded')})."
    )


def markdown(result: dict[str, Any]) -> str:
    """results.md: the tables docs/benchmarks.md shows."""
    rows = {r["id"]: r for r in result["rows"]}
    b = result["budget"]

    def cell(key: str) -> str:
        return f"{rows[key]['value']:.4f}" if key in rows else "–"

    lines = [
        f"Test split: {result['data']['test']['examples']} images; train split: "
        f"{result['data']['train_examples']} images. Budget: {b['pretrain_minutes']:g} min "
        f"pretraining (measured {b.get('pretrain_actual_minutes', 0):.2f}), "
        f"{b['linear_eval_minutes']:g} min linear evaluation, {b['finetune_minutes']:g} min "
        "fine-tuning per label fraction.",
        "",
        _machine_line(result.get("machine", {})),
        "",
        "| encoder | kNN top-1 (k=200, T=0.1) | linear eval top-1 |",
        "|---|---|---|",
        f"| SimCLR, {b['pretrain_minutes']:g} min | {cell('knn/simclr')} | "
        f"{cell('linear/simclr')} |",
        f"| same encoder, random init | {cell('knn/random_init')} | {cell('linear/random_init')} |",
        f"| raw pixels | {cell('knn/raw_pixels')} | – |",
        "",
        f"| labels | SimCLR + fine-tune ({b['pretrain_minutes']:g} + {b['finetune_minutes']:g} "
        f"min) | supervised from scratch ({b['supervised_minutes']:g} min) |",
        "|---|---|---|",
    ]
    share = result["config"].get("unlabeled_share", 0.0)
    for fraction in result["config"]["label_fractions"]:
        tag = arm_id(fraction, share)
        labels = (
            f"{pct(fraction * (1 - share))}, rest an unlabeled pool" if share else pct(fraction)
        )
        lines.append(
            f"| {labels} | {cell(f'finetune_{tag}/simclr')} | "
            f"{cell(f'finetune_{tag}/supervised')} |"
        )
    measured = [
        f"{r['id']} {r['train_minutes']:.2f}"
        for r in result["rows"]
        if r.get("train_minutes") is not None
    ]
    if measured:
        lines += ["", "Measured training minutes: " + ", ".join(measured) + "."]
    t = result["targets"]
    if "knn_target_met" in t:
        lines += [
            "",
            f"kNN margin over the higher floor: {t['knn_margin_over_higher_floor']:+.4f} "
            f"(target +{KNN_MARGIN_TARGET}: {'met' if t['knn_target_met'] else 'missed'}).",
        ]
    if "finetune_1pct_target_met" in t:
        lines.append(
            f"1% labels, SimCLR + fine-tune minus supervised: {t['finetune_1pct_margin']:+.4f} "
            f"(target > 0: {'met' if t['finetune_1pct_target_met'] else 'missed'})."
        )
    return "\n".join(lines) + "\n"


def plot_curve(result: dict[str, Any], path: pathlib.Path) -> None:
    """kNN top-1 against training minutes (the random-init encoder at 0), floors as lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = {r["id"]: r for r in result["rows"]}
    points = result["curve"]
    xs = [p["minutes"] for p in points]
    ys = [p["knn_top1"] for p in points]
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(xs, ys, marker="o", label="SimCLR pretraining")
    for key, label, style in (
        ("knn/random_init", "random-init encoder", ":"),
        ("knn/raw_pixels", "raw pixels", "--"),
    ):
        if key in rows:
            ax.axhline(rows[key]["value"], linestyle=style, color="gray", label=label)
    ax.set_ylim(0, min(1.0, max(ys + [r["value"] for r in rows.values()]) + 0.1))
    ax.set_xlabel("training minutes (kNN evaluations excluded)")
    ax.set_ylabel("kNN top-1 on the test split")
    ax.set_title(f"CIFAR-10, {result['config']['model']}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(str(path))


# ----- a local_runner.py run (bench/gpu_cifar.sh) -----

STAGE_LINE = re.compile(r"^pretrain: (\d+) examples, \d+ classes, batch (\d+), (\d+) steps", re.M)


def peak_memory_mib(memory_csv: str) -> float | None:
    """The largest reading of an `nvidia-smi --query-gpu=memory.used --format=csv,noheader,
    nounits` log (MiB, one line per GPU per poll); None when there is none."""
    path = pathlib.Path(memory_csv) if memory_csv else None
    if path is None or not path.exists():
        return None
    values = []
    for line in path.read_text().splitlines():
        try:
            values.append(float(line.strip()))
        except ValueError:
            continue  # a partial last line, a header, an error message
    return max(values) if values else None


def pipeline_run_report(
    model_dir: str, log_text: str, memory_csv: str = "", **context: str
) -> dict[str, Any]:
    """Speed and kNN curve of the pretraining in the newest local_runner.py run of
    `model_dir`, from what its Trainer printed (`log_text`) and logged (TensorBoard events,
    results.json), and the peak device memory polled while it ran; `context` (device,
    precision, command, ...) is copied in."""
    from pipeline.runner import summary as summary_lib

    run = summary_lib.latest_run(os.path.join(model_dir, "metadata.sqlite"))
    if "pretrain" not in run.model_run_uris:
        raise ValueError(f"{model_dir}: the newest run has no pretraining stage")
    model_run = pathlib.Path(run.model_run_uris["pretrain"])
    record = json.loads((model_run / "results.json").read_text())
    timeline = read_timeline(model_run / "train")
    found = STAGE_LINE.findall(log_text)
    if not found:
        raise ValueError("the log has no 'pretrain: N examples, ..., batch B, S steps' line")
    examples, batch, total = (int(x) for x in found[-1])
    epoch_steps = data_lib.steps_per_epoch(examples, batch)
    epochs = total / epoch_steps
    phases = record.get("seconds", {})
    steady = None
    if phases.get("train") and total > 1:  # the first step is traced apart ("trace")
        steady = phases["train"] / ((total - 1) / epoch_steps)
    curve = []
    if knn.RANDOM_INIT_METRIC in record:
        curve.append({"epoch": 0.0, "minutes": 0.0, "knn_top1": record[knn.RANDOM_INIT_METRIC]})
    for point in timeline.curve():
        curve.append({"epoch": round(point["step"] / epoch_steps, 2), **point})
    return {
        **context,
        "train_examples": examples,
        "batch": batch,
        "steps": total,
        "epochs": round(epochs, 2),
        "seconds_per_epoch": round(timeline.minutes() * 60 / epochs, 2),
        "steady_seconds_per_epoch": round(steady, 2) if steady is not None else None,
        "phase_seconds": phases,
        "knn": curve,
        "raw_pixel_knn_top1": record.get(knn.RAW_PIXELS_METRIC),
        "peak_memory_mib": peak_memory_mib(memory_csv),
        "top1": run.top1,
        "protocol": run.protocol,
        "component_seconds": run.seconds,
    }


def pipeline_run_markdown(report: dict[str, Any]) -> str:
    """The markdown the accelerator section of docs/benchmarks.md records for one run."""

    def num(value: float | None, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    memory = report["peak_memory_mib"]
    lines = [
        f"#### {report.get('device', '?')}, {report.get('date', '')}",
        "",
        f"`{report.get('command', '')}`",
        "",
        "| epochs | steps | batch | precision | s/epoch (wall, incl. tracing, checkpoints) | "
        "s/epoch (steady) | peak device memory, MiB | kNN top-1 at the end | "
        "top-1 after fine-tuning |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {report['epochs']:g} | {report['steps']} | {report['batch']} | "
        f"{report.get('precision', '?')} | {report['seconds_per_epoch']:.2f} | "
        f"{num(report['steady_seconds_per_epoch'], '.2f')} | "
        f"{'n/a (no NVIDIA GPU)' if memory is None else f'{memory:.0f}'} | "
        f"{num(report['knn'][-1]['knn_top1'] if report['knn'] else None, '.4f')} | "
        f"{num(report['top1'], '.4f')} ({report.get('protocol') or '?'}) |",
        "",
        "| epoch | training minutes | kNN top-1 |",
        "|---|---|---|",
    ]
    lines += [
        f"| {p['epoch']:g} | {p['minutes']:.2f} | {p['knn_top1']:.4f} |" for p in report["knn"]
    ]
    if report.get("raw_pixel_knn_top1") is not None:
        lines += ["", f"kNN top-1 on raw pixels: {report['raw_pixel_knn_top1']:.4f}."]
    return "\n".join(lines) + "\n"


def write_pipeline_run_report(
    model_dir: str, log: str, memory_csv: str, out_stem: str, **context: str
) -> dict[str, Any]:
    """pipeline_run_report → <out_stem>.json and <out_stem>.md; returns the report."""
    report = pipeline_run_report(model_dir, pathlib.Path(log).read_text(), memory_csv, **context)
    pathlib.Path(f"{out_stem}.json").write_text(json.dumps(report, indent=2))
    pathlib.Path(f"{out_stem}.md").write_text(pipeline_run_markdown(report))
    return report


# ----- main -----


def stage_summary(run: StageRun, steps: int) -> dict[str, Any]:
    """What results.json keeps of a stage: its steps, training minutes and wall seconds."""
    return {
        "steps": steps,
        "training_minutes": round(run.timeline.minutes(), 3),
        "seconds": run.record.get("seconds", {}),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # Decided once, as the pipeline does, so every stage and the record use the same dtype.
    choice = precision.resolve(args.mixed_precision, "default")
    args.mixed_precision = choice.dtype
    print(choice.line(), flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = prepare_data(args)
    bench = Bench(args, data)
    if bench.test["classes"] < 2:
        raise ValueError("the test split needs at least two classes")
    test_files, n_test = list(data.test_files), bench.test["examples"]
    rows: dict[str, Row] = {}
    result: dict[str, Any] = {
        "config": {
            **{k: v for k, v in vars(args).items() if k != "step_seconds"},
            "model": f"ResNet-{args.resnet_depth} x{args.width_multiplier:g}",
        },
        "machine": {
            "device": "GPU" if tf.config.list_logical_devices("GPU") else "CPU",
            "cpu_cores": os.cpu_count(),
            "cpu": precision.cpu_device().name,
            "amx": all(f in precision.cpu_device().cpu_flags for f in precision.AMX_FLAGS),
            "precision": {"dtype": choice.dtype, "reason": choice.reason},
            "load_average_1min": [],
        },
        "data": {
            "source": data.source,
            "transform_graph": data.transform_graph,
            "train_files": data.train_files,
            "train_examples": bench.num_train,
            "unlabeled_files": data.unlabeled_files,
            "pretrain_examples": bench.num_pretrain,
            "test_files": test_files,
            "test": bench.test,
        },
        "budget": {
            "pretrain_minutes": args.budget_minutes,
            "linear_eval_minutes": args.linear_eval_minutes,
            "finetune_minutes": args.finetune_minutes,
            "supervised_minutes": args.budget_minutes + args.finetune_minutes,
        },
        "stages": {},
        "rows": [],
        "curve": [],
        "targets": {},
    }

    def save() -> None:
        result["rows"] = [dataclasses.asdict(r) for r in rows.values()]
        result["targets"] = verdicts(rows)
        result["machine"]["load_average_1min"].append(round(os.getloadavg()[0], 2))
        result["wall_minutes"] = round((time.perf_counter() - started) / 60, 2)
        (out / "results.json").write_text(json.dumps(result, indent=2))

    def add(row: Row) -> None:
        rows[row.id] = row
        print(f"{row.id}: {row.value:.4f} on {row.test_examples} test images", flush=True)

    b = result["budget"]
    if args.step_seconds:
        costs = {kind: StepCost(sec) for kind, sec in args.step_seconds.items()}
    else:
        costs = bench.calibrate()
    b["step_cost"] = {k: dataclasses.asdict(c) for k, c in costs.items()}
    b["step_cost_source"] = "given" if args.step_seconds else "calibrated"
    steps = {
        "pretrain": costs["pretrain"].steps_for(args.budget_minutes),
        "linear": costs["linear"].steps_for(args.linear_eval_minutes),
        "finetune": costs["supervised"].steps_for(args.finetune_minutes),
        "supervised": costs["supervised"].steps_for(b["supervised_minutes"]),
    }
    epochs = steps["pretrain"] * min(args.batch_size, bench.num_pretrain) / bench.num_pretrain
    knn_every = max(1, round(epochs / args.knn_points))
    b.update(steps=steps, pretrain_epochs=round(epochs, 2), knn_every_epochs=knn_every)
    save()

    # Pretraining. Its kNN monitor measures the floors before the first step (the encoder at
    # its random initialization, and raw pixels), then the encoder every knn_every epochs.
    pretrain = bench.run("pretrain", bench.pretrain(steps["pretrain"], knn_every), export=True)
    pretrained, record = pretrain.serving_model_dir, pretrain.record
    missing = [m for m in (knn.METRIC, knn.RANDOM_INIT_METRIC) if m not in record]
    if missing:
        raise RuntimeError(f"pretraining's results.json lacks {missing}")
    pretrain_minutes = pretrain.timeline.minutes()
    b["pretrain_actual_minutes"] = round(pretrain_minutes, 3)
    result["stages"]["pretrain"] = stage_summary(pretrain, steps["pretrain"])
    result["online_linear_probe_top1"] = pretrain.results.get("eval/label_top_1_accuracy")
    random_init = float(record[knn.RANDOM_INIT_METRIC])
    result["curve"] = [{"step": 0, "minutes": 0.0, "knn_top1": random_init}]
    result["curve"] += pretrain.timeline.curve()
    minutes = round(pretrain_minutes, 3)
    add(Row("knn/simclr", "SimCLR", "knn_top1", record[knn.METRIC], n_test, test_files, minutes))
    add(Row("knn/random_init", "random-init encoder", "knn_top1", random_init, n_test, test_files))
    if knn.RAW_PIXELS_METRIC in record:
        raw = float(record[knn.RAW_PIXELS_METRIC])
        add(Row("knn/raw_pixels", "raw pixels", "knn_top1", raw, n_test, test_files))
    save()

    for encoder, base in (("simclr", pretrained), ("random_init", None)):
        run = bench.run(f"linear_{encoder}", bench.linear_eval(steps["linear"]), base)
        result["stages"][f"linear_{encoder}"] = stage_summary(run, steps["linear"])
        method = "SimCLR" if encoder == "simclr" else "random-init encoder"
        minutes = run.timeline.minutes()
        add(row_from_eval(f"linear/{encoder}", method, "linear_top1", run.results, data, minutes))
        save()

    for fraction in args.label_fractions:
        tag = arm_id(fraction, args.unlabeled_share)
        result.setdefault("labeled_examples", {})[tag] = bench.labeled_count(fraction)
        run = bench.run(f"finetune_{tag}", bench.fine_tune(steps["finetune"], fraction), pretrained)
        result["stages"][f"finetune_{tag}"] = stage_summary(run, steps["finetune"])
        minutes = pretrain_minutes + run.timeline.minutes()
        method = "SimCLR + fine-tune"
        add(row_from_eval(f"finetune_{tag}/simclr", method, "top1", run.results, data, minutes))
        run = bench.run(f"supervised_{tag}", bench.supervised(steps["supervised"], fraction))
        result["stages"][f"supervised_{tag}"] = stage_summary(run, steps["supervised"])
        minutes = run.timeline.minutes()
        method = "supervised from scratch"
        add(row_from_eval(f"finetune_{tag}/supervised", method, "top1", run.results, data, minutes))
        save()

    other = [r.id for r in rows.values() if r.test_examples != n_test]
    if other:
        raise RuntimeError(f"{other} were measured on other than the {n_test} test images")
    (out / "results.md").write_text(markdown(result))
    plot_curve(result, out / "curve.png")
    save()
    print((out / "results.md").read_text(), flush=True)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'curve.png'}", flush=True)
    return result


if __name__ == "__main__":
    main()
