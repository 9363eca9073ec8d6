"""The configuration schema the Trainer reads (`run_fn`'s custom_config).

These dataclasses are the Trainer-side half of the config tree: the pipeline's `SimCLRConfig`
(pipeline/configs.py) composes them with its data, gate and runner sections, and hands each
Trainer only a `TrainerConfig`: the sections that stage reads. TFX caches a component on its
execution properties, so a gate or runner option must not reach a Trainer's JSON.

Every option is a dataclass field whose metadata names its command-line flag and help text; a
field's default is the reference's (google-research/simclr `tf2/run.py`) default.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from models.precision import PRECISIONS

ACCELERATORS = ("auto", "cpu", "gpu", "tpu")

# Residual blocks in each of the four groups, by ResNet depth (TensorFlow-free, so flag checks
# can use it without loading TensorFlow).
BLOCKS_PER_GROUP: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}
RESNET_DEPTHS = tuple(BLOCKS_PER_GROUP)
# The ExampleGen split of the unlabeled pool; every record in it has label -1.
UNLABELED_SPLIT = "unlabeled"
OPTIMIZERS = ("lars", "momentum", "adam")
STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")


def opt(
    default: Any,
    help: str,
    flag: str | None = None,
    choices: tuple | None = None,
    kind: type | None = None,
) -> Any:
    """A dataclass field carrying its flag name, help text and allowed values; `kind` is the
    flag's value type where the default (None) does not tell."""
    meta = {"help": help, "flag": flag, "choices": choices, "kind": kind}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


class ConfigError(ValueError):
    """An invalid option; the message is one line that names the flag."""


def need(cond: bool, flag: str, msg: str) -> None:
    """Raises ConfigError(`--flag: msg`) unless `cond`."""
    if not cond:
        raise ConfigError(f"--{flag}: {msg}")


@dataclass
class AugmentConfig:
    color_jitter_strength: float = opt(1.0, "The strength of color jittering.")
    color_jitter_impl: str = opt(
        "v2",
        "Color jitter variant: 'v2' (multiplicative brightness, SimCLRv2) or 'v1' (additive).",
        choices=("v1", "v2"),
    )
    use_blur: bool = opt(True, "Gaussian blur (p=0.5, sigma per image) during pretraining.")

    def validate(self) -> None:
        need(self.color_jitter_strength >= 0, "color_jitter_strength", "must be >= 0")


@dataclass
class ModelConfig:
    resnet_depth: int = opt(50, "Depth of ResNet.", choices=RESNET_DEPTHS)
    width_multiplier: float = opt(
        1.0,
        "Multiplier of ResNet width. Integers as in SimCLR; fractions (e.g. 0.25) make tiny "
        "models for laptops and tests.",
    )
    sk_ratio: float = opt(0.0, "Selective kernel ratio; > 0 enables SK (SimCLRv2 uses 0.0625).")
    se_ratio: float = opt(0.0, "Squeeze-excitation ratio; > 0 enables SE.")
    batch_norm_decay: float = opt(0.9, "Batch norm decay parameter.")
    global_bn: bool = opt(True, "Aggregate batch-norm statistics across replicas (sync BN).")
    proj_head_mode: str = opt(
        "nonlinear", "How the head projection is done.", choices=("none", "linear", "nonlinear")
    )
    proj_out_dim: int = opt(128, "Output dimension of the projection head.")
    num_proj_layers: int = opt(3, "Number of layers of the nonlinear projection head.")
    ft_proj_selector: int = opt(
        0,
        "Which projection-head layer feeds the supervised head: 0 = backbone output, i = the "
        "output of head layer i, -1 = the last layer (the projection output), as in the "
        "reference. Fine-tuning trains the head layers below the selected output.",
    )

    def validate(self) -> None:
        need(
            self.resnet_depth in RESNET_DEPTHS,
            "resnet_depth",
            f"must be one of {RESNET_DEPTHS}, got {self.resnet_depth}",
        )
        need(self.width_multiplier > 0, "width_multiplier", "must be positive")
        need(
            self.width_multiplier < 1 or float(self.width_multiplier).is_integer(),
            "width_multiplier",
            f"must be an integer or a fraction below 1, got {self.width_multiplier}",
        )
        need(self.sk_ratio >= 0, "sk_ratio", "must be >= 0")
        need(self.se_ratio >= 0, "se_ratio", "must be >= 0")
        need(0 < self.batch_norm_decay < 1, "batch_norm_decay", "must be in (0, 1)")
        need(self.proj_out_dim > 0, "proj_out_dim", "must be positive")
        need(self.num_proj_layers >= 1, "num_proj_layers", "must be >= 1")
        need(
            -1 <= self.ft_proj_selector <= self.num_proj_layers,
            "ft_proj_selector",
            f"must be in [-1, num_proj_layers={self.num_proj_layers}]",
        )
        need(
            self.proj_head_mode != "none" or self.ft_proj_selector == 0,
            "ft_proj_selector",
            f"{self.ft_proj_selector} selects a projection layer, but --proj_head_mode=none has "
            "none",
        )
        need(
            self.proj_head_mode != "linear" or self.ft_proj_selector in (-1, 0, 1),
            "ft_proj_selector",
            "--proj_head_mode=linear has one projection layer: use -1, 0 or 1",
        )


