"""The Trainer on a tiny Transform output: label fraction, frozen backbone, zero head, and the
checkpoint directory that lets a rerun resume (the kill-and-rerun itself is proven end to end
through local_runner.py in tests/test_local_runner_e2e.py)."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from models.model import SimCLRModel
from tests.models import fixtures


def _frozen_model(run, config) -> SimCLRModel:
    """`run`'s export loaded into the finetune network of `config` (same variable order always)."""
    model = SimCLRModel(
        config.model,
        10,
        config.data.image_size,
        pretraining=False,
        fine_tune_after_block=config.finetune.fine_tune_after_block,
    )
    model.build_for()
    variables = str(pathlib.Path(run.serving_model_dir) / "variables" / "variables")
    status = tf.train.Checkpoint(model=model).read(variables)
    status.expect_partial().assert_existing_objects_matched()
    return model


def test_label_fraction_trains_on_the_stratified_subset(finetune_run):
    assert "finetune: 10 of 80 labeled examples (label_fraction=0.1)" in finetune_run.stdout
    # A batch larger than the labeled subset shrinks to it, with a warning.
    assert (
        "warning: finetune: batch 16 is larger than the 10 training examples; using batch 10"
        in finetune_run.stdout
    )
    assert "finetune: 10 examples, 10 classes, batch 10, 3 steps" in finetune_run.stdout
    results = json.loads((pathlib.Path(finetune_run.model_run_dir) / "results.json").read_text())
    assert results["num_train_examples"] == 10 and results["total_steps"] == 3
    assert results["eval/num_examples"] == 10 * fixtures.EVAL_PER_CLASS


def test_frozen_backbone_keeps_pretrained_weights_and_bn_statistics(pretrain_run, finetune_run):
    assert f"backbone restored from {pretrain_run.serving_model_dir}" in finetune_run.stdout
    pretrained = _frozen_model(pretrain_run, finetune_run.config)
    finetuned = _frozen_model(finetune_run, finetune_run.config)
    names = [w.name for w in pretrained.resnet.weights]
    moving = [i for i, n in enumerate(names) if "moving_" in n]
    assert moving and len(names) == len(finetuned.resnet.weights)
    before, after = pretrained.resnet.get_weights(), finetuned.resnet.get_weights()
    for name, b, a in zip(names, before, after, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)
    # The statistics compared are pretraining's, not untouched initial values.
    assert any(np.abs(before[i]).sum() > 0 for i in moving if "moving_mean" in names[i])
    # Meanwhile the classifier did train.
    kernel, bias = finetuned.supervised_head.get_weights()
    assert np.abs(kernel).sum() > 0 and np.abs(bias).sum() > 0


def test_zero_initialized_head_starts_at_uniform_predictions(finetune_run):
    scalars = fixtures.read_scalars(pathlib.Path(finetune_run.model_run_dir) / "train")
    # Step 1 is measured before any update: all-zero logits give cross entropy ln(10) exactly,
    # where a randomly initialized head (weights ~0.01) would be off by about 1e-3.
    assert abs(scalars["train/supervised_loss"][1] - math.log(10)) < 1e-5


def test_checkpoint_directory_is_stable_for_the_same_training_only(cifar_dir, tmp_path):
    """A rerun (new TFX execution, new model_run_dir) finds the same directory, also with other
    reporting options; a change to the stage's training, its input artifacts or its code gets
    another one."""
    from models.trainer import checkpoint_dir
    from pipeline.configs import trainer_config

    config = fixtures.tiny_config(cifar_dir)
    inputs = {"train_files": ["/a/Split-train/*"], "transform_output": "/t/1", "base_model": None}

    def directory(cfg, ins=inputs, code="c1"):
        return checkpoint_dir(str(tmp_path), trainer_config(cfg, "pretrain"), ins, code)

    first = directory(config)
    assert directory(config, dict(inputs)) == first
    assert pathlib.Path(first).name.startswith("pretrain-")
    reporting = {
        "runtime.log_every_steps": 1,
        "runtime.eval_batch_size": 7,
        "runtime.keep_checkpoint_max": 2,
        "pretrain.knn_every_epochs": 3,
        "pretrain.checkpoint_steps": 3,
        "pretrain.checkpoint_epochs": 4,
        "runtime.accelerator": "cpu",  # a check at start, not a way of training
    }
    for path, value in reporting.items():
        assert directory(fixtures.tiny_config(cifar_dir, **{path: value})) == first, path
    hotter = fixtures.tiny_config(cifar_dir, **{"pretrain.temperature": 0.2})
    reseeded = fixtures.tiny_config(cifar_dir, **{"runtime.seed": 1})
    # Another precision (the same command on a machine with another answer to 'auto').
    bf16 = fixtures.tiny_config(cifar_dir, **{"runtime.mixed_precision": "bfloat16"})
    other_data = {**inputs, "transform_output": "/t/2"}
    others = [directory(hotter), directory(reseeded), directory(config, other_data)]
    others += [directory(config, code="c2"), directory(bf16)]
    assert len({first, *others}) == 6
    # What the directory stands for is written beside the checkpoints.
    written = json.loads((pathlib.Path(first) / "training.json").read_text())
    assert written["inputs"] == inputs and written["config"]["train"]["temperature"] == 0.5
    assert written["code"] == "c1" and "log_every_steps" not in written["config"]["runtime"]


