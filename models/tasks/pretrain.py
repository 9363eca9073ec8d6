"""Pretraining: NT-Xent on two augmented views, with an online linear probe on frozen features."""

from __future__ import annotations

import tensorflow as tf

from models import data as data_lib
from models import export, knn
from models.config import TrainerConfig
from models.loss import contrastive_metrics, nt_xent_loss, partially_labeled_loss
from models.model import SimCLRModel
from models.schedule import total_train_steps
from models.split_records import SplitRecords
from models.tasks.base import StageInputs, Task

METRIC_NAMES = (
    "total_loss",
    "contrast_loss",
    "contrast_acc",
    "contrast_entropy",
    "supervised_loss",
    "supervised_acc",
    "weight_decay",
)
PROGRESS_METRICS = ("total_loss", "contrast_loss", "contrast_acc", "supervised_acc")


class PretrainTask(Task):
    """With a base model (--warm_start resolved an earlier run's pretrained model) the encoder
    starts from it, on a fresh schedule of `warm_start_epochs`; otherwise from scratch."""

    metric_names = METRIC_NAMES
    supervised = False
    progress_metrics = PROGRESS_METRICS

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

    @property
    def loss_weights(self) -> dict[str, float]:
        """The contrastive loss, plus the online probe's (on stop-gradient features) when on."""
        weights = {"contrast_loss": 1.0}
        if self.config.train.lineareval_while_pretraining:
            weights["supervised_loss"] = 1.0
        return weights

    def losses(
        self, model: SimCLRModel, batch: tuple[tf.Tensor, ...], training: bool
    ) -> dict[str, tf.Tensor]:
        """NT-Xent on the two views stacked as [view1; view2] (+ the probe's cross-entropy)."""
        view1, view2, labels = batch
        t = self.config.train
        outputs = model(tf.concat([view1, view2], axis=0), training=training)
        hidden = tf.cast(outputs["proj_head_output"], tf.float32)
        con = nt_xent_loss(hidden, temperature=t.temperature, hidden_norm=t.hidden_norm)
        # As the reference logs them: over view-1 anchors against the view-2 block only.
        half = tf.shape(con.logits)[1] // 2
        logits = tf.stop_gradient(con.logits[:, :half])
        terms = {"contrast_loss": con.loss, **contrastive_metrics(logits, con.labels[:, :half])}
        if t.lineareval_while_pretraining:
            # Only images with a label train the probe; the unlabeled pool's carry -1.
            sup_loss, sup_acc = partially_labeled_loss(
                tf.concat([labels, labels], 0), outputs["logits_sup"]
            )
            terms.update(supervised_loss=sup_loss, supervised_acc=sup_acc)
        return terms

    def monitor(self, model: SimCLRModel, checkpoint_every: int) -> knn.KnnMonitor | None:
        every = self.config.train.knn_every_epochs
        if every <= 0:
            return None
        bank = SplitRecords(  # the bank needs labels: the labeled splits
            data_lib.labeled_split_files(self.inputs.train_files), self.inputs.split_sizes
        )
        return knn.KnnMonitor(
            model,
            bank.files,
            self.inputs.eval_files,
            self.spec,
            batch_size=self.config.runtime.eval_batch_size,
            num_classes=self.inputs.num_classes,
            every_steps=every * self.epoch_steps,
            checkpoint_every=checkpoint_every,
            total_steps=self.total_steps,
            starts_trained=self.warm_started,
            bank_size=bank.count if bank.sized else None,
        )
