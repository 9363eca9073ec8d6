"""bench/hardware.py (CPU peak, FLOP counting) and bench/step_levers.py (the lever table)."""

from __future__ import annotations

import pytest
import tensorflow as tf
import tf_keras as keras

from bench import hardware, step_levers

CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
model name\t: {model}
cpu MHz\t\t: {mhz}
flags\t\t: fpu sse sse4_2 avx {flags}
"""


def _cpu(vendor: str, flags: str, mhz: str = "2000.000", model: str = "x") -> hardware.CpuInfo:
    text = CPUINFO.format(vendor=vendor, model=model, mhz=mhz, flags=flags)
    return hardware.parse_cpuinfo(text, cores=2)


def test_parse_cpuinfo_reads_model_clock_and_extensions():
    info = _cpu("GenuineIntel", "avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile", "2100.5", "Xeon")
    assert info.model == "Xeon" and info.cores == 2 and info.base_ghz == 2.1
    assert info.extensions == (
        "sse4_2",
        "avx",
        "avx2",
        "fma",
        "avx512f",
        "avx512_bf16",
        "amx_bf16",
        "amx_tile",
    )


@pytest.mark.parametrize(
    "vendor, flags, fp32, bf16",
    [
        # Intel with AMX: two 512-bit FMA pipes; one TMUL doing 1,024 bf16 FMAs a cycle.
        ("GenuineIntel", "avx2 fma avx512f avx512_bf16 amx_bf16", 64, 2048),
        # Intel AVX-512 without AMX but with the bf16 dot product: twice fp32.
        ("GenuineIntel", "avx2 fma avx512f avx512_bf16", 64, 128),
        # Zen 4 runs 512-bit FMAs as two 256-bit halves.
        ("AuthenticAMD", "avx2 fma avx512f avx512_bf16", 32, 64),
        # AVX2 + FMA only: no bfloat16 hardware.
        ("AuthenticAMD", "avx2 fma", 32, None),
    ],
)
def test_peak_flops_per_cycle(vendor, flags, fp32, bf16):
    info = _cpu(vendor, flags, "2500.0")
    assert hardware.flops_per_cycle(info, "float32") == fp32
    assert hardware.flops_per_cycle(info, "bfloat16") == bf16
    assert hardware.peak_gflops(info, "float32") == pytest.approx(2 * 2.5 * fp32)


def test_count_flops_matches_convolution_formula():
    """Two convolutions, forward and backward: each conv costs 2*N*H*W*k*k*Cin*Cout FLOPs
    forward, and the same again for its input gradient and for its filter gradient."""
    first = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)
    second = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)
    images = tf.zeros([2, 9, 9, 3])
    second(first(images))
    variables = first.trainable_variables + second.trainable_variables

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(second(first(x)))
        return tape.gradient(loss, variables)

    counts = hardware.count_flops(step.get_concrete_function(images))
    forward = 2 * 2 * 9 * 9 * 3 * 3 * 3 * 8 + 2 * 2 * 9 * 9 * 3 * 3 * 8 * 4
    assert counts["Conv2D"] == forward
    assert counts["Conv2DBackpropFilter"] == forward
    assert counts["Conv2DBackpropInput"] == forward


def _result(step_s: float, gflop: float = 100.0, peak: float = 200.0) -> dict:
    return {
        "step_s": step_s,
        "images_per_s": 256 / step_s,
        "step_gflop": gflop,
        "peak_gflops_per_s": peak,
        "warmup_s": 1.0,
        "max_rss_mib": 1,
        "load_average_1min": 0.1,
    }


def test_summary_ratios_against_mean_reference_and_keeps_only_what_helps():
    table = step_levers.rows(cores=2, with_bf16=False)
    results = {
        "reference": _result(10.0, gflop=110.0),  # unfused BN: its elementwise ops count too
        "onednn_off": _result(20.0, gflop=110.0),
        "fused_bn": _result(6.0),
        "threads_1_inter": _result(5.9),
        "xla": {"error": "exit 1: boom"},
        "reference_again": _result(12.0, gflop=110.0),
    }
    summary = step_levers.summarize(table, results, {"runs": False, "error": "NHWC only"}, 0.05)
    rows = {e["name"]: e for e in summary["rows"]}
    assert summary["reference_step_s"] == 11.0 and summary["step_gflop"] == 100.0
    assert rows["fused_bn"]["vs_reference"] == pytest.approx(11 / 6, abs=0.01)
    assert (
        rows["fused_bn"]["vs_base"] == pytest.approx(10 / 6, abs=0.01) and rows["fused_bn"]["kept"]
    )
    assert rows["fused_bn"]["gflops_per_s"] == pytest.approx(100 / 6, abs=0.1)
    assert rows["fused_bn"]["percent_of_peak"] == pytest.approx(100 * 100 / 6 / 200, abs=0.1)
    assert not rows["onednn_off"]["kept"]
    assert not rows["threads_1_inter"]["kept"]  # 1.7% faster is inside the margin
    assert rows["xla"]["error"] == "exit 1: boom"
    text = step_levers.markdown(
        summary, _cpu("AuthenticAMD", "avx2 fma"), step_levers.parse_args([]), "x"
    )
    assert "| fused_bn | fused batch norm | reference | 6.00 |" in text
    assert "does not run: NHWC only" in text


def test_summary_refuses_without_a_reference():
    table = step_levers.rows(cores=2, with_bf16=True)
    with pytest.raises(RuntimeError, match="reference"):
        step_levers.summarize(table, {"fused_bn": _result(5.0)}, {}, 0.05)


def test_amx_cpus_get_the_bfloat16_rows_of_both_settings():
    plain = {r.name for r in step_levers.rows(cores=2, with_bf16=True)}
    amx = {r.name: r for r in step_levers.rows(cores=2, with_bf16=True, with_amx=True)}
    added = set(amx) - plain
    assert added == {
        "reference_bfloat16",
        "bfloat16_tf_elementwise",
        "bfloat16_plain_narrow_maps",
        "bfloat16_side_by_side_4",
        "bfloat16_xla",
        "fpmath_bf16",
        "onednn_amp",
    }
    assert "--batch_norm=unfused" in amx["reference_bfloat16"].flags
    assert "--mixed_precision=bfloat16" in amx["reference_bfloat16"].flags
    # The reference's bfloat16 step has none of this project's kernel choices.
    assert {
        "--side_by_side_max_width=0",
        "--elementwise=tensorflow",
    } <= set(amx["reference_bfloat16"].flags)
    assert dict(amx["fpmath_bf16"].env) == {"TF_SET_ONEDNN_FPMATH_MODE": "BF16"}
    assert list(amx)[-1] == "reference_again"  # drift still shows last
    assert hardware.has_amx(_cpu("GenuineIntel", "avx512f avx512_bf16 amx_bf16 amx_tile"))
    assert not hardware.has_amx(_cpu("GenuineIntel", "avx512f avx512_bf16"))
    assert not hardware.has_amx(_cpu("GenuineIntel", "avx512f amx_bf16"))
    assert hardware.describe(_cpu("GenuineIntel", "amx_bf16 amx_tile", model="Xeon")) == (
        "Xeon (AMX), 2 cores"
    )
    assert hardware.describe(_cpu("AuthenticAMD", "avx2", model="EPYC")) == "EPYC (no AMX), 2 cores"
