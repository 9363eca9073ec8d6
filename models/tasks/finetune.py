"""Fine-tuning: the supervised head (and the unfrozen layers) on labeled images, crop+flip only.

The stage follows one of the reference README's two protocols, named so every accuracy says
which one produced it (`PROTOCOLS`).
The protocols' recipes are the stage's defaults and live with its config schema
(`models.config.PROTOCOLS`), so the command line reads them without loading TensorFlow.
"""

from __future__ import annotations

from types import MappingProxyType

import numpy as np
import tensorflow as tf

from models import export
from models.loss import supervised_loss
from models.model import SavedModelBackbone, SimCLRModel, import_projection_head
from models.tasks.base import Task

METRIC_NAMES = ("total_loss", "supervised_loss", "supervised_acc", "weight_decay")
PROGRESS_METRICS = ("total_loss", "supervised_acc")


class FinetuneTask(Task):
    metric_names = METRIC_NAMES
    progress_metrics = PROGRESS_METRICS
    loss_weights = MappingProxyType({"supervised_loss": 1.0})

    def training_keys(self) -> np.ndarray | None:
        if self.labeled_keys is None and self.records.unlabeled:
            labels, keys = self.records.labels_and_keys
            return keys[labels >= 0]  # never fine-tune on label -1
        return self.labeled_keys

    @property
    def eval_label(self) -> str:
        return f"finetune ({self.config.train.finetune_protocol})"

    @property
    def imported(self) -> bool:
        """The base model is a released-format SavedModel (--checkpoint), not our pretraining."""
        return self.config.train.checkpoint != ""

    def build_model(self) -> SimCLRModel:
        t = self.config.train
        backbone = None
        if self.imported:
            if 0 <= t.fine_tune_after_block <= 3:
                raise ValueError(
                    "--fine_tune_after_block: an imported --checkpoint backbone trains whole "
                    f"(-1) or stays frozen (4); {t.fine_tune_after_block} is not supported"
                )
            backbone = SavedModelBackbone(
                self.inputs.base_model, frozen=t.fine_tune_after_block >= 4
            )
            print(f"finetune: backbone imported from {self.inputs.base_model}", flush=True)
        return SimCLRModel(
            self.config.model,
            self.inputs.num_classes,
            self.config.input.image_size,
            pretraining=False,
            fine_tune_after_block=t.fine_tune_after_block,
            zero_init_logits_layer=t.zero_init_logits_layer,
            backbone=backbone,
        )

    def initialize(self, model: SimCLRModel) -> None:
        base = self.inputs.base_model
        if not base:
            return
        if self.imported:
            copied = import_projection_head(
                model.projection_head, base, self.config.model.ft_proj_selector
            )
            if copied:
                print(f"finetune: {copied} projection-head layer(s) imported", flush=True)
        else:
            export.restore_backbone(model, base)
            print(f"finetune: backbone restored from {base}", flush=True)

    def build_inputs(self, ctx: tf.distribute.InputContext, skip: int) -> tf.data.Dataset:
        return self.dataset(ctx, skip, contrastive=False, keep_keys=self.labeled_keys)

    def losses(
        self, model: SimCLRModel, batch: tuple[tf.Tensor, ...], training: bool
    ) -> dict[str, tf.Tensor]:
        """Cross-entropy of the supervised head."""
        images, labels = batch
        outputs = model(images, training=training)
        sup_loss, sup_acc = supervised_loss(labels, outputs["logits_sup"])
        return {"supervised_loss": sup_loss, "supervised_acc": sup_acc}
