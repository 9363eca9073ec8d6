"""TFX Trainer entry point (`run_fn`) for both stages: pretrain and finetune.

custom_config = {"stage": "pretrain" | "finetune", "config": <SimCLRConfig JSON>}; everything the
stage does is read from that one config tree.
"""

from __future__ import annotations

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"

import dataclasses
import json
import logging
from typing import Any

import tensorflow as tf
import tensorflow_transform as tft

from models import data as data_lib
from models import export, knn, train_loop
from models.model import SavedModelBackbone, SimCLRModel
from models.optimizers import build_optimizer
from models.schedule import WarmUpAndCosineDecay, total_train_steps
from models.strategy import make_strategy, set_precision, wrap_optimizer
from pipeline.configs import SimCLRConfig, validate
from transform import preprocessing as tp

log = logging.getLogger(__name__)


def run_fn(fn_args: Any) -> None:
    stage = fn_args.custom_config["stage"]
    config = SimCLRConfig.from_json(fn_args.custom_config["config"])
    run_stage(
        config,
        stage,
        train_files=fn_args.train_files,
        eval_files=fn_args.eval_files,
        transform_output_dir=fn_args.transform_output,
        serving_model_dir=fn_args.serving_model_dir,
        model_run_dir=fn_args.model_run_dir,
        base_model=fn_args.base_model,
    )


def run_stage(
    config: SimCLRConfig,
    stage: str,
    *,
    train_files: list[str],
    eval_files: list[str],
    transform_output_dir: str,
    serving_model_dir: str,
    model_run_dir: str,
    base_model: str | None = None,
) -> dict[str, float]:
    """Trains one stage, evaluates it on the eval split and exports the serving model."""
    runtime = config.runtime
    tf.keras.utils.set_random_seed(runtime.seed)
    set_precision(runtime.mixed_precision)
    strategy = make_strategy(runtime.strategy, runtime.tpu_name)
    validate(config, num_replicas=strategy.num_replicas_in_sync)
    stage_cfg = config.stage(stage)
    tft_output = tft.TFTransformOutput(transform_output_dir)
    label_names = tp.read_label_names(tft_output)
    num_classes = len(label_names)
    spec = data_lib.ImageSpec(
        stored_size=config.data.stored_size,
        image_format=config.data.image_format,
        image_size=config.data.image_size,
    )

    labels, keys = data_lib.read_labels_and_keys(train_files)
    labeled_keys = None
    if stage != "pretrain" and config.finetune.label_subset:
        labeled_keys = data_lib.select_listed(keys, config.finetune.label_subset)
        print(
            f"{stage}: {len(labeled_keys)} of {len(keys)} labeled examples "
            f"(label_subset={config.finetune.label_subset})",
            flush=True,
        )
    elif stage != "pretrain" and config.finetune.label_fraction < 1.0:
        labeled_keys = data_lib.select_label_fraction(
            labels, keys, config.finetune.label_fraction, config.finetune.label_fraction_seed
        )
        print(
            f"{stage}: {len(labeled_keys)} of {len(keys)} labeled examples "
            f"(label_fraction={config.finetune.label_fraction})",
            flush=True,
        )
    # Fine-tuning sees only the labeled subset; distillation sees every image and uses labels
    # (of the subset) only for its optional label loss.
    keep_keys = labeled_keys if stage == "finetune" else None
    num_examples = len(keep_keys) if keep_keys is not None else len(keys)
    if num_examples == 0:
        raise ValueError(f"{stage}: the training split has no examples")
    batch = stage_cfg.train_batch_size
    total_steps = total_train_steps(
        num_examples, batch, stage_cfg.train_epochs, stage_cfg.train_steps
    )
    epoch_steps = data_lib.steps_per_epoch(num_examples, batch)
    checkpoint_every = stage_cfg.checkpoint_steps or stage_cfg.checkpoint_epochs * epoch_steps

    base_model = _saved_model_dir(base_model) if base_model else None
    teacher = None
    with strategy.scope():
        model = _build_model(config, stage, num_classes, base_model)
        model.build_for()
        if stage == "finetune" and base_model and not config.finetune.checkpoint:
            export.restore_backbone(model, base_model)
            print(f"finetune: backbone restored from {base_model}", flush=True)
        if stage == "distill":
            teacher = tf.saved_model.load(base_model)
            print(f"distill: teacher {base_model}", flush=True)
        schedule = WarmUpAndCosineDecay(
            base_learning_rate=stage_cfg.learning_rate,
            num_examples=num_examples,
            train_batch_size=batch,
            warmup_epochs=stage_cfg.warmup_epochs,
            total_steps=total_steps,
            learning_rate_scaling=stage_cfg.learning_rate_scaling,
        )
        optimizer = wrap_optimizer(
            build_optimizer(
                stage_cfg.optimizer,
                schedule,
                stage_cfg.momentum,
                stage_cfg.weight_decay,
                stage_cfg.eeta,
            ),
            runtime.mixed_precision,
        )
        metrics = train_loop.make_metrics(stage)

    if stage == "pretrain":
        step_fn = train_loop.pretrain_step(
            model,
            optimizer,
            metrics,
            temperature=config.pretrain.temperature,
            hidden_norm=config.pretrain.hidden_norm,
            lineareval=config.pretrain.lineareval_while_pretraining,
            weight_decay=stage_cfg.weight_decay,
            optimizer_name=stage_cfg.optimizer,
        )
    elif stage == "distill":
        step_fn = train_loop.distill_step(
            model,
            teacher,
            optimizer,
            metrics,
            temperature=config.distill.distill_temperature,
            label_weight=config.distill.distill_label_weight,
            weight_decay=stage_cfg.weight_decay,
            optimizer_name=stage_cfg.optimizer,
        )
    else:
        step_fn = train_loop.finetune_step(
            model,
            optimizer,
            metrics,
            weight_decay=stage_cfg.weight_decay,
            optimizer_name=stage_cfg.optimizer,
        )

    def make_dataset(ctx: tf.distribute.InputContext, skip: int) -> tf.data.Dataset:
        return data_lib.train_dataset(
            train_files,
            spec,
            ctx.get_per_replica_batch_size(batch),
            contrastive=stage == "pretrain",
            color_jitter_strength=config.augment.color_jitter_strength,
            color_jitter_impl=config.augment.color_jitter_impl,
            use_blur=config.augment.use_blur,
            seed=runtime.seed + ctx.input_pipeline_id,
            skip_examples=skip // ctx.num_input_pipelines,
            keep_keys=keep_keys,
            labeled_keys=labeled_keys if stage == "distill" else None,
            cache=config.data.cache_dataset,
            shard=(ctx.num_input_pipelines, ctx.input_pipeline_id),
        )

    print(
        f"{stage}: {num_examples} examples, {num_classes} classes, batch {batch}, "
        f"{total_steps} steps on {strategy.num_replicas_in_sync} replica(s)",
        flush=True,
    )
    settings = train_loop.LoopSettings(
        stage=stage,
        total_steps=total_steps,
        checkpoint_every=max(1, checkpoint_every),
        log_every=runtime.log_every_steps,
        global_batch_size=batch,
        keep_checkpoint_max=runtime.keep_checkpoint_max,
        jit_compile=runtime.jit_compile,
    )
    monitor = None
    if stage == "pretrain" and config.pretrain.knn_every_epochs > 0:
        monitor = knn.KnnMonitor(
            model,
            train_files,
            eval_files,
            spec,
            batch_size=runtime.eval_batch_size,
            num_classes=num_classes,
            every_steps=config.pretrain.knn_every_epochs * epoch_steps,
            checkpoint_every=settings.checkpoint_every,
            total_steps=total_steps,
        )
    train_loop.run(
        strategy,
        model,
        optimizer,
        step_fn,
        make_dataset,
        metrics,
        settings,
        checkpoint_dir=os.path.join(model_run_dir, "checkpoints"),
        summary_dir=os.path.join(model_run_dir, "train"),
        on_checkpoint=monitor,
    )

    results: dict[str, float] = {}
    if stage != "pretrain" or config.pretrain.lineareval_while_pretraining:
        results = train_loop.evaluate(
            model, data_lib.eval_dataset(eval_files, spec, runtime.eval_batch_size)
        )
        writer = tf.summary.create_file_writer(os.path.join(model_run_dir, "eval"))
        with writer.as_default(step=total_steps):
            for name, value in results.items():
                tf.summary.scalar(name, value)
        writer.flush()
        print(
            f"{stage}: eval top-1 {results['eval/label_top_1_accuracy']:.4f}, "
            f"top-5 {results['eval/label_top_5_accuracy']:.4f} "
            f"on {int(results['eval/num_examples'])} examples",
            flush=True,
        )
    with tf.io.gfile.GFile(os.path.join(model_run_dir, "results.json"), "w") as f:
        json.dump(
            {
                "stage": stage,
                "total_steps": total_steps,
                "num_train_examples": num_examples,
                **results,
                **(monitor.last if monitor else {}),
            },
            f,
            indent=2,
        )

    module = export.ServingModule(
        model, tft_output, label_names, spec.stored_size, spec.image_format
    )
    export.export_serving_model(module, serving_model_dir)
    log.info("Exported %s model to %s", stage, serving_model_dir)
    return results


