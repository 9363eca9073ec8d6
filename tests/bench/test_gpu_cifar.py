"""bench/gpu_cifar.sh: the precision it picks for the GPU it finds, and a run on CPU with a tiny
subset and model, where a stand-in nvidia-smi reports device memory, so that the recorded
seconds per epoch, kNN curve and peak memory are checked end to end without a GPU."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest

from bench import quality

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "bench" / "gpu_cifar.sh"
# Prints a name and compute capability, and when polled a memory log whose peak is 2500 MiB.
FAKE_NVIDIA_SMI = """#!/usr/bin/env bash
case "$*" in
  *-L*) echo "GPU 0: Test GPU (UUID: GPU-0)" ;;
  *name*) echo "Test GPU" ;;
  *compute_cap*) echo "${FAKE_COMPUTE_CAP:-9.0}" ;;
  *memory.used*) printf '100\\n2500\\n700\\n'; while true; do echo 700; sleep 0.5; done ;;
esac
"""


@pytest.fixture(scope="module")
def fake_nvidia_smi(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("bin") / "nvidia-smi"
    path.write_text(FAKE_NVIDIA_SMI)
    path.chmod(0o755)
    return path


def _script(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("cap", "flags", "precision"),
    [
        ("9.0", [], "bfloat16"),  # Hopper
        ("8.0", [], "bfloat16"),  # Ampere: the first with bfloat16 tensor cores
        ("7.5", [], "float16"),  # Turing: float16 with loss scaling
        ("9.0", ["--mixed_precision=float32"], "float32"),  # the user's flag wins
    ],
)
def test_precision_follows_the_gpu(fake_nvidia_smi, cap, flags, precision):
    result = _script(
        "30", *flags, DRY_RUN="1", NVIDIA_SMI=str(fake_nvidia_smi), FAKE_COMPUTE_CAP=cap
    )
    assert result.returncode == 0, result.stderr
    assert f"device: Test GPU; precision: {precision}" in result.stdout
    command = result.stdout.split("command: ", 1)[1].split()
    # The recipe, then the user's flags, which argparse lets override it.
    assert command[1:2] == ["local_runner.py"]
    for flag in (
        "--dataset=cifar10",
        "--resnet_depth=18",
        "--train_batch_size=512",
        "--knn_every_epochs=10",
        "--train_epochs=30",
    ):
        assert flag in command
    if flags:
        assert command[-len(flags) :] == flags
    # A GPU that nvidia-smi sees must be the one TensorFlow trains on.
    assert "--accelerator=gpu" in command


def test_without_a_gpu_it_trains_in_float32(tmp_path):
    result = _script("5", DRY_RUN="1", NVIDIA_SMI=str(tmp_path / "absent"))
    assert result.returncode == 0, result.stderr
    assert "device: CPU (no NVIDIA GPU); precision: float32" in result.stdout
    assert "--accelerator=gpu" not in result.stdout


@pytest.mark.parametrize("epochs", ["", "0", "ten", "-3"])
def test_epochs_must_be_a_positive_integer(epochs):
    result = _script(*([epochs] if epochs else []), DRY_RUN="1")
    assert result.returncode == 2
    assert "EPOCHS must be a positive integer" in result.stderr


@pytest.mark.e2e
def test_tiny_run_records_speed_knn_curve_and_peak_memory(cifar_dir, fake_nvidia_smi, tmp_path):
    record = tmp_path / "benchmarks.md"
    record.write_text("# Benchmarks\n")
    flags = [
        "--max_images_per_class=8",
        "--width_multiplier=0.125",
        "--proj_out_dim=16",
        "--train_batch_size=16",
        "--finetune_train_batch_size=16",
        "--finetune_train_epochs=1",
        "--mixed_precision=float32",
        # The fake nvidia-smi shows a GPU that TensorFlow cannot see: train on the CPU anyway.
        "--accelerator=auto",
        "--eval_batch_size=64",
        "--knn_every_epochs=1",
        "--min_top1=0",
    ]
    result = _script(
        "2",
        *flags,
        timeout=600,
        DATA_DIR=str(cifar_dir),
        OUT_DIR=str(tmp_path / "out"),
        NVIDIA_SMI=str(fake_nvidia_smi),
        GPU_CIFAR_RECORD=str(record),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [run_dir] = (tmp_path / "out").glob("run-*")
    report = json.loads((run_dir / "gpu_cifar.json").read_text())
    # 80 images in batches of 16: 5 steps an epoch, and SimCLR's 2 * 80 // 16 + 1 = 11 steps.
    assert (report["train_examples"], report["batch"], report["steps"]) == (80, 16, 11)
    assert report["epochs"] == pytest.approx(2.2)
    assert report["device"] == "Test GPU" and report["precision"] == "float32"
    assert report["seconds_per_epoch"] > 0 and report["steady_seconds_per_epoch"] > 0
    # Traced first step and checkpoints make the wall time per epoch the larger one.
    assert report["seconds_per_epoch"] > report["steady_seconds_per_epoch"]
    assert report["peak_memory_mib"] == 2500
    # kNN before the first step (random init), after epochs 1 and 2, and at the last step.
    assert [p["epoch"] for p in report["knn"]] == [0, 1, 2, 2.2]
    assert all(0 <= p["knn_top1"] <= 1 for p in report["knn"])
    minutes = [p["minutes"] for p in report["knn"]]
    assert minutes == sorted(minutes) and minutes[0] == 0
    assert report["protocol"] == "linear_eval" and 0 <= report["top1"] <= 1
    snippet = (run_dir / "gpu_cifar.md").read_text()
    assert "| 2.2 | 11 | 16 | float32 |" in snippet and "| 2500 |" in snippet
    assert f"bench/gpu_cifar.sh 2 {' '.join(flags)}" in snippet
    assert record.read_text() == "# Benchmarks\n\n" + snippet

    # The quality benchmark can reuse this run's Transform output (--pipeline_dir).
    data = quality.transform_from_pipeline(str(run_dir))
    train = quality.split_fingerprint(data.train_files)
    test = quality.split_fingerprint(data.test_files)
    assert train["examples"] == test["examples"] == 80
    assert train["records_sha256"] != test["records_sha256"]
