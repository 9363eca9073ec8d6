"""Strategy and precision selection, and training/serving under mixed precision on CPU."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from models.config import PretrainConfig
from models.model import ENDPOINTS, SimCLRModel
from models.optimizers import build_optimizer
from models.strategy import (
    AcceleratorMissing,
    check_accelerator,
    make_strategy,
    set_precision,
    wrap_optimizer,
)
from tests.models import fixtures


@pytest.fixture(autouse=True)
def float32_policy():
    """The Keras policy is process-global: leave it as other tests expect it."""
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_auto_strategy_on_one_cpu_is_the_default_strategy():
    strategy = make_strategy("auto")
    assert strategy is tf.distribute.get_strategy()
    assert strategy.num_replicas_in_sync == 1


def test_unknown_names_are_rejected_with_their_flag():
    with pytest.raises(ValueError, match="^--strategy: unknown strategy 'nccl'$"):
        make_strategy("nccl")
    with pytest.raises(ValueError, match="^--mixed_precision: unknown or unresolved dtype 'fp8'$"):
        set_precision("fp8")
    with pytest.raises(ValueError, match="unresolved dtype 'auto'"):
        set_precision("auto")


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="a GPU is visible")
def test_a_gpu_trainer_without_a_gpu_stops_in_one_line():
    with pytest.raises(AcceleratorMissing) as info:
        check_accelerator("gpu", "mirrored")
    message = str(info.value)
    assert message.startswith("--accelerator=gpu: expected a GPU, TensorFlow ")
    assert "sees none" in message and "/device:CPU:0" in message and "\n" not in message
    for accelerator in ("auto", "cpu"):
        check_accelerator(accelerator, "default")  # nothing is required of the device


def test_a_tpu_trainer_that_reaches_no_tpu_stops_in_one_line(monkeypatch):
    def unreachable(tpu=None):
        raise ValueError(f"Could not lookup TPU metadata for {tpu}\nsecond line")

    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", unreachable)
    with pytest.raises(AcceleratorMissing) as info:
        make_strategy("tpu", "local")
    assert str(info.value) == (
        "--strategy=tpu: expected a TPU (local), none could be reached: "
        "Could not lookup TPU metadata for local"
    )
    with pytest.raises(AcceleratorMissing, match="needs --strategy=tpu"):
        check_accelerator("tpu", "default")


@pytest.mark.parametrize(
    ("dtype", "policy", "loss_scaled"),
    [
        ("float32", "float32", False),
        ("bfloat16", "mixed_bfloat16", False),
        ("float16", "mixed_float16", True),
    ],
)
def test_precision_sets_policy_and_loss_scaling(dtype, policy, loss_scaled):
    set_precision(dtype)
    assert keras.mixed_precision.global_policy().name == policy
    optimizer = wrap_optimizer(build_optimizer("lars", 0.1, 0.9, 1e-6), dtype)
    assert isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer) == loss_scaled


def _tiny_model() -> SimCLRModel:
    config = fixtures.tiny_config(pathlib.Path("."), **{"model.global_bn": True})
    model = SimCLRModel(config.model, 4, 16, pretraining=True)
    model.build_for()
    return model


def _pretrain_steps(dtype: str, steps: int) -> dict:
    """`steps` pretrain steps on one fixed batch under `dtype`; what the checks need."""
    set_precision(dtype)
    tf.keras.utils.set_random_seed(0)
    model = _tiny_model()
    optimizer = wrap_optimizer(build_optimizer("lars", 0.5, 0.9, 1e-4), dtype)
    # Its variables made now, not in the first trace (which tf.function would trace again).
    optimizer.build(model.trainable_variables)
    task = fixtures.step_task(PretrainConfig(temperature=0.5, weight_decay=1e-4, optimizer="lars"))
    metrics = task.build_metrics()
    # Traced as the training loop traces it: without autograph (converting the model's code made
    # the trace several times slower, and nothing in the step branches on tensors).
    step = tf.function(task.train_step(model, optimizer, metrics), autograph=False)
    rng = np.random.default_rng(0)
    view1 = rng.uniform(size=(8, 16, 16, 3)).astype(np.float32)
    view2 = np.clip(view1 + rng.normal(scale=0.05, size=view1.shape), 0, 1).astype(np.float32)
    labels = rng.integers(0, 4, 8)
    initial = [v.numpy() for v in model.trainable_variables]
    losses = []
    for _ in range(steps):
        step(tf.constant(view1), tf.constant(view2), tf.constant(labels))
        losses.append(metrics["total_loss"].result().numpy())
        for m in metrics.values():
            m.reset_state()
    outputs = model(tf.constant(view1), training=True)
    return {
        "model": model,
        "optimizer": optimizer,
        "losses": losses,
        "initial": initial,
        "outputs": outputs,
    }


def _moved(run: dict) -> float:
    return max(
        float(np.max(np.abs(v.numpy() - w)))
        for v, w in zip(run["model"].trainable_variables, run["initial"], strict=True)
    )


def test_bfloat16_steps_compute_in_bfloat16_with_float32_losses():
    run = _pretrain_steps("bfloat16", 4)
    outputs = run["outputs"]
    assert outputs["block_group4"].dtype == tf.bfloat16
    assert outputs["proj_head_output"].dtype == tf.bfloat16
    assert {v.dtype for v in run["model"].variables} == {tf.float32}
    assert all(loss.dtype == np.float32 and np.isfinite(loss) for loss in run["losses"])
    assert run["losses"][-1] < run["losses"][0]
    assert _moved(run) > 1e-4


def test_float16_steps_use_dynamic_loss_scaling():
    run = _pretrain_steps("float16", 8)
    optimizer = run["optimizer"]
    assert run["outputs"]["block_group4"].dtype == tf.float16
    # The initial scale 2**15 overflows float16 gradients: those steps are skipped and the
    # scale halves until updates go through.
    scale = float(optimizer.loss_scale.numpy())
    halvings = int(round(np.log2(2.0**15 / scale)))
    assert 1 <= halvings < 8 and 2.0**15 / 2**halvings == scale
    # The skipped steps left the weights alone (the same loss each time) until one went through
    # and changed them; each skipped step halved the scale (a later overflow may halve it again,
    # depending on the CPU's float16 kernels, as may whether the loss has gone down).
    losses = run["losses"]
    skipped = next((i for i, loss in enumerate(losses) if loss != losses[0]), len(losses)) - 1
    assert 1 <= skipped <= halvings and skipped < len(losses) - 1
    assert all(np.isfinite(v.numpy()).all() for v in run["model"].variables)
    assert _moved(run) > 1e-4


def test_bfloat16_trainer_stage_serves_float32(
    cifar_dir, transformed, tmp_path, capsys, monkeypatch
):
    # The dtypes served do not depend on the backbone's depth; a shallower one traces faster.
    fixtures.one_block_per_group(monkeypatch)
    config = fixtures.tiny_config(
        cifar_dir, **{"runtime.mixed_precision": "bfloat16", "pretrain.train_steps": 2}
    )
    kwargs = fixtures.run_stage_args(transformed, tmp_path)
    results = fixtures.run_stage(config, "pretrain", **kwargs)
    assert "pretrain step 2/2" in capsys.readouterr().out
    assert 0.0 <= results["eval/label_top_1_accuracy"] <= 1.0

    loaded = tf.saved_model.load(kwargs["serving_model_dir"])
    images = tf.random.uniform([3, fixtures.IMAGE_SIZE, fixtures.IMAGE_SIZE, 3], seed=1)
    served = loaded.signatures["serving_images"](images=images)
    assert set(served) == set(ENDPOINTS)
    assert {t.dtype for t in served.values()} == {tf.float32}

    def example(path: pathlib.Path) -> bytes:
        feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[path.read_bytes()]))
        features = tf.train.Features(feature={"image": feature})
        return tf.train.Example(features=features).SerializeToString()

    examples = tf.constant([example(p) for p in transformed.eval_jpegs[:4]])
    out = loaded.signatures["serving_default"](examples=examples)
    probabilities = out["probabilities"]
    assert probabilities.dtype == tf.float32 and out["top_k_scores"].dtype == tf.float32
    # A float32 softmax sums to 1 far more tightly than bfloat16's 8-bit mantissa would allow.
    np.testing.assert_allclose(probabilities.numpy().sum(axis=1), 1.0, atol=1e-6)