def _saved_model_dir(path: str) -> str:
    """TFX points base_model at <artifact>/Format-Serving; an imported model is the uri itself."""
    if tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
        return path
    parent = os.path.dirname(path.rstrip("/"))
    if tf.io.gfile.exists(os.path.join(parent, "saved_model.pb")):
        return parent
    raise ValueError(f"base model: no SavedModel at {path}")


def _build_model(
    config: SimCLRConfig, stage: str, num_classes: int, base_model: str | None
) -> SimCLRModel:
    """The network a stage trains: SimCLR (pretrain), the fine-tuned one, or the student."""
    ft = config.finetune
    if stage == "distill":
        d = config.distill
        student = dataclasses.replace(
            config.model,
            resnet_depth=d.distill_resnet_depth or config.model.resnet_depth,
            width_multiplier=d.distill_width_multiplier or config.model.width_multiplier,
        )
        return SimCLRModel(student, num_classes, config.data.image_size, pretraining=False)
    backbone = None
    if stage == "finetune" and ft.checkpoint:
        backbone = SavedModelBackbone(base_model, frozen=ft.fine_tune_after_block >= 4)
        print(f"finetune: backbone imported from {base_model}", flush=True)
    return SimCLRModel(
        config.model,
        num_classes,
        config.data.image_size,
        pretraining=stage == "pretrain",
        fine_tune_after_block=ft.fine_tune_after_block,
        zero_init_logits_layer=ft.zero_init_logits_layer,
        backbone=backbone,
    )
