"""Seed-to-seed spread of fine-tuning one pretrained encoder from a finished quality run.

    python bench/finetune_spread.py --run=output/quality --steps=122 --seeds=0,1,2,3

One fine-tuning result per run says nothing about how far a second one would land, so two runs'
`finetune_*` rows cannot be called different or equal from them alone. This fine-tunes the
run's pretrained encoder once per runtime seed (head initialization, shuffle order,
augmentations) on the same labeled images (the run's label-selection seed is kept), with the
stages and the Transform output exactly as `bench/quality.py` ran them, and reports each seed's
top-1 on the test split, their mean and sample standard deviation. It measures fine-tuning
noise only: the pretraining run is the same for every seed. Writes spread.json under --out.
"""

from __future__ import annotations

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import time
from typing import Any

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench import quality  # noqa: E402
from models import precision  # noqa: E402
from models.config import TrainerConfig  # noqa: E402


def parse_seeds(text: str) -> list[int]:
    """'0,1,2,3' → [0, 1, 2, 3]: distinct non-negative integers."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--seeds: comma-separated integers expected, got {text!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: distinct non-negative integers expected, got {text!r}")
    return seeds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="A finished bench/quality.py run's --out.")
    p.add_argument(
        "--steps", type=int, default=0, help="Fine-tuning steps; 0: the steps the run used."
    )
    p.add_argument(
        "--label_fraction",
        type=float,
        default=0.0,
        help="The label fraction of the run's fine-tune row; 0: the run's only one.",
    )
    p.add_argument("--seeds", default="0,1,2,3", help="Comma-separated runtime seeds.")
    p.add_argument(
        "--out", default="", help="Report and stage runs; default <run>/finetune_spread."
    )
    args = p.parse_args(argv)
    try:
        args.seeds = parse_seeds(args.seeds)
    except ValueError as e:
        p.error(str(e))
    if args.steps < 0:
        p.error("--steps must be positive (or 0 for the run's own)")
    if not 0 <= args.label_fraction <= 1:
        p.error("--label_fraction must be in (0, 1]")
    args.run = os.path.abspath(args.run)
    if not os.path.isfile(os.path.join(args.run, "results.json")):
        p.error(f"--run: no results.json in {args.run}")
    args.out = os.path.abspath(args.out or os.path.join(args.run, "finetune_spread"))
    return args


def spread(values: list[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (n - 1; None for a single value)."""
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else None,
    }


def run_fraction(requested: float, fractions: list[float]) -> float:
    """The label fraction to fine-tune on: `requested`, or (0) the run's only one."""
    if requested:
        return requested
    if len(fractions) != 1:
        raise ValueError(f"--label_fraction: the run used {fractions}; name one")
    return fractions[0]


def with_seed(config: TrainerConfig, seed: int) -> TrainerConfig:
    """`config` with another runtime seed (weights, shuffle order, augmentations); the label
    selection's own seed stays, so every seed fine-tunes on the same labeled images."""
    return dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, seed=seed))


def load_run(run: str) -> tuple[dict[str, Any], argparse.Namespace, quality.TransformedData]:
    """A quality run's record, its resolved arguments and the Transform output it trained on
    (after any subsampling), as its results.json keeps them."""
    record = json.loads(pathlib.Path(run, "results.json").read_text())
    config = {k: v for k, v in record["config"].items() if k != "model"}
    d = record["data"]
    data = quality.TransformedData(
        transform_graph=d["transform_graph"],
        train_files=list(d["train_files"]),
        test_files=list(d["test_files"]),
        source=d["source"],
        unlabeled_files=list(d.get("unlabeled_files", [])),
    )
    return record, argparse.Namespace(**config), data


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    record, run_args, data = load_run(args.run)
    try:
        fraction = run_fraction(args.label_fraction, run_args.label_fractions)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    steps = args.steps or int(record["budget"]["steps"]["finetune"])
    pretrained = pathlib.Path(run_args.work_dir, "runs", "pretrain", "serving_model")
    if not (pretrained / "saved_model.pb").is_file():
        raise SystemExit(f"no pretrained model at {pretrained}: the run did not finish pretraining")
    run_row_id = f"finetune_{quality.arm_id(fraction, run_args.unlabeled_share)}/simclr"
    run_row = next((r for r in record["rows"] if r["id"] == run_row_id), None)
    # Stage runs go under --out; the run's own folders are left as they are.
    label_seed = run_args.seed
    run_args.work_dir = os.path.join(args.out, "work")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    bench = quality.Bench(run_args, data)
    if bench.test != record["data"]["test"]:
        raise SystemExit(f"the test split's records changed since the run: {data.test_files}")
    config = bench.fine_tune(steps, fraction)
    result: dict[str, Any] = {
        "run": args.run,
        "pretrained_model": str(pretrained),
        "transform_graph": data.transform_graph,
        "train_files": data.train_files,
        "test": bench.test,
        "steps": steps,
        "label_fraction": fraction,
        "label_fraction_seed": label_seed,
        "labeled_examples": bench.labeled_count(fraction),
        "precision": run_args.mixed_precision,
        "machine": {
            "cpu": precision.cpu_device().name,
            "cpu_cores": os.cpu_count(),
            "load_average_1min": [],
        },
        "run_row": run_row,
        "seeds": [],
    }
    started = time.perf_counter()
    for seed in args.seeds:
        stage = bench.run(f"finetune_seed{seed}", with_seed(config, seed), str(pretrained))
        top1 = float(stage.results["eval/label_top_1_accuracy"])
        result["seeds"].append(
            {
                "seed": seed,
                "top1": top1,
                "top5": float(stage.results["eval/label_top_5_accuracy"]),
                "test_examples": int(stage.results["eval/num_examples"]),
                "training_minutes": round(stage.timeline.minutes(), 3),
            }
        )
        print(f"seed {seed}: top-1 {top1:.4f}", flush=True)
        result.update(spread([s["top1"] for s in result["seeds"]]))
        result["machine"]["load_average_1min"].append(round(os.getloadavg()[0], 2))
        result["wall_minutes"] = round((time.perf_counter() - started) / 60, 2)
        (out / "spread.json").write_text(json.dumps(result, indent=2))
    sd = result["sd"]
    print(
        f"{len(args.seeds)} seeds, {steps} steps, fraction {fraction:g}: top-1 mean "
        f"{result['mean']:.4f}" + (f" ± {sd:.4f} (sample sd)" if sd is not None else ""),
        flush=True,
    )
    print(f"wrote {out / 'spread.json'}", flush=True)
    return result


if __name__ == "__main__":
    main()
