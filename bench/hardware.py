"""What the CPU can do and what a step asks of it: CPU model, vector/matrix extensions, peak
GFLOP/s per precision, and FLOPs counted from a traced TensorFlow graph.

The peak is cores x clock x FLOPs per cycle per core. FLOPs per cycle come from the vendors'
descriptions of the execution units (two FMA pipes per core on every CPU listed here); the clock
is the base clock the kernel reports, so turbo is not counted. A figure above 100% of it means
the core ran faster than its base clock, not a wrong count.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass

from models.precision import AMX_FLAGS

# FLOPs per cycle per core. An FMA counts as 2 FLOPs; two FMA pipes per core.
FP32_AVX512 = 2 * 16 * 2  # two 512-bit FMA units (Intel Xeon Skylake-SP and later)
FP32_AVX512_ZEN4 = 2 * 8 * 2  # Zen 4 executes 512-bit FMAs as two 256-bit halves
FP32_AVX2 = 2 * 8 * 2  # two 256-bit FMA units
FP32_SSE = 2 * 4 * 2
# AVX512_BF16's dot product does two bf16 multiply-adds per fp32 lane: twice the fp32 rate.
BF16_DOT_FACTOR = 2
# AMX: one TMUL per core, 1,024 bf16 multiply-adds per cycle (Intel's Sapphire Rapids figure).
BF16_AMX = 1024 * 2


@dataclass(frozen=True)
class CpuInfo:
    model: str
    vendor: str
    cores: int  # usable by this process
    base_ghz: float
    extensions: tuple[str, ...]  # the ones that decide the peak, in the order below

    def as_dict(self) -> dict:
        return asdict(self)


EXTENSIONS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def parse_cpuinfo(text: str, cores: int) -> CpuInfo:
    """CpuInfo from the text of /proc/cpuinfo (first processor's fields)."""

    def field(name: str) -> str:
        match = re.search(rf"^{name}\s*:\s*(.*)$", text, re.MULTILINE)
        return match.group(1).strip() if match else ""

    flags = set(field("flags").split())
    mhz = field("cpu MHz")
    return CpuInfo(
        model=field("model name") or "unknown",
        vendor=field("vendor_id") or "unknown",
        cores=cores,
        base_ghz=round(float(mhz) / 1000, 3) if mhz else 0.0,
        extensions=tuple(e for e in EXTENSIONS if e in flags),
    )


def cpu_info() -> CpuInfo:
    with open("/proc/cpuinfo") as f:
        text = f.read()
    return parse_cpuinfo(text, len(os.sched_getaffinity(0)))


def flops_per_cycle(info: CpuInfo, precision: str) -> int | None:
    """Peak FLOPs per cycle per core for 'float32' or 'bfloat16'; None: no such hardware."""
    ext = set(info.extensions)
    amd = "AMD" in info.vendor
    if "avx512f" in ext:
        fp32 = FP32_AVX512_ZEN4 if amd else FP32_AVX512
    elif {"avx2", "fma"} <= ext:
        fp32 = FP32_AVX2
    else:
        fp32 = FP32_SSE
    if precision == "float32":
        return fp32
    if precision != "bfloat16":
        raise ValueError(f"precision must be float32 or bfloat16, got {precision!r}")
    if "amx_bf16" in ext:
        return BF16_AMX
    if "avx512_bf16" in ext:
        return fp32 * BF16_DOT_FACTOR
    return None  # bfloat16 is emulated through float32 conversions


def has_amx(info: CpuInfo) -> bool:
    """Whether the CPU has AMX for bfloat16: where --mixed_precision=auto picks bfloat16."""
    return all(flag in info.extensions for flag in AMX_FLAGS)


def describe(info: CpuInfo) -> str:
    """The CPU as every benchmark table names it: model, AMX or not, cores."""
    return f"{info.model} ({'AMX' if has_amx(info) else 'no AMX'}), {info.cores} cores"


def peak_gflops(info: CpuInfo, precision: str) -> float | None:
    per_cycle = flops_per_cycle(info, precision)
    if per_cycle is None or not info.base_ghz:
        return None
    return info.cores * info.base_ghz * per_cycle


def count_flops(concrete_function) -> dict[str, int]:
    """Floating-point operations of one call of a traced function, by op type.

    Each op's count comes from the statistics TensorFlow registers for its type (what
    `tf.compat.v1.profiler` sums): convolutions and both their gradients, matmuls, element-wise
    arithmetic, computed from the op's shapes, which must be static. Ops without registered
    statistics (e.g. the fused batch-norm kernels) count 0, so the total is a slight undercount.
    """
    from tensorflow.python.framework import ops

    graph = concrete_function.graph
    counts: dict[str, int] = {}
    for op in graph.get_operations():
        try:
            value = ops.get_stats_for_node_def(graph, op.node_def, "flops").value
        except ValueError:  # an unknown shape; none in a step traced from concrete tensors
            value = None
        if value:
            counts[op.type] = counts.get(op.type, 0) + int(value)
    return counts
