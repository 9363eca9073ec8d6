"""The oneDNN step breakdown on canned ONEDNN_VERBOSE lines (oneDNN 3.3, timestamps on)."""

from __future__ import annotations

import pytest

from bench import onednn_breakdown as bd

MDS = "src_bf16::blocked:acdb::f0 wei_bf16:a:blocked:AcdB16b32a2b::f0 dst_bf16::blocked:acdb::f0"
SHAPE = "mb8_ic64oc64_ih32oh32kh3sh1dh0ph1_iw32ow32kw3sw1dw0pw1"


def line(stamp: float, kind: str, impl: str, prop: str, ms: float) -> str:
    return f"onednn_verbose,{stamp},primitive,exec,cpu,{kind},{impl},{prop},{MDS},,,{SHAPE},{ms}"


LINES = [
    "onednn_verbose,info,oneDNN v3.3.4 (commit N/A)",
    line(999.0, "convolution", "brgconv:avx512_core_amx", "forward_training", 50.0),  # warm-up
    line(1000.5, "convolution", "brgconv:avx512_core_amx", "forward_training", 10.0),
    line(1001.0, "convolution", "brgconv_bwd_w:avx512_core_amx", "backward_weights", 30.0),
    line(1002.0, "reorder", "jit:uni", "undef", 1.0),
    line(1003.0, "batch_normalization", "bnorm_tbb_jit:avx512_core_bf16", "backward", 4.0),
    "1004.0 a line TensorFlow printed",
    line(1005.0, "convolution", "brgconv:avx512_core_amx", "forward_training", 10.0),
    line(2001.0, "convolution", "brgconv:avx512_core_amx", "forward_training", 70.0),  # after
]


def test_only_primitives_inside_the_timed_window_count():
    prims = bd.parse_verbose(LINES, (1000.0, 2000.0))
    assert [p["ms"] for p in prims] == [10.0, 30.0, 1.0, 4.0, 10.0]
    assert prims[0]["dtypes"] == "src_bf16 wei_bf16 dst_bf16" and prims[0]["shape"] == SHAPE


def test_summary_splits_onednn_amx_reorders_and_the_rest():
    # Two timed steps of 50 ms each.
    s = bd.summarize(bd.parse_verbose(LINES, (1000.0, 2000.0)), step_s=0.05, steps=2)
    assert s["step_ms"] == pytest.approx(50.0)
    assert s["onednn_ms"] == pytest.approx(27.5)  # (10 + 30 + 1 + 4 + 10) / 2
    assert s["amx_ms"] == pytest.approx(25.0)
    assert s["reorder_ms"] == pytest.approx(0.5)
    assert s["other_ms"] == pytest.approx(22.5)
    top = s["rows"][0]
    assert (top["impl"], top["calls_per_step"], top["ms_per_step"]) == (
        "brgconv_bwd_w:avx512_core_amx",
        0.5,
        15.0,
    )
    forward = next(r for r in s["rows"] if r["prop"] == "forward_training")
    assert forward["calls_per_step"] == 1 and forward["share"] == pytest.approx(0.2)
    # Convolutions by problem, slowest first; other primitives are not listed there.
    assert [(c["prop"], c["ms_per_step"]) for c in s["convolutions"]] == [
        ("backward_weights", 15.0),
        ("forward_training", 10.0),
    ]


def test_its_own_flags_are_kept_apart_from_the_benchmarks():
    args, rest = bd.parse_args(["--out=x", "--mixed_precision=bfloat16", "--steps=3"])
    assert (args.out, args.steps) == ("x", 3) and rest == ["--mixed_precision=bfloat16"]
