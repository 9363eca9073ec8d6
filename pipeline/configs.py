"""The typed configuration tree: command line → pipeline → Trainer `custom_config` → `run_fn`.

Every option is a dataclass field whose metadata names its command-line flag and says what it
means, so `--help`, the docs table and the JSON handed to the Trainer all come from one place.
Flag names follow google-research/simclr `tf2/run.py` wherever that option exists there.

Defaults: a field's default is the reference's default. A dataset preset (`DATASET_PRESETS`)
replaces defaults that make no sense for a dataset (e.g. image_size 32 for CIFAR-10), but never a
value the user gave on the command line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from models.config import (
    IMAGENET_LINEAR_EVAL,
    PROTOCOLS,
    AugmentConfig,
    ConfigError,
    InputConfig,
    LabelConfig,
    MatchedStage,
    ModelConfig,
    RuntimeConfig,
    StageConfig,
    TrainerConfig,
    need,
    opt,
    semi_supervised_epochs,
)
from models.tasks import registry

DATASETS = ("digits", "cifar10", "imagenet2012", "folder")
TRAIN_MODES = ("pretrain", "finetune")


@dataclass
class DataConfig:
    dataset: str = opt(
        "digits",
        "Dataset: 'digits' (embedded: scikit-learn's handwritten digits rendered as 32x32 PNG "
        "class folders, no download), 'cifar10', 'imagenet2012', or 'folder' (any class-folder "
        "tree).",
        choices=DATASETS,
    )
    data_dir: str = opt(
        "",
        "Dataset root: class folders <data_dir>/<split>/<class>/<image> or TFDS-style TFRecords "
        "<data_dir>/<split>/*.tfrecord*. Required unless --dataset=digits.",
    )
    data_format: str = opt(
        "auto",
        "Input layout: 'folders', 'tfrecord', or 'auto' (detect from data_dir).",
        choices=("auto", "folders", "tfrecord"),
    )
    train_split: str = opt("train", "Split for training.")
    eval_split: str = opt(
        "",
        "Split for evaluation (TFMA and the Evaluator gate). Empty: 'test' if present, else "
        "'validation'.",
    )
    unlabeled_dir: str = opt(
        "",
        "A folder (local or gs://) of unlabeled images at any depth, ingested as the split "
        "'unlabeled' (label -1; sub-folders are not classes). Without it, <data_dir>/unlabeled/ "
        "is that pool when present; TFRecord data names it by a split 'unlabeled' or "
        "'unlabelled' (records with label -1, as TFDS STL-10, or none).",
    )
    labels_file: str = opt(
        "",
        "Optional file with one class name per line (line i = class id i); default: sorted "
        "class-folder names.",
    )
    max_bad_fraction: float = opt(
        0.01, "Fail ingestion when more than this fraction of a split's files are unreadable."
    )
    max_images_per_class: int = opt(
        0, "Ingest only the first N files of each class folder (sorted by name); 0 = all."
    )
    drop_empty_class_folders: bool = opt(
        False, "Leave out class folders without image files (with a warning) instead of stopping."
    )
    image_size: int = opt(224, "Input image size (the model sees image_size x image_size).")
    stored_image_size: int = opt(
        0,
        "Stored image size: for 'raw', the side of the square Transform stores (shorter side "
        "resized, then center-cropped); for 'jpeg', the shorter side of the whole image, aspect "
        "ratio kept, so random crops can reach every part of it. 0: image_size for images <= "
        "32 px, else 256 so random crops keep resolution.",
    )
    image_format: str = opt(
        "raw",
        "How Transform stores images: 'raw' (a fixed-size square of uint8 pixels, for small "
        "square images such as CIFAR) or 'jpeg' (the whole image re-encoded with its shorter "
        "side at the stored size, for ImageNet).",
        choices=("raw", "jpeg"),
    )
    cache_dataset: bool = opt(False, "Cache the decoded training set in memory (small datasets).")

    def validate(self) -> None:
        need(
            self.dataset in DATASETS,
            "dataset",
            f"must be one of {DATASETS}, got {self.dataset!r}",
        )
        need(
            self.dataset == "digits" or bool(self.data_dir),
            "data_dir",
            f"required for --dataset={self.dataset}",
        )
        if self.data_dir and not self.data_dir.startswith("gs://"):
            need(os.path.isdir(self.data_dir), "data_dir", f"no such directory: {self.data_dir}")
        need(self.image_size > 0, "image_size", f"must be positive, got {self.image_size}")
        need(self.stored_image_size >= 0, "stored_image_size", "must be >= 0")
        need(
            self.stored_size >= self.image_size or self.stored_image_size == 0,
            "stored_image_size",
            f"{self.stored_image_size} is smaller than --image_size={self.image_size}",
        )
        need(0.0 <= self.max_bad_fraction <= 1.0, "max_bad_fraction", "must be in [0, 1]")
        need(self.max_images_per_class >= 0, "max_images_per_class", "must be >= 0")
        if self.labels_file and not self.labels_file.startswith("gs://"):
            need(
                os.path.isfile(self.labels_file),
                "labels_file",
                f"no such file: {self.labels_file}",
            )
        if self.unlabeled_dir and "://" not in self.unlabeled_dir:
            need(
                os.path.isdir(self.unlabeled_dir),
                "unlabeled_dir",
                f"no such directory: {self.unlabeled_dir}",
            )

    @property
    def stored_size(self) -> int:
        if self.stored_image_size:
            return self.stored_image_size
        return self.image_size if self.image_size <= 32 else 256


# With no explicit --min_top1 the gate requires twice the chance rate 1/K of K classes, and at
# most 25 points above chance (so two classes need 0.75, ten 0.2, a thousand 0.002).
CHANCE_FLOOR_MAX_MARGIN = 0.25


def chance_floor(num_classes: int) -> float:
    """The default top-1 floor: clearly better than guessing among `num_classes` classes."""
    chance = 1.0 / max(1, num_classes)
    return min(2 * chance, chance + CHANCE_FLOOR_MAX_MARGIN)


@dataclass
class EvalConfig:
    min_top1: float = opt(
        -1.0,
        "Evaluator gate: absolute floor on top-1 accuracy. -1: derived from the number of "
        "classes K, twice the chance rate 1/K and at most 1/K + 0.25 (10 classes: 0.2).",
    )
    min_top5: float = opt(0.0, "Evaluator gate: absolute floor on top-5 accuracy (0 = off).")
    max_top1_regression: float = opt(
        0.02,
        "Evaluator gate: the candidate's top-1 may be at most this much below the last "
        "blessed model's.",
    )
    min_gain_over_baseline: float | None = opt(
        None,
        "Gain gate (with --baseline=supervised): push only if the candidate's top-1 beats the "
        "baseline's by at least this much on the eval split (e.g. 0.02; negative tolerates a "
        "loss). Unset: the comparison is reported, not gated.",
        kind=float,
    )
    push: str = opt(
        "candidate",
        "Which model a passed gate pushes: 'candidate' (the SimCLR model) or 'baseline' (the "
        "supervised baseline, when it won; never pushed unless asked).",
        choices=("candidate", "baseline"),
    )

    def validate(self) -> None:
        need(
            self.min_top1 == -1 or 0 <= self.min_top1 <= 1.01,
            "min_top1",
            "must be -1 or in [0, 1.01]",
        )
        need(0 <= self.min_top5 <= 1.01, "min_top5", "must be in [0, 1.01]")
        need(0 <= self.max_top1_regression <= 1, "max_top1_regression", "must be in [0, 1]")
        gain = self.min_gain_over_baseline
        need(gain is None or -1 <= gain <= 1, "min_gain_over_baseline", "must be in [-1, 1]")


@dataclass
class RunnerConfig:
    pipeline_name: str = opt("simclr", "TFX pipeline name.")
    model_dir: str = opt(
        "",
        "Root of all outputs (pipeline artifacts, metadata, pushed models); default "
        "./output/<dataset>.",
    )
    push_dir: str = opt("", "Where blessed models are pushed; default <model_dir>/serving_model.")
    beam_mode: str = opt(
        "in_memory",
        "Beam DirectRunner mode: in_memory or multi_processing.",
        choices=("in_memory", "multi_processing", "multi_threading"),
    )
    beam_workers: int = opt(0, "DirectRunner workers for multi_processing; 0 = number of CPUs.")
    enable_cache: bool = opt(
        True,
        "Reuse outputs of components whose inputs, configuration and code (a digest of models/ "
        "and transform/) are unchanged, so a rerun of the same command resumes where it "
        "stopped; --noenable_cache recomputes everything, training from step 0.",
    )

    def resolved_model_dir(self, dataset: str) -> str:
        return os.path.abspath(self.model_dir or os.path.join("output", dataset))


@dataclass
class SimCLRConfig:
    train_mode: str = opt(
        "pretrain",
        "'pretrain': contrastive pretraining then fine-tuning; 'finetune': supervised training "
        "only.",
        choices=TRAIN_MODES,
    )
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    # One section per registered Trainer stage (models/tasks/registry.py), read as attributes
    # (`config.pretrain`) and serialized as top-level keys, like the other sections.
    stages: dict[str, StageConfig] = field(default_factory=lambda: _stage_sections())
    # Not a flag: set by build_config when the fine-tuning epochs come from the semi-supervised
    # recipe, so the Trainer picks them from the labeled fraction it actually counts.
    recipe_epochs: bool = False

    def __getattr__(self, name: str) -> StageConfig:
        stages = self.__dict__.get("stages")
        if stages is not None and name in stages:
            return stages[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or stage {name!r}")

    # ----- serialization -----
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(d.pop("stages"))
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> SimCLRConfig:
        d = dict(d)
        stages = _stage_sections()
        for name in list(stages):
            if name in d:
                stages[name] = _from_dict(type(stages[name]), d.pop(name))
        config = _from_dict(cls, d)
        config.stages = stages
        return config

    @classmethod
    def from_json(cls, text: str) -> SimCLRConfig:
        return cls.from_dict(json.loads(text))

    def stage(self, name: str) -> StageConfig:
        if name not in self.stages:
            raise ConfigError(f"unknown Trainer stage {name!r}")
        return self.stages[name]

    def validate(self) -> None:
        validate(self)


def _stage_sections() -> dict[str, StageConfig]:
    return {stage.name: stage.new_section() for stage in registry.stages()}


def _from_dict(cls: type, d: dict) -> Any:
    kwargs = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in d.items():
        if key not in hints:
            raise ConfigError(f"unknown config field {cls.__name__}.{key}")
        sub = _dataclass_type(cls, key)
        kwargs[key] = _from_dict(sub, value) if sub is not None else value
    return cls(**kwargs)


def _dataclass_type(cls: type, name: str) -> type | None:
    default = next(f for f in dataclasses.fields(cls) if f.name == name)
    if default.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = default.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(value):
            return type(value)
    return None


# ----- dataset presets -----

# Class counts of the named datasets, for the default top-1 floor when the data cannot tell.
DATASET_CLASSES = {"digits": 10, "cifar10": 10, "imagenet2012": 1000}

DATASET_PRESETS: dict[str, dict[str, Any]] = {
    # Small enough to pretrain + fine-tune + evaluate in a few minutes on 2 CPU cores.
    "digits": {
        "data.image_size": 32,
        "model.resnet_depth": 18,
        "model.width_multiplier": 0.25,
        "model.proj_out_dim": 64,
        "model.global_bn": False,
        "augment.color_jitter_strength": 0.5,
        "augment.use_blur": False,
        "pretrain.train_batch_size": 128,
        "pretrain.train_epochs": 40,
        "pretrain.learning_rate": 1.0,
        "pretrain.weight_decay": 1e-4,
        "pretrain.temperature": 0.5,
        "pretrain.warmup_epochs": 1.0,
        "finetune.train_batch_size": 128,
        "finetune.train_epochs": 20,
        "distill.train_batch_size": 128,
        "distill.train_epochs": 20,
        "baseline.train_batch_size": 128,
        "runtime.eval_batch_size": 256,
    },
    # The reference's CIFAR-10 recipe (SimCLR README).
    "cifar10": {
        "data.image_size": 32,
        "model.resnet_depth": 18,
        "model.global_bn": False,
        "augment.color_jitter_strength": 0.5,
        "augment.use_blur": False,
        "pretrain.train_batch_size": 512,
        "pretrain.train_epochs": 1000,
        "pretrain.learning_rate": 1.0,
        "pretrain.weight_decay": 1e-4,
        "pretrain.temperature": 0.5,
    },
    "imagenet2012": {
        "data.image_size": 224,
        "data.eval_split": "validation",
        # The whole image as a JPEG (shorter side 256) is ~1/5 the bytes of raw 256x256 pixels
        # (measured in docs/cloud.md), and random crops can reach all of it.
        "data.image_format": "jpeg",
    },
    "folder": {},
}


def flag_fields() -> list[tuple[str, str, dataclasses.Field, type]]:
    """(flag, dotted path, field, owning class) for every command-line option."""
    out: list[tuple[str, str, dataclasses.Field, type]] = []
    for f in dataclasses.fields(SimCLRConfig):
        if f.metadata.get("help"):
            out.append((f.name, f.name, f, SimCLRConfig))
    for section in ("data", "augment", "model", "runtime", "eval", "runner"):
        cls = _dataclass_type(SimCLRConfig, section)
        for f in dataclasses.fields(cls):
            out.append((f.metadata.get("flag") or f.name, f"{section}.{f.name}", f, cls))
    # The reference's flag names set the stage named by --train_mode (the stage registered with
    # no flag prefix holds them); every other stage's optimization flags carry its prefix
    # (--finetune_learning_rate), and its own options keep their names.
    shared = {g.name for g in dataclasses.fields(StageConfig)}
    for stage in registry.stages():
        cls = stage.config_class
        for f in dataclasses.fields(cls):
            if not stage.flag_prefix:
                out.append((f.name, f"<stage>.{f.name}", f, cls))
            else:
                flag = stage.flag(f.name, own=f.name not in shared)
                out.append((flag, f"{stage.name}.{f.name}", f, cls))
    flags = [flag for flag, *_ in out]
    twice = sorted({flag for flag in flags if flags.count(flag) > 1})
    if twice:
        raise ConfigError(f"--{twice[0]} is declared by two config fields")
    return out


def default_path(path: str) -> str:
    """A flag's config path with `<stage>` (the stage --train_mode names) read as the stage
    whose flags carry no prefix, as the defaults show it."""
    bare = next(s.name for s in registry.stages() if not s.flag_prefix)
    return path.replace("<stage>", bare)


def get_path(config: SimCLRConfig, path: str) -> Any:
    obj: Any = config
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def set_path(config: SimCLRConfig, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    obj: Any = config
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def build_config(overrides: dict[str, Any]) -> SimCLRConfig:
    """Config from flag values the user gave (flag name → value), presets and defaults.

    Precedence: the user's flags, then the dataset preset, then the reference's defaults.
    """
    config = SimCLRConfig()
    by_flag = {flag: (path, f) for flag, path, f, _ in flag_fields()}
    unknown = set(overrides) - set(by_flag)
    if unknown:
        raise ConfigError(f"unknown flag --{sorted(unknown)[0]}")
    train_mode = overrides.get("train_mode", config.train_mode)
    if train_mode not in TRAIN_MODES:
        raise ConfigError(f"--train_mode must be one of {TRAIN_MODES}, got {train_mode!r}")
    config.train_mode = train_mode
    dataset = overrides.get("dataset", config.data.dataset)
    if dataset not in DATASETS:
        raise ConfigError(f"--dataset must be one of {DATASETS}, got {dataset!r}")
    given: dict[str, Any] = {}
    for flag, value in overrides.items():
        path, _ = by_flag[flag]
        if path.startswith("<stage>."):
            name = path.split(".", 1)[1]
            target = train_mode
            if not hasattr(config.stage(target), name):
                raise ConfigError(f"--{flag} applies only with --train_mode=pretrain")
            path = f"{target}.{name}"
        elif path.split(".", 1)[0] == train_mode and _is_prefixed(flag, path):
            # The stage --train_mode names takes the reference's bare names.
            bare = path.split(".", 1)[1]
            raise ConfigError(
                f"--{flag} applies only when --train_mode is not {train_mode}; use --{bare} "
                f"with --train_mode={train_mode}"
            )
        given[path] = value
    for path, value in DATASET_PRESETS[dataset].items():
        set_path(config, path, value)
    for path, value in given.items():
        set_path(config, path, value)
    for path, value in protocol_recipe(config).items():
        if path not in given:
            set_path(config, path, value)
            if path == "finetune.train_epochs" and semi_supervised(config):
                # Steps given on the command line replace epochs altogether.
                config.recipe_epochs = not config.finetune.train_steps
    config.finetune.finetune_protocol = resolved_protocol(config)
    validate(config)
    return config


def _is_prefixed(flag: str, path: str) -> bool:
    """Whether `flag` is a stage's prefixed name of a shared optimization field."""
    return flag != path.split(".", 1)[1]


