"""What every Trainer stage shares: its data view, optimizer and gradient plumbing.

A stage is a `Task` (the Task pattern of TF Model Garden's SimCLR project): it builds its model
and its input pipeline, names its loss terms and metrics, and the base class turns those into the
one replica step every stage trains with; `models/driver.py` runs any task under a strategy with
checkpoints, evaluation and export.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import tensorflow as tf
import tf_keras as keras

from models import data as data_lib
from models import knn
from models.config import TrainerConfig, semi_supervised_epochs
from models.model import SimCLRModel
from models.optimizers import build_optimizer, weight_decay_loss
from models.schedule import WarmUpAndCosineDecay, total_train_steps
from models.split_records import SplitRecords, SplitSize
from models.strategy import wrap_optimizer
from models.train_loop import LoopSettings

# Below this many steps a supervised stage barely moves from its initialization.
FEW_STEPS = 100


@dataclass(frozen=True)
class StageInputs:
    """The Trainer's input artifacts, as TFX hands them to `run_fn`."""

    train_files: list[str]
    eval_files: list[str]
    transform_output_dir: str
    num_classes: int
    base_model: str | None = None
    # Every split's size from the pipeline's statistics (none: records are counted by reading).
    split_sizes: Mapping[str, SplitSize] | None = None


class Task:
    """One Trainer stage. Subclasses implement `losses` and the `build_*` methods and set:

    - `loss_weights`: which of `losses`' terms train the model, and with what weight;
    - `metric_names`: everything recorded (each term, plus the step's `total_loss` and
      `weight_decay`), in the order summaries and the progress line list them;
    - `progress_metrics`: those of them the progress line shows.
    """

    metric_names: tuple[str, ...] = ()
    progress_metrics: tuple[str, ...] = ()
    loss_weights: Mapping[str, float] = MappingProxyType({})
    # Whether the supervised head is evaluated on the eval split after training.
    evaluates = True
    # Whether the stage trains toward labels (warned about when it barely trains).
    supervised = True

    def __init__(self, config: TrainerConfig, inputs: StageInputs, num_replicas: int = 1):
        self.config = config
        self.inputs = inputs
        self.spec = data_lib.ImageSpec(
            stored_size=config.input.stored_size,
            image_format=config.input.image_format,
            image_size=config.input.image_size,
        )
        self.records = SplitRecords(inputs.train_files, inputs.split_sizes)
        self.split_bytes = data_lib.split_bytes(inputs.train_files)
        self.shuffle_buffer = data_lib.shuffle_buffer_size(self.split_bytes, self.records.count)
        self.labeled_keys = self._select_labeled()
        trained = self.training_keys()
        self.num_examples = self.records.count if trained is None else len(trained)
        if self.num_examples == 0:
            raise ValueError(f"{config.stage}: the training split has no examples")
        self.batch_size = self._fit_batch(config.train.train_batch_size, num_replicas)
        t = config.train
        self.train_epochs = t.train_epochs
        if config.labels is not None and config.labels.recipe_epochs and not t.train_steps:
            self.train_epochs = self._recipe_epochs()
        self.total_steps = total_train_steps(
            self.num_examples, self.batch_size, self.train_epochs, t.train_steps
        )
        self.epoch_steps = data_lib.steps_per_epoch(self.num_examples, self.batch_size)

    @classmethod
    def without_inputs(cls, config: TrainerConfig) -> Task:
        """The task's model and step from its config alone, reading no input files (benchmarks
        and tests of the step); what needs the data (inputs, counts, schedule) is unavailable."""
        task = cls.__new__(cls)
        task.config = config
        return task

    # ----- data -----
    @functools.cached_property
    def pretraining_read(self) -> int:
        """Examples pretraining read: the labeled train split and the unlabeled pool (which a
        stage that trains on the labeled split alone does not read itself)."""
        return self.records.count + self.records.unread_pool_size()

    def recipe_epochs(self) -> int:
        """The semi-supervised recipe's epochs for the labeled fraction actually read: labeled
        examples this stage trains on over all examples pretraining read, never a guess from a
        file name."""
        return semi_supervised_epochs(self.num_examples / max(1, self.pretraining_read))

    def _recipe_epochs(self) -> int:
        """`recipe_epochs`, announced with the fraction it comes from."""
        epochs, read = self.recipe_epochs(), self.pretraining_read
        print(
            f"{self.config.stage}: {self.num_examples} labeled of the {read} examples "
            f"pretraining read ({self.num_examples / max(1, read):.2%}): {epochs} epochs "
            "(semi-supervised recipe)",
            flush=True,
        )
        return epochs

    def _select_labeled(self) -> np.ndarray | None:
        """Keys of the labeled subset (label_subset / label_fraction), or None for all labels.

        Chosen among the examples that have a label: the unlabeled pool's (-1) never count.
        Only here are the records' keys read.
        """
        sel, stage = self.config.labels, self.config.stage
        if sel is None or not (sel.label_subset or sel.label_fraction < 1.0):
            return None
        labels, keys = self.records.labels_and_keys
        keys = keys[labels >= 0]
        labels = labels[labels >= 0]
        if sel.label_subset:
            chosen = data_lib.select_listed(keys, sel.label_subset)
            how = f"label_subset={sel.label_subset}"
        else:
            chosen = data_lib.select_label_fraction(
                labels, keys, sel.label_fraction, sel.label_fraction_seed
            )
            how = f"label_fraction={sel.label_fraction}"
        print(f"{stage}: {len(chosen)} of {len(keys)} labeled examples ({how})", flush=True)
        return chosen

    def training_keys(self) -> np.ndarray | None:
        """Keys of the examples this stage trains on; None for every example."""
        return None

    def num_unlabeled(self) -> int:
        """Examples this stage trains on without a label (-1: the unlabeled pool)."""
        trained = self.training_keys()
        if trained is None or not self.records.unlabeled:
            return self.records.unlabeled
        labels, keys = self.records.labels_and_keys
        return int(np.isin(trained, keys[labels < 0]).sum())

    def _fit_batch(self, batch: int, num_replicas: int) -> int:
        """The configured batch, unless the training set is smaller: then the largest batch of
        whole replicas that fits, with a warning (an endless repeat would otherwise show every
        image several times per step)."""
        fitted = fit_batch(batch, self.num_examples, num_replicas)
        if fitted == batch:
            return batch
        print(
            f"warning: {self.config.stage}: batch {batch} is larger than the "
            f"{self.num_examples} training examples; using batch {fitted}",
            flush=True,
        )
        return fitted

    def subset_fits_in_memory(self, count: int) -> bool:
        """Whether `count` of the split's records are small enough to keep in memory (a 1% or
        10% labeled subset of CIFAR-10: 1.3 / 13 MB), estimated from the split's file size."""
        share = count / max(1, self.records.count)
        return self.split_bytes * share <= data_lib.FULL_SHUFFLE_BYTES

    def dataset(
        self, ctx: tf.distribute.InputContext, skip: int, *, contrastive: bool, **kwargs
    ) -> tf.data.Dataset:
        a = self.config.augment
        keep = kwargs.get("keep_keys")
        cache = self.config.input.cache_dataset or (
            keep is not None and self.subset_fits_in_memory(len(keep))
        )
        return data_lib.train_dataset(
            self.inputs.train_files,
            self.spec,
            ctx.get_per_replica_batch_size(self.batch_size),
            contrastive=contrastive,
            color_jitter_strength=a.color_jitter_strength,
            color_jitter_impl=a.color_jitter_impl,
            use_blur=a.use_blur,
            seed=self.config.runtime.seed + ctx.input_pipeline_id,
            skip_examples=skip // ctx.num_input_pipelines,
            cache=cache,
            shard=(ctx.num_input_pipelines, ctx.input_pipeline_id),
            shuffle_buffer=self.shuffle_buffer,
            **kwargs,
        )

    # ----- the stage's own parts -----
    def build_model(self) -> SimCLRModel:
        """The stage's network with a supervised head, from random initialization (`config.model`
        is already this stage's: the distillation student's depth and width)."""
        c = self.config
        return SimCLRModel(c.model, self.inputs.num_classes, c.input.image_size, pretraining=False)

    def initialize(self, model: SimCLRModel) -> None:
        """Loads what the stage starts from (a base model, a teacher) into the built model."""

    def build_inputs(self, ctx: tf.distribute.InputContext, skip: int) -> tf.data.Dataset:
        raise NotImplementedError

    def losses(
        self, model: SimCLRModel, batch: tuple[tf.Tensor, ...], training: bool
    ) -> dict[str, tf.Tensor]:
        """Named scalar terms of one replica batch: those in `loss_weights` are trained on, the
        others (accuracies, entropies) are only recorded. Runs inside the gradient tape."""
        raise NotImplementedError

    def prepare(self, batch: tuple[tf.Tensor, ...]) -> tuple[tf.Tensor, ...]:
        """The batch `losses` receives; work here stays outside the gradient tape (a teacher's
        forward pass)."""
        return batch

    def monitor(self, model: SimCLRModel, checkpoint_every: int) -> knn.KnnMonitor | None:
        """An `on_checkpoint` callback for the loop (pretraining's kNN monitor), or None."""
        return None

    # ----- shared -----
    @property
    def eval_label(self) -> str:
        """How the stage's eval accuracy is printed: every accuracy names what produced it."""
        return self.config.stage

    def announce(self, num_replicas: int) -> None:
        """One line of what will run, and a warning when a supervised stage barely trains."""
        stage = self.config.stage
        unlabeled = self.num_unlabeled()
        # Its first part is read back by tools (bench/gpu_cifar.sh): keep it stable.
        print(
            f"{stage}: {self.num_examples} examples, {self.inputs.num_classes} classes, batch "
            f"{self.batch_size}, {self.total_steps} steps on {num_replicas} replica(s) "
            f"({self.num_examples - unlabeled} labeled, {unlabeled} unlabeled)",
            flush=True,
        )
        if self.supervised and self.total_steps < FEW_STEPS:
            print(
                f"warning: {stage}: only {self.total_steps} training steps; a supervised stage "
                f"needs about {FEW_STEPS} or more to move far from its starting point",
                flush=True,
            )

    def loop_settings(self) -> LoopSettings:
        t, rt = self.config.train, self.config.runtime
        return LoopSettings(
            stage=self.config.stage,
            total_steps=self.total_steps,
            checkpoint_every=max(1, t.checkpoint_steps or t.checkpoint_epochs * self.epoch_steps),
            log_every=rt.log_every_steps,
            global_batch_size=self.batch_size,
            keep_checkpoint_max=rt.keep_checkpoint_max,
            progress_metrics=self.progress_metrics,
            jit_compile=rt.jit_compile,
        )

    def write_results(self, path: str, metrics: dict[str, float], seconds: dict) -> None:
        """results.json: what the stage trained on, its metrics and its phase seconds."""
        summary = {
            "stage": self.config.stage,
            "total_steps": self.total_steps,
            "train_epochs": self.train_epochs,
            "num_train_examples": self.num_examples,
            "num_unlabeled_train_examples": self.num_unlabeled(),
            # Passes over the training records to count them or select labels (0 when the
            # pipeline's statistics sized every split and no label subset was asked for).
            "counting_passes": self.records.reads,
        }
        with tf.io.gfile.GFile(path, "w") as f:
            json.dump({**summary, **metrics, "seconds": seconds}, f, indent=2)

    def build_optimizer(self) -> keras.optimizers.Optimizer:
        t = self.config.train
        schedule = WarmUpAndCosineDecay(
            base_learning_rate=t.learning_rate,
            num_examples=self.num_examples,
            train_batch_size=self.batch_size,
            warmup_epochs=t.warmup_epochs,
            total_steps=self.total_steps,
            learning_rate_scaling=t.learning_rate_scaling,
        )
        optimizer = build_optimizer(t.optimizer, schedule, t.momentum, t.weight_decay, t.eeta)
        return wrap_optimizer(optimizer, self.config.runtime.mixed_precision)

    def build_metrics(self) -> dict[str, keras.metrics.Mean]:
        return make_metrics(self.metric_names)

    def weight_decay(self, model: keras.Model) -> tf.Tensor:
        t = self.config.train
        return weight_decay_loss(model.trainable_variables, t.weight_decay, t.optimizer)

    def train_step(
        self,
        model: SimCLRModel,
        optimizer: keras.optimizers.Optimizer,
        metrics: dict[str, keras.metrics.Mean],
    ) -> Callable[..., None]:
        """The replica step of every stage, called with one element of the stage's dataset:
        total_loss = the weighted sum of the `loss_weights` terms + weight decay; every term is
        recorded unweighted under its own name, with `total_loss` and `weight_decay`."""
        stage, weights = self.config.stage, dict(self.loss_weights)
        if not weights:
            raise ValueError(f"{stage}: loss_weights names no loss to train on")
        missing = [n for n in ("total_loss", "weight_decay", *weights) if n not in metrics]
        if missing:
            raise ValueError(f"{stage}: no metric records {', '.join(missing)}")

        def step(*batch: tf.Tensor) -> None:
            batch = self.prepare(batch)
            with tf.GradientTape() as tape:
                terms = self.losses(model, batch, training=True)
                unrecorded = sorted(set(weights) - set(terms)) + sorted(set(terms) - set(metrics))
                if unrecorded:
                    raise ValueError(
                        f"{stage}: losses() and metric_names disagree on {', '.join(unrecorded)}"
                    )
                wd = self.weight_decay(model)
                total = weighted_sum(terms, weights) + wd
                scaled = scale_loss(optimizer, total)
            apply_gradients(tape, scaled, model, optimizer)
            record(metrics, total_loss=total, weight_decay=wd, **terms)

        return step


