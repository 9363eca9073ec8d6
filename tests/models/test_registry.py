"""models/tasks/registry.py: every stage declared once, and everything else iterating over it.

The last test registers a toy stage from here (its config, its Task, its registry entry, no
other edit) and runs it end to end through `local_runner.py`'s code path.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from dataclasses import dataclass
from types import MappingProxyType

import pytest

from models.config import ConfigError, StageConfig, opt
from models.tasks import registry
from pipeline import configs

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_builtin_stages_in_pipeline_order_with_their_roles():
    assert registry.names() == ("pretrain", "finetune", "distill", "baseline")
    roles = {s.name: s.role for s in registry.stages()}
    assert roles == {
        "pretrain": registry.ENCODER,
        "finetune": registry.CANDIDATE,
        "distill": registry.CANDIDATE,
        "baseline": registry.BASELINE,
    }
    # Task classes load lazily, by name, and exist.
    for stage in registry.stages():
        assert stage.task_class().__name__.endswith("Task")


def test_which_stages_a_run_has_and_which_model_is_judged():
    def names(flags):
        config = configs.build_config(flags)
        return [s.name for s in registry.active(config)], registry.candidate(config).name

    assert names({}) == (["pretrain", "finetune"], "finetune")
    assert names({"distill": True}) == (["pretrain", "finetune", "distill"], "distill")
    assert names({"train_mode": "finetune"}) == (["finetune"], "finetune")
    config = configs.build_config({"baseline": "supervised"})
    assert registry.baseline(config).name == "baseline"
    assert registry.candidate(config).name == "finetune"


def test_registering_twice_or_on_an_unknown_base_is_refused():
    with pytest.raises(ConfigError, match="registered twice"):
        registry.register(registry.get("finetune"))
    bad = dataclasses.replace(registry.get("finetune"), name="orphan", base="nowhere")
    with pytest.raises(ConfigError, match="base stage 'nowhere'"):
        registry.register(bad)
    assert "orphan" not in registry.names()


def test_flags_follow_each_stages_prefix():
    flags = {flag: path for flag, path, *_ in configs.flag_fields()}
    assert flags["learning_rate"] == "<stage>.learning_rate"  # the reference's bare names
    assert flags["finetune_learning_rate"] == "finetune.learning_rate"
    assert flags["distill_learning_rate"] == "distill.learning_rate"
    assert flags["baseline_learning_rate"] == "baseline.learning_rate"
    # A stage's own options keep their names.
    assert flags["distill_temperature"] == "distill.distill_temperature"
    assert flags["baseline_budget"] == "baseline.baseline_budget"
    with pytest.raises(ConfigError, match="use --learning_rate with --train_mode=finetune"):
        configs.build_config({"train_mode": "finetune", "finetune_learning_rate": 0.1})


def test_stage_defaults_and_student_rule_come_from_the_registry():
    config = configs.build_config(
        {"distill": True, "distill_resnet_depth": 34, "distill_width_multiplier": 0.5}
    )
    assert config.distill.optimizer == "momentum" and config.distill.learning_rate == 0.1
    student = configs.trainer_config(config, "distill").model
    assert (student.resnet_depth, student.width_multiplier, student.ft_proj_selector) == (
        34,
        0.5,
        0,
    )
    teacher = configs.trainer_config(config, "finetune").model
    assert (teacher.resnet_depth, teacher.width_multiplier) == (
        config.model.resnet_depth,
        config.model.width_multiplier,
    )
    # Only the contrastive stage gets SimCLR's augmentations; others get crop and flip.
    config.augment.color_jitter_strength = 0.3
    assert configs.trainer_config(config, "pretrain").augment.color_jitter_strength == 0.3
    assert configs.trainer_config(config, "finetune").augment.color_jitter_strength == 1.0


def test_validation_names_the_stages_own_flag():
    with pytest.raises(ConfigError, match="^--finetune_train_batch_size: must be positive"):
        configs.build_config({"finetune_train_batch_size": 0})
    with pytest.raises(ConfigError, match="^--train_batch_size: must be positive"):
        configs.build_config({"train_mode": "finetune", "train_batch_size": 0})
    # A stage the run does not have is not checked.
    configs.build_config({"distill_train_batch_size": 0})
    with pytest.raises(ConfigError, match="^--distill_train_batch_size"):
        configs.build_config({"distill": True, "distill_train_batch_size": 0})


def test_the_config_round_trips_with_stage_sections_at_the_top():
    config = configs.build_config({"baseline": "supervised", "temperature": 0.2})
    d = json.loads(config.to_json())
    assert d["pretrain"]["temperature"] == 0.2 and "stages" not in d
    assert configs.SimCLRConfig.from_json(config.to_json()) == config


# ----- a toy stage, registered here and nowhere else -----


@dataclass
class ToyConfig(StageConfig):
    toy_smoothing: float = opt(0.1, "Label smoothing of the toy stage's cross-entropy.")


def _toy_task():
    import tensorflow as tf

    from models import export
    from models.model import SimCLRModel
    from models.tasks.base import Task

    class ToyTask(Task):
        """A supervised head trained from the fine-tuned model with a label-smoothed loss."""

        loss_weights = MappingProxyType({"smoothed_loss": 1.0})
        metric_names = ("total_loss", "smoothed_loss", "weight_decay")
        progress_metrics = ("total_loss", "smoothed_loss")

        def build_model(self) -> SimCLRModel:
            c = self.config
            return SimCLRModel(
                c.model, self.inputs.num_classes, c.input.image_size, pretraining=False
            )

        def initialize(self, model: SimCLRModel) -> None:
            export.restore_backbone(model, self.inputs.base_model)

        def build_inputs(self, ctx, skip):
            return self.dataset(ctx, skip, contrastive=False, keep_keys=self.labeled_keys)

        def losses(self, model, batch, training):
            images, labels = batch
            logits = tf.cast(model(images, training=training)["logits_sup"], tf.float32)
            onehot = tf.one_hot(labels, tf.shape(logits)[-1])
            loss = tf.keras.losses.categorical_crossentropy(
                onehot, logits, from_logits=True, label_smoothing=self.config.train.toy_smoothing
            )
            return {"smoothed_loss": tf.reduce_mean(loss)}

    return ToyTask


@pytest.fixture
def toy_stage():
    stage = registry.register(
        registry.Stage(
            name="toy",
            config_class=ToyConfig,
            task=_toy_task(),
            runs=lambda c: True,
            flag_prefix="toy_",
            base="finetune",
            protocol_name="toy protocol",
        )
    )
    yield stage
    registry.unregister("toy")


def test_a_registered_stage_gets_flags_validation_and_its_trainer_config(toy_stage):
    config = configs.build_config({"toy_train_steps": 3, "toy_smoothing": 0.25})
    assert [s.name for s in registry.active(config)][-1] == "toy"
    assert registry.candidate(config).name == "toy"
    trainer = configs.trainer_config(config, "toy")
    assert (trainer.train.train_steps, trainer.train.toy_smoothing) == (3, 0.25)
    assert type(trainer.from_json(trainer.to_json()).train) is ToyConfig
    with pytest.raises(ConfigError, match="^--toy_learning_rate: must be >= 0"):
        configs.build_config({"toy_learning_rate": -1.0})


@pytest.mark.e2e
def test_a_toy_stage_runs_end_to_end_through_local_runner(toy_stage, tmp_path, monkeypatch):
    """Supervised training on the embedded digits, then the toy stage from its model: the toy
    Trainer runs, is the model the Evaluator judges and the Pusher pushes, and reports its
    protocol; nothing outside this file and the registry knows it."""
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    monkeypatch.chdir(REPO_ROOT)
    sys.modules.pop("local_runner", None)
    import local_runner
    from pipeline.runner import summary as summary_lib

    out = tmp_path / "out"
    code = local_runner.main(
        [
            "--dataset=digits",
            "--train_mode=finetune",
            "--max_images_per_class=12",
            "--width_multiplier=0.125",
            "--train_batch_size=32",
            "--train_steps=2",
            "--toy_train_batch_size=32",
            "--toy_train_steps=3",
            "--toy_smoothing=0.2",
            "--min_top1=0",
            "--max_top1_regression=1",
            f"--model_dir={out}",
        ]
    )
    assert code == 0
    run = summary_lib.latest_run(str(out / "metadata.sqlite"))
    assert {"finetune_trainer", "toy_trainer", "Evaluator", "Pusher"} <= set(run.components)
    results = json.loads((pathlib.Path(run.model_run_uris["toy"]) / "results.json").read_text())
    assert (results["stage"], results["total_steps"]) == ("toy", 3)
    assert run.protocol == "toy protocol"
    assert run.pushed and run.blessed
    assert run.evaluated_model_uri == run.model_uris["toy"]


@pytest.mark.parametrize("module", ["models.tasks.registry", "pipeline.names"])
def test_the_registry_and_the_names_load_no_tensorflow_or_tfx(module):
    """The command line reads the registry, and run readers the names, without loading either."""
    import subprocess

    code = (
        f"import sys, {module}; "
        "print(sorted(m for m in ('tensorflow', 'tfx', 'tf_keras') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
