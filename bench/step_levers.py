"""CPU speed levers of the pretraining step, one at a time, against the reference's settings in
the same run.

    python bench/step_levers.py --out=output/step_levers          # ResNet-18, CIFAR, batch 256

Each row is one `bench/pretrain_throughput.py` process (oneDNN and thread pools are fixed when
TensorFlow starts, so every setting gets a fresh process) and changes one thing against the row
named in its `base` column. The reference's settings (unfused batch norm, float32, no XLA,
TensorFlow's defaults otherwise) run first and again last, so drift on a shared machine shows;
every ratio is against the mean of those two. A lever is kept when it beats its base by more than
`--keep_margin`. NCHW is probed with one convolution's gradient, because TensorFlow's CPU
kernels decide whether the layout runs at all. bfloat16 runs only where the CPU has bfloat16
instructions (AVX512_BF16 or AMX); elsewhere TensorFlow emulates it and the row says so.

Writes levers.json (every process's result) and levers.md (the table) under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench import hardware  # noqa: E402  (TensorFlow-free)

THROUGHPUT = REPO_ROOT / "bench" / "pretrain_throughput.py"


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    lever: str
    base: str  # the row this one changes one thing of ("" for the reference)
    flags: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


REFERENCE_FLAGS = ("--batch_norm=unfused", "--mixed_precision=float32")
FUSED = ("--batch_norm=fused", "--mixed_precision=float32")
BF16 = ("--batch_norm=fused", "--mixed_precision=bfloat16")


def rows(cores: int, with_bf16: bool, with_amx: bool = False) -> list[Row]:
    """The levers; the bfloat16 variants only where bfloat16 can pay (AMX: where the project
    picks it by default)."""
    out = [
        Row("reference", "reference settings: unfused BN, float32, no XLA", "", REFERENCE_FLAGS),
        Row(
            "onednn_off",
            "oneDNN off (TF_ENABLE_ONEDNN_OPTS=0)",
            "reference",
            REFERENCE_FLAGS,
            (("TF_ENABLE_ONEDNN_OPTS", "0"),),
        ),
        Row("fused_bn", "fused batch norm", "reference", FUSED),
        Row(
            "threads_1_inter",
            f"threads: intra-op {cores}, inter-op 1",
            "fused_bn",
            (*FUSED, f"--intra_op_threads={cores}", "--inter_op_threads=1"),
        ),
        Row("xla", "XLA (jit_compile)", "fused_bn", (*FUSED, "--jit_compile")),
    ]
    if with_bf16:
        out.append(Row("bfloat16", "bfloat16 mixed precision", "fused_bn", BF16))
    if with_amx:
        out += [
            Row(
                "reference_bfloat16",
                "bfloat16 mixed precision, the reference's unfused BN, TensorFlow's kernels",
                "reference",
                (
                    "--batch_norm=unfused",
                    "--mixed_precision=bfloat16",
                    "--side_by_side_max_width=0",
                    "--elementwise=tensorflow",
                ),
            ),
            Row(
                "bfloat16_tf_elementwise",
                "bfloat16, the blocks' element-wise work by TensorFlow's kernels (not XLA)",
                "bfloat16",
                (*BF16, "--elementwise=tensorflow"),
            ),
            Row(
                "bfloat16_plain_narrow_maps",
                "bfloat16, convolutions on 4x4 and 8x8 maps as oneDNN has them (not side by side)",
                "bfloat16",
                (*BF16, "--side_by_side_max_width=0"),
            ),
            Row(
                "bfloat16_side_by_side_4",
                "bfloat16, only 4x4 maps side by side (8x8 kernel gradients as oneDNN has them)",
                "bfloat16",
                (*BF16, "--side_by_side_max_width=4"),
            ),
            Row("bfloat16_xla", "bfloat16 + XLA", "bfloat16", (*BF16, "--jit_compile")),
            Row(
                "fpmath_bf16",
                "float32 graph, oneDNN bf16 math (TF_SET_ONEDNN_FPMATH_MODE=BF16)",
                "fused_bn",
                FUSED,
                (("TF_SET_ONEDNN_FPMATH_MODE", "BF16"),),
            ),
            Row(
                "onednn_amp",
                "float32 graph, oneDNN auto mixed precision rewrite (grappler)",
                "fused_bn",
                (*FUSED, "--onednn_auto_mixed_precision"),
            ),
        ]
    out.append(Row("reference_again", "reference settings, again", "", REFERENCE_FLAGS))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="output/step_levers")
    p.add_argument("--resnet_depth", type=int, default=18)
    p.add_argument("--width_multiplier", type=float, default=1.0)
    p.add_argument("--train_batch_size", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup_steps", type=int, default=1)
    p.add_argument("--num_images", type=int, default=1024)
    p.add_argument("--data_dir", default=str(REPO_ROOT.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--work_dir", default="/tmp/simclr_bench")
    p.add_argument(
        "--only", default="", help="Comma-separated row names to run (reference rows always run)."
    )
    p.add_argument(
        "--bfloat16",
        choices=("auto", "yes", "no"),
        default="auto",
        help="auto: only on CPUs with bfloat16 instructions.",
    )
    p.add_argument(
        "--cached_batch",
        action="store_true",
        help="Every row repeats one in-memory batch instead of running the input pipeline "
        "beside the step (as bench/torch_peer.py does).",
    )
    p.add_argument("--keep_margin", type=float, default=0.05, help="Speed-up needed to keep.")
    p.add_argument("--nchw_probe", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def nchw_probe() -> None:
    """One channels-first convolution + BN, forward and backward, in a traced function."""
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import tensorflow as tf
    import tf_keras as keras

    conv = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, data_format="channels_first")
    norm = keras.layers.BatchNormalization(axis=1)
    images = tf.random.normal([8, 16, 32, 32])

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(norm(conv(x), training=True) ** 2)
        return tape.gradient(loss, conv.trainable_variables + norm.trainable_variables)

    try:
        step(images)
    except tf.errors.OpError as e:
        reason = next(
            (line.strip() for line in e.message.splitlines() if "support" in line), e.message
        )
        print(json.dumps({"runs": False, "error": reason[:300]}))
        return
    print(json.dumps({"runs": True}))


def run_row(row: Row, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        str(THROUGHPUT),
        f"--resnet_depth={args.resnet_depth}",
        f"--width_multiplier={args.width_multiplier}",
        f"--train_batch_size={args.train_batch_size}",
        f"--steps={args.steps}",
        f"--warmup_steps={args.warmup_steps}",
        f"--num_images={args.num_images}",
        f"--data_dir={args.data_dir}",
        f"--work_dir={args.work_dir}",
        "--image_size=32",
        *(["--cached_batch"] if args.cached_batch else []),
        *row.flags,
    ]
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", **dict(row.env)}
    if "TF_ENABLE_ONEDNN_OPTS" not in dict(row.env):
        env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    print(f"[{time.strftime('%H:%M:%S')}] {row.name}: {' '.join(cmd[2:])}", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0][:300]}"}
    result = json.loads(lines[-1])
    print(f"    {result['step_s']} s/step, {result['gflops_per_s']} GFLOP/s", flush=True)
    return result


def summarize(table: list[Row], results: dict[str, dict], nchw: dict, margin: float) -> dict:
    """Ratios against the mean reference step, and each lever's verdict against its base."""
    refs = [
        results[n]["step_s"]
        for n in ("reference", "reference_again")
        if "step_s" in results.get(n, {})
    ]
    if not refs:
        raise RuntimeError("the reference settings did not run; nothing to compare against")
    reference_s = statistics.mean(refs)
    # The same maths in every row; the fused graph's count leaves out nothing but BN kernels.
    counted = [r["step_gflop"] for r in results.values() if "step_gflop" in r]
    step_gflop = min(counted)
    out = {"reference_step_s": reference_s, "step_gflop": step_gflop, "rows": []}
    for row in table:
        r = results.get(row.name, {})
        entry = {"name": row.name, "lever": row.lever, "base": row.base}
        if "step_s" in r:
            entry.update(
                step_s=r["step_s"],
                images_per_s=r["images_per_s"],
                gflops_per_s=round(step_gflop / r["step_s"], 1),
                percent_of_peak=(
                    round(100 * step_gflop / r["step_s"] / r["peak_gflops_per_s"], 1)
                    if r.get("peak_gflops_per_s")
                    else None
                ),
                vs_reference=round(reference_s / r["step_s"], 2),
                warmup_s=r["warmup_s"],
                max_rss_mib=r["max_rss_mib"],
                load=r["load_average_1min"],
            )
            base = results.get(row.base, {})
            if "step_s" in base:
                entry["vs_base"] = round(base["step_s"] / r["step_s"], 2)
                entry["kept"] = entry["vs_base"] > 1 + margin
        else:
            entry["error"] = r.get("error", "not run")
        out["rows"].append(entry)
    out["nchw"] = nchw
    return out


