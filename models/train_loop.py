"""The custom training loop: GradientTape steps under a tf.distribute strategy, with
checkpoint/resume, TensorBoard summaries, a progress line and wall time per phase.

Not `model.fit`: SimCLR needs two views per image, a loss over the global batch (negatives
gathered across replicas) and per-optimizer weight decay, as in the reference.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import tensorflow as tf
import tf_keras as keras

log = logging.getLogger(__name__)

# Beside a stage's checkpoints: the stage that wrote them. Every stage's network has the same
# variables (backbone, projection head, supervised head), so a checkpoint of another stage would
# otherwise restore whole, step count included.
STAGE_FILE = "stage.txt"


@dataclass(frozen=True)
class LoopSettings:
    stage: str
    total_steps: int
    checkpoint_every: int
    log_every: int
    global_batch_size: int
    keep_checkpoint_max: int
    # The metrics the progress line shows, in the order the metrics dict lists them.
    progress_metrics: tuple[str, ...]
    jit_compile: bool = False


class PhaseClock:
    """Wall seconds per named phase of a Trainer stage, summed over every entry into a phase.

    What is not training (start-up, tracing, evaluation, export) is what a small run spends
    most of its time on, so each stage reports where its wall time went. Phases must not nest;
    `total()` is the wall time since the clock was made, so `total() - sum(seconds)` is what no
    phase covered.
    """

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - begin

    def timed(self, name: str, fn: Callable) -> Callable:
        """`fn` with each call counted in phase `name`."""

        def call(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)

        return call

    def total(self) -> float:
        return time.perf_counter() - self.started

    def summary(self, order: tuple[str, ...] = ()) -> dict[str, float]:
        """Seconds per phase (`order` first, each listed one present, zero if never entered),
        then `total`."""
        phases = {name: self.seconds.get(name, 0.0) for name in order}
        phases.update({k: v for k, v in self.seconds.items() if k not in phases})
        return {**phases, "total": self.total()}


def format_seconds(stage: str, seconds: dict[str, float]) -> str:
    """One line: `<stage>: seconds setup 1.2 | build 3.4 | ... | total 20.5`."""
    return f"{stage}: seconds " + " | ".join(f"{k} {v:.1f}" for k, v in seconds.items())


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def restore_whole(checkpoint: tf.train.Checkpoint, path: str, stage: str) -> None:
    """Restores `path` into every variable that exists now, or fails with one line.

    A checkpoint of other code (a renamed layer, another head) would otherwise restore the
    variables it shares with this model and leave the rest initialized, silently. Values in
    the checkpoint that nothing here reads yet (optimizer slots, created at the first step)
    are restored when they are created. A checkpoint written by another stage is refused too
    (`STAGE_FILE`).
    """
    marker = os.path.join(os.path.dirname(path), STAGE_FILE)
    if tf.io.gfile.exists(marker):
        with tf.io.gfile.GFile(marker) as f:
            written_by = f.read().strip()
        if written_by != stage:
            raise ValueError(
                f"{stage}: checkpoint {path} was written by the {written_by} stage; remove its "
                "directory to train afresh"
            )
    try:
        checkpoint.restore(path).expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError) as e:  # missing variables; other shapes
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{stage}: checkpoint {path} does not match this model ({first[:200]}); remove "
            "its directory to train afresh"
        ) from None


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
    restore_dir: str = "",
    on_start: Callable[[int], dict[str, float]] | None = None,
    clock: PhaseClock | None = None,
) -> int:
    """Trains to settings.total_steps, resuming from the newest checkpoint in restore_dir.

    Checkpoints are written to checkpoint_dir; restore_dir (default: the same) differs only on
    multi-worker non-chief workers, which write to scratch but restore what the chief wrote.

    make_dataset(input_context, skip_examples) builds one replica group's input; on resume it
    skips the examples already consumed so the record order continues where it stopped.
    Checkpoints are complete before CheckpointManager records them, so a kill mid-write never
    replaces the last good one. Returns the final step.

    on_start(step) runs once after the restore, with the step training starts from (0 unless
    resumed); on_checkpoint(step) after each checkpoint. The scalars either returns are logged
    at that step and printed. `clock` receives the loop's phases: build (checkpoint restore),
    setup (input pipeline, summary writer), trace (the first step, alone, so that tracing is
    not counted as training), train (the other steps and their summaries) and checkpoint.
    """
    clock = clock or PhaseClock()
    with clock.phase("build"):
        checkpoint, global_step = _checkpoint(strategy, model, optimizer)
        manager = tf.train.CheckpointManager(
            checkpoint, checkpoint_dir, max_to_keep=settings.keep_checkpoint_max
        )
        start = _restore(checkpoint, global_step, restore_dir or checkpoint_dir, settings.stage)
        _mark_stage(checkpoint_dir, settings.stage)
    with clock.phase("setup"):
        skip = start * settings.global_batch_size
        dataset = strategy.distribute_datasets_from_function(lambda ctx: make_dataset(ctx, skip))
        iterator = iter(dataset)
        writer = tf.summary.create_file_writer(summary_dir)
    train_steps = _steps_function(strategy, step_fn, global_step, settings.jit_compile)

    def report(step: int, extra: dict[str, float]) -> None:
        with writer.as_default(step=step):
            for name, value in extra.items():
                tf.summary.scalar(name, value)
        if extra:
            print(
                f"{settings.stage} step {step}: "
                + ", ".join(f"{k} {v:.4f}" for k, v in extra.items()),
                flush=True,
            )

    if on_start is not None:
        report(start, on_start(start))
    step, progress = start, _Progress(settings, start)
    traced = False
    while step < settings.total_steps:
        remaining = _next_boundary(step, settings) - step
        if not traced:
            # The same traced function as every later call (the count is a tensor).
            with clock.phase("trace"):
                train_steps(iterator, tf.constant(1))
                step = int(global_step.numpy())
            traced, remaining = True, remaining - 1
        with clock.phase("train"):
            if remaining:
                train_steps(iterator, tf.constant(remaining))
            step = int(global_step.numpy())
            values, lr_value = _write_summaries(writer, metrics, optimizer, step)
            if step % settings.log_every == 0 or step == settings.total_steps:
                progress.print(step, values, lr_value)
        if step % settings.checkpoint_every == 0 or step == settings.total_steps:
            with clock.phase("checkpoint"):
                manager.save(checkpoint_number=step)
            if on_checkpoint is not None:
                report(step, on_checkpoint(step))
    writer.flush()
    return step


def _checkpoint(
    strategy: tf.distribute.Strategy, model: keras.Model, optimizer: keras.optimizers.Optimizer
) -> tuple[tf.train.Checkpoint, tf.Variable]:
    """What a checkpoint holds: the model, the optimizer (slots and iterations) and the step.

    The optimizer's slots are made here, for every trainable variable, rather than by its
    first `apply_gradients` inside the traced step: a `tf.function` whose first trace creates
    variables is traced a second time, which doubled the trace phase of every stage. (A model
    not built yet keeps the optimizer's own lazy build.)
    """
    with strategy.scope():
        if model.trainable_variables:
            optimizer.build(model.trainable_variables)
        global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, global_step=global_step)
    return checkpoint, global_step


def _restore(
    checkpoint: tf.train.Checkpoint, global_step: tf.Variable, restore_dir: str, stage: str
) -> int:
    """Restores the newest checkpoint in `restore_dir`, if any; returns the step to start at."""
    latest = tf.train.latest_checkpoint(restore_dir)
    if not latest:
        return 0
    restore_whole(checkpoint, latest, stage)
    start = int(global_step.numpy())
    log.info("Restored %s at step %d", latest, start)
    print(f"{stage}: resuming from {latest} (step {start})", flush=True)
    return start


def _mark_stage(checkpoint_dir: str, stage: str) -> None:
    """Records the stage beside its checkpoints (`restore_whole` refuses another stage's)."""
    tf.io.gfile.makedirs(checkpoint_dir)
    with tf.io.gfile.GFile(os.path.join(checkpoint_dir, STAGE_FILE), "w") as f:
        f.write(stage)


def _steps_function(
    strategy: tf.distribute.Strategy, step_fn: Callable, global_step: tf.Variable, jit: bool
) -> Callable:
    """A tf.function running `steps` replica steps from an iterator, counting them."""
    # Autograph is needed for the loop below only. The step's own code (model, loss, optimizer)
    # branches on Python values alone, and converting it made the first step's trace slower.
    replica_step = tf.autograph.experimental.do_not_convert(step_fn)
    if jit:
        # XLA compiles the replica step only; the loop around it keeps the iterator outside XLA.
        replica_step = tf.function(replica_step, jit_compile=True, autograph=False)

    @tf.function
    def train_steps(iterator, steps: tf.Tensor) -> None:
        for _ in tf.range(steps):
            strategy.run(replica_step, args=next(iterator))
            global_step.assign_add(1)

    return train_steps


def _next_boundary(step: int, settings: LoopSettings) -> int:
    """The next step at which the loop logs, checkpoints or ends."""
    return min(
        settings.total_steps,
        (step // settings.log_every + 1) * settings.log_every,
        (step // settings.checkpoint_every + 1) * settings.checkpoint_every,
    )


def _write_summaries(
    writer, metrics: dict[str, keras.metrics.Mean], optimizer, step: int
) -> tuple[dict[str, float], float]:
    """Writes the running means since the last call and the learning rate at `step`, resets the
    means, and returns both. Metrics no step updated (the probe's, when it is off) are left
    out."""
    values = {name: float(m.result().numpy()) for name, m in metrics.items() if m.count.numpy() > 0}
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
    return values, lr_value


class _Progress:
    """The progress line: the task's progress metrics, learning rate, images/s and ETA."""

    def __init__(self, settings: LoopSettings, start: int) -> None:
        self.settings, self.start = settings, start
        self.started = self.last_time = time.perf_counter()
        self.last_step = start

    def print(self, step: int, values: dict[str, float], lr_value: float) -> None:
        s, now = self.settings, time.perf_counter()
        rate = (step - self.last_step) * s.global_batch_size / max(now - self.last_time, 1e-9)
        eta = (s.total_steps - step) * (now - self.started) / max(step - self.start, 1)
        shown = " | ".join(f"{k} {v:.4f}" for k, v in values.items() if k in s.progress_metrics)
        print(
            f"{s.stage} step {step}/{s.total_steps} | {shown} | "
            f"lr {lr_value:.4g} | {rate:.1f} img/s | ETA {_format_eta(eta)}",
            flush=True,
        )
        self.last_time, self.last_step = now, step


def evaluate(model: keras.Model, dataset: tf.data.Dataset) -> dict[str, float]:
    """Top-1 / top-5 accuracy of the supervised head over one pass of `dataset`."""

    # One trace for every batch size, without autograph (nothing here branches on tensors).
    @tf.function(
        input_signature=[dataset.element_spec[0], dataset.element_spec[1]], autograph=False
    )
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


def log_eval(results: dict[str, float], log_dir: str, step: int, stage: str) -> None:
    """Writes eval results as TensorBoard scalars at `step` and prints the headline."""
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default(step=step):
        for name, value in results.items():
            tf.summary.scalar(name, value)
    writer.flush()
    print(
        f"{stage}: eval top-1 {results['eval/label_top_1_accuracy']:.4f}, "
        f"top-5 {results['eval/label_top_5_accuracy']:.4f} "
        f"on {int(results['eval/num_examples'])} examples",
        flush=True,
    )
