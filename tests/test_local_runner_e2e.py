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
    assert any("sparse_categorical_accuracy" in f and ">= 1.0100" in f for f in run2.failures)
    assert "NOT_BLESSED" in second.stdout
    assert sorted(p.name for p in (out / "serving_model").iterdir()) == pushed_before


def write_tfds_style(root: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """Class folders → `<name>-<split>.tfrecord-00000-of-00001` with TFDS's image/label features."""
    import tensorflow as tf

    out.mkdir(parents=True)
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        classes = sorted(p.name for p in split_dir.iterdir())
        path = out / f"digits-{split_dir.name}.tfrecord-00000-of-00001"
        with tf.io.TFRecordWriter(str(path)) as writer:
            for label, name in enumerate(classes):
                for image in sorted((split_dir / name).iterdir()):
                    feature = {
                        "image": tf.train.Feature(
                            bytes_list=tf.train.BytesList(value=[image.read_bytes()])
                        ),
                        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                    }
                    example = tf.train.Example(features=tf.train.Features(feature=feature))
                    writer.write(example.SerializeToString())
    return out


@pytest.mark.e2e
def test_tfrecords_supervised_then_degraded_candidate_is_blocked(tmp_path):
    """TFDS-style TFRecords via ImportExampleGen, --train_mode=finetune, and the regression gate:
    a zero-initialized head trained with learning rate 0 must not replace the pushed model."""
    from pipeline.digits import write_digits_dataset

    data = write_tfds_style(write_digits_dataset(tmp_path / "digits"), tmp_path / "tfrecords")
    out = tmp_path / "out"
    common = [
        "--dataset=digits",
        f"--data_dir={data}",
        f"--model_dir={out}",
        "--train_mode=finetune",
        "--width_multiplier=0.25",
        "--optimizer=momentum",
        "--warmup_epochs=0",
        "--train_batch_size=64",
        "--log_every_steps=20",
        "--min_top1=0.3",
    ]
    first = run_pipeline(common + ["--train_steps=80", "--learning_rate=2.0"])
    assert first.returncode == 0
    metadata = str(out / "metadata.sqlite")
    run1 = summary_lib.latest_run(metadata)
    assert "ImportExampleGen" in run1.components and "pretrain_trainer" not in run1.components
    assert run1.example_count == 360
    assert run1.top1 >= 0.3 and run1.blessed and run1.pushed
    pushed = sorted((out / "serving_model").iterdir())
    stamps = {p.name: p.stat().st_mtime_ns for p in pushed[-1].rglob("*")}

    degraded = run_pipeline(
        common + ["--train_steps=1", "--learning_rate=0", "--zero_init_logits_layer=True"]
    )
    assert degraded.returncode == 0
    run2 = summary_lib.latest_run(metadata)
    assert run2.top1 == pytest.approx(0.1, abs=0.01)  # uniform scores: always class 0
    assert run2.baseline_top1 == pytest.approx(run1.top1)
    assert run2.blessed is False and not run2.pushed
    assert "NOT_BLESSED" in degraded.stdout
    assert "change vs. baseline" in degraded.stdout and ">= 0.3000" in degraded.stdout
    assert sorted((out / "serving_model").iterdir()) == pushed
    assert {p.name: p.stat().st_mtime_ns for p in pushed[-1].rglob("*")} == stamps
