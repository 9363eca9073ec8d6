"""End to end through `local_runner.py`, as a user runs it (LocalDagRunner, default flags).

The shared scenario (tests/pipeline_runs.py) kills a run mid-pretraining and runs the same
command again, with no extra flag; here its runs are checked for resuming, caching, gating and
what a changed option does to resuming. A second scenario
trains supervised on TFDS-style TFRecords and shows that a degraded candidate is never pushed.
"""

import hashlib
import pathlib
import re

import pytest
import tensorflow as tf

from models import precision
from pipeline.runner import summary as summary_lib
from tests import pipeline_runs
from tests.pipeline_runs import PRETRAIN_STEPS, progress_steps, run_pipeline

UPSTREAM = {"FileBasedExampleGen", "StatisticsGen", "SchemaGen", "ExampleValidator", "Transform"}
COMPONENTS = UPSTREAM | {
    "pretrain_trainer",
    "finetune_trainer",
    "latest_blessed_model_resolver",
    "Evaluator",
    "Pusher",
}


@pytest.fixture(scope="module")
def resumed(pipeline_scenario):
    return summary_lib.latest_run(str(pipeline_scenario.model_dir / "metadata.sqlite"))


@pytest.fixture(scope="module")
def gate_changed(pipeline_scenario, resumed):
    """Run C: the resumed run's command with only a stricter gate."""
    result = run_pipeline(pipeline_scenario.args + ["--min_top1=1.01"])
    assert result.returncode == 0
    return result, summary_lib.latest_run(str(pipeline_scenario.model_dir / "metadata.sqlite"))


@pytest.fixture(scope="module")
def temperature_changed(pipeline_scenario, gate_changed):
    """Run D: the resumed run's command with another contrastive temperature."""
    result = run_pipeline(pipeline_scenario.args + ["--temperature=0.2"])
    assert result.returncode == 0
    return result, summary_lib.latest_run(str(pipeline_scenario.model_dir / "metadata.sqlite"))


@pytest.fixture(scope="module")
def reporting_changed(pipeline_scenario, temperature_changed):
    """Run E: run D's command with options that change no trained model."""
    args = pipeline_scenario.args + ["--temperature=0.2", "--log_every_steps=3"]
    result = run_pipeline(args + ["--eval_batch_size=32", "--keep_checkpoint_max=3"])
    assert result.returncode == 0
    return result, summary_lib.latest_run(str(pipeline_scenario.model_dir / "metadata.sqlite"))


@pytest.mark.e2e
def test_killed_pretraining_resumes_from_its_last_checkpoint(pipeline_scenario, resumed):
    killed_at = pipeline_scenario.killed_at
    # The kill landed mid-pretraining, after at least two checkpoints.
    assert len(killed_at) >= 2 and killed_at[-1] < PRETRAIN_STEPS, killed_at
    assert f"pretrain step {PRETRAIN_STEPS}/" not in pipeline_scenario.killed_output
    last = killed_at[-1]
    stdout = pipeline_scenario.resumed.stdout
    # The README's command as it is: no caching flag, and the runner says caching is on.
    assert not any("cache" in arg for arg in pipeline_scenario.args)
    assert "cache: on (" in stdout
    [stage_dir] = pipeline_runs.stage_dirs(pipeline_scenario.model_dir, "pretrain")
    assert f"pretrain: resuming from {stage_dir / f'ckpt-{last}'} (step {last})" in stdout
    steps = progress_steps(stdout, "pretrain")
    assert steps and steps[0] > last and steps[-1] == PRETRAIN_STEPS, steps
    # Completed components were not recomputed; pretraining ran (and only pretraining resumed).
    assert UPSTREAM <= set(resumed.cached), resumed.cached
    assert "pretrain_trainer" not in resumed.cached
    assert "taken from the cache: " in stdout
    # The resumed run ends at the step count of an uninterrupted run, with every checkpoint.
    assert resumed.stage_results["pretrain"]["total_steps"] == PRETRAIN_STEPS
    checkpoints = pipeline_runs.checkpoints(stage_dir)
    assert checkpoints[-1] == PRETRAIN_STEPS and last in checkpoints
    # The checkpoint it resumed from is untouched, and every listed one is complete: model,
    # optimizer (its step and momentum slots) and the global step agree.
    assert pipeline_scenario.killed_files and all(
        hashlib.sha256((stage_dir / name).read_bytes()).hexdigest() == digest
        for name, digest in pipeline_scenario.killed_files.items()
    )
    for step in checkpoints:
        reader = tf.train.load_checkpoint(str(stage_dir / f"ckpt-{step}"))
        keys = reader.get_variable_to_shape_map()
        assert reader.get_tensor("global_step/.ATTRIBUTES/VARIABLE_VALUE") == step
        assert reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == step
        assert any(k.startswith("model/resnet/") for k in keys)
        slots = [k for k in keys if k.startswith("optimizer/_variables/")]
        # One momentum slot per trained variable, and training has moved them off zero.
        assert len(slots) > 10 and any(abs(reader.get_tensor(k)).sum() > 0 for k in slots)
    # And it went on through evaluation to a pushed model.
    assert COMPONENTS <= set(resumed.components)
    assert resumed.blessed is True and resumed.pushed
    assert (pathlib.Path(resumed.pushed_destination) / "saved_model.pb").exists()
    assert resumed.example_count == 10 * pipeline_runs.TEST_PER_CLASS
    assert f"(protocol: {resumed.protocol})" in stdout and resumed.protocol == "linear_eval"
    # --mixed_precision=auto, decided for this machine, printed at the start and recorded per
    # Trainer (bfloat16 on a CPU with AMX, float32 on others).
    choice = precision.resolve("auto", "auto")
    assert choice.line() in stdout
    assert resumed.precision == {"pretrain_trainer": choice.dtype, "finetune_trainer": choice.dtype}
    # The closing time summary: training steps (both Trainers' train phases) and the rest.
    assert set(resumed.trainer_phases) == {"pretrain_trainer", "finetune_trainer"}
    timing = re.search(
        r"^time: (\d+) s in all; training steps (\d+) s; everything else \(non-training "
        r"overhead\) (\d+) s$",
        stdout,
        re.M,
    )
    assert timing, stdout[-3000:]
    wall, training, rest = (int(g) for g in timing.groups())
    assert abs(training - resumed.training_seconds()) <= 0.5 and abs(wall - training - rest) <= 1
    assert f"  pretrain_trainer: {resumed.seconds['pretrain_trainer']:.0f} s" in stdout


