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
        return make_tpu_strategy(tpu_name)
    raise ValueError(f"--strategy: unknown strategy {name!r}")


class AcceleratorMissing(RuntimeError):
    """The configured accelerator is not visible: training would silently run on the CPU."""


def _visible(kind: str) -> list[str]:
    return [d.name for d in tf.config.list_logical_devices(kind)]


def check_accelerator(accelerator: str, strategy: str = "auto") -> None:
    """Stops a Trainer configured for a GPU or TPU that TensorFlow cannot see, in one line.

    Without it an image that cannot load CUDA, or a TPU VM whose runtime failed, trains on the
    host's CPU for days while the accelerator is billed. A TPU is checked by connecting to it,
    which is what `make_strategy` does next anyway.
    """
    if accelerator == "gpu" and not tf.config.list_physical_devices("GPU"):
        raise AcceleratorMissing(
            f"--accelerator=gpu: expected a GPU, TensorFlow {tf.__version__} sees none "
            f"(devices: {', '.join(_visible('CPU')) or 'none'}; is CUDA installed and "
            "CUDA_VISIBLE_DEVICES set?)"
        )
    if accelerator == "cpu" and strategy == "tpu":
        raise AcceleratorMissing("--accelerator=cpu contradicts --strategy=tpu")
    if accelerator == "tpu":
        if strategy != "tpu":
            raise AcceleratorMissing(
                f"--accelerator=tpu needs --strategy=tpu, got --strategy={strategy}"
            )
        # Connecting happens in make_strategy; a failure there is re-raised in one line.


def make_tpu_strategy(tpu_name: str) -> tf.distribute.TPUStrategy:
    """TPUStrategy on `tpu_name`, or one line saying that no TPU could be reached."""
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_name or None)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AcceleratorMissing(
            f"--strategy=tpu: expected a TPU ({tpu_name or 'from TPU_NAME'}), none could be "
            f"reached: {first}"
        ) from None
    strategy = tf.distribute.TPUStrategy(resolver)
    if not _visible("TPU"):
        raise AcceleratorMissing(
            f"--strategy=tpu: connected to {tpu_name or 'the TPU'} but TensorFlow sees no TPU "
            f"cores (devices: {', '.join(_visible('CPU'))})"
        )
    return strategy


def runs_on_cpu() -> bool:
    """Whether ops traced now run on the CPU: no GPU visible and no TPU strategy in scope.
    Kernel choices that pay only on CPUs ask this when they are traced."""
    if isinstance(tf.distribute.get_strategy(), tf.distribute.TPUStrategy):
        return False
    return not tf.config.list_logical_devices("GPU")


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
        # 'auto' is decided before a stage runs (models.precision), never here.
        raise ValueError(f"--mixed_precision: unknown or unresolved dtype {dtype!r}")
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
