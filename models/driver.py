"""The generic Trainer driver: any stage (`models/tasks/`) under a strategy, resumed from its
checkpoints, trained, evaluated and exported. The stage decides everything else.

Each stage ends with one line of wall seconds per phase (also in results.json under
"seconds"), because on small data most of a stage's time is not spent training.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping

import tensorflow as tf
import tensorflow_transform as tft

from models import data as data_lib
from models import export, train_loop
from models.config import TrainerConfig
from models.model import saved_model_dir
from models.precision import resolve
from models.split_records import SplitSize
from models.strategy import (
    check_accelerator,
    is_chief,
    make_strategy,
    set_precision,
    worker_dirs,
)
from models.tasks import registry
from models.tasks.base import StageInputs
from transform import preprocessing as tp

# Every stage reports these, in this order (0 when a stage has no such phase).
PHASES = ("setup", "build", "trace", "train", "checkpoint", "knn", "eval", "export")


def resolve_precision(config: TrainerConfig) -> TrainerConfig:
    """`config` with `--mixed_precision=auto` decided for this machine.

    Pipelines resolve it when they are built (so their cache and checkpoint keys hold the dtype
    used); this covers a stage run directly (benchmarks, tests).
    """
    rt = config.runtime
    if rt.mixed_precision != "auto":
        return config
    choice = resolve(rt.mixed_precision, rt.strategy)
    print(f"{config.stage}: {choice.line()}", flush=True)
    runtime = dataclasses.replace(rt, mixed_precision=choice.dtype)
    return dataclasses.replace(config, runtime=runtime)


def run_stage(
    config: TrainerConfig,
    *,
    train_files: list[str],
    eval_files: list[str],
    transform_output_dir: str,
    serving_model_dir: str,
    model_run_dir: str,
    checkpoint_dir: str = "",
    base_model: str | None = None,
    on_exported: Callable[[], None] | None = None,
    split_sizes: Mapping[str, SplitSize] | None = None,
) -> dict[str, float]:
    """Trains one stage to its final step, evaluates it on the eval split and exports it.

    Checkpoints go to `checkpoint_dir` (default: under model_run_dir); a rerun pointed at the
    same directory continues from its newest checkpoint. `on_exported` runs on the chief once
    the model is exported (the Trainer's checkpoint clean-up). `split_sizes` (every split's
    size from the pipeline's statistics) spares reading the records to count them. An empty
    `serving_model_dir` skips the export, for runs whose model nothing serves or restores (a
    benchmark's evaluation arms).
    """
    config = resolve_precision(config)
    clock, rt = train_loop.PhaseClock(), config.runtime
    with clock.phase("setup"):
        tf.keras.utils.set_random_seed(rt.seed)
        check_accelerator(rt.accelerator, rt.strategy)
        set_precision(rt.mixed_precision)
        strategy = make_strategy(rt.strategy, rt.tpu_name)
        tft_output = tft.TFTransformOutput(transform_output_dir)
        label_names = tp.read_label_names(tft_output)
        base = saved_model_dir(base_model) if base_model else None
        inputs = StageInputs(
            train_files, eval_files, transform_output_dir, len(label_names), base, split_sizes
        )
        task_class = registry.get(config.stage).task_class()
        task = task_class(config, inputs, strategy.num_replicas_in_sync)
        restore_dir = checkpoint_dir or os.path.join(model_run_dir, "checkpoints")
        # Only the chief writes where others read; other workers write to scratch.
        ckpt_dir, run_dir, export_dir = worker_dirs(
            strategy, restore_dir, model_run_dir, serving_model_dir
        )
    with clock.phase("build"), strategy.scope():
        model = task.build_model()
        model.build_for()
        task.initialize(model)
        optimizer = task.build_optimizer()
        metrics = task.build_metrics()
    task.announce(strategy.num_replicas_in_sync)
    settings = task.loop_settings()
    monitor = task.monitor(model, settings.checkpoint_every)
    hooks = {}
    if monitor is not None:
        # The kNN floors are measured once, before the first step; a resumed run reads them back.
        floors = functools.partial(monitor.floors, save_dir=ckpt_dir, restore_dir=restore_dir)
        hooks = {
            "on_start": clock.timed("knn", floors),
            "on_checkpoint": clock.timed("knn", monitor),
        }
    train_loop.run(
        strategy,
        model,
        optimizer,
        task.train_step(model, optimizer, metrics),
        task.build_inputs,
        metrics,
        settings,
        checkpoint_dir=ckpt_dir,
        restore_dir=restore_dir,
        summary_dir=os.path.join(run_dir, "train"),
        clock=clock,
        **hooks,
    )
    results = {}
    if task.evaluates:
        with clock.phase("eval"):
            dataset = data_lib.eval_dataset(eval_files, task.spec, rt.eval_batch_size)
            results = train_loop.evaluate(model, dataset)
            log_dir = os.path.join(run_dir, "eval")
            train_loop.log_eval(results, log_dir, task.total_steps, task.eval_label)
    if serving_model_dir:
        with clock.phase("export"):
            module = export.ServingModule(
                model, tft_output, label_names, task.spec.stored_size, task.spec.image_format
            )
            export.export_serving_model(module, export_dir)
    seconds = clock.summary(PHASES)
    print(train_loop.format_seconds(config.stage, seconds), flush=True)
    knn = monitor.last if monitor else {}
    task.write_results(os.path.join(run_dir, "results.json"), {**results, **knn}, seconds)
    if on_exported is not None and is_chief(strategy):
        on_exported()
    return results