@pytest.mark.e2e
def test_changing_only_the_gate_reruns_only_evaluation(pipeline_scenario, resumed, gate_changed):
    result, run = gate_changed
    assert run.run_id != resumed.run_id
    assert (UPSTREAM | {"pretrain_trainer", "finetune_trainer"}) <= set(run.cached), run.cached
    assert "Evaluator" not in run.cached and "Pusher" not in run.cached
    assert "Evaluator" in run.components and "Pusher" in run.components
    assert "pretrain step" not in result.stdout and "resuming" not in result.stdout
    assert run.trainer_phases == {} and "; training steps 0 s;" in result.stdout
    # The stricter floor fails; the regression gate compares against the resumed run's model.
    assert run.baseline_top1 == pytest.approx(resumed.top1)
    assert run.blessed is False and not run.pushed
    assert any("sparse_categorical_accuracy" in f and ">= 1.0100" in f for f in run.failures)
    assert "NOT_BLESSED" in result.stdout
    pushed = sorted(p.name for p in (pipeline_scenario.model_dir / "serving_model").iterdir())
    assert pushed == [pathlib.Path(resumed.pushed_destination).name]


@pytest.mark.e2e
def test_changing_the_temperature_retrains_from_scratch(
    pipeline_scenario, resumed, temperature_changed
):
    result, run = temperature_changed
    assert UPSTREAM <= set(run.cached)
    assert "pretrain_trainer" not in run.cached and "finetune_trainer" not in run.cached
    # A new checkpoint directory: the old one (another configuration) is never restored.
    assert "pretrain: resuming" not in result.stdout
    steps = progress_steps(result.stdout, "pretrain")
    assert steps[0] == 5 and steps[-1] == PRETRAIN_STEPS, steps
    # An uninterrupted run ends at the same step count as the resumed one.
    assert (
        run.stage_results["pretrain"]["total_steps"]
        == resumed.stage_results["pretrain"]["total_steps"]
    )
    # Once it finished, the directory of the earlier training (B's) was removed; the exported
    # models of both runs remain as artifacts.
    [kept] = pipeline_runs.stage_dirs(pipeline_scenario.model_dir, "pretrain")
    assert kept != pipeline_scenario.pretrain_dir and not pipeline_scenario.pretrain_dir.exists()
    earlier = pipeline_scenario.pretrain_dir.name
    assert f"pretrain: removed checkpoints of earlier training ({earlier})" in result.stdout
    assert pipeline_runs.checkpoints(kept)[-1] == PRETRAIN_STEPS
    for summary in (resumed, run):
        model_run = pathlib.Path(summary.model_run_uris["pretrain"])
        model = model_run.parent.parent / "model" / model_run.name
        assert any(model.rglob("saved_model.pb")), model


