"""Unlabeled images end to end, as a user gives them, and a pool that grows.

Through `local_runner.py`: the embedded digits with 80% of each training class moved into an
unlabeled pool, once as `<data_dir>/unlabeled/` (at several depths, one sub-folder named like a
class) and once through `--unlabeled_dir`. Every count is taken from the files on disk, and each
Trainer's results.json must match it exactly: pretraining reads the labeled train split plus the
pool, fine-tuning the labeled train split only (distillation's reads are checked where the
pipeline is built, tests/pipeline/test_pipeline.py). The in-tree run is then the first run of
data that grows: half of its pool arrives after it, and the same command with `--warm_start`
must ingest it and continue from run 1's pretrained encoder. The TFRecord route: a generated
split in TFDS STL-10's layout (`unlabelled`, label -1 or none) through the pipeline's own
ExampleGen, StatisticsGen, SchemaGen, ExampleValidator and Transform under TFX's LocalDagRunner.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from pipeline.runner import summary as summary_lib
from pipeline.runner.report import read_anomalies
from tests.pipeline_runs import progress_steps, run_pipeline

UNLABELED_SHARE = 0.8
PRETRAIN_BATCH = 64
TINY = [
    "--dataset=digits",
    "--width_multiplier=0.125",
    "--proj_out_dim=16",
    f"--train_batch_size={PRETRAIN_BATCH}",
    "--warmup_epochs=0",
    "--finetune_train_batch_size=32",
    "--finetune_train_steps=2",
    "--log_every_steps=10",
    "--min_top1=0",
]
# Run 1 of the pool that grows: two epochs with a kNN after each, so run 2 has a last kNN to
# start from; a regression gate that lets a tiny model through.
GROWS = ["--train_epochs=2", "--knn_every_epochs=1", "--max_top1_regression=1"]
# kNN top-1 over 360 eval images moves by a few points between two evaluations of one encoder.
KNN_NOISE = 0.05


def _images(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in folder.rglob("*.png"))


def split_digits(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """The digits tree with 80% of every train class moved to `<root>/data/unlabeled/`: the
    first half of the moved files straight in the pool, the rest two folders deep under a
    folder named like a class (which must not become a label)."""
    from pipeline.runner.digits import write_digits_dataset

    data = write_digits_dataset(root / "data")
    (data / "DATASET.json").unlink()  # the tree no longer is the generated one
    pool = data / "unlabeled"
    for class_dir in sorted((data / "train").iterdir()):
        files = sorted(class_dir.glob("*.png"))
        moved = files[: int(round(UNLABELED_SHARE * len(files)))]
        for i, image in enumerate(moved):
            target = pool if i % 2 == 0 else pool / "3" / f"roll-{class_dir.name}"
            target.mkdir(parents=True, exist_ok=True)
            shutil.move(image, target / image.name)
    return data, pool


@pytest.fixture(scope="module")
def digits_pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("unlabeled")
    data, pool = split_digits(root)
    counts = {
        "train": len(_images(data / "train")),
        "test": len(_images(data / "test")),
        "unlabeled": len(_images(pool)),
    }
    return root, data, pool, counts


def _knn(stdout: str) -> list[tuple[int, float]]:
    """(step, kNN top-1) of every kNN line pretraining printed, in order."""
    found = re.findall(r"^pretrain step (\d+): .*?eval/knn_top_1_accuracy ([0-9.]+)", stdout, re.M)
    return [(int(step), float(value)) for step, value in found]


@dataclass
class PoolRun:
    data: pathlib.Path
    out: pathlib.Path
    args: list[str]
    later: pathlib.Path  # the pool's images that arrive after run 1, laid out as in the pool
    counts: dict[str, int]  # images on disk at run 1
    result: subprocess.CompletedProcess
    run: summary_lib.RunSummary


@pytest.fixture(scope="session")
def pool_run(tmp_path_factory) -> PoolRun:
    """Run 1: `<data_dir>/unlabeled/` holding half of the moved images (every other file); the
    other half waits in `later/` for run 2. Session-scoped, and its two tests in one xdist
    group: a worker that runs another module's test between them must not build it again."""
    root = tmp_path_factory.mktemp("in_tree")
    data, pool = split_digits(root)
    later = root / "later"
    for image in _images(pool)[::2]:
        target = later / image.relative_to(pool)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(image, target)
    counts = {"train": len(_images(data / "train")), "unlabeled": len(_images(pool))}
    counts["test"] = len(_images(data / "test"))
    out = root / "out"
    args = [*TINY, *GROWS, f"--data_dir={data}", f"--model_dir={out}"]
    result = run_pipeline(args)
    assert result.returncode == 0, result.stderr[-3000:]
    run = summary_lib.latest_run(str(out / "metadata.sqlite"))
    return PoolRun(data, out, args, later, counts, result, run)


