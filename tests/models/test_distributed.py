"""Distributed pretraining computes what one device computes on the same global batch.

Logical CPU devices and TF_CONFIG must be in place before TensorFlow initializes, and pytest may
already have initialized it, so every check runs this file as a script in fresh processes:
`python test_distributed.py mirrored OUT.json` or `... worker INDEX PORT0,PORT1 OUT_DIR`.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

IMAGE_SIZE = 16
NUM_CLASSES = 4
GLOBAL_BATCH = 8
TEMPERATURE = 0.1
WEIGHT_DECAY = 1e-4
WORKER_STEPS = 3
TOLERANCE = 1e-5


def _model(global_bn: bool):
    from models.config import ModelConfig
    from models.model import SimCLRModel

    config = ModelConfig(
        resnet_depth=18, width_multiplier=0.125, global_bn=global_bn, proj_out_dim=16
    )
    model = SimCLRModel(config, NUM_CLASSES, IMAGE_SIZE, pretraining=True)
    model.build_for()
    return model


def _batch(seed: int, size: int = GLOBAL_BATCH) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (size, IMAGE_SIZE, IMAGE_SIZE, 3)
    view1 = rng.uniform(size=shape).astype(np.float32)
    view2 = rng.uniform(size=shape).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, size).astype(np.int64)
    return view1, view2, labels


def _task():
    """The pretraining task, for its step alone."""
    from models import config as mc
    from models.tasks.pretrain import PretrainTask

    train = mc.PretrainConfig(
        temperature=TEMPERATURE, weight_decay=WEIGHT_DECAY, optimizer="momentum"
    )
    trainer = mc.TrainerConfig(
        "pretrain",
        mc.InputConfig(),
        mc.AugmentConfig(),
        mc.ModelConfig(),
        train,
        mc.RuntimeConfig(),
    )
    return PretrainTask.without_inputs(trainer)


def _one_step(strategy, global_bn: bool, init_weights: list[np.ndarray]) -> dict:
    """One `pretrain_step` with plain SGD at learning rate 1, so the weight change is -gradient.

    Replica r gets rows [r*b, (r+1)*b) of both views and of the labels, as the input pipeline
    feeds replicas; the step itself lays them out as [view1; view2].
    """
    import tensorflow as tf
    import tf_keras as keras

    task = _task()
    with strategy.scope():
        model = _model(global_bn)
        model.set_weights(init_weights)
        optimizer = keras.optimizers.SGD(1.0)
        # Its variables made now, not in the first trace (which tf.function would trace again).
        optimizer.build(model.trainable_variables)
        metrics = task.build_metrics()
    before = [v.numpy() for v in model.trainable_variables]
    step_fn = task.train_step(model, optimizer, metrics)
    replicas = strategy.num_replicas_in_sync
    b = GLOBAL_BATCH // replicas
    arrays = _batch(seed=0)
    if replicas == 1:
        inputs = tuple(tf.constant(a) for a in arrays)
    else:
        inputs = tuple(
            strategy.experimental_distribute_values_from_function(
                lambda ctx, a=a: tf.constant(a[ctx.replica_id_in_sync_group * b :][:b])
            )
            for a in arrays
        )

    # As the training loop traces the step: without autograph (nothing in it branches on tensors).
    @tf.function(autograph=False)
    def run(view1, view2, labels):
        strategy.run(step_fn, args=(view1, view2, labels))

    run(*inputs)
    return {
        "gradients": [
            b - v.numpy() for b, v in zip(before, model.trainable_variables, strict=True)
        ],
        "moving_stats": [v.numpy() for v in model.non_trainable_variables],
        "metrics": {name: float(m.result().numpy()) for name, m in metrics.items()},
        # Every replica's copy of a variable must hold the same value after the update.
        "copies_spread": max(
            float(np.max(np.abs(c.numpy() - v.numpy())))
            for v in model.variables
            for c in strategy.experimental_local_results(v)
        ),
    }


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))


def _mirrored_main(out_path: str) -> None:
    import tensorflow as tf
    import tf_keras as keras

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    # float64 isolates the distribution logic from float32 summation-order rounding, which
    # alone moves these gradients (scale ~50) by ~1e-5 relative. The losses stay float32.
    keras.mixed_precision.set_global_policy("float64")
    tf.keras.utils.set_random_seed(0)
    init = _model(global_bn=True).get_weights()

    single = _one_step(tf.distribute.get_strategy(), True, init)
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    synced = _one_step(mirrored, True, init)
    local_bn = _one_step(mirrored, False, init)
    result = {
        "replicas": mirrored.num_replicas_in_sync,
        "single_metrics": single["metrics"],
        "synced_metrics": synced["metrics"],
        "grad_scale": max(float(np.max(np.abs(g))) for g in single["gradients"]),
        "synced_grad_err": _max_diff(synced["gradients"], single["gradients"]),
        "synced_stats_err": _max_diff(synced["moving_stats"], single["moving_stats"]),
        "synced_copies_spread": synced["copies_spread"],
        "local_bn_grad_err": _max_diff(local_bn["gradients"], single["gradients"]),
    }
    pathlib.Path(out_path).write_text(json.dumps(result))


def _worker_main(index: int, ports: list[int], out_dir: str) -> None:
    """One of the workers: a few `train_loop.run` steps, then its weights to worker<index>.npz.

    Each worker feeds different images and starts from a different seed, so the workers agree
    only if initial values are broadcast and gradients are all-reduced across them.
    """
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
            "task": {"type": "worker", "index": index},
        }
    )
    import tensorflow as tf

    from models import train_loop
    from models.optimizers import build_optimizer
    from models.strategy import make_strategy, worker_dirs

    tf.config.threading.set_intra_op_parallelism_threads(1)
    strategy = make_strategy("multi_worker")
    tf.keras.utils.set_random_seed(index)
    task = _task()
    with strategy.scope():
        model = _model(global_bn=True)
        optimizer = build_optimizer("lars", 0.5, momentum=0.9, weight_decay=1e-4)
        metrics = task.build_metrics()
    init = model.get_weights()

    def make_dataset(ctx: tf.distribute.InputContext, skip: int) -> tf.data.Dataset:
        b = ctx.get_per_replica_batch_size(GLOBAL_BATCH)
        return tf.data.Dataset.from_tensors(_batch(10 + ctx.input_pipeline_id, b)).repeat()

    # Both workers are pointed at the same run directories, as Trainer replicas are; only the
    # chief may write there.
    shared = pathlib.Path(out_dir) / "shared"
    ckpt_dir, summary_dir = worker_dirs(
        strategy, str(shared / "checkpoints"), str(shared / "train")
    )
    settings = train_loop.LoopSettings(
        stage="pretrain",
        total_steps=WORKER_STEPS,
        checkpoint_every=WORKER_STEPS,
        log_every=1,
        global_batch_size=GLOBAL_BATCH,
        keep_checkpoint_max=1,
        progress_metrics=task.progress_metrics,
    )
    step = train_loop.run(
        strategy,
        model,
        optimizer,
        task.train_step(model, optimizer, metrics),
        make_dataset,
        metrics,
        settings,
        checkpoint_dir=ckpt_dir,
        summary_dir=summary_dir,
        restore_dir=str(shared / "checkpoints"),
    )
    np.savez(
        pathlib.Path(out_dir) / f"worker{index}.npz",
        step=step,
        replicas=strategy.num_replicas_in_sync,
        dirs=np.array([ckpt_dir, summary_dir]),
        **{f"init_{i}": w for i, w in enumerate(init)},
        **{f"final_{i}": w for i, w in enumerate(model.get_weights())},
    )


def _script(*args: str, stdout=subprocess.PIPE) -> subprocess.Popen:
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.pop("TF_CONFIG", None)
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Waits for all processes; if one fails or hangs, kills the rest (workers block on peers)."""
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"{proc.args[2:]} failed:\n{err[-3000:]}"
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return outputs