def resolved_protocol(config: SimCLRConfig) -> str:
    """The finetune stage's protocol: 'auto' resolved as the SimCLR paper reports results.

    'supervised' names training from scratch only; a protocol that contradicts whether there is
    a pretrained backbone is refused, so no accuracy is reported under a name it did not earn.
    """
    f = config.finetune
    pretrained = config.train_mode == "pretrain" or bool(f.checkpoint)
    if f.finetune_protocol == "supervised" and pretrained:
        raise ConfigError(
            "--finetune_protocol: 'supervised' is training from scratch (--train_mode=finetune "
            "without --checkpoint); a pretrained backbone takes 'linear_eval' or 'fine_tune'"
        )
    if f.finetune_protocol in ("linear_eval", "fine_tune") and not pretrained:
        raise ConfigError(
            f"--finetune_protocol: {f.finetune_protocol!r} evaluates a pretrained backbone; "
            "--train_mode=finetune without --checkpoint trains from scratch ('supervised')"
        )
    if not pretrained:
        return "supervised"
    if f.finetune_protocol != "auto":
        return f.finetune_protocol
    return "fine_tune" if semi_supervised(config) else "linear_eval"


def semi_supervised(config: SimCLRConfig) -> bool:
    """Whether fine-tuning sees only part of what pretraining read: a label selection, or an
    unlabeled pool beside the labeled images."""
    f = config.finetune
    return bool(f.label_subset or f.label_fraction < 1.0 or has_unlabeled_pool(config.data))