def markdown(summary: dict, cpu: hardware.CpuInfo, args: argparse.Namespace, bf16_note: str) -> str:
    peak32 = hardware.peak_gflops(cpu, "float32")
    peak16 = hardware.peak_gflops(cpu, "bfloat16")
    lines = [
        f"CPU: {cpu.model} ({cpu.vendor}), {cpu.cores} cores usable, "
        f"base clock {cpu.base_ghz} GHz, "
        f"extensions: {', '.join(cpu.extensions)}. Peak: float32 {peak32} GFLOP/s"
        + (f", bfloat16 {peak16} GFLOP/s" if peak16 else ", no bfloat16 instructions")
        + ".",
        "",
        f"Step: ResNet-{args.resnet_depth} x{args.width_multiplier:g}, 32x32, batch "
        f"{args.train_batch_size} (two views each), forward + backward + LARS: "
        f"{summary['step_gflop']} GFLOP counted. {args.steps} timed steps after "
        f"{args.warmup_steps} warm-up per row"
        + (", one cached batch" if args.cached_batch else ", input pipeline running beside")
        + ". Reference step (mean of its two rows): "
        f"{summary['reference_step_s']:.2f} s.",
        "",
        "| row | lever | base | s/step | img/s | GFLOP/s | % of peak | vs reference | vs base "
        "| kept | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in summary["rows"]:
        if "error" in e:
            lines.append(
                f"| {e['name']} | {e['lever']} | {e['base'] or '–'} | {e['error']} | | | | | | | |"
            )
            continue
        kept = "–" if "kept" not in e else ("yes" if e["kept"] else "no")
        lines.append(
            f"| {e['name']} | {e['lever']} | {e['base'] or '–'} | {e['step_s']:.2f} | "
            f"{e['images_per_s']:.1f} | {e['gflops_per_s']} | {e['percent_of_peak']} | "
            f"{e['vs_reference']:.2f}x | {e.get('vs_base', '–')} | {kept} | {e['load']} |"
        )
    nchw = summary["nchw"]
    lines.append(
        "| nchw | NCHW (channels_first) | fused_bn | "
        + (
            "runs on this CPU; not timed"
            if nchw.get("runs")
            else f"does not run: {nchw.get('error')}"
        )
        + " | | | | | | no | |"
    )
    if bf16_note:
        lines.append(
            f"| bfloat16 | bfloat16 mixed precision | fused_bn | {bf16_note} | | | | | | no | |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.nchw_probe:
        nchw_probe()
        return {}
    cpu = hardware.cpu_info()
    has_bf16 = hardware.flops_per_cycle(cpu, "bfloat16") is not None
    with_bf16 = args.bfloat16 == "yes" or (args.bfloat16 == "auto" and has_bf16)
    bf16_note = "" if with_bf16 else "not run: no bfloat16 instructions on this CPU (emulated)"
    table = rows(cpu.cores, with_bf16, with_bf16 and hardware.has_amx(cpu))
    only = {n for n in args.only.split(",") if n} | {"reference", "reference_again"}
    if args.only:
        table = [r for r in table if r.name in only]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for row in table:
        results[row.name] = run_row(row, args)
        (out / "runs.json").write_text(json.dumps(results, indent=1))  # kept if stopped
    probe = subprocess.run(
        [sys.executable, __file__, "--nchw_probe"],
        env={**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
    )
    probe_lines = [line for line in probe.stdout.splitlines() if line.startswith("{")]
    nchw = json.loads(probe_lines[-1]) if probe_lines else {"runs": False, "error": "probe failed"}
    summary = summarize(table, results, nchw, args.keep_margin)
    summary["cpu"] = cpu.as_dict()
    summary["peak_gflops_per_s"] = {
        "float32": hardware.peak_gflops(cpu, "float32"),
        "bfloat16": hardware.peak_gflops(cpu, "bfloat16"),
    }
    (out / "levers.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=1))
    text = markdown(summary, cpu, args, bf16_note)
    (out / "levers.md").write_text(text)
    print(text, flush=True)
    return summary


if __name__ == "__main__":
    main()
