"""What a Trainer stage's start-up costs on a large split, with and without the split sizes.

    python bench/trainer_startup.py [--records=100000] [--image_bytes=30000] [--pool=100000]

Writes a synthetic transformed train split and unlabeled pool (GZIP TFRecords as Transform
writes them: `image` of --image_bytes incompressible bytes, like a stored JPEG, `label`, `key`)
and times building the pretraining and fine-tuning Tasks (everything `run_stage` does before
the model is built: counting, label selection, schedule) three ways: counting by reading every
record (what every stage did before the pipeline passed StatisticsGen's counts), with the split
sizes the pipeline now passes, and with the sizes plus a 10% label fraction (one pass to read
the keys, which a label subset needs). The files are dropped from the page cache before each
timing (`posix_fadvise`), so reads come from the disk; from GCS they are slower still.
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

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench import hardware  # noqa: E402
from models.split_records import SplitSize  # noqa: E402
from models.tasks import TASKS, StageInputs  # noqa: E402
from pipeline.configs import build_config, trainer_config  # noqa: E402

NUM_CLASSES = 1000
SHARDS = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=100_000, help="Labeled train records.")
    p.add_argument("--pool", type=int, default=100_000, help="Unlabeled pool records.")
    p.add_argument("--image_bytes", type=int, default=30_000, help="Bytes per stored image.")
    p.add_argument("--work_dir", default="/tmp/simclr_startup")
    p.add_argument("--out", default="", help="Write the results here as JSON.")
    return p.parse_args(argv)


def write_split(folder: pathlib.Path, count: int, image_bytes: int, labeled: bool) -> str:
    """`count` records in SHARDS GZIP files (kept when already written with these sizes)."""
    done = folder / f"DONE-{count}-{image_bytes}"
    if not done.exists():
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*"):
            old.unlink()
        rng = np.random.default_rng(0)

        options = tf.io.TFRecordOptions(compression_type="GZIP")
        for shard in range(SHARDS):
            path = folder / f"part-{shard:05d}-of-{SHARDS:05d}.gz"
            with tf.io.TFRecordWriter(str(path), options) as writer:
                for i in range(shard, count, SHARDS):
                    data = rng.bytes(image_bytes)  # as incompressible as a JPEG
                    label = i % NUM_CLASSES if labeled else -1
                    feature = {
                        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
                        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                        "key": tf.train.Feature(
                            bytes_list=tf.train.BytesList(value=[f"{folder.name}/{i}".encode()])
                        ),
                    }
                    example = tf.train.Example(features=tf.train.Features(feature=feature))
                    writer.write(example.SerializeToString())
        done.touch()
    return str(folder / "*.gz")


def drop_page_cache(pattern: str) -> None:
    for path in tf.io.gfile.glob(pattern):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_task(stage: str, flags: dict, inputs: StageInputs, patterns: list[str]) -> dict:
    for pattern in patterns:
        drop_page_cache(pattern)
    config = trainer_config(
        build_config({"dataset": "imagenet2012", "data_dir": str(REPO_ROOT), **flags}), stage
    )
    started = time.perf_counter()
    task = TASKS[stage](config, inputs, 1)
    pretraining_read = task.pretraining_read
    seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 2),
        "examples": task.num_examples,
        "pretraining_read": pretraining_read,
        "passes": task.records.reads,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    root = pathlib.Path(args.work_dir) / "transformed_examples"
    train = write_split(root / "Split-train", args.records, args.image_bytes, True)
    pool = write_split(root / "Split-unlabeled", args.pool, args.image_bytes, False)
    gib = sum(os.path.getsize(p) for p in tf.io.gfile.glob(str(root / "*" / "*.gz"))) / 2**30
    sizes = {
        "train": SplitSize(args.records, 0, NUM_CLASSES - 1),
        "unlabeled": SplitSize(args.pool, -1, -1),
    }
    flags = {"unlabeled_dir": args.work_dir, "train_epochs": 100}
    stages = {"pretrain": [train, pool], "finetune": [train]}
    out = []
    for stage, files in stages.items():
        for how, split_sizes, extra in (
            ("reading every record", None, {}),
            ("split sizes from the statistics", sizes, {}),
            ("split sizes, 10% label fraction", sizes, {"label_fraction": 0.1}),
        ):
            if stage == "pretrain" and extra:
                continue  # pretraining's probe takes the labels as they are
            inputs = StageInputs(files, [train], "", NUM_CLASSES, split_sizes=split_sizes)
            row = {
                "stage": stage,
                "how": how,
                **time_task(stage, {**flags, **extra}, inputs, files),
            }
            print(json.dumps(row), flush=True)
            out.append(row)
    cpu = hardware.cpu_info()
    print(f"CPU: {hardware.describe(cpu)}", flush=True)
    print(f"data: {args.records} train + {args.pool} pool records, {gib:.1f} GiB on disk")
    print("| stage | counted by | start-up s | examples | passes over the records |")
    print("|---|---|---|---|---|")
    for r in out:
        print(
            f"| {r['stage']} | {r['how']} | {r['seconds']:.2f} | {r['examples']} | {r['passes']} |"
        )
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"cpu": cpu.model, "rows": out}, indent=1))
    return out


if __name__ == "__main__":
    main()
