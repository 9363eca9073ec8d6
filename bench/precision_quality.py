"""Does the default precision cost quality? `bench/quality.py` with `--mixed_precision=auto`
against float32, one after the other in one command, on the same Transform output and budget.

    python bench/precision_quality.py --budget_minutes=5 --label_fractions=0.01 \
        [--pipeline_dir=DIR] [--out=output/precision_quality] [any other bench/quality.py flag]

On a CPU with AMX, auto means bfloat16: more steps fit the same minutes, so the kNN margin over
the higher floor (random-init encoder, raw pixels) should grow, and no arm may fall by more than
--noise. On other CPUs auto is float32 and the two runs only show run-to-run noise. Writes
<out>/auto/, <out>/float32/ (each quality.py's results) and <out>/comparison.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
from typing import Any

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
QUALITY = REPO_ROOT / "bench" / "quality.py"
ARMS = ("auto", "float32")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO_ROOT / "output" / "precision_quality"))
    p.add_argument(
        "--noise",
        type=float,
        default=0.01,
        help="How far an arm may fall before it counts as a loss (top-1, absolute).",
    )
    p.add_argument(
        "--same_steps",
        action="store_true",
        help="Allow --step_seconds (both arms then train the same steps: a smoke test only).",
    )
    p.add_argument(
        "--pipeline_dir",
        default="",
        help="A local_runner.py --model_dir whose Transform output both arms reuse; default: "
        "the first arm runs the pipeline and the second reuses its output.",
    )
    args, rest = p.parse_known_args(argv)
    if any(f.startswith("--mixed_precision") for f in rest):
        p.error("--mixed_precision is set by this script")
    if any(f.startswith("--step_seconds") for f in rest) and not args.same_steps:
        # The point is how many steps each precision fits into the same minutes.
        p.error("--step_seconds gives both precisions the same steps; leave calibration on")
    return args, rest


def compare(auto: dict[str, Any], float32: dict[str, Any], noise: float) -> dict[str, Any]:
    """Row by row deltas (auto - float32), the kNN margins, and the two verdicts."""
    runs = {"auto": auto, "float32": float32}

    def each(get) -> dict[str, Any]:
        return {name: get(result) for name, result in runs.items()}

    values = each(lambda r: {row["id"]: row["value"] for row in r["rows"]})
    rows = [
        {"id": i, "auto": values["auto"][i], "float32": f, "delta": round(values["auto"][i] - f, 4)}
        for i, f in values["float32"].items()
        if i in values["auto"]
    ]
    margins = each(lambda r: r["targets"].get("knn_margin_over_higher_floor"))
    # The floors do not train, so they are no arm that could pay for speed.
    fell = [
        r["id"]
        for r in rows
        if r["id"] not in ("knn/random_init", "knn/raw_pixels") and r["delta"] < -noise
    ]
    return {
        "precision": each(lambda r: r["machine"].get("precision")),
        "pretrain_steps": each(lambda r: r["budget"]["steps"]["pretrain"]),
        "pretrain_epochs": each(lambda r: r["budget"]["pretrain_epochs"]),
        "rows": rows,
        "knn_margin_over_higher_floor": margins,
        "knn_margin_grew": (
            None if None in margins.values() else margins["auto"] > margins["float32"]
        ),
        "noise": noise,
        "arms_fallen_beyond_noise": fell,
    }


def markdown(c: dict[str, Any], machine: dict[str, Any]) -> str:
    p = c["precision"]
    lines = [
        f"CPU: {machine.get('cpu')} ({'AMX' if machine.get('amx') else 'no AMX'}). auto = "
        f"{p['auto']['dtype']} ({p['auto']['reason']}).",
        f"Pretraining steps in the budget: auto {c['pretrain_steps']['auto']} "
        f"({c['pretrain_epochs']['auto']} epochs), float32 {c['pretrain_steps']['float32']} "
        f"({c['pretrain_epochs']['float32']} epochs).",
        "",
        "| row | auto | float32 | auto − float32 |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['id']} | {r['auto']:.4f} | {r['float32']:.4f} | {r['delta']:+.4f} |"
        for r in c["rows"]
    ]
    m = c["knn_margin_over_higher_floor"]
    lines += [
        "",
        f"kNN margin over the higher floor: auto {m['auto']}, float32 {m['float32']} "
        f"(grew: {c['knn_margin_grew']}). Arms more than {c['noise']} below float32: "
        f"{', '.join(c['arms_fallen_beyond_noise']) or 'none'}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, rest = parse_args(argv)
    out = pathlib.Path(args.out).resolve()
    results = {}
    pipeline_dir = [f"--pipeline_dir={args.pipeline_dir}"] if args.pipeline_dir else []
    for arm in ARMS:
        arm_out = out / arm
        cmd = [sys.executable, str(QUALITY), f"--out={arm_out}", f"--mixed_precision={arm}"]
        print(" ".join(cmd[1:] + rest + pipeline_dir), flush=True)
        subprocess.run(cmd + rest + pipeline_dir, check=True)
        results[arm] = json.loads((arm_out / "results.json").read_text())
        # The second arm trains on the first arm's Transform output.
        made = sorted((arm_out / "work").glob("pipeline-*"))
        if made and not pipeline_dir:
            pipeline_dir = [f"--pipeline_dir={made[0]}"]
    comparison = compare(results["auto"], results["float32"], args.noise)
    (out / "comparison.json").write_text(json.dumps(comparison, indent=2))
    text = markdown(comparison, results["auto"]["machine"])
    (out / "comparison.md").write_text(text)
    print(text, flush=True)
    return comparison


if __name__ == "__main__":
    main()
