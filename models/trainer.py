"""TFX Trainer entry point (`run_fn`) of every stage.

custom_config = {"trainer": <TrainerConfig JSON>, "checkpoint_root": <dir>, "code_digest": <sha256
of models/ and transform/>}: the stage's own configuration only (TFX caches a Trainer on it),
where checkpoints outlive an execution, and which code trains.
"""

from __future__ import annotations

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"

import functools
import hashlib
import json
from typing import Any

import tensorflow as tf

from models.config import TrainerConfig
from models.driver import run_stage
from models.split_records import SPLIT_SIZES_KEY, sizes_from_json

# Options that change how a stage reports, evaluates or how often it saves, never what it trains:
# left out of the checkpoint key, so changing them on a rerun still resumes.
NOT_IN_CHECKPOINT_KEY = {
    "runtime": (
        "log_every_steps",
        "eval_batch_size",
        "keep_checkpoint_max",
        "tpu_name",
        "accelerator",
    ),
    "train": ("knn_every_epochs", "checkpoint_epochs", "checkpoint_steps"),
}
TRAINING_FILE = "training.json"
# Written beside the checkpoints by the Vertex AI launcher (pipeline/cloud/jobs.py) while its
# custom job may be writing there; "released" once the job has ended.
LEASE_FILE = "vertex_job_lease.json"


def checkpoint_key(config: TrainerConfig, inputs: dict[str, Any], code_digest: str = "") -> str:
    """What a checkpoint belongs to: the trained model's configuration, the input artifacts (the
    transformed examples, the transform graph, the base model) and the code that trains."""
    trained = json.loads(config.to_json())
    for section, names in NOT_IN_CHECKPOINT_KEY.items():
        for name in names:
            trained[section].pop(name, None)
    key = {"config": trained, "inputs": inputs, "code": code_digest}
    return json.dumps(key, sort_keys=True)


def checkpoint_dir(
    root: str, config: TrainerConfig, inputs: dict[str, Any], code_digest: str = ""
) -> str:
    """A directory that only a rerun of the same training can find.

    Each TFX execution gets a new model_run_dir, so checkpoints kept there die with a killed run.
    This directory is named by a hash of `checkpoint_key`: rerunning the same command resumes
    there, while a change to the model's configuration, the data or the code starts afresh.
    `training.json` beside the checkpoints holds the key; a directory whose key differs (a hash
    collision, a hand-edited file) is refused rather than restored.
    """
    key = checkpoint_key(config, inputs, code_digest)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = os.path.join(root, f"{config.stage}-{digest}")
    record = os.path.join(path, TRAINING_FILE)
    if tf.io.gfile.exists(record):
        with tf.io.gfile.GFile(record) as f:
            if json.loads(f.read()) != json.loads(key):
                raise ValueError(
                    f"{config.stage}: checkpoints in {path} belong to other training "
                    f"({TRAINING_FILE} differs); remove the directory to train afresh"
                )
    tf.io.gfile.makedirs(path)
    with tf.io.gfile.GFile(record, "w") as f:
        f.write(key)
    return path


def remove_other_checkpoints(root: str, stage: str, keep: str) -> list[str]:
    """Removes the stage's checkpoint directories other than `keep`; returns what it removed.

    Called once the stage has trained to its final step and exported its model: the exported
    Model artifact is what later stages and runs use, so directories of earlier configurations
    (finished, or killed and abandoned) are dead weight. `keep` stays, so a rerun that changes
    only a reporting option finds its final checkpoint and trains no step again.
    """
    removed = []
    for path in sorted(tf.io.gfile.glob(os.path.join(root, f"{stage}-*"))):
        if path.rstrip("/") == keep.rstrip("/") or not tf.io.gfile.isdir(path):
            continue
        if _leased(path):
            print(f"{stage}: kept {os.path.basename(path)}: a training job may still write there")
            continue
        tf.io.gfile.rmtree(path)
        removed.append(path)
    return removed


def _leased(path: str) -> bool:
    """Whether a cloud training job holds the directory: a lease that was never released (the
    launcher releases it when the job ends; one it could not release is kept, to be safe)."""
    lease = os.path.join(path, LEASE_FILE)
    if not tf.io.gfile.exists(lease):
        return False
    with tf.io.gfile.GFile(lease) as f:
        try:
            return not json.loads(f.read()).get("released")
        except ValueError:
            return True


def _report_removed(root: str, stage: str, keep: str) -> None:
    removed = remove_other_checkpoints(root, stage, keep)
    if removed:
        names = ", ".join(os.path.basename(p) for p in removed)
        print(f"{stage}: removed checkpoints of earlier training ({names})", flush=True)


def run_fn(fn_args: Any) -> None:
    custom = fn_args.custom_config
    config = TrainerConfig.from_json(custom["trainer"])
    inputs = {
        "train_files": list(fn_args.train_files),
        "eval_files": list(fn_args.eval_files),
        "transform_output": fn_args.transform_output,
        "base_model": fn_args.base_model,
    }
    root = custom.get("checkpoint_root") or ""
    ckpt_dir = checkpoint_dir(root, config, inputs, custom.get("code_digest", "")) if root else ""
    run_stage(
        config,
        train_files=fn_args.train_files,
        eval_files=fn_args.eval_files,
        transform_output_dir=fn_args.transform_output,
        serving_model_dir=fn_args.serving_model_dir,
        model_run_dir=fn_args.model_run_dir,
        checkpoint_dir=ckpt_dir,
        base_model=fn_args.base_model,
        on_exported=functools.partial(_report_removed, root, config.stage, ckpt_dir)
        if root
        else None,
        split_sizes=sizes_from_json(custom.get(SPLIT_SIZES_KEY)),
    )
