"""tf.distribute strategy and mixed-precision policy from the runtime config."""

from __future__ import annotations

import tempfile

import tensorflow as tf
import tf_keras as keras


def make_strategy(name: str, tpu_name: str = "") -> tf.distribute.Strategy:
    """'auto' picks MirroredStrategy when several GPUs are visible, else the default strategy."""
    if name == "auto":
        name = "mirrored" if len(tf.config.list_logical_devices("GPU")) > 1 else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_name or None)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"--strategy: unknown strategy {name!r}")


def local_replicas(name: str) -> int:
    """Replicas a strategy will have on this machine, for checks made before any component runs.

    Multi-worker and TPU replica counts are only known where the Trainer runs; 1 here.
    """
    gpus = len(tf.config.list_physical_devices("GPU"))
    if name == "mirrored" or (name == "auto" and gpus > 1):
        return max(1, gpus)
    return 1


def set_precision(dtype: str) -> None:
    """Keras global policy; losses and softmax are computed in float32 by the train step."""
    policy = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
    if dtype not in policy:
        raise ValueError(f"--mixed_precision: unknown dtype {dtype!r}")
    keras.mixed_precision.set_global_policy(policy[dtype])


def wrap_optimizer(optimizer: keras.optimizers.Optimizer, dtype: str):
    """float16 needs dynamic loss scaling to keep small gradients from underflowing."""
    if dtype == "float16":
        return keras.mixed_precision.LossScaleOptimizer(optimizer)
    return optimizer


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's shared outputs.

    Under MultiWorkerMirroredStrategy that is the 'chief' task, or worker 0 of a cluster without
    one; every other strategy runs in one process, which is the chief.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    resolver = strategy.cluster_resolver
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type in (None, "chief"):
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


def worker_dirs(strategy: tf.distribute.Strategy, *dirs: str) -> tuple[str, ...]:
    """`dirs` on the chief; fresh scratch directories on other workers.

    Saving checkpoints, summaries and SavedModels is collective under multi-worker training, so
    every worker writes, but only the chief's copy may land where later stages read.
    """
    if is_chief(strategy):
        return dirs
    task_id = strategy.cluster_resolver.task_id
    return tuple(tempfile.mkdtemp(prefix=f"worker{task_id}-") for _ in dirs)