@pytest.mark.e2e
@pytest.mark.xdist_group("pool_run")
def test_unlabeled_folder_in_the_data_dir(pool_run):
    run, result, counts = pool_run.run, pool_run.result, pool_run.counts
    labeled, unlabeled = counts["train"], counts["unlabeled"]
    assert unlabeled == pytest.approx(2 * labeled, rel=0.05)  # half of the 80% moved

    # Ingestion: the pool is its own split, every image in it unlabeled, none skipped.
    assert run.ingestion["unlabeled"]["written"] == unlabeled
    assert (run.ingestion["unlabeled"]["labeled"], run.ingestion["unlabeled"]["skipped"]) == (0, 0)
    assert run.ingestion["train"]["labeled"] == labeled
    line = f"ingested split 'unlabeled': {unlabeled} images (0 labeled, {unlabeled} unlabeled)"
    assert line in result.stdout
    # Statistics, schema and validation cover the pool, and accept it.
    assert read_anomalies(run.anomalies_uri) == {"test": [], "train": [], "unlabeled": []}
    # Pretraining: two epochs over labeled train + pool, with SimCLR's step count; every pool
    # record is unlabeled (-1), the class-named sub-folder included.
    pretrain = run.stage_results["pretrain"]
    assert pretrain["num_train_examples"] == labeled + unlabeled
    assert pretrain["num_unlabeled_train_examples"] == unlabeled
    assert pretrain["total_steps"] == 2 * (labeled + unlabeled) // PRETRAIN_BATCH + 1
    assert progress_steps(result.stdout, "pretrain")[-1] == pretrain["total_steps"]
    # Fine-tuning reads the labeled train split only; the Evaluator the eval split only.
    finetune = run.stage_results["finetune"]
    assert finetune["num_train_examples"] == labeled
    assert finetune["num_unlabeled_train_examples"] == 0
    # Both counted from StatisticsGen's output: no pass over the records to count them.
    assert pretrain["counting_passes"] == finetune["counting_passes"] == 0
    assert run.example_count == counts["test"]
    assert run.split_readers == {
        "train": ["pretrain_trainer", "finetune_trainer"],
        "unlabeled": ["pretrain_trainer"],
        "test": ["Evaluator"],
    }
    assert "split 'unlabeled' read by: pretrain_trainer" in result.stdout
    # The auto protocol with a pool is semi-supervised fine-tuning.
    assert run.protocol == "fine_tune"
    # The HTML report shows the pool: its row in the per-class table and who read each split.
    [report] = re.findall(r"^report: (.+)$", result.stdout, re.M)
    html = pathlib.Path(report).read_text()
    assert "(unlabeled)" in html and "read by" in html and "pretrain_trainer" in html


@pytest.mark.e2e
@pytest.mark.xdist_group("pool_run")
def test_new_images_and_warm_start_continue_from_the_last_pretrained_encoder(pool_run):
    """Run 2: the held-back half of the pool arrives, and the same command with `--warm_start`
    ingests it, starts pretraining from run 1's pretrained encoder (and says so), begins where
    run 1 ended (its first kNN, before any step, at least run 1's last kNN minus noise), and
    gates against run 1's blessed model."""
    run1 = pool_run.run
    assert run1.blessed
    run1_knn = _knn(pool_run.result.stdout)
    assert run1_knn and run1_knn[-1][0] > 0
    pool = pool_run.data / "unlabeled"
    for image in _images(pool_run.later):
        target = pool / image.relative_to(pool_run.later)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(image, target)
    grown = len(_images(pool))
    second = run_pipeline([*pool_run.args, "--warm_start", "--warm_start_epochs=1"])
    assert second.returncode == 0, second.stderr[-3000:]
    run2 = summary_lib.latest_run(str(pool_run.out / "metadata.sqlite"))

    # The new images were ingested: ExampleGen ran again and counted them all.
    assert "FileBasedExampleGen" not in run2.cached
    assert run2.ingestion["unlabeled"]["written"] == grown > pool_run.counts["unlabeled"]
    # Pretraining started from run 1's pretrained model, said so, and recorded it; its one
    # epoch is over the grown pool.
    started = str(pathlib.Path(run1.model_uris["pretrain"]))
    assert f"pretrain: warm start from {started}" in second.stdout
    assert run2.warm_start_from and run2.warm_start_from.startswith(started)
    # Now all 80% of each class's images are in the pool: the counts match the files exactly.
    labeled, pretrain = pool_run.counts["train"], run2.stage_results["pretrain"]
    assert pretrain["total_steps"] == (labeled + grown) // PRETRAIN_BATCH + 1
    assert pretrain["num_train_examples"] - pretrain["num_unlabeled_train_examples"] == labeled
    assert pretrain["num_unlabeled_train_examples"] == grown == pytest.approx(4 * labeled, rel=0.05)
    assert run2.stage_results["finetune"]["num_train_examples"] == labeled
    # Its first kNN (before any step) is where run 1 ended, give or take noise.
    run2_knn = _knn(second.stdout)
    assert run2_knn[0][0] == 0
    assert run2_knn[0][1] >= run1_knn[-1][1] - KNN_NOISE
    # The no-regression gate compared run 2's model with run 1's blessed one.
    assert run2.regression_baseline_uri == run1.model_uris["finetune"]
    assert run2.baseline_top1 == pytest.approx(run1.top1, abs=1e-6)


