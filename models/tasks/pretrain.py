"""Pretraining: NT-Xent on two augmented views, with an online linear probe on frozen features."""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf
import tf_keras as keras

from models import data as data_lib
from models import export, knn
from models.config import PretrainConfig, TrainerConfig
from models.loss import contrastive_metrics, nt_xent_loss, partially_labeled_loss
from models.model import SimCLRModel
from models.optimizers import weight_decay_loss
from models.schedule import total_train_steps
from models.tasks.base import (
    StageInputs,
    Task,
    apply_gradients,
    make_metrics,
    record,
    scale_loss,
)

METRIC_NAMES = (
    "total_loss",
    "contrast_loss",
    "contrast_acc",
    "contrast_entropy",
    "supervised_loss",
    "supervised_acc",
    "weight_decay",
)


def contrastive_step(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    metrics: dict[str, keras.metrics.Mean],
    train: PretrainConfig,
) -> Callable:
    """Replica step: contrastive loss on two views (+ the linear probe on stop-gradient)."""

    def step(view1: tf.Tensor, view2: tf.Tensor, labels: tf.Tensor) -> None:
        images = tf.concat([view1, view2], axis=0)
        with tf.GradientTape() as tape:
            outputs = model(images, training=True)
            hidden = tf.cast(outputs["proj_head_output"], tf.float32)
            con = nt_xent_loss(hidden, temperature=train.temperature, hidden_norm=train.hidden_norm)
            loss = con.loss
            if train.lineareval_while_pretraining:
                # Only images with a label train the probe; the unlabeled pool's carry -1.
                sup_loss, sup_acc = partially_labeled_loss(
                    tf.concat([labels, labels], 0), outputs["logits_sup"]
                )
                loss += sup_loss
                record(metrics, supervised_loss=sup_loss, supervised_acc=sup_acc)
            wd = weight_decay_loss(model.trainable_variables, train.weight_decay, train.optimizer)
            loss += wd
            scaled = scale_loss(optimizer, loss)
        apply_gradients(tape, scaled, model, optimizer)
        # As the reference logs them: over view-1 anchors against the view-2 block only.
        half = tf.shape(con.logits)[1] // 2
        stats = contrastive_metrics(con.logits[:, :half], con.labels[:, :half])
        record(metrics, total_loss=loss, contrast_loss=con.loss, weight_decay=wd, **stats)

    return step


def pretrain_metrics() -> dict[str, keras.metrics.Mean]:
    """The step's metrics (create them inside the strategy scope)."""
    return make_metrics(METRIC_NAMES)


class PretrainTask(Task):
    """With a base model (--warm_start resolved an earlier run's pretrained model) the encoder
    starts from it, on a fresh schedule of `warm_start_epochs`; otherwise from scratch."""

    metric_names = METRIC_NAMES

    def __init__(self, config: TrainerConfig, inputs: StageInputs, num_replicas: int = 1):
        super().__init__(config, inputs, num_replicas)
        t = config.train
        if self.warm_started and t.warm_start_epochs:
            self.train_epochs = t.warm_start_epochs
            self.total_steps = total_train_steps(
                self.num_examples, self.batch_size, self.train_epochs, 0
            )

    @property
    def warm_started(self) -> bool:
        return bool(self.inputs.base_model)

    def initialize(self, model: SimCLRModel) -> None:
        """Backbone and projection head (weights and batch-norm statistics) of the base model;
        the online probe starts afresh, as its classes may have changed."""
        if not self.warm_started:
            if self.config.train.warm_start:
                print("pretrain: --warm_start found no earlier pretrained model", flush=True)
            return
        export.restore_backbone(model, self.inputs.base_model)
        t = self.config.train
        epochs = (
            "" if t.train_steps and not t.warm_start_epochs else f" ({self.train_epochs} epochs)"
        )
        print(
            f"pretrain: warm start from {self.inputs.base_model}; a fresh schedule of "
            f"{self.total_steps} steps{epochs}",
            flush=True,
        )

    def write_results(self, path: str, metrics: dict[str, float], seconds: dict) -> None:
        started = {"warm_start_from": self.inputs.base_model} if self.warm_started else {}
        super().write_results(path, {**metrics, **started}, seconds)

    @property
    def evaluates(self) -> bool:  # the probe is the only supervised head pretraining has
        return self.config.train.lineareval_while_pretraining

    eval_label = "pretrain (online linear probe)"

    def build_model(self) -> SimCLRModel:
        return SimCLRModel(
            self.config.model,
            self.inputs.num_classes,
            self.config.input.image_size,
            pretraining=True,
        )

    def build_inputs(self, ctx: tf.distribute.InputContext, skip: int) -> tf.data.Dataset:
        return self.dataset(ctx, skip, contrastive=True)

    def train_step(self, model, optimizer, metrics) -> Callable:
        return contrastive_step(model, optimizer, metrics, self.config.train)

    def monitor(self, model: SimCLRModel, checkpoint_every: int) -> knn.KnnMonitor | None:
        every = self.config.train.knn_every_epochs
        if every <= 0:
            return None
        return knn.KnnMonitor(
            model,
            data_lib.labeled_split_files(self.inputs.train_files),  # the bank needs labels
            self.inputs.eval_files,
            self.spec,
            batch_size=self.config.runtime.eval_batch_size,
            num_classes=self.inputs.num_classes,
            every_steps=every * self.epoch_steps,
            checkpoint_every=checkpoint_every,
            total_steps=self.total_steps,
            starts_trained=self.warm_started,
        )
