"""The stage registry: every Trainer stage declared once.

Model Garden keys a task by its config class; here an entry also says what the pipeline around
the Trainer needs to know about the stage: its config section and flag prefix, which runs have
it, what data it reads, what model it starts from, whether the Evaluator judges it and what its
network is. Flag generation, validation, `trainer_config`, the pipeline's Trainers, the cloud
batch checks, the run summary and the report iterate over `stages()`; none of them names a stage.

This module imports no TensorFlow (the command line reads it); a stage's Task class is loaded
only when a Trainer runs it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from models.config import (
    BaselineConfig,
    ConfigError,
    DistillConfig,
    FinetuneConfig,
    PretrainConfig,
    StageConfig,
)

# What the Evaluator and Pusher make of a stage's model.
ENCODER = "encoder"  # trained for later stages; its own accuracy is a probe's
CANDIDATE = "candidate"  # the last one a run has is evaluated, gated and pushed
BASELINE = "baseline"  # compared with the candidate; pushed only when asked


@dataclass(frozen=True)
class Stage:
    """One Trainer stage, as everything outside its own module sees it.

    `runs(config)` reads the pipeline's config (any object with the config sections as
    attributes), so this layer never imports the pipeline.
    """

    name: str
    config_class: type[StageConfig]
    # "module:Class" (imported when a Trainer runs it) or the Task class itself.
    task: str | type
    runs: Callable[[Any], bool]
    # Prefix of its optimization flags (`--<prefix>train_epochs`); "" for the stage that the
    # reference's bare names set (the one --train_mode names).
    flag_prefix: str
    role: str = CANDIDATE
    # The stage whose exported model this one starts from (its base_model), if that stage runs.
    base: str | None = None
    # Splits it trains on besides the labeled train split.
    reads_unlabeled: bool = False
    # Whether it receives the label selection (--label_fraction / --label_subset).
    selects_labels: bool = True
    # Whether its epochs follow the semi-supervised recipe of the counted labeled fraction.
    recipe_epochs: bool = False
    # Whether it trains with SimCLR's contrastive augmentations and two views per image.
    contrastive: bool = False
    # Model fields this stage sets from its own section when nonzero (the distillation
    # student's depth and width): model field -> section field.
    student: dict[str, str] = field(default_factory=dict)
    # Model fields fixed for this stage, whatever the flags say.
    model_fixed: dict[str, Any] = field(default_factory=dict)
    # Defaults of its section that differ from its config class's.
    defaults: dict[str, Any] = field(default_factory=dict)
    # The evaluation protocol its accuracy is reported under: a field of its section, or a
    # fixed name ("" = none).
    protocol_field: str = ""
    protocol_name: str = ""
    # One line for the run summary and report on what it is.
    title: str = ""

    def task_class(self) -> type:
        if isinstance(self.task, type):
            return self.task
        module, _, name = self.task.partition(":")
        return getattr(importlib.import_module(module), name)

    def new_section(self) -> StageConfig:
        return self.config_class(**self.defaults)

    def protocol(self, section: dict[str, Any]) -> str | None:
        """The protocol of a recorded run of this stage (its Trainer's JSON `train` section)."""
        if self.protocol_field:
            return section.get(self.protocol_field) or None
        return self.protocol_name or None

    def flag(self, name: str, own: bool) -> str:
        """The flag of one of its section's fields: its own fields keep their names."""
        return name if own else f"{self.flag_prefix}{name}"


_STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Adds a stage after those registered before it (the pipeline's order of Trainers)."""
    if stage.name in _STAGES:
        raise ConfigError(f"stage {stage.name!r} is registered twice")
    if stage.base is not None and stage.base not in _STAGES:
        raise ConfigError(f"stage {stage.name!r}: its base stage {stage.base!r} is not registered")
    _STAGES[stage.name] = stage
    return stage


def unregister(name: str) -> None:
    """Removes a stage (tests that register their own)."""
    _STAGES.pop(name, None)


def stages() -> list[Stage]:
    return list(_STAGES.values())


def get(name: str) -> Stage:
    try:
        return _STAGES[name]
    except KeyError:
        raise ConfigError(f"unknown Trainer stage {name!r}") from None


def names() -> tuple[str, ...]:
    return tuple(_STAGES)


def active(config: Any) -> list[Stage]:
    """The stages a run has, in order."""
    return [s for s in _STAGES.values() if s.runs(config)]


def candidate(config: Any) -> Stage:
    """The stage whose model the Evaluator judges and the Pusher pushes: the last candidate."""
    found = [s for s in active(config) if s.role == CANDIDATE]
    if not found:
        raise ConfigError("no stage of this run produces a model to evaluate")
    return found[-1]


def baseline(config: Any) -> Stage | None:
    found = [s for s in active(config) if s.role == BASELINE]
    return found[-1] if found else None


register(
    Stage(
        name="pretrain",
        config_class=PretrainConfig,
        task="models.tasks.pretrain:PretrainTask",
        runs=lambda c: c.train_mode == "pretrain",
        flag_prefix="",
        role=ENCODER,
        reads_unlabeled=True,
        selects_labels=False,
        contrastive=True,
        # The online probe reads backbone features; ft_proj_selector is the later stages'.
        model_fixed={"ft_proj_selector": 0},
        title="contrastive pretraining (NT-Xent) with an online linear probe",
    )
)
register(
    Stage(
        name="finetune",
        config_class=FinetuneConfig,
        task="models.tasks.finetune:FinetuneTask",
        runs=lambda c: True,
        flag_prefix="finetune_",
        base="pretrain",
        recipe_epochs=True,
        protocol_field="finetune_protocol",
        title="the supervised head (and unfrozen layers) on the labeled examples",
    )
)
register(
    Stage(
        name="distill",
        config_class=DistillConfig,
        task="models.tasks.distill:DistillTask",
        runs=lambda c: c.distill.distill,
        flag_prefix="distill_",
        base="finetune",
        reads_unlabeled=True,
        student={
            "resnet_depth": "distill_resnet_depth",
            "width_multiplier": "distill_width_multiplier",
        },
        model_fixed={"ft_proj_selector": 0},
        # It starts from the reference's fine-tuning optimizer settings.
        defaults={
            "learning_rate": 0.1,
            "learning_rate_scaling": "linear",
            "warmup_epochs": 0.0,
            "weight_decay": 0.0,
            "optimizer": "momentum",
            "train_epochs": 100,
        },
        protocol_name="distillation",
        title="the fine-tuned teacher distilled into a student on every training image",
    )
)
register(
    Stage(
        name="baseline",
        config_class=BaselineConfig,
        task="models.tasks.baseline:BaselineTask",
        runs=lambda c: c.baseline.baseline == "supervised",
        flag_prefix="baseline_",
        role=BASELINE,
        model_fixed={"ft_proj_selector": 0},
        # The supervised recipe of bench/quality.py's supervised arm: momentum SGD, batch 256,
        # lr 0.1 per 256 images, weight decay 5e-4, cosine decay (here without warmup).
        defaults={
            "train_batch_size": 256,
            "optimizer": "momentum",
            "learning_rate": 0.1,
            "learning_rate_scaling": "linear",
            "weight_decay": 5e-4,
            "warmup_epochs": 0.0,
        },
        protocol_name="supervised baseline",
        title="the same network from random initialization on the same labeled examples",
    )
)
