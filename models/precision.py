"""Which compute dtype the run's hardware computes natively and fast: `--mixed_precision=auto`.

bfloat16 pays only where the device has matrix units for it: TPUs, NVIDIA GPUs of compute
capability 8.0 and newer (Ampere's bfloat16 tensor cores), and CPUs with AMX. On a CPU with
AVX512_BF16 but no AMX the same policy is slower than float32 (docs/benchmarks.md), and without
either TensorFlow emulates it. TensorFlow 2.16 has no Python query for AMX, and CPU model numbers
are no guide (the same model is sold with AMX fused off, and virtual machines hide it), so the
CPU's flags in /proc/cpuinfo decide.

The decision is made where the pipeline is built, so that the precision actually used is part
of each Trainer's configuration (its cache key and checkpoint key), and printed with its reason.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

DTYPES = ("float32", "bfloat16", "float16")
PRECISIONS = ("auto", *DTYPES)
# Both are needed: amx_tile holds the tiles, amx_bf16 multiplies bfloat16 tiles.
AMX_FLAGS = ("amx_bf16", "amx_tile")
# Ampere (8.0) introduced bfloat16 tensor cores.
GPU_BF16_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class Device:
    """What the Trainer will compute on, as far as precision is concerned."""

    kind: str  # 'cpu' | 'gpu' | 'tpu'
    name: str = ""
    cpu_flags: frozenset[str] = frozenset()
    # The lowest compute capability among the GPUs (the slowest replica sets the pace).
    gpu_capability: tuple[int, int] | None = None


@dataclass(frozen=True)
class Choice:
    dtype: str
    reason: str

    def line(self) -> str:
        return f"precision: {self.dtype} ({self.reason})"


def choose(requested: str, device: Device) -> Choice:
    """The dtype for `requested` on `device`: an explicit dtype always wins."""
    if requested not in PRECISIONS:
        raise ValueError(f"--mixed_precision: must be one of {PRECISIONS}, got {requested!r}")
    if requested != "auto":
        return Choice(requested, "set by --mixed_precision")
    return _auto(device)


def _auto(device: Device) -> Choice:
    choice = _native(device)
    return Choice(choice.dtype, f"auto: {choice.reason}")


def _native(device: Device) -> Choice:
    if device.kind == "tpu":
        return Choice("bfloat16", "TPUs compute bfloat16 natively")
    if device.kind == "gpu":
        cap = device.gpu_capability
        if cap is None:
            return Choice("float32", f"{device.name or 'GPU'}: compute capability unknown")
        shown = f"{device.name or 'GPU'} has compute capability {cap[0]}.{cap[1]}"
        if cap >= GPU_BF16_CAPABILITY:
            return Choice("bfloat16", f"{shown}: bfloat16 tensor cores")
        return Choice("float32", f"{shown}: no bfloat16 tensor cores (needs 8.0)")
    name = device.name or "this CPU"
    if all(flag in device.cpu_flags for flag in AMX_FLAGS):
        return Choice("bfloat16", f"{name} has AMX ({', '.join(AMX_FLAGS)})")
    if "avx512_bf16" in device.cpu_flags:
        return Choice("float32", f"{name} has AVX512_BF16 but no AMX: bfloat16 is slower there")
    return Choice("float32", f"{name} has no bfloat16 matrix units (no AMX)")


def cpu_flags(cpuinfo_text: str) -> frozenset[str]:
    """The first processor's flags from the text of /proc/cpuinfo."""
    match = re.search(r"^flags\s*:\s*(.*)$", cpuinfo_text, re.MULTILINE)
    return frozenset(match.group(1).split()) if match else frozenset()


def cpu_device(cpuinfo_path: str = "/proc/cpuinfo") -> Device:
    """This machine's CPU; no flags (so float32) where /proc/cpuinfo cannot be read."""
    try:
        with open(cpuinfo_path) as f:
            text = f.read()
    except OSError:
        return Device("cpu", "this CPU (no /proc/cpuinfo)")
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.MULTILINE)
    return Device("cpu", model.group(1).strip() if model else "this CPU", cpu_flags(text))


def gpu_device(details: list[dict]) -> Device:
    """A GPU device from TensorFlow's device details (`compute_capability`, `device_name`)."""
    caps = [d["compute_capability"] for d in details if d.get("compute_capability")]
    names = sorted({d.get("device_name", "GPU") for d in details})
    name = f"{len(details)} x {' / '.join(names)}" if names else "GPU"
    return Device("gpu", name, gpu_capability=min(tuple(c) for c in caps) if caps else None)


def local_device(strategy: str) -> Device:
    """The device a Trainer run on this machine computes on: TPU for --strategy=tpu, the GPUs
    TensorFlow sees, else the CPU."""
    if strategy == "tpu":
        return Device("tpu", "TPU")
    if os.environ.get("CUDA_VISIBLE_DEVICES") != "":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            return gpu_device([tf.config.experimental.get_device_details(g) for g in gpus])
    return cpu_device()


def resolve(requested: str, strategy: str) -> Choice:
    """`choose` for a Trainer that runs on this machine."""
    if requested != "auto":
        return choose(requested, Device("cpu"))
    return choose(requested, local_device(strategy))