def has_unlabeled_pool(data: DataConfig) -> bool:
    """--unlabeled_dir, or a local data_dir holding `unlabeled/` or TFDS unlabeled split files.

    Only local folders are looked at here (no storage client at flag time); the pipeline's
    `inspect_data` finds the pool wherever the data is.
    """
    if data.unlabeled_dir:
        return True
    if not data.data_dir or "://" in data.data_dir or not os.path.isdir(data.data_dir):
        return False
    if os.path.isdir(os.path.join(data.data_dir, "unlabeled")):
        return True
    names = os.listdir(data.data_dir)
    return any(f"-{split}.tfrecord" in n for n in names for split in UNLABELED_TFRECORD_SPLITS)


# TFDS names of unlabeled splits (STL-10: 'unlabelled'); each is ingested as 'unlabeled'.
UNLABELED_TFRECORD_SPLITS = ("unlabeled", "unlabelled")


def protocol_recipe(config: SimCLRConfig) -> dict[str, Any]:
    """Dotted config paths → the values the finetune stage's protocol prescribes.

    Applied over the dataset presets and under the user's explicit flags. Semi-supervised
    fine-tuning counts epochs over the labeled subset, as the reference does.
    """
    protocol = resolved_protocol(config)
    if protocol == "supervised":
        return {}
    recipe: dict[str, Any] = {}
    for name, value in PROTOCOLS[protocol].items():
        section = "model" if name == "ft_proj_selector" else "finetune"
        recipe[f"{section}.{name}"] = value
    if config.model.proj_head_mode == "none":
        recipe["model.ft_proj_selector"] = 0
    if protocol == "linear_eval" and config.data.dataset == "imagenet2012":
        recipe.update({f"finetune.{k}": v for k, v in IMAGENET_LINEAR_EVAL.items()})
    elif "finetune.train_epochs" in DATASET_PRESETS[config.data.dataset]:
        # A preset's epoch budget (a laptop demo) stands; the rest of the recipe applies.
        recipe.pop("finetune.train_epochs")
    if protocol == "fine_tune" and semi_supervised(config):
        # A provisional count: the Trainer replaces it with the recipe of the labeled fraction
        # it counts (labeled examples it reads over all examples pretraining read), since a
        # subset list or an unlabeled pool says nothing about that fraction until the data is
        # read (`SimCLRConfig.recipe_epochs`).
        recipe["finetune.train_epochs"] = semi_supervised_epochs(config.finetune.label_fraction)
    return recipe