def fit_batch(batch: int, examples: int, num_replicas: int) -> int:
    """`batch`, or when the examples are fewer, the largest batch of whole replicas they fill
    (at least one example per replica)."""
    if batch <= examples:
        return batch
    return max(num_replicas, examples // num_replicas * num_replicas)


def weighted_sum(terms: Mapping[str, tf.Tensor], weights: Mapping[str, float]) -> tf.Tensor:
    """Sum of weight * term over `weights`, in their order (a weight of 1 leaves its term as it
    is)."""
    parts = [terms[n] if w == 1.0 else w * terms[n] for n, w in weights.items()]
    return sum(parts[1:], parts[0])


def make_metrics(names: tuple[str, ...]) -> dict[str, keras.metrics.Mean]:
    """Running means, reset at every summary; create them inside the strategy scope."""
    return {name: keras.metrics.Mean(f"train/{name}") for name in names}


def record(metrics: dict[str, keras.metrics.Mean], **values: tf.Tensor) -> None:
    """Adds this step's values to the running means of the same names."""
    for name, value in values.items():
        metrics[name].update_state(value)


def scale_loss(optimizer: keras.optimizers.Optimizer, loss: tf.Tensor) -> tf.Tensor:
    """The replica's share of a replica-local mean loss (gradients are summed across replicas),
    loss-scaled for float16. Call it inside the tape."""
    scaled = loss / tf.distribute.get_strategy().num_replicas_in_sync
    if isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer):
        scaled = optimizer.get_scaled_loss(scaled)
    return scaled


def apply_gradients(
    tape: tf.GradientTape, scaled_loss: tf.Tensor, model: keras.Model, optimizer
) -> None:
    """Applies the gradients of `scale_loss`'s output.

    Variables without a gradient (projection layers above ft_proj_selector while fine-tuning)
    are left out rather than updated with zeros.
    """
    variables = model.trainable_variables
    grads = tape.gradient(scaled_loss, variables)
    if isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer):
        grads = optimizer.get_unscaled_gradients(grads)
    optimizer.apply_gradients(
        [(g, v) for g, v in zip(grads, variables, strict=True) if g is not None]
    )