def test_mirrored_two_cpus_equals_single_device(tmp_path):
    out = tmp_path / "mirrored.json"
    _finish([_script("mirrored", str(out))], timeout=240)
    r = json.loads(out.read_text())

    assert r["replicas"] == 2
    for name in ("total_loss", "contrast_loss", "contrast_acc", "supervised_loss"):
        np.testing.assert_allclose(
            r["synced_metrics"][name], r["single_metrics"][name], atol=TOLERANCE, err_msg=name
        )
    # SGD at learning rate 1: weight change = summed replica gradients of the global loss.
    assert r["grad_scale"] > 1e-3
    assert r["synced_grad_err"] < TOLERANCE
    assert r["synced_stats_err"] < TOLERANCE
    assert r["synced_copies_spread"] == 0.0
    # Per-replica batch norm sees other statistics: the check above is sensitive to sync BN.
    assert r["local_bn_grad_err"] > 100 * TOLERANCE


def test_multi_worker_two_processes_agree_on_weights(tmp_path):
    import portpicker

    ports = [portpicker.pick_unused_port() for _ in range(2)]
    ports_arg = ",".join(str(p) for p in ports)
    procs = [
        _script("worker", str(i), ports_arg, str(tmp_path), stdout=subprocess.DEVNULL)
        for i in range(2)
    ]
    _finish(procs, timeout=240)
    w0, w1 = (np.load(tmp_path / f"worker{i}.npz") for i in range(2))
    n = len([k for k in w0.files if k.startswith("final_")])

    assert int(w0["step"]) == int(w1["step"]) == WORKER_STEPS
    assert int(w0["replicas"]) == int(w1["replicas"]) == 2
    for i in range(n):
        np.testing.assert_array_equal(w0[f"init_{i}"], w1[f"init_{i}"])
        np.testing.assert_allclose(w0[f"final_{i}"], w1[f"final_{i}"], rtol=0, atol=1e-6)
    moved = max(float(np.max(np.abs(w0[f"final_{i}"] - w0[f"init_{i}"]))) for i in range(n))
    assert moved > 1e-4
    # Only the chief (worker 0) wrote to the shared directories; worker 1 wrote to scratch.
    shared = tmp_path / "shared"
    assert list(w0["dirs"]) == [str(shared / "checkpoints"), str(shared / "train")]
    assert all(not d.startswith(str(tmp_path)) for d in w1["dirs"])
    assert (shared / "checkpoints" / "checkpoint").exists()
    assert len(list((shared / "train").glob("events.out.tfevents.*"))) == 1
    assert pathlib.Path(w1["dirs"][0], "checkpoint").exists()  # the collective save ran there


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    from models.config import BLOCKS_PER_GROUP

    # One block per group: every kind of layer that distribution touches (stem, blocks,
    # projection shortcuts, their batch norms, the heads) at half the depth, so half the tracing.
    BLOCKS_PER_GROUP[18] = (1, 1, 1, 1)
    mode = sys.argv[1]
    if mode == "mirrored":
        _mirrored_main(sys.argv[2])
    elif mode == "worker":
        _worker_main(int(sys.argv[2]), [int(p) for p in sys.argv[3].split(",")], sys.argv[4])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