def trainer_config(config: SimCLRConfig, stage: str) -> TrainerConfig:
    """The sections one Trainer stage reads, and nothing else: TFX caches the component on it,
    so a gate, report or runner option never re-runs training."""
    d, spec = config.data, registry.get(stage)
    section = config.stage(stage)
    model = dataclasses.replace(config.model, **spec.model_fixed)
    for model_field, own_field in spec.student.items():
        if getattr(section, own_field):
            model = dataclasses.replace(model, **{model_field: getattr(section, own_field)})
    labels = None
    if spec.selects_labels:
        f = config.finetune  # the label selection's flags live in the fine-tuning section
        labels = LabelConfig(
            f.label_fraction,
            f.label_fraction_seed,
            f.label_subset,
            recipe_epochs=spec.recipe_epochs and config.recipe_epochs,
        )
    return TrainerConfig(
        stage=stage,
        input=InputConfig(d.image_size, d.stored_size, d.image_format, d.cache_dataset),
        augment=dataclasses.replace(config.augment if spec.contrastive else AugmentConfig()),
        model=model,
        train=dataclasses.replace(section),
        runtime=dataclasses.replace(config.runtime),
        labels=labels,
        matched=matched_stages(config, spec),
    )


def matched_stages(config: SimCLRConfig, spec: registry.Stage) -> list[MatchedStage]:
    """What a baseline with a step budget counts: every other stage of the run, as it counts
    its own steps (empty for any other stage, or with --baseline_budget=epochs)."""
    if spec.role != registry.BASELINE or config.stage(spec.name).baseline_budget != "steps":
        return []
    matched = []
    for other in registry.active(config):
        if other.role == registry.BASELINE:
            continue
        section = config.stage(other.name)
        matched.append(
            MatchedStage(
                stage=other.name,
                train_batch_size=section.train_batch_size,
                train_epochs=section.train_epochs,
                train_steps=section.train_steps,
                reads_unlabeled=other.reads_unlabeled,
                recipe_epochs=other.recipe_epochs and config.recipe_epochs,
            )
        )
    return matched


