"""Distillation (SimCLRv2's third step): the fine-tuned teacher labels every training image and
a student (possibly smaller) learns its softened predictions."""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from models.loss import distillation_loss, partially_labeled_loss
from models.model import SimCLRModel
from models.tasks.base import Task, apply_gradients, record, scale_loss

METRIC_NAMES = ("total_loss", "distill_loss", "supervised_loss", "supervised_acc", "weight_decay")


class DistillTask(Task):
    metric_names = METRIC_NAMES
    teacher = None

    def build_model(self) -> SimCLRModel:
        # config.model is the student's network (the pipeline sets its depth and width).
        return SimCLRModel(
            self.config.model,
            self.inputs.num_classes,
            self.config.input.image_size,
            pretraining=False,
        )

    def initialize(self, model: SimCLRModel) -> None:
        self.teacher = tf.saved_model.load(self.inputs.base_model)
        print(f"distill: teacher {self.inputs.base_model}", flush=True)

    def build_inputs(self, ctx: tf.distribute.InputContext, skip: int) -> tf.data.Dataset:
        # Every image; labels outside the labeled subset become -1 (used only by the label loss).
        return self.dataset(ctx, skip, contrastive=False, labeled_keys=self.labeled_keys)

    def train_step(self, model, optimizer, metrics) -> Callable:
        t, teacher = self.config.train, self.teacher

        def step(images: tf.Tensor, labels: tf.Tensor) -> None:
            teacher_logits = teacher(images, trainable=False)["logits_sup"]
            with tf.GradientTape() as tape:
                logits = model(images, training=True)["logits_sup"]
                distill = distillation_loss(teacher_logits, logits, t.distill_temperature)
                sup_loss, sup_acc = partially_labeled_loss(labels, logits)
                wd = self.weight_decay(model)
                loss = distill + t.distill_label_weight * sup_loss + wd
                scaled = scale_loss(optimizer, loss)
            apply_gradients(tape, scaled, model, optimizer)
            record(
                metrics,
                total_loss=loss,
                distill_loss=distill,
                supervised_loss=sup_loss,
                supervised_acc=sup_acc,
                weight_decay=wd,
            )

        return step
