"""Pretraining: NT-Xent on two augmented views, with an online linear probe on frozen features."""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf
import tf_keras as keras

from models import knn
from models.config import PretrainConfig
from models.loss import contrastive_metrics, nt_xent_loss, supervised_loss
from models.model import SimCLRModel
from models.optimizers import weight_decay_loss
from models.tasks.base import Task, apply_gradients, make_metrics, record, scale_loss

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
                sup_loss, sup_acc = supervised_loss(
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
    metric_names = METRIC_NAMES

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
            self.inputs.train_files,
            self.inputs.eval_files,
            self.spec,
            batch_size=self.config.runtime.eval_batch_size,
            num_classes=self.inputs.num_classes,
            every_steps=every * self.epoch_steps,
            checkpoint_every=checkpoint_every,
            total_steps=self.total_steps,
        )
