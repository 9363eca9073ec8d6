"""End to end: the whole pipeline through LocalDagRunner on a small real CIFAR-10 subset.

Run 1 (low floor) must execute every component, report top-1/top-5 and push. Run 2 (floor
1.01) must resolve run 1's model as its baseline, come out NOT_BLESSED and push nothing.
"""

import os
import pathlib
import subprocess
import sys

import pytest

from pipeline import summary as summary_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
COMPONENTS = {
    "FileBasedExampleGen",
    "StatisticsGen",
    "SchemaGen",
    "ExampleValidator",
    "Transform",
    "pretrain_trainer",
    "finetune_trainer",
    "latest_blessed_model_resolver",
    "Evaluator",
    "Pusher",
}
TINY = [
    "--dataset=cifar10",
    "--image_size=32",
    "--resnet_depth=18",
    "--width_multiplier=0.125",
    "--proj_out_dim=16",
    "--train_batch_size=32",
    "--train_steps=3",
    "--finetune_train_batch_size=32",
    "--finetune_train_steps=3",
    "--eval_batch_size=64",
    "--log_every_steps=1",
]


def make_subset(cifar: pathlib.Path, root: pathlib.Path, train: int, test: int) -> pathlib.Path:
    for split, count in (("train", train), ("test", test)):
        for class_dir in sorted((cifar / split).iterdir()):
            target = root / split / class_dir.name
            target.mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:count]:
                (target / image.name).symlink_to(image)
    return root


def run_pipeline(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1")
    result = subprocess.run(
        [sys.executable, "local_runner.py", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    print(result.stdout[-5000:])
    print(result.stderr[-5000:], file=sys.stderr)
    return result


@pytest.mark.e2e
def test_pipeline_blesses_pushes_then_gates(cifar_dir, tmp_path):
    data = make_subset(cifar_dir, tmp_path / "data", train=20, test=10)
    out = tmp_path / "out"
    common = TINY + [f"--data_dir={data}", f"--model_dir={out}"]

    first = run_pipeline(common + ["--min_top1=0.0", "--max_top1_regression=1.0"])
    assert first.returncode == 0
    metadata = str(out / "metadata.sqlite")
    run1 = summary_lib.latest_run(metadata)
    assert COMPONENTS <= set(run1.components)
    assert 0.0 <= run1.top1 <= run1.top5 <= 1.0
    assert run1.example_count == 100
    assert len(run1.per_label_top1) == 10
    assert run1.blessed is True and run1.pushed
    pushed = pathlib.Path(run1.pushed_destination)
    assert (pushed / "saved_model.pb").exists()
    assert "blessing: BLESSED" in first.stdout and f"top-1 accuracy {run1.top1:.4f}" in first.stdout
    for stage in ("pretrain", "finetune"):
        logs = pathlib.Path(run1.model_run_uris[stage])
        assert any(logs.rglob("events.out.tfevents*")), stage
    pushed_before = sorted(p.name for p in (out / "serving_model").iterdir())

    second = run_pipeline(common + ["--min_top1=1.01"])
    assert second.returncode == 0
    run2 = summary_lib.latest_run(metadata)
    assert run2.run_id != run1.run_id
    assert run2.baseline_top1 == pytest.approx(run1.top1)
    assert run2.blessed is False and not run2.pushed
    assert any("sparse_categorical_accuracy" in f and "1.0100" in f for f in run2.failures)
    assert "NOT_BLESSED" in second.stdout
    assert sorted(p.name for p in (out / "serving_model").iterdir()) == pushed_before