def validate(config: SimCLRConfig, num_replicas: int = 1) -> None:
    """Reject bad values before any component runs; each error is one line naming the flag.

    Each section checks its own fields (`validate` beside its definition); what is left here
    are the rules that join sections.
    """
    config.data.validate()
    config.model.validate()
    config.augment.validate()
    config.runtime.validate()
    config.eval.validate()
    for stage in registry.active(config):
        prefix = stage_flag(config, stage.name, "")
        config.stage(stage.name).validate(prefix, num_replicas)
    _validate_across_sections(config)


def baseline_plan(config: SimCLRConfig) -> str | None:
    """One line on the baseline comparison and its gate; None without a baseline stage."""
    stage = registry.baseline(config)
    if stage is None:
        return None
    section, gain = config.stage(stage.name), config.eval.min_gain_over_baseline
    budget = (
        "as many optimizer steps as the candidate's stages"
        if section.baseline_budget == "steps"
        else "its own --baseline_train_epochs/--baseline_train_steps"
    )
    gate = (
        f"gain gate: the candidate is pushed only if its top-1 beats the baseline's by >= "
        f"{gain:+.4f} (--min_gain_over_baseline)"
        if gain is not None
        else "compared, not gated (--min_gain_over_baseline sets a gate)"
    )
    pushed = ""
    if config.eval.push == "baseline":
        pushed = "; --push=baseline: the baseline is pushed if it wins"
    return f"baseline: {stage.title}, for {budget}; {gate}{pushed}"


