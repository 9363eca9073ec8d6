"""SimCLRv2 step 3 (distillation) and fine-tuning from a released-format SavedModel."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from models import data as data_lib
from models import train_loop
from models.model import SimCLRModel
from models.trainer import run_stage
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
    results = run_stage(config, "finetune", **kwargs)
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
    student_top1 = run_stage(config, "distill", **kwargs)["eval/label_top_1_accuracy"]

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

    class Teacher:
        def __call__(self, images, trainable):
            return {"logits_sup": tf.constant(t_logits)}

    class Student(keras.Model):
        def __init__(self):
            super().__init__()
            self.bias = tf.Variable(tf.zeros([3]))

        def call(self, images, training=False):
            return {"logits_sup": tf.constant(s_logits) + self.bias}

    student = Student()
    metrics = train_loop.make_metrics("distill")
    step = train_loop.distill_step(
        student,
        Teacher(),
        keras.optimizers.SGD(0.0),
        metrics,
        temperature=temperature,
        label_weight=0.0,
        weight_decay=0.0,
        optimizer_name="momentum",
    )
    step(tf.zeros([2, 4, 4, 3]), tf.constant([-1, -1], tf.int64))
    assert float(metrics["distill_loss"].result()) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["supervised_loss"].result()) == 0.0  # no labeled example


def test_finetune_from_released_format_savedmodel(cifar_dir, transformed, tmp_path):
    """A pretrain export made by another process is imported through its `__call__` contract."""
    pretrain_dir = tmp_path / "pretrain"
    config = fixtures.tiny_config(cifar_dir)
    command = fixtures.stage_command(
        config, "pretrain", fixtures.run_stage_args(transformed, pretrain_dir), tmp_path / "s.json"
    )
    subprocess.run(
        command, env=fixtures.subprocess_env(), check=True, timeout=600, capture_output=True
    )
    released = str(pretrain_dir / "serving_model")

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
    run_stage(ft, "finetune", **kwargs)

    images = tf.random.uniform([4, fixtures.IMAGE_SIZE, fixtures.IMAGE_SIZE, 3], seed=1)
    source = tf.saved_model.load(released)(images, trainable=False)
    tuned = tf.saved_model.load(kwargs["serving_model_dir"])
    served = tuned.signatures["serving_images"](images=images)
    # A frozen imported backbone serves exactly the released features.
    np.testing.assert_allclose(
        served["final_avg_pool"].numpy(), source["final_avg_pool"].numpy(), atol=1e-5
    )
    assert served["logits_sup"].shape == (4, 10)


def test_checkpoint_without_the_contract_is_rejected(tmp_path):
    module = tf.Module()
    module.v = tf.Variable(1.0)
    tf.saved_model.save(module, str(tmp_path))
    from models.model import SavedModelBackbone

    with pytest.raises(ValueError, match="--checkpoint"):
        SavedModelBackbone(str(tmp_path))
