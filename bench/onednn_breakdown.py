"""Where the seconds of one pretraining step go on a CPU: oneDNN's own account of every primitive
it ran (convolutions forward and backward, batch norm, reorders, matmuls), and the rest.

    python bench/onednn_breakdown.py --mixed_precision=bfloat16 --out=output/onednn_bf16

Runs `bench/pretrain_throughput.py --cached_batch` with ONEDNN_VERBOSE=1 (and timestamps), keeps
the primitives executed inside its timed steps, and sums their execution times by kind,
implementation (`brgconv:avx512_core_amx` runs on AMX tiles; `jit:avx512_core` or `gemm:jit`
does not) and direction. What oneDNN did not run (TensorFlow's Eigen kernels: element-wise ops,
the loss, the optimizer, casts, and framework overhead) is the step time minus that sum. Printing
every primitive slows the step itself a little, so the table's total is the traced step's
time, not the benchmark's.

Writes breakdown.json and breakdown.md under --out.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
THROUGHPUT = REPO_ROOT / "bench" / "pretrain_throughput.py"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """This script's options, and the rest, which go to bench/pretrain_throughput.py."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="output/onednn_breakdown")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=25, help="Rows of the primitive table.")
    return p.parse_known_args(argv)


def parse_verbose(lines: list[str], window: tuple[float, float]) -> list[dict]:
    """Executed primitives whose timestamp (ms) falls in `window`, from ONEDNN_VERBOSE lines
    `onednn_verbose,<ms>,primitive,exec,cpu,<kind>,<impl>,<prop>,<mds>,<attrs>,<aux>,<shape>,
    <exec ms>` (oneDNN 3.x with ONEDNN_VERBOSE_TIMESTAMP=1)."""
    out = []
    for line in lines:
        parts = line.strip().split(",")
        if len(parts) < 13 or parts[0] != "onednn_verbose" or parts[2:4] != ["primitive", "exec"]:
            continue
        try:
            stamp, exec_ms = float(parts[1]), float(parts[-1])
        except ValueError:
            continue
        if not window[0] <= stamp <= window[1]:
            continue
        out.append(
            {
                "kind": parts[5],
                "impl": parts[6],
                "prop": parts[7],
                "dtypes": " ".join(md.split(":")[0] for md in parts[8].split()),
                "shape": parts[-2],
                "ms": exec_ms,
            }
        )
    return out


def summarize(primitives: list[dict], step_s: float, steps: int) -> dict:
    """Per-step milliseconds by (kind, implementation, direction), and what oneDNN did not run."""
    by_group: dict[tuple[str, str, str], list[float]] = collections.defaultdict(list)
    for p in primitives:
        by_group[(p["kind"], p["impl"], p["prop"])].append(p["ms"])
    step_ms = 1000 * step_s
    rows = [
        {
            "kind": kind,
            "impl": impl,
            "prop": prop,
            "calls_per_step": len(times) / steps,
            "ms_per_step": sum(times) / steps,
            "share": sum(times) / steps / step_ms,
        }
        for (kind, impl, prop), times in by_group.items()
    ]
    rows.sort(key=lambda r: -r["ms_per_step"])
    by_shape: dict[tuple[str, str, str], list[float]] = collections.defaultdict(list)
    for p in primitives:
        if p["kind"] == "convolution":
            by_shape[(p["prop"], p["shape"], p["dtypes"])].append(p["ms"])
    shapes = [
        {"prop": prop, "shape": shape, "dtypes": dtypes, "ms_per_step": sum(t) / steps}
        for (prop, shape, dtypes), t in by_shape.items()
    ]
    shapes.sort(key=lambda r: -r["ms_per_step"])
    onednn_ms = sum(r["ms_per_step"] for r in rows)
    amx_ms = sum(r["ms_per_step"] for r in rows if "amx" in r["impl"])
    reorder_ms = sum(r["ms_per_step"] for r in rows if r["kind"] == "reorder")
    return {
        "step_ms": step_ms,
        "onednn_ms": onednn_ms,
        "amx_ms": amx_ms,
        "reorder_ms": reorder_ms,
        "other_ms": step_ms - onednn_ms,
        "rows": rows,
        "convolutions": shapes,
    }


