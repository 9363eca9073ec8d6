"""run_stage end to end on a tiny Transform output: label fraction, frozen backbone, zero head,
and resuming a pretraining run that was killed with SIGKILL."""

from __future__ import annotations

import json
import math
import pathlib
import re
import signal
import subprocess
import time

import numpy as np
import tensorflow as tf

from models.model import SimCLRModel
from models.optimizers import build_optimizer
from models.schedule import WarmUpAndCosineDecay
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


def _is_head_bias(name: str) -> bool:
    return "head_supervised" in name and "bias" in name


def _checkpoint_state(directory: pathlib.Path) -> list[str]:
    state = tf.train.get_checkpoint_state(str(directory))
    return [] if state is None else [pathlib.Path(p).name for p in state.all_model_checkpoint_paths]


def _checkpoint_bytes(directory: pathlib.Path, name: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.glob(f"{name}.*")}


def test_pretraining_resumes_after_sigkill(cifar_dir, transformed, tmp_path):
    steps = 16
    config = fixtures.tiny_config(
        cifar_dir,
        **{
            "pretrain.train_steps": steps,
            "pretrain.checkpoint_steps": 2,
            "pretrain.lineareval_while_pretraining": False,
            "runtime.keep_checkpoint_max": 20,
            "runtime.log_every_steps": 2,
        },
    )
    kwargs = fixtures.run_stage_args(transformed, tmp_path)
    command = fixtures.stage_command(config, "pretrain", kwargs, tmp_path / "stage.json")
    ckpt_dir = pathlib.Path(kwargs["model_run_dir"]) / "checkpoints"
    env = fixtures.subprocess_env()

    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            command, env=env, cwd=fixtures.REPO_ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 600
        while len(_checkpoint_state(ckpt_dir)) < 2 and first.poll() is None:
            assert time.monotonic() < deadline, "no checkpoints within 10 minutes"
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
    first_log = (tmp_path / "first.log").read_text()
    assert first.returncode == -signal.SIGKILL, first_log
    before = _checkpoint_state(ckpt_dir)
    assert len(before) >= 2 and before[-1] != f"ckpt-{steps}", before
    saved = {name: _checkpoint_bytes(ckpt_dir, name) for name in before}
    resume_step = int(before[-1].split("-")[1])

    second = subprocess.run(
        command,
        env=env,
        cwd=fixtures.REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert (
        f"pretrain: resuming from {ckpt_dir / before[-1]} (step {resume_step})" in second.stdout
    ), second.stdout
    progress = [int(s) for s in re.findall(r"^pretrain step (\d+)/16 ", second.stdout, re.M)]
    # Without online linear evaluation no supervised metric is reported.
    assert "supervised" not in second.stdout
    assert progress == list(range(resume_step + 2, steps + 1, 2)), second.stdout
    results = json.loads((pathlib.Path(kwargs["model_run_dir"]) / "results.json").read_text())
    assert results["total_steps"] == steps
    assert (pathlib.Path(kwargs["serving_model_dir"]) / "saved_model.pb").exists()

    # Every checkpoint there was before the kill survives unchanged; all of them are listed.
    after = _checkpoint_state(ckpt_dir)
    assert after == [f"ckpt-{s}" for s in range(2, steps + 1, 2)]
    for name, files in saved.items():
        assert _checkpoint_bytes(ckpt_dir, name) == files, name

    # Each listed checkpoint restores completely: weights, step, optimizer step and slots.
    cfg = config.pretrain
    for name in after:
        number = int(name.split("-")[1])
        model = SimCLRModel(config.model, 10, config.data.image_size, pretraining=True)
        model.build_for()
        schedule = WarmUpAndCosineDecay(cfg.learning_rate, 80, cfg.train_batch_size, 0.0, steps)
        optimizer = build_optimizer(
            cfg.optimizer, schedule, cfg.momentum, cfg.weight_decay, cfg.eeta
        )
        # Without online linear evaluation the head's bias gets no gradient, hence no slot.
        optimizer.build([v for v in model.trainable_variables if not _is_head_bias(v.name)])
        global_step = tf.Variable(0, dtype=tf.int64)
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, global_step=global_step)
        checkpoint.restore(str(ckpt_dir / name)).assert_consumed()
        assert int(global_step.numpy()) == number
        assert int(optimizer.iterations.numpy()) == number
        slots = [v.numpy() for v in optimizer.momentums]
        assert len(slots) == len(model.trainable_variables) - 1
        assert all(np.abs(s).sum() > 0 for s in slots)


def test_checkpoint_directory_is_stable_for_the_same_training_only(cifar_dir, tmp_path):
    """A rerun (new TFX execution, new model_run_dir) finds the same directory; any change to the
    stage's configuration or its input artifacts gets another one."""
    from models.trainer import checkpoint_dir
    from pipeline.configs import trainer_config

    config = fixtures.tiny_config(cifar_dir)
    inputs = {"train_files": ["/a/Split-train/*"], "transform_output": "/t/1", "base_model": None}
    first = checkpoint_dir(str(tmp_path), trainer_config(config, "pretrain"), inputs)
    again = checkpoint_dir(str(tmp_path), trainer_config(config, "pretrain"), dict(inputs))
    assert first == again and pathlib.Path(first).name.startswith("pretrain-")
    hotter = fixtures.tiny_config(cifar_dir, **{"pretrain.temperature": 0.2})
    other_data = {**inputs, "transform_output": "/t/2"}
    assert checkpoint_dir(str(tmp_path), trainer_config(hotter, "pretrain"), inputs) != first
    assert checkpoint_dir(str(tmp_path), trainer_config(config, "pretrain"), other_data) != first
    # What the directory stands for is written beside the checkpoints.
    written = json.loads((pathlib.Path(first) / "training.json").read_text())
    assert written["inputs"] == inputs and written["config"]["train"]["temperature"] == 0.5