@dataclass
class StageConfig:
    """Optimization settings of one Trainer stage (pretrain or finetune)."""

    train_batch_size: int = opt(512, "Batch size for training.")
    train_epochs: int = opt(100, "Number of epochs to train for.")
    train_steps: int = opt(0, "Number of steps to train for; overrides train_epochs when > 0.")
    learning_rate: float = opt(0.3, "Initial learning rate per batch size of 256.")
    learning_rate_scaling: str = opt(
        "linear", "How to scale the learning rate with batch size.", choices=("linear", "sqrt")
    )
    warmup_epochs: float = opt(10.0, "Number of epochs of linear warmup.")
    weight_decay: float = opt(1e-6, "Amount of weight decay to use.")
    optimizer: str = opt("lars", "Optimizer to use.", choices=OPTIMIZERS)
    momentum: float = opt(0.9, "Momentum parameter.")
    eeta: float = opt(0.001, "LARS trust coefficient.")
    checkpoint_epochs: int = opt(1, "Number of epochs between checkpoints and summaries.")
    checkpoint_steps: int = opt(
        0, "Number of steps between checkpoints/summaries; overrides checkpoint_epochs when > 0."
    )

    def validate(self, prefix: str = "", num_replicas: int = 1) -> None:
        """Checks the section; `prefix` is its flags' prefix (`finetune_`), shown in errors."""
        batch = self.train_batch_size
        need(batch > 0, prefix + "train_batch_size", f"must be positive, got {batch}")
        need(
            batch % num_replicas == 0,
            prefix + "train_batch_size",
            f"{batch} is not divisible by the {num_replicas} replicas",
        )
        need(
            self.train_epochs > 0 or self.train_steps > 0,
            prefix + "train_epochs",
            "train_epochs or train_steps must be positive",
        )
        need(self.train_steps >= 0, prefix + "train_steps", "must be >= 0")
        need(self.learning_rate >= 0, prefix + "learning_rate", "must be >= 0")
        need(self.warmup_epochs >= 0, prefix + "warmup_epochs", "must be >= 0")
        need(self.weight_decay >= 0, prefix + "weight_decay", "must be >= 0")
        need(self.optimizer in OPTIMIZERS, prefix + "optimizer", f"must be one of {OPTIMIZERS}")
        need(
            self.checkpoint_epochs > 0 or self.checkpoint_steps > 0,
            prefix + "checkpoint_epochs",
            "checkpoint_epochs or checkpoint_steps must be positive",
        )


