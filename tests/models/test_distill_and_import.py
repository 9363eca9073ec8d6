"""SimCLRv2 step 3 (distillation) and fine-tuning from a released-format SavedModel."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from models import data as data_lib
from models import train_loop
from models.loss import distillation_loss, partially_labeled_loss
from models.model import SimCLRModel
from tests.models import fixtures


def _eval_on(data: fixtures.TransformedData, files: list[str], model) -> float:
    spec = data_lib.ImageSpec(fixtures.IMAGE_SIZE, "raw", fixtures.IMAGE_SIZE)
    return train_loop.evaluate(model, data_lib.eval_dataset(files, spec, 64))[
        "eval/label_top_1_accuracy"
    ]


@pytest.fixture(scope="module")
def teacher(cifar_dir, transformed, tmp_path_factory):
    """A supervised teacher that has fit the tiny train split (so it has something to teach)."""
    config = fixtures.tiny_config(
        cifar_dir,
        **{
            "finetune.train_steps": 120,
            "finetune.checkpoint_steps": 120,
            "finetune.learning_rate": 4.0,
            "finetune.optimizer": "momentum",
            "finetune.warmup_epochs": 0.0,
            "finetune.weight_decay": 0.0,
            "runtime.log_every_steps": 60,
        },
    )
    config.train_mode = "finetune"
    run_dir = tmp_path_factory.mktemp("teacher")
    kwargs = fixtures.run_stage_args(transformed, run_dir)
    kwargs["eval_files"] = transformed.train_files
    results = fixtures.run_stage(config, "finetune", **kwargs)
    return config, kwargs["serving_model_dir"], results["eval/label_top_1_accuracy"]


def test_distilled_student_beats_random_init_student(teacher, transformed, tmp_path):
    config, teacher_dir, teacher_top1 = teacher
    assert teacher_top1 > 0.3, "the teacher must have learned the split it teaches"
    config.distill.distill = True
    config.distill.train_batch_size = 16
    config.distill.train_steps = 120
    config.distill.checkpoint_steps = 120
    config.distill.learning_rate = 4.0
    config.distill.distill_temperature = 1.0
    config.distill.distill_width_multiplier = 0.125
    kwargs = fixtures.run_stage_args(transformed, tmp_path, base_model=teacher_dir)
    kwargs["eval_files"] = transformed.train_files  # the images the teacher labels
    student_top1 = fixtures.run_stage(config, "distill", **kwargs)["eval/label_top_1_accuracy"]

    keras.utils.set_random_seed(0)
    random_student = SimCLRModel(config.model, 10, fixtures.IMAGE_SIZE, pretraining=False)
    random_student.build_for()
    random_top1 = _eval_on(transformed, transformed.train_files, random_student)
    assert student_top1 > random_top1 + 0.1, (student_top1, random_top1)

    # The student is exported like any candidate: serving signature over raw examples.
    loaded = tf.saved_model.load(kwargs["serving_model_dir"])
    assert set(loaded.signatures) == {"serving_default", "serving_images"}


def test_distillation_loss_matches_formula():
    t_logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]], np.float32)
    s_logits = np.array([[1.0, 1.0, 0.0], [0.0, -1.0, 2.0]], np.float32)
    temperature = 2.0

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    expected = temperature**2 * np.mean(
        -np.sum(softmax(t_logits / temperature) * np.log(softmax(s_logits / temperature)), -1)
    )

    got = distillation_loss(tf.constant(t_logits), tf.constant(s_logits), temperature)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_partially_labeled_loss_ignores_unlabeled_examples():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0], [1.0, 1.0, 5.0]], np.float32)
    labels = np.array([0, -1, 1], np.int64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -(log_probs[0, 0] + log_probs[2, 1]) / 2  # the labeled rows 0 and 2 only
    loss, acc = partially_labeled_loss(tf.constant(labels), tf.constant(logits))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(acc) == pytest.approx(0.5)  # row 0 right, row 2 wrong
    empty_loss, empty_acc = partially_labeled_loss(tf.constant([-1, -1], tf.int64), logits[:2])
    assert float(empty_loss) == 0.0 and float(empty_acc) == 0.0


@pytest.fixture(scope="module")
def released_export(cifar_dir, transformed, tmp_path_factory) -> str:
    """A pretrain export made by another process (so nothing is shared in memory)."""
    root = tmp_path_factory.mktemp("released")
    config = fixtures.tiny_config(cifar_dir)
    command = fixtures.stage_command(
        config, "pretrain", fixtures.run_stage_args(transformed, root), root / "s.json"
    )
    made = subprocess.run(
        command, env=fixtures.subprocess_env(), timeout=600, capture_output=True, text=True
    )
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    return str(root / "serving_model")


def test_finetune_from_released_format_savedmodel(
    cifar_dir, transformed, released_export, tmp_path
):
    """A released-format export is imported through its `__call__` contract."""
    released = released_export

    ft = fixtures.tiny_config(
        cifar_dir,
        **{
            "finetune.checkpoint": released,
            "finetune.fine_tune_after_block": 4,
            "finetune.train_steps": 3,
        },
    )
    ft.train_mode = "finetune"
    kwargs = fixtures.run_stage_args(transformed, tmp_path / "ft", base_model=released)
    fixtures.run_stage(ft, "finetune", **kwargs)

    images = tf.random.uniform([4, fixtures.IMAGE_SIZE, fixtures.IMAGE_SIZE, 3], seed=1)
    source = tf.saved_model.load(released)(images, trainable=False)
    tuned = tf.saved_model.load(kwargs["serving_model_dir"])
    served = tuned.signatures["serving_images"](images=images)
    # A frozen imported backbone serves exactly the released features.
    np.testing.assert_allclose(
        served["final_avg_pool"].numpy(), source["final_avg_pool"].numpy(), atol=1e-5
    )
    assert served["logits_sup"].shape == (4, 10)


def _head_variables(path: str) -> dict[str, np.ndarray]:
    loaded = tf.saved_model.load(path)
    found = tf.train.TrackableView(loaded).descendants()
    variables = [v for v in found if isinstance(v, tf.Variable)]
    return {v.name: v.numpy() for v in variables if "projection_head/layer_0/" in v.name}


def test_imported_checkpoint_fine_tunes_from_its_pretrained_projection_layer(
    cifar_dir, transformed, released_export, tmp_path
):
    """ft_proj_selector=1 with --checkpoint starts layer nl_0 from the checkpoint's values."""
    ft = fixtures.tiny_config(
        cifar_dir,
        **{
            "finetune.checkpoint": released_export,
            "finetune.fine_tune_after_block": -1,
            "finetune.train_steps": 1,
            "finetune.learning_rate": 0.0,
            "model.ft_proj_selector": 1,
        },
    )
    ft.train_mode = "finetune"
    kwargs = fixtures.run_stage_args(transformed, tmp_path / "ft", base_model=released_export)
    fixtures.run_stage(ft, "finetune", **kwargs)
    pretrained = _head_variables(released_export)
    tuned = _head_variables(kwargs["serving_model_dir"])
    kernels = [name for name in pretrained if name.endswith("kernel:0")]
    assert kernels and set(pretrained) <= set(tuned)
    # Learning rate 0: the weights are exactly the imported ones (batch-norm moving statistics
    # took one training step's update, so they are not compared).
    weights = [name for name in pretrained if "moving_" not in name]
    assert len(weights) >= 3  # kernel, gamma, beta
    for name in weights:
        np.testing.assert_array_equal(tuned[name], pretrained[name], err_msg=name)


def test_imported_checkpoint_rejects_a_partially_frozen_backbone(
    cifar_dir, transformed, released_export, tmp_path
):
    ft = fixtures.tiny_config(
        cifar_dir,
        **{"finetune.checkpoint": released_export, "finetune.fine_tune_after_block": 2},
    )
    ft.train_mode = "finetune"
    kwargs = fixtures.run_stage_args(transformed, tmp_path, base_model=released_export)
    with pytest.raises(ValueError, match="^--fine_tune_after_block: .* 2 is not supported$"):
        fixtures.run_stage(ft, "finetune", **kwargs)


def test_checkpoint_without_the_contract_is_rejected(tmp_path):
    module = tf.Module()
    module.v = tf.Variable(1.0)
    tf.saved_model.save(module, str(tmp_path))
    from models.model import SavedModelBackbone

    with pytest.raises(ValueError, match="--checkpoint"):
        SavedModelBackbone(str(tmp_path))
