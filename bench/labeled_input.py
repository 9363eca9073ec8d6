"""What a labeled batch costs the input pipeline at each label fraction.

    python bench/labeled_input.py [--num_images=10000] [--fractions=0.01,0.1,1]

Fine-tuning on a fraction of the labels reads the fine-tuning Task's input pipeline
(`models.tasks.finetune.FinetuneTask.build_inputs`: the stratified subset of
`--label_fraction`, crop + flip, batch 256) over CIFAR-10 training images passed through this
project's tf.Transform `preprocessing_fn` (bench/pretrain_throughput.py makes and caches them).
For each fraction it pulls --batches batches after --warmup_batches and reports seconds per
batch and labeled images/s. Run it on a quiet machine; every fraction runs in this one process,
one after the other.
"""

from __future__ import annotations

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import json
import pathlib
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import tensorflow as tf  # noqa: E402

from bench import hardware  # noqa: E402
from bench.pretrain_throughput import transformed_records  # noqa: E402
from models.config import (  # noqa: E402
    AugmentConfig,
    FinetuneConfig,
    InputConfig,
    LabelConfig,
    ModelConfig,
    RuntimeConfig,
    TrainerConfig,
)
from models.tasks.base import StageInputs  # noqa: E402
from models.tasks.finetune import FinetuneTask  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_images", type=int, default=10_000)
    p.add_argument("--fractions", default="0.01,0.1,1")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--warmup_batches", type=int, default=5)
    p.add_argument("--data_dir", default=str(REPO_ROOT.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--work_dir", default="/tmp/simclr_bench")
    p.add_argument("--out", default="", help="Write the results here as JSON.")
    return p.parse_args(argv)


def stage_config(fraction: float, batch_size: int) -> TrainerConfig:
    return TrainerConfig(
        stage="finetune",
        input=InputConfig(32, 32, "raw", False),
        augment=AugmentConfig(),
        model=ModelConfig(),
        train=FinetuneConfig(train_batch_size=batch_size, train_steps=1),
        runtime=RuntimeConfig(mixed_precision="float32"),
        labels=LabelConfig(label_fraction=fraction),
    )


def measure(task: FinetuneTask, batches: int, warmup: int) -> float:
    """Seconds per batch after the warm-up (shuffle buffer filled, caches built)."""
    it = iter(task.build_inputs(tf.distribute.InputContext(), 0))
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return (time.perf_counter() - t) / batches


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    files = transformed_records(args.data_dir, args.num_images, 32, args.work_dir)
    inputs = StageInputs([files], [files], "", num_classes=10)
    out = []
    for fraction in [float(f) for f in args.fractions.split(",")]:
        task = FinetuneTask(stage_config(fraction, args.batch_size), inputs)
        seconds = measure(task, args.batches, args.warmup_batches)
        row = {
            "fraction": fraction,
            "labeled_examples": task.num_examples,
            "batch_size": task.batch_size,
            "seconds_per_batch": round(seconds, 4),
            "labeled_images_per_s": round(task.batch_size / seconds, 1),
            # Older versions of the code (measured for before/after) have no such choice.
            "kept_in_memory": task.labeled_keys is not None
            and getattr(task, "subset_fits_in_memory", lambda n: False)(len(task.labeled_keys)),
        }
        print(json.dumps(row), flush=True)
        out.append(row)
    cpu = hardware.cpu_info()
    print(f"CPU: {hardware.describe(cpu)}", flush=True)
    print("| label fraction | labeled images | s/batch | labeled images/s |")
    print("|---|---|---|---|")
    for r in out:
        print(
            f"| {r['fraction']:g} | {r['labeled_examples']} | {r['seconds_per_batch']:.3f} | "
            f"{r['labeled_images_per_s']:.0f} |"
        )
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"cpu": cpu.model, "rows": out}, indent=1))
    return out


if __name__ == "__main__":
    main()
