"""Where one Trainer stage's wall time goes, on the demo's data and model.

    python bench/stage_overhead.py --train_steps=22 --knn_every_epochs=1
    python bench/stage_overhead.py --stage=finetune --base_model=<a pretrain export> \
        --train_steps=22

The data are the demo's (`--dataset=digits`: scikit-learn's digits rendered as 32x32 PNGs, the
seeded 1,437/360 split) passed once through this project's tf.Transform `preprocessing_fn` with
tf.Transform's Beam implementation, as the Transform component does (cached in --work_dir).
The configuration is the digits preset (ResNet-18 x0.25, batch 128, checkpoints every epoch of
11 steps) with fewer steps, so the run is mostly the non-training overhead that the demo pays
once per stage. `models.driver.run_stage` runs one stage, as the Trainer component does: the
pretrain stage, or the linear-eval stage from --base_model (the `serving_model` folder a
pretrain run of this script printed).

Reported per stage, as JSON: the wall time of the run_stage call, the Trainer's own per-phase
seconds from its results.json (setup, build, trace, train, checkpoint, knn, eval, export), and
the wall time they leave unaccounted. The 1-minute load average is printed before and after:
the machine may be shared.
"""

from __future__ import annotations

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import contextlib
import functools
import json
import pathlib
import shutil
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import tensorflow as tf  # noqa: E402

RAW_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "label_name": tf.io.FixedLenFeature([], tf.string),
    "filename": tf.io.FixedLenFeature([], tf.string),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train_steps", type=int, default=22, help="Steps of each stage.")
    p.add_argument("--knn_every_epochs", type=int, default=1, help="0 turns the monitor off.")
    p.add_argument("--stage", default="pretrain", choices=("pretrain", "finetune"))
    p.add_argument("--base_model", default="", help="The pretrain export finetune starts from.")
    p.add_argument("--work_dir", default="/tmp/simclr_overhead", help="Cache of transformed data.")
    args = p.parse_args(argv)
    if args.train_steps < 1 or args.knn_every_epochs < 0:
        p.error("--train_steps must be positive and --knn_every_epochs >= 0")
    if (args.stage == "finetune") != bool(args.base_model):
        p.error("--base_model is needed by --stage=finetune, and only by it")
    return args


def transformed_digits(work_dir: pathlib.Path) -> dict[str, object]:
    """The digits splits after `preprocessing_fn`: the Transform output and file patterns."""
    out = work_dir / "transformed"
    paths = {
        "transform_output_dir": str(out / "transform_graph"),
        "train_files": [str(out / "Split-train" / "*.gz")],
        "eval_files": [str(out / "Split-test" / "*.gz")],
    }
    if (out / "DONE").exists():
        return paths

    import apache_beam as beam
    import tensorflow_transform as tft
    import tensorflow_transform.beam as tft_beam
    from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

    from pipeline.runner.digits import write_digits_dataset
    from transform import preprocessing as tp

    root = write_digits_dataset(work_dir / "digits")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    rows = {
        split: [
            {
                "image": path.read_bytes(),
                "label": label,
                "label_name": name.encode(),
                "filename": f"{name}/{path.name}".encode(),
            }
            for label, name in enumerate(classes)
            for path in sorted((root / split / name).glob("*.png"))
        ]
        for split in ("train", "test")
    }
    shutil.rmtree(out, ignore_errors=True)
    metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(RAW_FEATURES))
    fn = functools.partial(
        tp.preprocessing_fn, custom_config={"image_size": 32, "image_format": "raw"}
    )
    with beam.Pipeline() as pipeline:
        with tft_beam.Context(temp_dir=str(out / "tmp")):
            raw = {
                split: pipeline | f"Create{split}" >> beam.Create(r, reshuffle=False)
                for split, r in rows.items()
            }
            transform_fn = (raw["train"], metadata) | tft_beam.AnalyzeDataset(fn)
            _ = transform_fn | tft_beam.WriteTransformFn(paths["transform_output_dir"])
            _ = metadata | tft_beam.WriteMetadata(
                str(out / "transform_graph" / tft.TFTransformOutput.RAW_METADATA_DIR), pipeline
            )
            for split, data in raw.items():
                _ = (
                    ((data, metadata), transform_fn)
                    | f"Transform{split}" >> tft_beam.TransformDataset()
                    | f"Encode{split}" >> tft_beam.EncodeTransformedDataset()
                    | f"Write{split}"
                    >> beam.io.WriteToTFRecord(
                        str(out / f"Split-{split}" / "examples"), file_name_suffix=".gz"
                    )
                )
    (out / "DONE").write_text("")
    return paths


def run(args: argparse.Namespace, stage: str, paths: dict, run_dir: pathlib.Path, base) -> dict:
    from models import driver
    from pipeline.configs import build_config, trainer_config

    flags = {
        "dataset": "digits",
        "train_steps": args.train_steps,
        "finetune_train_steps": args.train_steps,
        "knn_every_epochs": args.knn_every_epochs,
    }
    config = trainer_config(build_config(flags), stage)
    begin = time.perf_counter()
    driver.run_stage(
        config,
        train_files=paths["train_files"],
        eval_files=paths["eval_files"],
        transform_output_dir=paths["transform_output_dir"],
        serving_model_dir=str(run_dir / "serving_model"),
        model_run_dir=str(run_dir / "model_run"),
        base_model=base,
    )
    wall = time.perf_counter() - begin
    results = json.loads((run_dir / "model_run" / "results.json").read_text())
    trainer_s = {k: round(v, 2) for k, v in results.get("seconds", {}).items()}
    return {
        "stage": stage,
        "wall_s": round(wall, 2),
        "trainer_s": trainer_s,
        # What the stage's own phase clock did not see (imports inside the call, teardown).
        "unaccounted_s": round(wall - sum(v for k, v in trainer_s.items() if k != "total"), 2),
        "knn": {k: v for k, v in results.items() if "knn" in k},
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    work_dir = pathlib.Path(args.work_dir)
    paths = transformed_digits(work_dir)
    run_dir = work_dir / "runs" / time.strftime("%Y%m%d-%H%M%S") / args.stage
    load_before = os.getloadavg()[0]
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer's own lines
        report = run(args, args.stage, paths, run_dir, args.base_model or None)
    report["load_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    report["export"] = str(run_dir / "serving_model")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