def test_a_directory_recorded_for_other_training_is_refused(cifar_dir, tmp_path):
    from models.trainer import checkpoint_dir
    from pipeline.configs import trainer_config

    config = trainer_config(fixtures.tiny_config(cifar_dir), "pretrain")
    inputs = {"train_files": ["/a/*"], "transform_output": "/t/1", "base_model": None}
    path = pathlib.Path(checkpoint_dir(str(tmp_path), config, inputs, "c1"))
    record = json.loads((path / "training.json").read_text())
    record["code"] = "edited"
    (path / "training.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"^pretrain: checkpoints in .* belong to other training"):
        checkpoint_dir(str(tmp_path), config, inputs, "c1")


def test_a_finished_stage_removes_the_checkpoints_of_its_earlier_trainings(tmp_path):
    from models.trainer import remove_other_checkpoints

    for name in ("pretrain-aaa", "pretrain-bbb", "pretrain-ccc", "finetune-aaa"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "ckpt-1.index").write_text("x")
    keep = str(tmp_path / "pretrain-bbb")
    removed = remove_other_checkpoints(str(tmp_path), "pretrain", keep)
    assert [pathlib.Path(p).name for p in removed] == ["pretrain-aaa", "pretrain-ccc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finetune-aaa", "pretrain-bbb"]
    assert (tmp_path / "pretrain-bbb" / "ckpt-1.index").exists()


def test_retention_keeps_a_directory_a_cloud_job_may_still_write(tmp_path):
    import json

    from models.trainer import LEASE_FILE, remove_other_checkpoints

    for name, lease in (
        ("pretrain-live", {"job": "projects/p/locations/l/customJobs/1"}),
        ("pretrain-ended", {"job": "projects/p/locations/l/customJobs/2", "released": "t"}),
        ("pretrain-mine", None),
    ):
        (tmp_path / name).mkdir()
        if lease:
            (tmp_path / name / LEASE_FILE).write_text(json.dumps(lease))
    removed = remove_other_checkpoints(str(tmp_path), "pretrain", str(tmp_path / "pretrain-mine"))
    assert [pathlib.Path(p).name for p in removed] == ["pretrain-ended"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pretrain-live", "pretrain-mine"]


def test_warm_start_begins_from_the_pretrained_encoder_on_a_fresh_schedule(
    cifar_dir, transformed, pretrain_run, capsys
):
    """--warm_start: backbone and projection head (weights and batch-norm statistics) come from
    the earlier pretrained model; the online probe starts afresh; the schedule is
    --warm_start_epochs over the data read now."""
    from models.model import saved_model_dir
    from models.schedule import total_train_steps
    from models.tasks import TASKS, StageInputs
    from pipeline.configs import trainer_config

    config = fixtures.tiny_config(
        cifar_dir,
        **{
            "pretrain.warm_start": True,
            "pretrain.warm_start_epochs": 3,
            "pretrain.knn_every_epochs": 1,
        },
    )
    base = saved_model_dir(pretrain_run.serving_model_dir)

    def task(base_model):
        inputs = StageInputs(
            transformed.train_files,
            transformed.eval_files,
            transformed.transform_output,
            10,
            base_model,
        )
        return TASKS["pretrain"](trainer_config(config, "pretrain"), inputs)

    warm, cold = task(base), task(None)
    assert warm.train_epochs == 3
    assert warm.total_steps == total_train_steps(warm.num_examples, warm.batch_size, 3, 0)
    assert cold.total_steps == 4  # without an earlier model: the configured length, from scratch
    model = warm.build_model()
    model.build_for()
    warm.initialize(model)
    assert f"pretrain: warm start from {base}; a fresh schedule of" in capsys.readouterr().out
    reference = SimCLRModel(config.model, 10, fixtures.IMAGE_SIZE, pretraining=True)
    reference.build_for()
    variables = str(pathlib.Path(base) / "variables" / "variables")
    tf.train.Checkpoint(model=reference).read(variables).expect_partial()
    for part in ("resnet", "projection_head"):
        got, want = getattr(model, part).weights, getattr(reference, part).weights
        assert any("moving_mean" in w.name for w in got)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g.numpy(), w.numpy(), err_msg=g.name)
    # The probe is not carried over (its classes may differ now).
    assert not np.array_equal(
        model.supervised_head.weights[0].numpy(), reference.supervised_head.weights[0].numpy()
    )
    cold.initialize(model)
    assert "pretrain: --warm_start found no earlier pretrained model" in capsys.readouterr().out
    # kNN before the first step is where training starts, not a random-init floor.
    monitor = warm.monitor(model, 2)
    assert monitor.starts_trained and not cold.monitor(model, 2).starts_trained