def stage_flag(config: SimCLRConfig, stage: str, name: str) -> str:
    """The flag that sets optimization field `name` of a stage in this run."""
    return name if stage == config.train_mode else registry.get(stage).flag_prefix + name


def _validate_across_sections(config: SimCLRConfig) -> None:
    d, m = config.data, config.model
    # Measured: TF 2.16's oneDNN CPU kernels corrupt the heap (the process aborts) when the
    # stem has 8 channels (width 1/8) at 192 px and above; 12 channels (3/16) run.
    need(
        not (m.width_multiplier < 0.1875 and d.image_size >= 192)
        or os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0",
        "width_multiplier",
        f"{m.width_multiplier} at --image_size={d.image_size} crashes TensorFlow's oneDNN CPU "
        "kernels; use >= 0.1875 (or set TF_ENABLE_ONEDNN_OPTS=0)",
    )
    need(
        not config.finetune.checkpoint or config.train_mode == "finetune",
        "checkpoint",
        "a released model replaces pretraining: use it with --train_mode=finetune",
    )
    e = config.eval
    need(
        e.min_gain_over_baseline is None or registry.baseline(config) is not None,
        "min_gain_over_baseline",
        "compares with a baseline: add --baseline=supervised",
    )
    need(
        e.push != "baseline" or registry.baseline(config) is not None,
        "push",
        "'baseline' pushes the baseline's model: add --baseline=supervised",
    )