@dataclass
class PretrainConfig(StageConfig):
    temperature: float = opt(0.1, "Temperature parameter for contrastive loss.")
    hidden_norm: bool = opt(True, "L2-normalize projections before the contrastive loss.")
    lineareval_while_pretraining: bool = opt(
        True, "Train a linear classifier on stop-gradient features while pretraining."
    )
    knn_every_epochs: int = opt(
        0,
        "Every N epochs, weighted kNN top-1 of backbone features on the eval split; 0 = off. "
        "Before the first step it also logs the floors: the same kNN with the randomly "
        "initialized encoder and on raw pixels.",
    )
    warm_start: bool = opt(
        False,
        "Start pretraining from the latest pretrained encoder of an earlier run of this "
        "pipeline (backbone and projection head: weights and batch-norm statistics) instead of "
        "a random initialization, with a fresh schedule of --warm_start_epochs over the data "
        "read now. Without an earlier pretrained model it starts from scratch.",
    )
    warm_start_epochs: int = opt(
        0,
        "Epochs of a warm-started pretraining's schedule (warmup and cosine decay over them); "
        "0 = --train_epochs / --train_steps.",
    )

    def validate(self, prefix: str = "", num_replicas: int = 1) -> None:
        super().validate(prefix, num_replicas)
        need(self.temperature > 0, "temperature", "must be positive")
        need(self.knn_every_epochs >= 0, "knn_every_epochs", "must be >= 0")
        need(self.warm_start_epochs >= 0, "warm_start_epochs", "must be >= 0")


@dataclass
class FinetuneConfig(StageConfig):
    finetune_protocol: str = opt(
        "auto",
        "Which evaluation protocol the stage after pretraining follows (the SimCLR README's "
        "recipes; explicit flags override a recipe's values): 'linear_eval' (a zero-initialized "
        "linear classifier on the frozen backbone: fine_tune_after_block=4, momentum, lr 0.1, no "
        "decay or warmup, 100 epochs; ImageNet: wd 1e-6, 90 epochs), 'fine_tune' (the whole "
        "network from the first projection layer, ft_proj_selector=1: LARS, lr 0.005 with sqrt "
        "scaling, no decay or warmup; 60 epochs on 1% of the labels, 30 on 10%), or 'auto': "
        "linear_eval on all labels, fine_tune with --label_fraction/--label_subset. With "
        "--train_mode=finetune and no --checkpoint the stage is plain supervised training, "
        "'supervised', the only protocol accepted there and nowhere else.",
        choices=("auto", "linear_eval", "fine_tune", "supervised"),
    )
    fine_tune_after_block: int = opt(
        -1,
        "Fine-tune layers after this block: -1 = everything, 0 = after the stem, 4 = only the "
        "linear head. Frozen blocks keep batch norm in inference mode.",
    )
    zero_init_logits_layer: bool = opt(
        False, "Zero-initialize the supervised head when fine-tuning."
    )
    label_fraction: float = opt(
        1.0, "Fraction of labeled train examples used for fine-tuning (stratified, seeded)."
    )
    label_fraction_seed: int = opt(0, "Seed of the stratified label-fraction selection.")
    label_subset: str = opt(
        "",
        "File listing the labeled training images, one file name a line (e.g. the SimCLR/TFDS "
        "ImageNet 1% or 10% list); fine-tuning uses only examples whose key's base name is "
        "listed. Replaces --label_fraction.",
    )
    checkpoint: str = opt(
        "",
        "A SavedModel in the released SimCLR TF2 format (e.g. gs://simclr-checkpoints-tf2/"
        "simclrv2/pretrained/r50_1x_sk0/saved_model/) imported as the base model for "
        "--train_mode=finetune, instead of pretraining.",
    )

    def validate(self, prefix: str = "", num_replicas: int = 1) -> None:
        super().validate(prefix, num_replicas)
        after, fraction = self.fine_tune_after_block, self.label_fraction
        need(-1 <= after <= 4, "fine_tune_after_block", "must be in [-1, 4]")
        need(0 < fraction <= 1, "label_fraction", f"must be in (0, 1], got {fraction}")
        if self.label_subset:
            need(
                self.label_subset.startswith("gs://") or os.path.isfile(self.label_subset),
                "label_subset",
                f"no such file: {self.label_subset}",
            )
            need(fraction == 1.0, "label_subset", "cannot be combined with --label_fraction")
        need(
            not self.checkpoint or not 0 <= after <= 3,
            "fine_tune_after_block",
            "an imported --checkpoint backbone trains whole (-1) or stays frozen (4); "
            f"{after} is not supported",
        )


