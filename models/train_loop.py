"""The custom training loop: GradientTape steps under a tf.distribute strategy, with
checkpoint/resume, TensorBoard summaries and a progress line.

Not `model.fit`: SimCLR needs two views per image, a loss over the global batch (negatives
gathered across replicas) and per-optimizer weight decay, as in the reference.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import tensorflow as tf
import tf_keras as keras

from models.loss import contrastive_metrics, nt_xent_loss
from models.optimizers import weight_decay_loss

log = logging.getLogger(__name__)

METRIC_NAMES = {
    "pretrain": (
        "total_loss",
        "contrast_loss",
        "contrast_acc",
        "contrast_entropy",
        "supervised_loss",
        "supervised_acc",
        "weight_decay",
    ),
    "finetune": ("total_loss", "supervised_loss", "supervised_acc", "weight_decay"),
    "distill": ("total_loss", "distill_loss", "supervised_loss", "supervised_acc", "weight_decay"),
}


@dataclass(frozen=True)
class LoopSettings:
    stage: str
    total_steps: int
    checkpoint_every: int
    log_every: int
    global_batch_size: int
    keep_checkpoint_max: int
    jit_compile: bool = False


def make_metrics(stage: str) -> dict[str, keras.metrics.Mean]:
    """Running means, reset at every summary; create them inside the strategy scope."""
    return {name: keras.metrics.Mean(f"train/{name}") for name in METRIC_NAMES[stage]}


def _supervised(labels: tf.Tensor, logits: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    logits = tf.cast(logits, tf.float32)
    loss = tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    )
    acc = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, -1), labels), tf.float32))
    return loss, acc


def _scale(optimizer: keras.optimizers.Optimizer, loss: tf.Tensor) -> tf.Tensor:
    if isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer):
        return optimizer.get_scaled_loss(loss)
    return loss


def _apply_gradients(tape: tf.GradientTape, loss: tf.Tensor, model: keras.Model, optimizer) -> None:
    """Gradients of the replica's share of the loss; the optimizer sums them across replicas.

    Variables without a gradient (projection layers above ft_proj_selector while fine-tuning)
    are left out rather than updated with zeros.
    """
    variables = model.trainable_variables
    grads = tape.gradient(loss, variables)
    if isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer):
        grads = optimizer.get_unscaled_gradients(grads)
    optimizer.apply_gradients(
        [(g, v) for g, v in zip(grads, variables, strict=True) if g is not None]
    )


def pretrain_step(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    metrics: dict[str, keras.metrics.Mean],
    *,
    temperature: float,
    hidden_norm: bool,
    lineareval: bool,
    weight_decay: float,
    optimizer_name: str,
) -> Callable:
    """Replica step: contrastive loss on two views (+ linear eval head on stop-gradient)."""

    def step(view1: tf.Tensor, view2: tf.Tensor, labels: tf.Tensor) -> None:
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        images = tf.concat([view1, view2], axis=0)
        with tf.GradientTape() as tape:
            outputs = model(images, training=True)
            hidden = tf.cast(outputs["proj_head_output"], tf.float32)
            con = nt_xent_loss(hidden, temperature=temperature, hidden_norm=hidden_norm)
            loss = con.loss
            if lineareval:
                sup_loss, sup_acc = _supervised(
                    tf.concat([labels, labels], 0), outputs["logits_sup"]
                )
                loss += sup_loss
                metrics["supervised_loss"].update_state(sup_loss)
                metrics["supervised_acc"].update_state(sup_acc)
            wd = weight_decay_loss(model.trainable_variables, weight_decay, optimizer_name)
            loss += wd
            scaled = _scale(optimizer, loss / replicas)
        _apply_gradients(tape, scaled, model, optimizer)
        # As the reference logs them: over view-1 anchors against the view-2 block only.
        half = tf.shape(con.logits)[1] // 2
        stats = contrastive_metrics(con.logits[:, :half], con.labels[:, :half])
        metrics["total_loss"].update_state(loss)
        metrics["contrast_loss"].update_state(con.loss)
        metrics["contrast_acc"].update_state(stats["contrast_acc"])
        metrics["contrast_entropy"].update_state(stats["contrast_entropy"])
        metrics["weight_decay"].update_state(wd)

    return step


def finetune_step(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    metrics: dict[str, keras.metrics.Mean],
    *,
    weight_decay: float,
    optimizer_name: str,
) -> Callable:
    """Replica step: cross-entropy of the supervised head."""

    def step(images: tf.Tensor, labels: tf.Tensor) -> None:
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            outputs = model(images, training=True)
            sup_loss, sup_acc = _supervised(labels, outputs["logits_sup"])
            wd = weight_decay_loss(model.trainable_variables, weight_decay, optimizer_name)
            loss = sup_loss + wd
            scaled = _scale(optimizer, loss / replicas)
        _apply_gradients(tape, scaled, model, optimizer)
        metrics["total_loss"].update_state(loss)
        metrics["supervised_loss"].update_state(sup_loss)
        metrics["supervised_acc"].update_state(sup_acc)
        metrics["weight_decay"].update_state(wd)

    return step


def distill_step(
    model: keras.Model,
    teacher,
    optimizer: keras.optimizers.Optimizer,
    metrics: dict[str, keras.metrics.Mean],
    *,
    temperature: float,
    label_weight: float,
    weight_decay: float,
    optimizer_name: str,
) -> Callable:
    """Replica step of SimCLRv2 distillation: T^2 * CE(softmax(teacher/T), student/T).

    The teacher (a loaded SavedModel, called as `teacher(images, trainable=False)`) labels every
    image; examples with label -1 are unlabeled and skip the optional label loss.
    """

    def step(images: tf.Tensor, labels: tf.Tensor) -> None:
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        teacher_logits = tf.cast(teacher(images, trainable=False)["logits_sup"], tf.float32)
        targets = tf.nn.softmax(teacher_logits / temperature)
        with tf.GradientTape() as tape:
            logits = tf.cast(model(images, training=True)["logits_sup"], tf.float32)
            distill = temperature**2 * tf.reduce_mean(
                tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=logits / temperature)
            )
            labeled = labels >= 0
            n_labeled = tf.reduce_sum(tf.cast(labeled, tf.float32))
            per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=tf.maximum(labels, 0), logits=logits
            )
            sup_loss = tf.math.divide_no_nan(
                tf.reduce_sum(tf.where(labeled, per_example, 0.0)), n_labeled
            )
            wd = weight_decay_loss(model.trainable_variables, weight_decay, optimizer_name)
            loss = distill + label_weight * sup_loss + wd
            scaled = _scale(optimizer, loss / replicas)
        _apply_gradients(tape, scaled, model, optimizer)
        correct = tf.cast(tf.equal(tf.argmax(logits, -1), labels), tf.float32)
        metrics["total_loss"].update_state(loss)
        metrics["distill_loss"].update_state(distill)
        metrics["supervised_loss"].update_state(sup_loss)
        metrics["supervised_acc"].update_state(
            tf.math.divide_no_nan(tf.reduce_sum(tf.where(labeled, correct, 0.0)), n_labeled)
        )
        metrics["weight_decay"].update_state(wd)

    return step


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def run(
    strategy: tf.distribute.Strategy,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    step_fn: Callable,
    make_dataset: Callable[[tf.distribute.InputContext, int], tf.data.Dataset],
    metrics: dict[str, keras.metrics.Mean],
    settings: LoopSettings,
    checkpoint_dir: str,
    summary_dir: str,
    on_checkpoint: Callable[[int], dict[str, float]] | None = None,
) -> int:
    """Trains to settings.total_steps, resuming from the newest checkpoint in checkpoint_dir.

    make_dataset(input_context, skip_examples) builds one replica group's input; on resume it
    skips the examples already consumed so the record order continues where it stopped.
    Checkpoints are complete before CheckpointManager records them, so a kill mid-write never
    replaces the last good one. Returns the final step.
    """
    with strategy.scope():
        global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, global_step=global_step)
    manager = tf.train.CheckpointManager(
        checkpoint, checkpoint_dir, max_to_keep=settings.keep_checkpoint_max
    )
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).expect_partial()
        log.info("Restored %s at step %d", manager.latest_checkpoint, int(global_step.numpy()))
        print(
            f"{settings.stage}: resuming from {manager.latest_checkpoint} "
            f"(step {int(global_step.numpy())})",
            flush=True,
        )
    start = int(global_step.numpy())
    skip = start * settings.global_batch_size
    dataset = strategy.distribute_datasets_from_function(lambda ctx: make_dataset(ctx, skip))
    iterator = iter(dataset)

    # XLA compiles the replica step only; the loop around it keeps the iterator outside XLA.
    replica_step = tf.function(step_fn, jit_compile=True) if settings.jit_compile else step_fn

    @tf.function
    def train_steps(iterator, steps: tf.Tensor) -> None:
        for _ in tf.range(steps):
            strategy.run(replica_step, args=next(iterator))
            global_step.assign_add(1)

    writer = tf.summary.create_file_writer(summary_dir)
    step = start
    last_time, last_step = time.perf_counter(), step
    t_start = last_time
    while step < settings.total_steps:
        boundary = min(
            settings.total_steps,
            (step // settings.log_every + 1) * settings.log_every,
            (step // settings.checkpoint_every + 1) * settings.checkpoint_every,
        )
        train_steps(iterator, tf.constant(boundary - step))
        step = int(global_step.numpy())
        now = time.perf_counter()
        # Metrics no step updated (supervised ones without online linear eval) are not reported.
        values = {
            name: float(m.result().numpy()) for name, m in metrics.items() if m.count.numpy() > 0
        }
        lr = optimizer.learning_rate
        # Under a strategy the optimizer's current rate is a MirroredVariable, which float()
        # rejects; reading it as a tensor takes the local copy.
        lr_value = float(tf.convert_to_tensor(lr(step) if callable(lr) else lr))
        with writer.as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(f"train/{name}", value)
            tf.summary.scalar("learning_rate", lr_value)
        for m in metrics.values():
            m.reset_state()
        if step % settings.log_every == 0 or step == settings.total_steps:
            rate = (step - last_step) * settings.global_batch_size / max(now - last_time, 1e-9)
            eta = (settings.total_steps - step) * (now - t_start) / max(step - start, 1)
            shown = " | ".join(
                f"{k} {v:.4f}"
                for k, v in values.items()
                if k
                in ("total_loss", "contrast_loss", "contrast_acc", "distill_loss", "supervised_acc")
            )
            print(
                f"{settings.stage} step {step}/{settings.total_steps} | {shown} | "
                f"lr {lr_value:.4g} | {rate:.1f} img/s | ETA {_format_eta(eta)}",
                flush=True,
            )
            last_time, last_step = now, step
        if step % settings.checkpoint_every == 0 or step == settings.total_steps:
            manager.save(checkpoint_number=step)
            if on_checkpoint is not None:
                extra = on_checkpoint(step)
                with writer.as_default(step=step):
                    for name, value in extra.items():
                        tf.summary.scalar(name, value)
                if extra:
                    print(
                        f"{settings.stage} step {step}: "
                        + ", ".join(f"{k} {v:.4f}" for k, v in extra.items()),
                        flush=True,
                    )
    writer.flush()
    return step


def evaluate(model: keras.Model, dataset: tf.data.Dataset) -> dict[str, float]:
    """Top-1 / top-5 accuracy of the supervised head over one pass of `dataset`."""

    @tf.function
    def batch_stats(images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        logits = tf.cast(model(images, training=False)["logits_sup"], tf.float32)
        k = min(5, int(logits.shape[-1]))
        top1 = tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, logits, 1), tf.float32))
        top5 = tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, logits, k), tf.float32))
        return tf.stack([top1, top5, tf.cast(tf.shape(labels)[0], tf.float32)])

    totals = tf.zeros([3])
    for images, labels in dataset:
        totals += batch_stats(images, labels)
    top1, top5, count = (float(x) for x in totals.numpy())
    if count == 0:
        raise ValueError("the evaluation split is empty")
    return {
        "eval/label_top_1_accuracy": top1 / count,
        "eval/label_top_5_accuracy": top5 / count,
        "eval/num_examples": count,
    }