# Where each option takes effect (the docs' flag reference); keys are field names or prefixes.
USED_BY: dict[str, str] = {
    "train_mode": "pipeline/pipeline.py",
    "data.dataset": "pipeline/configs.py (presets), local_runner.py",
    "data.data_dir": "pipeline/pipeline.py (ExampleGen)",
    "data.data_format": "pipeline/pipeline.py",
    "data.train_split": "pipeline/pipeline.py (Transform, Trainer)",
    "data.eval_split": "pipeline/pipeline.py (Transform, Trainer, Evaluator)",
    "data.labels_file": "pipeline/components/image_example_gen/executor.py",
    "data.unlabeled_dir": "pipeline/pipeline.py, pipeline/components/image_example_gen/executor.py",
    "data.max_bad_fraction": "pipeline/components/image_example_gen/executor.py",
    "data.max_images_per_class": "pipeline/components/image_example_gen/executor.py",
    "data.drop_empty_class_folders": "pipeline/components/image_example_gen/executor.py",
    "data.image_size": "models/augment.py, models/model.py",
    "data.stored_image_size": "transform/preprocessing.py",
    "data.image_format": "transform/preprocessing.py",
    "data.cache_dataset": "models/data.py",
    "augment.": "models/augment.py",
    "model.resnet_depth": "models/resnet.py",
    "model.width_multiplier": "models/resnet.py",
    "model.sk_ratio": "models/resnet.py",
    "model.se_ratio": "models/resnet.py",
    "model.batch_norm_decay": "models/resnet.py, models/heads.py",
    "model.global_bn": "models/resnet.py, models/heads.py",
    "model.proj_": "models/heads.py",
    "model.num_proj_layers": "models/heads.py",
    "model.ft_proj_selector": "models/model.py",
    "<stage>.temperature": "models/loss.py",
    "<stage>.hidden_norm": "models/loss.py",
    "<stage>.lineareval_while_pretraining": "models/tasks/pretrain.py",
    "<stage>.knn_every_epochs": "models/knn.py",
    "<stage>.warm_start": "pipeline/pipeline.py (resolver), models/tasks/pretrain.py",
    "<stage>.optimizer": "models/optimizers.py",
    "<stage>.momentum": "models/optimizers.py",
    "<stage>.eeta": "models/lars.py",
    "<stage>.weight_decay": "models/optimizers.py, models/lars.py",
    "<stage>.learning_rate": "models/schedule.py",
    "<stage>.warmup_epochs": "models/schedule.py",
    "<stage>.train_": "models/schedule.py, models/tasks/base.py",
    "<stage>.checkpoint_": "models/train_loop.py",
    "finetune.fine_tune_after_block": "models/resnet.py",
    "finetune.zero_init_logits_layer": "models/heads.py",
    "finetune.label_": "models/data.py, models/tasks/base.py",
    "finetune.finetune_protocol": "pipeline/configs.py (recipes in models/config.py)",
    "finetune.checkpoint": "pipeline/pipeline.py (Importer), models/tasks/finetune.py",
    "finetune.": "models/tasks/finetune.py",
    "distill.distill": "pipeline/pipeline.py",
    "distill.": "models/tasks/distill.py, models/loss.py",
    "baseline.baseline": "pipeline/pipeline.py (Trainer, TFMA comparison)",
    "baseline.": "models/tasks/baseline.py",
    "eval.min_gain_over_baseline": "pipeline/pipeline.py (TFMA comparison, Cond around the Pusher)",
    "eval.push": "pipeline/pipeline.py",
    "runtime.strategy": "models/strategy.py",
    "runtime.tpu_name": "models/strategy.py",
    "runtime.mixed_precision": "models/precision.py (auto, resolved by the runners), "
    "models/strategy.py",
    "runtime.accelerator": "models/strategy.py, local_runner.py",
    "runtime.": "models/train_loop.py, models/driver.py",
    "eval.": "pipeline/pipeline.py (TFMA EvalConfig)",
    "runner.enable_cache": "pipeline/pipeline.py (code digests), dataflow_runner.py",
    "runner.": "local_runner.py",
}


def used_by(path: str) -> str:
    """The module(s) an option lands in: the longest matching key of USED_BY."""
    section, _, name = path.partition(".")
    forms = [path]
    if section in registry.names() and name in {f.name for f in dataclasses.fields(StageConfig)}:
        forms.append(f"<stage>.{name}")
    matches = [k for k in USED_BY for p in forms if p == k or p.startswith(k)]
    return USED_BY[max(matches, key=len)] if matches else ""


def flag_table() -> str:
    """Markdown table: flag → config field → module → default → meaning (docs/flags.md)."""
    rows = [
        "| flag | config field | used in | default | meaning |",
        "|---|---|---|---|---|",
    ]
    defaults = SimCLRConfig()
    for flag, path, f, _ in flag_fields():
        shown = path.replace("<stage>", "<train_mode>")
        default = get_path(defaults, default_path(path))
        rows.append(
            f"| `--{flag}` | `{shown}` | {used_by(path)} | `{default}` | {f.metadata['help']} |"
        )
    return "\n".join(rows)
