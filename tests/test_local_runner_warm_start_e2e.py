"""Data that grows, end to end through `local_runner.py`: run 1 on half of the embedded digits'
training images, the other half added, run 2 with `--warm_start`.

Run 2 must ingest the new counts, start pretraining from run 1's pretrained encoder (and say
so), begin where run 1 ended (its first kNN, before any step, at least run 1's last kNN minus
noise), and gate against run 1's blessed model.
"""

from __future__ import annotations

import pathlib
import re
import shutil

import pytest

from pipeline.runner import summary as summary_lib
from tests.pipeline_runs import run_pipeline

# kNN top-1 over 360 eval images moves by a few points between two banks of the same encoder.
KNN_NOISE = 0.05
ARGS = [
    "--dataset=digits",
    "--width_multiplier=0.125",
    "--proj_out_dim=16",
    "--train_batch_size=64",
    "--warmup_epochs=0",
    "--train_epochs=2",
    "--knn_every_epochs=1",
    "--finetune_train_batch_size=32",
    "--finetune_train_steps=2",
    "--min_top1=0",
    "--max_top1_regression=1",
    "--log_every_steps=10",
]


def _knn(stdout: str) -> list[tuple[int, float]]:
    """(step, kNN top-1) of every kNN line pretraining printed, in order."""
    found = re.findall(r"^pretrain step (\d+): .*?eval/knn_top_1_accuracy ([0-9.]+)", stdout, re.M)
    return [(int(step), float(value)) for step, value in found]


@pytest.mark.e2e
def test_new_images_and_warm_start_continue_from_the_last_pretrained_encoder(tmp_path):
    from pipeline.runner.digits import write_digits_dataset

    data = write_digits_dataset(tmp_path / "data")
    (data / "DATASET.json").unlink()  # the tree no longer is the generated one
    later = tmp_path / "later"
    for class_dir in sorted((data / "train").iterdir()):
        for image in sorted(class_dir.glob("*.png"))[::2]:
            (later / class_dir.name).mkdir(parents=True, exist_ok=True)
            shutil.move(image, later / class_dir.name / image.name)
    half = len(list((data / "train").rglob("*.png")))
    out = tmp_path / "out"
    args = [*ARGS, f"--data_dir={data}", f"--model_dir={out}"]

    first = run_pipeline(args)
    assert first.returncode == 0, first.stderr[-3000:]
    run1 = summary_lib.latest_run(str(out / "metadata.sqlite"))
    assert run1.ingestion["train"]["written"] == half and run1.blessed
    run1_knn = _knn(first.stdout)
    assert run1_knn and run1_knn[-1][0] > 0

    for class_dir in sorted(later.iterdir()):
        for image in class_dir.iterdir():
            shutil.move(image, data / "train" / class_dir.name / image.name)
    full = len(list((data / "train").rglob("*.png")))
    second = run_pipeline([*args, "--warm_start", "--warm_start_epochs=1"])
    assert second.returncode == 0, second.stderr[-3000:]
    run2 = summary_lib.latest_run(str(out / "metadata.sqlite"))

    # The new images were ingested: ExampleGen ran again and counted them all.
    assert "FileBasedExampleGen" not in run2.cached
    assert run2.ingestion["train"]["written"] == full > half
    # Pretraining started from run 1's pretrained model, said so, and recorded it.
    started = str(pathlib.Path(run1.model_uris["pretrain"]))
    assert f"pretrain: warm start from {started}" in second.stdout
    assert run2.warm_start_from and run2.warm_start_from.startswith(started)
    # Its first kNN (before any step) is where run 1 ended, give or take noise.
    run2_knn = _knn(second.stdout)
    assert run2_knn[0][0] == 0
    assert run2_knn[0][1] >= run1_knn[-1][1] - KNN_NOISE
    # The no-regression gate compared run 2's model with run 1's blessed one.
    assert run2.regression_baseline_uri == run1.model_uris["finetune"]
    assert run2.baseline_top1 == pytest.approx(run1.top1, abs=1e-6)