@pytest.mark.e2e
def test_changing_only_reporting_options_resumes_at_the_final_step(
    pipeline_scenario, temperature_changed, reporting_changed
):
    """Log cadence, eval batch size and checkpoint retention are in the Trainer's execution
    properties (it reads them) but not in its checkpoint key: it runs again, finds its final
    checkpoint and trains no step."""
    result, run = reporting_changed
    _, trained = temperature_changed
    assert UPSTREAM <= set(run.cached) and "pretrain_trainer" not in run.cached
    [kept] = pipeline_runs.stage_dirs(pipeline_scenario.model_dir, "pretrain")
    final = kept / f"ckpt-{PRETRAIN_STEPS}"
    assert f"pretrain: resuming from {final} (step {PRETRAIN_STEPS})" in result.stdout
    assert progress_steps(result.stdout, "pretrain") == []
    assert run.stage_results["pretrain"]["total_steps"] == PRETRAIN_STEPS
    # The same trained weights: the exported pretraining model equals run D's.
    assert run.stage_results["pretrain"]["eval/label_top_1_accuracy"] == pytest.approx(
        trained.stage_results["pretrain"]["eval/label_top_1_accuracy"]
    )


def write_tfds_style(root: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """Class folders → `<name>-<split>.tfrecord-00000-of-00001` with TFDS's image/label features."""
    import tensorflow as tf

    out.mkdir(parents=True)
    classes = sorted(p.name for p in (root / "train").iterdir())
    (out / "label.labels.txt").write_text("".join(f"{name}\n" for name in classes))
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
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
    from pipeline.runner.digits import write_digits_dataset

    data = write_tfds_style(write_digits_dataset(tmp_path / "digits"), tmp_path / "tfrecords")
    out = tmp_path / "out"
    common = [
        "--dataset=digits",
        f"--data_dir={data}",
        f"--model_dir={out}",
        "--train_mode=finetune",
        "--width_multiplier=0.125",
        "--optimizer=momentum",
        "--warmup_epochs=0",
        "--train_batch_size=32",
        "--log_every_steps=20",
    ]
    first = run_pipeline(common + ["--train_steps=60", "--learning_rate=2.0"])
    assert first.returncode == 0
    metadata = str(out / "metadata.sqlite")
    run1 = summary_lib.latest_run(metadata)
    assert "ImportExampleGen" in run1.components and "pretrain_trainer" not in run1.components
    assert run1.example_count == 360
    # No --min_top1: the default floor for 10 classes (from the TFDS label list) is 0.2.
    assert "gate top-1 >= 0.2000 (default: clearly above chance)" in first.stdout
    assert run1.top1 >= 0.2 and run1.blessed and run1.pushed
    pushed = sorted((out / "serving_model").iterdir())
    stamps = {p.name: p.stat().st_mtime_ns for p in pushed[-1].rglob("*")}

    # The second run changes only the Trainer: ingestion and Transform come from the cache
    # (on by default).
    degraded = run_pipeline(
        common + ["--train_steps=1", "--learning_rate=0", "--zero_init_logits_layer=True"]
    )
    assert degraded.returncode == 0
    run2 = summary_lib.latest_run(metadata)
    assert "Transform" in run2.cached and "finetune_trainer" not in run2.cached
    assert run2.top1 == pytest.approx(0.1, abs=0.01)  # uniform scores: always class 0
    assert run2.baseline_top1 == pytest.approx(run1.top1)
    assert run2.blessed is False and not run2.pushed
    assert "NOT_BLESSED" in degraded.stdout
    # A chance-level candidate fails the default floor as well as the regression gate.
    assert "change vs. baseline" in degraded.stdout and ">= 0.2000" in degraded.stdout
    assert sorted((out / "serving_model").iterdir()) == pushed
    assert {p.name: p.stat().st_mtime_ns for p in pushed[-1].rglob("*")} == stamps


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="a GPU is visible")
def test_a_gpu_run_on_a_machine_without_one_stops_before_any_component(tmp_path):
    out = tmp_path / "out"
    result = run_pipeline(["--accelerator=gpu", f"--model_dir={out}"], timeout=300)
    assert result.returncode == 2
    [line] = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: --accelerator=gpu: expected a GPU, TensorFlow ")
    assert "sees none" in line and not out.exists()