@dataclass
class DistillConfig(StageConfig):
    """SimCLRv2's third step: distill the fine-tuned teacher into a student on unlabeled images."""

    distill: bool = opt(False, "Add a distillation Trainer; the student is evaluated and pushed.")
    distill_temperature: float = opt(1.0, "Distillation temperature T in T^2 * CE(t/T, s/T).")
    distill_label_weight: float = opt(
        0.0, "Weight of the cross-entropy on labels (of the label_fraction subset) added to it."
    )
    distill_resnet_depth: int = opt(0, "Student ResNet depth; 0 = the teacher's.")
    distill_width_multiplier: float = opt(0.0, "Student width multiplier; 0 = the teacher's.")

    def validate(self, prefix: str = "", num_replicas: int = 1) -> None:
        super().validate(prefix, num_replicas)
        need(self.distill_temperature > 0, "distill_temperature", "must be positive")
        need(self.distill_label_weight >= 0, "distill_label_weight", "must be >= 0")
        need(
            self.distill_resnet_depth in (0, *RESNET_DEPTHS),
            "distill_resnet_depth",
            f"must be 0 or one of {RESNET_DEPTHS}",
        )
        need(self.distill_width_multiplier >= 0, "distill_width_multiplier", "must be >= 0")


@dataclass
class BaselineConfig(StageConfig):
    """A supervised baseline: the same network from random initialization on exactly the
    labeled examples fine-tuning reads, to answer whether pretraining paid off on this data."""

    baseline: str = opt(
        "none",
        "Train a baseline beside the SimCLR model and compare them with TFMA on the eval split: "
        "'supervised' = the same network from random initialization on the labeled examples "
        "fine-tuning reads (same --label_fraction/--label_subset); 'none' = no baseline.",
        choices=("none", "supervised"),
    )
    baseline_budget: str = opt(
        "steps",
        "The baseline's training budget: 'steps' = as many optimizer steps as pretraining and "
        "fine-tuning together (each counted over what it reads, as those stages count them); "
        "'epochs' = --baseline_train_epochs / --baseline_train_steps.",
        choices=("steps", "epochs"),
    )


@dataclass
class MatchedStage:
    """What the baseline needs to count another stage's optimizer steps the way it does."""

    stage: str
    train_batch_size: int
    train_epochs: int
    train_steps: int
    # Counted over the labeled train split plus the unlabeled pool; else over the labeled
    # examples the baseline reads too.
    reads_unlabeled: bool
    recipe_epochs: bool = False


@dataclass
class RuntimeConfig:
    """How the Trainer runs: devices, precision, logging, checkpoints."""

    strategy: str = opt(
        "auto",
        "tf.distribute strategy: auto (mirrored on >1 GPU, else default), default, mirrored, "
        "multi_worker (TF_CONFIG), tpu.",
        choices=STRATEGIES,
    )
    tpu_name: str = opt("", "TPU name or grpc:// address for --strategy=tpu.")
    mixed_precision: str = opt(
        "auto",
        "Compute dtype: auto (bfloat16 where the device computes it natively and fast: CPUs "
        "with AMX, TPUs, GPUs of compute capability >= 8.0; float32 elsewhere, including CPUs "
        "with AVX512_BF16 but no AMX, where bfloat16 is slower), float32, bfloat16, or float16 "
        "(GPU, loss scaling). Resolved when the pipeline is built and printed with its reason.",
        choices=PRECISIONS,
    )
    accelerator: str = opt(
        "auto",
        "Device the Trainer must train on: auto (whatever TensorFlow sees), cpu, gpu or tpu. With "
        "gpu or tpu a Trainer that sees none stops at start with one line instead of training on "
        "the CPU (the Vertex AI GPU and TPU Trainers set it).",
        choices=ACCELERATORS,
    )
    jit_compile: bool = opt(False, "Compile the train step with XLA.")
    eval_batch_size: int = opt(256, "Batch size for in-Trainer evaluation.")
    keep_checkpoint_max: int = opt(5, "Maximum number of checkpoints to keep.")
    log_every_steps: int = opt(10, "Print a progress line every N steps.")
    seed: int = opt(0, "Random seed for weight initialization and input shuffling.")

    def validate(self) -> None:
        need(self.eval_batch_size > 0, "eval_batch_size", "must be positive")
        need(self.keep_checkpoint_max > 0, "keep_checkpoint_max", "must be positive")
        need(self.log_every_steps > 0, "log_every_steps", "must be positive")
        if self.strategy == "tpu":
            need(bool(self.tpu_name) or "TPU_NAME" in os.environ, "tpu_name", "required for TPUs")


