"""--mixed_precision=auto decided on recorded CPU flag sets and device descriptions: no hardware
needed, and the same answers on every machine the suite lands on."""

from __future__ import annotations

import pathlib

import pytest

from models import precision
from models.precision import Choice, Device, choose

# The flags of the three CPUs this project's figures were measured on, as /proc/cpuinfo showed
# them: an Intel Xeon exposing AMX (family 6 model 167), an Intel Xeon with AVX512_BF16 whose
# AMX the hypervisor hides (family 6 model 207), and an AMD EPYC with AVX2 and FMA only.
_COMMON = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse "
    "sse2 ss ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc "
    "cpuid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt "
    "tsc_deadline_timer aes xsave avx f16c rdrand hypervisor lahf_lm abm 3dnowprefetch "
    "fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid rdseed adx smap clflushopt clwb sha_ni "
    "xsaveopt xsavec xgetbv1 xsaves arat umip vaes vpclmulqdq rdpid fsrm"
)
_AVX512 = (
    "avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl avx_vnni avx512_bf16 avx512vbmi "
    "avx512_vbmi2 gfni avx512_vnni avx512_bitalg avx512_vpopcntdq"
)
INTEL_AMX = f"{_COMMON} {_AVX512} serialize tsxldtrk amx_bf16 avx512_fp16 amx_tile amx_int8"
INTEL_AVX512_BF16 = f"{_COMMON} {_AVX512} serialize tsxldtrk avx512_fp16"
AMD_AVX2 = f"{_COMMON} misalignsse sse4a xop"
# AMX reported half (a kernel that knows only one of the two): the tiles cannot be used.
INTEL_AMX_BF16_WITHOUT_TILES = f"{_COMMON} {_AVX512} amx_bf16"


def cpuinfo(model: str, flags: str) -> str:
    block = (
        f"processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: {model}\nflags\t\t: {flags}\n"
    )
    return block + "\n" + block.replace(": 0", ": 1")


def cpu(flags: str) -> Device:
    return Device("cpu", "Xeon", precision.cpu_flags(cpuinfo("Xeon", flags)))


@pytest.mark.parametrize(
    ("flags", "dtype", "why"),
    [
        (INTEL_AMX, "bfloat16", "has AMX"),
        (INTEL_AVX512_BF16, "float32", "AVX512_BF16 but no AMX"),
        (AMD_AVX2, "float32", "no AMX"),
        (INTEL_AMX_BF16_WITHOUT_TILES, "float32", "no AMX"),
    ],
)
def test_auto_on_cpus_follows_amx(flags, dtype, why):
    choice = choose("auto", cpu(flags))
    assert choice.dtype == dtype
    assert choice.reason.startswith("auto: ") and why in choice.reason


@pytest.mark.parametrize(
    ("capabilities", "dtype"),
    [
        ([(7, 0)], "float32"),  # V100
        ([(7, 5)], "float32"),  # T4
        ([(8, 0)], "bfloat16"),  # A100
        ([(8, 9)], "bfloat16"),  # L4
        ([(9, 0)], "bfloat16"),  # H100
        ([(9, 0), (7, 5)], "float32"),  # the slowest GPU sets the pace
    ],
)
def test_auto_on_gpus_follows_compute_capability(capabilities, dtype):
    details = [{"compute_capability": c, "device_name": "NVIDIA GPU"} for c in capabilities]
    device = precision.gpu_device(details)
    assert device.gpu_capability == min(capabilities)
    assert choose("auto", device).dtype == dtype


def test_auto_on_tpus_and_unknown_gpus():
    assert choose("auto", Device("tpu")).dtype == "bfloat16"
    assert choose("auto", precision.gpu_device([{"device_name": "GPU"}])).dtype == "float32"


@pytest.mark.parametrize("dtype", precision.DTYPES)
@pytest.mark.parametrize("device", [cpu(AMD_AVX2), cpu(INTEL_AMX), Device("tpu")])
def test_an_explicit_dtype_always_wins(dtype, device):
    assert choose(dtype, device) == Choice(dtype, "set by --mixed_precision")


def test_unknown_values_are_one_line_naming_the_flag():
    with pytest.raises(ValueError, match=r"^--mixed_precision: must be one of .*'fp8'$"):
        choose("fp8", Device("cpu"))


def test_cpu_device_reads_the_first_processor(tmp_path: pathlib.Path):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo("Intel(R) Xeon(R) Processor", INTEL_AMX))
    device = precision.cpu_device(str(path))
    assert device.name == "Intel(R) Xeon(R) Processor"
    assert {"amx_bf16", "amx_tile", "avx512_bf16"} <= device.cpu_flags
    assert choose("auto", device).line() == (
        "precision: bfloat16 (auto: Intel(R) Xeon(R) Processor has AMX (amx_bf16, amx_tile))"
    )
    missing = precision.cpu_device(str(tmp_path / "absent"))
    assert missing.cpu_flags == frozenset() and choose("auto", missing).dtype == "float32"


def test_local_device_is_the_tpu_for_the_tpu_strategy():
    assert precision.local_device("tpu").kind == "tpu"
    assert precision.resolve("float16", "default") == Choice("float16", "set by --mixed_precision")
