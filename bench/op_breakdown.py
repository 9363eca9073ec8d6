"""Where the seconds of one pretraining step go, by TensorFlow op: the profiler's account of every
kernel the step ran, oneDNN's and Eigen's alike, and of the XLA-compiled functions.

    python bench/op_breakdown.py --mixed_precision=bfloat16 --out=output/op_breakdown

Runs `bench/pretrain_throughput.py --cached_batch --inter_op_threads=1` with TensorFlow's profiler
on its timed steps and sums each op's self time (its time less that of the ops it ran inside it)
by op type. One inter-op thread keeps ops from overlapping, so the parts add up to the step;
what no op accounts for is the executor's own time. `bench/onednn_breakdown.py` splits the
oneDNN kernels further (implementation, direction, problem shape); this table is the one that
names the rest: element-wise ops, casts, the loss and the optimizer.

Writes breakdown.json and breakdown.md under --out.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import shutil
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.onednn_breakdown import run_throughput, write_breakdown  # noqa: E402

# Op types by part of the step, after the oneDNN prefixes (_MklNative, _Mkl) are taken off.
CATEGORIES = (
    ("convolution kernel gradients", ("Conv2DBackpropFilter",)),
    ("convolution input gradients", ("Conv2DBackpropInput",)),
    ("convolution forward", ("Conv2D", "FusedConv2D")),
    ("batch norm backward", ("FusedBatchNormGradV3",)),
    ("batch norm forward", ("FusedBatchNormV3", "FusedBatchNormEx")),
    ("matmuls", ("MatMul", "FusedMatMul", "BatchMatMulV2")),
    # An XLA-compiled function runs as one asynchronous call of the function.
    (
        "XLA-compiled functions (element-wise, side-by-side rows)",
        ("PartitionedCall", "StatefulPartitionedCall"),
    ),
)
OTHER = "TensorFlow's other kernels (element-wise, casts, slices, loss, optimizer)"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """This script's options, and the rest, which go to bench/pretrain_throughput.py."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="output/op_breakdown")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=25, help="Rows of the op table.")
    return p.parse_known_args(argv)


def base_type(op_type: str) -> str:
    for prefix in ("_MklNative", "_Mkl"):
        if op_type.startswith(prefix):
            return op_type[len(prefix) :]
    return op_type


def category(op_type: str) -> str:
    base = base_type(op_type)
    for name, types in CATEGORIES:
        if base in types:
            return name
    return OTHER


def op_events(space) -> list[list[tuple[str, int, int]]]:
    """(op type, start ps, duration ps) of every op the executor ran, one list per thread.

    Synchronous kernels are events named `<op name>:<op type>`; asynchronous ones (an XLA
    function call, the iterator) are the executor's `ProcessAsync::Start` events, whose op type
    is a stat."""
    threads = []
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        stat_names = {k: v.name for k, v in plane.stat_metadata.items()}
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            ops = []
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if name == "ExecutorState::ProcessAsync::Start":
                    stats = {stat_names.get(s.metadata_id): s for s in event.stats}
                    kind = stats.get("kernel_type")
                    op_type = stat_names.get(kind.ref_value) if kind is not None else None
                    if op_type:
                        ops.append((op_type, event.offset_ps, event.duration_ps))
                elif ":" in name and "::" not in name:
                    ops.append((name.rsplit(":", 1)[1], event.offset_ps, event.duration_ps))
            threads.append(ops)
    return threads


def self_times(ops: list[tuple[str, int, int]]) -> list[tuple[str, int]]:
    """Each op's duration less that of the ops nested in it (a function call's body ops)."""
    ordered = sorted(ops, key=lambda o: (o[1], -o[2]))
    stack: list[list] = []  # [end, self ps, op type]
    done = []
    for op_type, start, duration in ordered:
        while stack and stack[-1][0] <= start:
            done.append(stack.pop())
        if stack:
            stack[-1][1] -= duration
        stack.append([start + duration, duration, op_type])
    done.extend(stack)
    return [(op_type, ps) for _, ps, op_type in done]


def summarize(threads: list[list[tuple[str, int, int]]], step_s: float, steps: int) -> dict:
    """Per-step milliseconds and calls by op type and by part of the step."""
    ms: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.Counter()
    for ops in threads:
        for op_type, ps in self_times(ops):
            ms[op_type] += ps / 1e9 / steps
            calls[op_type] += 1
    step_ms = 1000 * step_s
    rows = [
        {
            "op": op_type,
            "category": category(op_type),
            "calls_per_step": calls[op_type] / steps,
            "ms_per_step": t,
            "share": t / step_ms,
        }
        for op_type, t in ms.items()
    ]
    rows.sort(key=lambda r: -r["ms_per_step"])
    parts: dict[str, float] = {name: 0.0 for name, _ in CATEGORIES}
    parts[OTHER] = 0.0
    for r in rows:
        parts[r["category"]] += r["ms_per_step"]
    accounted = sum(parts.values())
    return {
        "step_ms": step_ms,
        "categories": parts,
        "unaccounted_ms": step_ms - accounted,
        "rows": rows,
    }


def markdown(summary: dict, result: dict, top: int) -> str:
    cpu, cfg, step = result["cpu"], result["config"], summary["step_ms"]
    lines = [
        f"CPU: {cpu['model']}, {cpu['cores']} cores, extensions {', '.join(cpu['extensions'])}.",
        f"Step: ResNet-{cfg['resnet_depth']} x{cfg['width_multiplier']:g}, batch "
        f"{cfg['train_batch_size']}, {cfg['mixed_precision']}, element-wise work "
        f"{cfg.get('elementwise', 'tensorflow')}; profiled step {step:.0f} ms "
        f"({result['images_per_s']} img/s while profiled).",
        "",
        "| part of the step | ms/step | share |",
        "|---|---|---|",
    ]
    for name, t in summary["categories"].items():
        lines.append(f"| {name} | {t:.0f} | {100 * t / step:.1f}% |")
    t = summary["unaccounted_ms"]
    lines += [
        f"| no op (the executor between ops) | {t:.0f} | {100 * t / step:.1f}% |",
        "",
        "| op | part | calls/step | ms/step | share |",
        "|---|---|---|---|---|",
    ]
    for r in summary["rows"][:top]:
        lines.append(
            f"| {r['op']} | {r['category']} | {r['calls_per_step']:g} | "
            f"{r['ms_per_step']:.1f} | {100 * r['share']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def load_space(profile_dir: pathlib.Path):
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    files = sorted(profile_dir.glob("plugins/profile/*/*.xplane.pb"))
    if not files:
        raise SystemExit(f"error: the profiler wrote no trace under {profile_dir}")
    space = xplane_pb2.XSpace()
    space.ParseFromString(files[-1].read_bytes())
    return space


def main(argv: list[str] | None = None) -> dict:
    args, flags = parse_args(argv)
    out = pathlib.Path(args.out)
    profile_dir = out / "profile"
    shutil.rmtree(profile_dir, ignore_errors=True)
    flags = ["--inter_op_threads=1", f"--profile_dir={profile_dir}", *flags]
    result, _ = run_throughput(args.steps, flags, {})
    summary = summarize(op_events(load_space(profile_dir)), result["step_s"], args.steps)
    write_breakdown(out, summary, result, markdown(summary, result, args.top))
    return summary


if __name__ == "__main__":
    main()
