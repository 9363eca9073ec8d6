"""Distillation (SimCLRv2's third step): the fine-tuned teacher labels every training image and
a student (possibly smaller) learns its softened predictions."""

from __future__ import annotations

import tensorflow as tf

from models.loss import distillation_loss, partially_labeled_loss
from models.model import SimCLRModel
from models.tasks.base import Task

METRIC_NAMES = ("total_loss", "distill_loss", "supervised_loss", "supervised_acc", "weight_decay")
PROGRESS_METRICS = ("total_loss", "distill_loss", "supervised_acc")


class DistillTask(Task):
    metric_names = METRIC_NAMES
    progress_metrics = PROGRESS_METRICS
    teacher = None

    def initialize(self, model: SimCLRModel) -> None:
        self.teacher = tf.saved_model.load(self.inputs.base_model)
        print(f"distill: teacher {self.inputs.base_model}", flush=True)

    def build_inputs(self, ctx: tf.distribute.InputContext, skip: int) -> tf.data.Dataset:
        # Every image; labels outside the labeled subset become -1 (used only by the label loss).
        return self.dataset(ctx, skip, contrastive=False, labeled_keys=self.labeled_keys)

    @property
    def loss_weights(self) -> dict[str, float]:
        """The teacher's soft labels, plus the true labels at --distill_label_weight."""
        return {
            "distill_loss": 1.0,
            "supervised_loss": self.config.train.distill_label_weight,
        }

    def prepare(self, batch: tuple[tf.Tensor, ...]) -> tuple[tf.Tensor, ...]:
        """Appends the teacher's logits, computed outside the gradient tape."""
        images, labels = batch
        return images, labels, self.teacher(images, trainable=False)["logits_sup"]

    def losses(
        self, model: SimCLRModel, batch: tuple[tf.Tensor, ...], training: bool
    ) -> dict[str, tf.Tensor]:
        images, labels, teacher_logits = batch
        logits = model(images, training=training)["logits_sup"]
        t = self.config.train
        distill = distillation_loss(teacher_logits, logits, t.distill_temperature)
        sup_loss, sup_acc = partially_labeled_loss(labels, logits)
        return {"distill_loss": distill, "supervised_loss": sup_loss, "supervised_acc": sup_acc}