@dataclass
class InputConfig:
    """What the Trainer needs to know about Transform's stored images."""

    image_size: int = 224
    stored_size: int = 256
    image_format: str = "raw"
    cache_dataset: bool = False


@dataclass
class LabelConfig:
    """Which training labels a supervised stage may use (finetune, and distill's label loss)."""

    label_fraction: float = 1.0
    label_fraction_seed: int = 0
    label_subset: str = ""
    # The stage's epochs follow the semi-supervised recipe (`semi_supervised_epochs`) of the
    # labeled fraction the Trainer counts: labeled examples it reads over all examples the
    # pretraining read (labeled train plus the unlabeled pool).
    recipe_epochs: bool = False


@dataclass
class TrainerConfig:
    """Everything one Trainer stage reads, and nothing else (its TFX cache key).

    `model` is the network this stage trains (the student's for distill); `labels` is None for
    pretraining, whose labels feed only the online linear probe.
    """

    stage: str
    input: InputConfig
    augment: AugmentConfig
    model: ModelConfig
    train: StageConfig
    runtime: RuntimeConfig
    labels: LabelConfig | None = None
    # The baseline's step budget: the stages whose steps it matches (empty for the others).
    matched: list[MatchedStage] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainerConfig:
        from models.tasks import registry  # the registry imports this module

        d = json.loads(text)
        stage = d["stage"]
        return cls(
            stage=stage,
            input=InputConfig(**d["input"]),
            augment=AugmentConfig(**d["augment"]),
            model=ModelConfig(**d["model"]),
            train=registry.get(stage).config_class(**d["train"]),
            runtime=RuntimeConfig(**d["runtime"]),
            labels=LabelConfig(**d["labels"]) if d.get("labels") is not None else None,
            matched=[MatchedStage(**m) for m in d.get("matched", [])],
        )


# The reference README's recipes, as defaults of the finetune stage (explicit flags win).
# linear_eval: a linear classifier on the frozen backbone. fine_tune: the whole network from the
# first projection layer (SimCLRv2), LARS with sqrt-scaled learning rate.
PROTOCOLS: dict[str, dict[str, object]] = {
    "linear_eval": {
        "fine_tune_after_block": 4,
        "zero_init_logits_layer": True,
        "ft_proj_selector": 0,
        "optimizer": "momentum",
        "learning_rate": 0.1,
        "learning_rate_scaling": "linear",
        "weight_decay": 0.0,
        "warmup_epochs": 0.0,
        "train_epochs": 100,
    },
    "fine_tune": {
        "fine_tune_after_block": -1,
        "zero_init_logits_layer": True,
        "ft_proj_selector": 1,
        "optimizer": "lars",
        "learning_rate": 0.005,
        "learning_rate_scaling": "sqrt",
        "weight_decay": 0.0,
        "warmup_epochs": 0.0,
        "train_epochs": 100,
    },
}
# ImageNet recipes differ in epochs and decay; semi-supervised ones count epochs over the
# labeled subset: 60 epochs on 1% of the labels, 30 on 10%.
IMAGENET_LINEAR_EVAL = {"weight_decay": 1e-6, "train_epochs": 90}
SEMI_SUPERVISED_EPOCHS = ((0.05, 60), (1.0, 30))


def semi_supervised_epochs(label_fraction: float) -> int:
    """The reference's fine-tuning epochs for a labeled fraction (1% → 60, 10% → 30)."""
    return next(epochs for upper, epochs in SEMI_SUPERVISED_EPOCHS if label_fraction <= upper)
