"""The Trainer on a tiny Transform output: label fraction, frozen backbone, zero head, and the
checkpoint directory that lets a rerun resume (the kill-and-rerun itself is proven end to end
through local_runner.py in tests/test_local_runner_e2e.py)."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
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