@pytest.mark.e2e
def test_unlabeled_dir_elsewhere(digits_pool):
    root, data, pool, counts = digits_pool
    labeled_only = root / "labeled_only"
    labeled_only.mkdir()
    for split in ("train", "test"):
        (labeled_only / split).symlink_to(data / split)
    out = root / "out_elsewhere"
    args = [*TINY, f"--unlabeled_dir={pool}", f"--model_dir={out}", "--train_steps=3"]
    # With the supervised baseline and a gain gate the candidate cannot meet (3 pretraining
    # steps): the comparison is made, the gate fails with its reason, and nothing is pushed.
    baseline = ["--baseline=supervised", "--baseline_train_batch_size=32"]
    gated = [*baseline, "--min_gain_over_baseline=0.6"]
    result = run_pipeline([*args, *gated, f"--data_dir={labeled_only}"])
    assert result.returncode == 0, result.stderr[-3000:]
    run = summary_lib.latest_run(str(out / "metadata.sqlite"))
    labeled, unlabeled = counts["train"], counts["unlabeled"]
    assert run.ingestion["unlabeled"]["folder"] == str(pool)
    assert run.ingestion["unlabeled"]["unlabeled"] == unlabeled
    pretrain = run.stage_results["pretrain"]
    assert (pretrain["num_train_examples"], pretrain["total_steps"]) == (labeled + unlabeled, 3)
    assert pretrain["num_unlabeled_train_examples"] == unlabeled
    assert run.stage_results["finetune"]["num_train_examples"] == labeled
    assert run.split_readers["unlabeled"] == ["pretrain_trainer"]
    check_failed_baseline_comparison(run, result.stdout, labeled)
    # The report shows both models side by side. (A changed gate reruns only evaluation, the
    # Trainers cached: the shared scenario's run C, tests/test_local_runner_e2e.py.)
    [report] = re.findall(r"^report: (.+)$", result.stdout, re.M)
    html = pathlib.Path(report).read_text()
    assert "Candidate vs. supervised baseline" in html
    assert f"{run.comparison.baseline_top1:.4f}" in html

    # Labels in the eval split only: refused in one line before any component runs.
    eval_only = root / "eval_only"
    eval_only.mkdir()
    (eval_only / "test").symlink_to(data / "test")
    refused_out = root / "out_refused"
    refused = run_pipeline([*args, f"--data_dir={eval_only}", f"--model_dir={refused_out}"])
    assert refused.returncode == 2
    [line] = [x for x in refused.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: --train_split: the only labeled images are the eval split")
    assert not (refused_out / "pipeline").exists()


def check_failed_baseline_comparison(
    run: summary_lib.RunSummary, stdout: str, labeled: int
) -> None:
    """The baseline read the labeled train split only, for as many steps as pretraining and
    fine-tuning took; the comparison's numbers agree with each other and the Evaluator's; the
    gain gate failed with its reason and nothing was pushed."""
    baseline = run.stage_results["baseline"]
    assert baseline["num_train_examples"] == labeled
    assert baseline["num_unlabeled_train_examples"] == 0
    assert baseline["matched_steps"] == {"pretrain": 3, "finetune": 2}
    assert baseline["total_steps"] == 5
    readers = ["baseline_trainer", "finetune_trainer", "pretrain_trainer"]
    assert sorted(run.split_readers["train"]) == readers
    c = run.comparison
    assert c is not None and c.examples == run.example_count
    assert c.candidate_top1 == pytest.approx(run.top1, abs=1e-6)  # the same model and examples
    assert c.top1_gain == pytest.approx(c.candidate_top1 - c.baseline_top1, abs=1e-6)
    assert c.gate_passed is False
    line = f"vs. supervised baseline on {c.examples} eval examples: candidate top-1"
    assert line in stdout
    assert "compute: candidate 5 steps" in stdout and "baseline 5 steps" in stdout
    assert "gain gate: FAILED: " in stdout
    assert "pushed model: nothing pushed" in stdout
    assert not run.pushed


def _png(seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def write_stl10_layout(root: pathlib.Path, counts: dict[str, int]) -> pathlib.Path:
    """TFDS STL-10's layout: `stl10-<split>.tfrecord-...` with `image` and `label`, the
    `unlabelled` split's records labeled -1, or (every other one) with no label at all."""
    import tensorflow as tf

    root.mkdir(parents=True)
    (root / "label.labels.txt").write_text("".join(f"c{i}\n" for i in range(10)))  # as TFDS
    seed = 0
    for split, count in counts.items():
        with tf.io.TFRecordWriter(str(root / f"stl10-{split}.tfrecord-00000-of-00001")) as w:
            for i in range(count):
                seed += 1
                label = -1 if split == "unlabelled" else i % 10
                feature = {
                    "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[_png(seed)])),
                    "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                }
                if split == "unlabelled" and i % 2:
                    del feature["label"]
                w.write(
                    tf.train.Example(
                        features=tf.train.Features(feature=feature)
                    ).SerializeToString()
                )
    return root


@pytest.mark.e2e
def test_stl10_layout_pool_through_statistics_schema_validation_and_transform(tmp_path):
    """The TFRecord route: the pipeline's own ImportExampleGen → Transform, run by TFX."""
    import tensorflow_transform as tft
    from tfx import v1 as tfx

    from models import data as data_lib
    from pipeline import configs
    from pipeline import pipeline as pipeline_lib
    from transform import preprocessing as tp

    counts = {"train": 20, "test": 10, "unlabelled": 30}
    data = write_stl10_layout(tmp_path / "stl10", counts)
    layout = pipeline_lib.inspect_data(str(data), "auto", "train", "")
    config = configs.build_config({"dataset": "folder", "data_dir": str(data), "image_size": 32})
    assert config.finetune.finetune_protocol == "fine_tune"  # a pool: semi-supervised
    built = pipeline_lib.create_pipeline(
        config,
        layout,
        pipeline_root=str(tmp_path / "root"),
        metadata_path=str(tmp_path / "metadata.sqlite"),
        push_dir=str(tmp_path / "push"),
        beam_pipeline_args=[],
    )
    upstream = ("ImportExampleGen", "StatisticsGen", "SchemaGen", "ExampleValidator", "Transform")
    kept = [c for c in built.components if c.id in upstream]
    for component in kept:  # the Trainers and the Evaluator are not run here
        for node in list(component.downstream_nodes):
            if node.id not in upstream:
                component.remove_downstream_node(node)
    tfx.orchestration.LocalDagRunner().run(
        tfx.dsl.Pipeline(
            pipeline_name="stl10",
            pipeline_root=str(tmp_path / "root"),
            components=kept,
            metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(
                str(tmp_path / "metadata.sqlite")
            ),
        )
    )
    root = tmp_path / "root"
    [anomalies] = (root / "ExampleValidator" / "anomalies").iterdir()
    assert read_anomalies(str(anomalies)) == {"test": [], "train": [], "unlabeled": []}
    [transformed] = (root / "Transform" / "transformed_examples").iterdir()
    labels, _ = data_lib.read_labels_and_keys(str(transformed / "Split-unlabeled" / "*"))
    assert labels.tolist() == [-1] * counts["unlabelled"]
    [graph] = (root / "Transform" / "transform_graph").iterdir()
    # The label vocabulary comes from the labeled train split: ten ids (named by number without
    # --labels_file), no -1.
    assert tp.read_label_names(tft.TFTransformOutput(str(graph))) == [str(i) for i in range(10)]
