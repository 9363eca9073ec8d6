"""TFX Trainer entry point (`run_fn`) of every stage.

custom_config = {"trainer": <TrainerConfig JSON>, "checkpoint_root": <dir>}: the stage's own
configuration only (TFX caches a Trainer on it) and where checkpoints outlive an execution.
"""

from __future__ import annotations

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"

import hashlib
import json
from typing import Any

import tensorflow as tf

from models.config import TrainerConfig
from models.driver import run_stage


def checkpoint_dir(root: str, config: TrainerConfig, inputs: dict[str, Any]) -> str:
    """A directory that only a rerun of the same training can find.

    Each TFX execution gets a new model_run_dir, so checkpoints kept there die with a killed run.
    This directory is named by a hash of the stage's configuration and its input artifacts (the
    transformed examples, the transform graph, the base model): rerunning the same command
    resumes there, while any change to the configuration or the data starts afresh.
    """
    key = json.dumps({"config": json.loads(config.to_json()), "inputs": inputs}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = os.path.join(root, f"{config.stage}-{digest}")
    tf.io.gfile.makedirs(path)
    with tf.io.gfile.GFile(os.path.join(path, "training.json"), "w") as f:
        f.write(key)
    return path


def run_fn(fn_args: Any) -> None:
    config = TrainerConfig.from_json(fn_args.custom_config["trainer"])
    inputs = {
        "train_files": list(fn_args.train_files),
        "eval_files": list(fn_args.eval_files),
        "transform_output": fn_args.transform_output,
        "base_model": fn_args.base_model,
    }
    root = fn_args.custom_config.get("checkpoint_root") or ""
    run_stage(
        config,
        train_files=fn_args.train_files,
        eval_files=fn_args.eval_files,
        transform_output_dir=fn_args.transform_output,
        serving_model_dir=fn_args.serving_model_dir,
        model_run_dir=fn_args.model_run_dir,
        checkpoint_dir=checkpoint_dir(root, config, inputs) if root else "",
        base_model=fn_args.base_model,
    )