def markdown(summary: dict, result: dict, top: int) -> str:
    cpu = result["cpu"]
    cfg = result["config"]
    step = summary["step_ms"]

    def pct(ms: float) -> str:
        return f"{100 * ms / step:.1f}%"

    lines = [
        f"CPU: {cpu['model']}, {cpu['cores']} cores, extensions {', '.join(cpu['extensions'])}.",
        f"Step: ResNet-{cfg['resnet_depth']} x{cfg['width_multiplier']:g}, batch "
        f"{cfg['train_batch_size']}, {cfg['mixed_precision']}"
        + (" + oneDNN auto mixed precision" if cfg.get("onednn_auto_mixed_precision") else "")
        + f", BN {cfg['batch_norm']}; traced step {step:.0f} ms "
        f"({result['images_per_s']} img/s under tracing).",
        "",
        f"- oneDNN primitives: {summary['onednn_ms']:.0f} ms ({pct(summary['onednn_ms'])}), "
        f"of which on AMX kernels {summary['amx_ms']:.0f} ms ({pct(summary['amx_ms'])}) and "
        f"reorders {summary['reorder_ms']:.0f} ms ({pct(summary['reorder_ms'])})",
        f"- everything else (Eigen element-wise ops, casts, loss, optimizer, framework): "
        f"{summary['other_ms']:.0f} ms ({pct(summary['other_ms'])})",
        "",
        "| primitive | implementation | direction | calls/step | ms/step | share |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary["rows"][:top]:
        lines.append(
            f"| {r['kind']} | {r['impl']} | {r['prop']} | {r['calls_per_step']:g} | "
            f"{r['ms_per_step']:.1f} | {100 * r['share']:.1f}% |"
        )
    lines += [
        "",
        "Slowest convolutions (oneDNN problem: mb batch, ic/oc channels, ih/oh sizes, kh kernel, "
        "sh stride):",
        "",
        "| direction | problem | ms/step |",
        "|---|---|---|",
    ]
    for r in summary["convolutions"][:top]:
        lines.append(f"| {r['prop']} | `{r['shape']}` | {r['ms_per_step']:.1f} |")
    return "\n".join(lines) + "\n"


def run_throughput(steps: int, flags: list[str], env: dict[str, str]) -> tuple[dict, list[str]]:
    """Runs bench/pretrain_throughput.py on one cached batch in a fresh process; its result and
    its output lines."""
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", **env}
    cmd = [
        sys.executable,
        str(THROUGHPUT),
        "--cached_batch",
        f"--steps={steps}",
        "--warmup_steps=1",
        *flags,
    ]
    print(" ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    results = [json.loads(line) for line in lines if line.startswith("{")]
    if proc.returncode or not results:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"error: the throughput run failed (exit {proc.returncode}): {tail[0]}")
    return results[-1], lines


def main(argv: list[str] | None = None) -> dict:
    args, flags = parse_args(argv)
    verbose = {"ONEDNN_VERBOSE": "1", "ONEDNN_VERBOSE_TIMESTAMP": "1"}
    result, lines = run_throughput(args.steps, flags, verbose)
    primitives = parse_verbose(lines, tuple(result["timed_window_ms"]))
    summary = summarize(primitives, result["step_s"], args.steps)
    write_breakdown(pathlib.Path(args.out), summary, result, markdown(summary, result, args.top))
    return summary


def write_breakdown(out: pathlib.Path, summary: dict, result: dict, text: str) -> None:
    """breakdown.json (the summary and the throughput run's result) and breakdown.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "breakdown.json").write_text(json.dumps({"summary": summary, "run": result}, indent=1))
    (out / "breakdown.md").write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
