"""SimCLRModel: endpoint shapes, where gradients flow, and which head layer feeds the classifier."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from models.config import ModelConfig
from models.model import ENDPOINTS, SimCLRModel

NUM_CLASSES = 5


def _config(**kwargs) -> ModelConfig:
    base = {
        "resnet_depth": 18,
        "width_multiplier": 0.125,
        "proj_out_dim": 16,
        "global_bn": False,
    }
    return ModelConfig(**{**base, **kwargs})


def _images(batch: int = 4, size: int = 32, seed: int = 0) -> tf.Tensor:
    rng = np.random.default_rng(seed)
    return tf.constant(rng.uniform(size=(batch, size, size, 3)), tf.float32)


def _labels(batch: int = 4) -> tf.Tensor:
    return tf.constant(np.arange(batch) % NUM_CLASSES, tf.int64)


def _supervised_grads(model: SimCLRModel, images: tf.Tensor) -> dict[str, tf.Tensor | None]:
    with tf.GradientTape() as tape:
        logits = model(images, training=True)["logits_sup"]
        loss = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(_labels(len(images)), logits)
        )
    variables = model.trainable_variables
    grads = tape.gradient(loss, variables)
    return {v.name: g for v, g in zip(variables, grads, strict=True)}


def _nonzero(grad: tf.Tensor | None) -> bool:
    return grad is not None and float(tf.reduce_sum(tf.abs(grad))) > 0.0


@pytest.mark.parametrize(
    ("image_size", "spatial"),
    # CIFAR stem (3x3 conv, no pooling) at 32 px; ImageNet stem (stride-2 conv + pool) at 64.
    [(32, [32, 32, 32, 16, 8, 4]), (64, [32, 16, 16, 8, 4, 2])],
)
@pytest.mark.parametrize("pretraining", [True, False])
def test_endpoints_and_shapes(image_size, spatial, pretraining):
    model = SimCLRModel(_config(), NUM_CLASSES, image_size, pretraining=pretraining)
    outputs = model(_images(3, image_size), training=False)
    assert set(outputs) == set(ENDPOINTS)
    width = 8  # 64 * 0.125
    channels = [width, width, width, 2 * width, 4 * width, 8 * width]
    names = ENDPOINTS[:6]
    for name, side, depth in zip(names, spatial, channels, strict=True):
        assert outputs[name].shape == (3, side, side, depth), name
    assert outputs["final_avg_pool"].shape == (3, 8 * width)
    np.testing.assert_allclose(
        outputs["final_avg_pool"], tf.reduce_mean(outputs["block_group4"], [1, 2]), atol=1e-6
    )
    np.testing.assert_array_equal(outputs["proj_head_input"], outputs["final_avg_pool"])
    assert outputs["proj_head_output"].shape == (3, 16)
    assert outputs["logits_sup"].shape == (3, NUM_CLASSES)


def test_pretraining_stops_supervised_gradient_at_the_head():
    model = SimCLRModel(_config(), NUM_CLASSES, 32, pretraining=True)
    grads = _supervised_grads(model, _images())
    head = {n: g for n, g in grads.items() if "head_supervised" in n}
    body = {n: g for n, g in grads.items() if "head_supervised" not in n}
    assert len(head) == 2 and all(_nonzero(g) for g in head.values())
    assert body and all(g is None for g in body.values())


def test_finetuning_sends_gradient_into_the_backbone():
    model = SimCLRModel(_config(), NUM_CLASSES, 32, pretraining=False)
    grads = _supervised_grads(model, _images())
    resnet = {n: g for n, g in grads.items() if "/resnet/" in n}
    assert resnet and all(g is not None for g in resnet.values())
    # Residual branches start behind a zero-initialized BN scale, so at init only the stem and
    # the shortcuts carry gradient; one shortcut per block group shows it reaches every group.
    reached = [n for n, g in resnet.items() if "kernel" in n and _nonzero(g)]
    assert any("/stem/" in n for n in reached)
    for group in range(1, 5):
        assert any(f"block_group{group}/" in n and "shortcut" in n for n in reached), group
    # ft_proj_selector=0: the projection head is not on the supervised path.
    projection = [g for n, g in grads.items() if "projection_head" in n]
    assert projection and all(g is None for g in projection)


def test_frozen_backbone_gets_no_gradient_and_no_trainable_variables():
    model = SimCLRModel(_config(), NUM_CLASSES, 32, pretraining=False, fine_tune_after_block=4)
    grads = _supervised_grads(model, _images())
    assert not [n for n in grads if "/resnet/" in n]
    assert all(_nonzero(g) for n, g in grads.items() if "head_supervised" in n)


@pytest.mark.parametrize("selector", [0, 1, -1])
def test_ft_proj_selector_picks_the_head_input(selector):
    model = SimCLRModel(_config(ft_proj_selector=selector), NUM_CLASSES, 32, pretraining=False)
    images = _images()
    outputs = model(images, training=False)
    _, hiddens = model.projection_head(outputs["final_avg_pool"], training=False)
    expected_input = {0: outputs["final_avg_pool"], 1: hiddens[1], -1: outputs["proj_head_output"]}
    kernel, bias = (v.numpy() for v in model.supervised_head.weights)
    expected = expected_input[selector].numpy() @ kernel + bias
    np.testing.assert_allclose(outputs["logits_sup"], expected, rtol=1e-5, atol=1e-6)
    assert kernel.shape[0] == {0: 64, 1: 64, -1: 16}[selector]
    # Fine-tuning trains the head layers up to the selected one and leaves the rest alone.
    grads = _supervised_grads(model, images)
    used = {0: 0, 1: 1, -1: 3}[selector]
    for i in range(3):
        layer_grads = [g for n, g in grads.items() if f"projection_head/layer_{i}/" in n]
        assert layer_grads
        if i < used:
            assert all(g is not None for g in layer_grads), i
        else:
            assert all(g is None for g in layer_grads), i


def test_zero_init_logits_layer_gives_zero_logits():
    images = _images()
    zero = SimCLRModel(_config(), NUM_CLASSES, 32, pretraining=False, zero_init_logits_layer=True)
    random = SimCLRModel(_config(), NUM_CLASSES, 32, pretraining=False)
    np.testing.assert_array_equal(zero(images)["logits_sup"], np.zeros([4, NUM_CLASSES]))
    assert float(tf.reduce_max(tf.abs(random(images)["logits_sup"]))) > 0.0


def test_imported_head_layers_follow_the_selector(tmp_path):
    """From a released-format SavedModel the layers below the selected output start pretrained;
    -1 (the head's output, as the reference reads `hiddens_list[-1]`) copies every layer."""
    from models.model import import_projection_head

    # A float32 model whatever policy an earlier test in this process left behind.
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        _check_imported_head_layers(import_projection_head, tmp_path)
    finally:
        keras.mixed_precision.set_global_policy(policy)


def _check_imported_head_layers(import_projection_head, tmp_path) -> None:
    source = SimCLRModel(_config(), NUM_CLASSES, 32, pretraining=True)
    source.build_for()
    for variable in source.projection_head.weights:
        variable.assign(tf.random.normal(variable.shape, seed=len(variable.name)))
    # The variables alone, under their model names: what import_projection_head reads (saving
    # the Keras model would trace every layer's call for nothing it uses).
    module = tf.Module()
    module.model_variables = list(source.weights)
    tf.saved_model.save(module, str(tmp_path))
    for selector, copied in ((1, 1), (-1, 3)):
        target = SimCLRModel(_config(ft_proj_selector=selector), NUM_CLASSES, 32, pretraining=False)
        target.build_for()
        assert import_projection_head(target.projection_head, str(tmp_path), selector) == copied
        for i in range(3):
            prefix = f"projection_head/layer_{i}/"
            pairs = [
                (s.numpy(), t.numpy())
                for s, t in zip(
                    source.projection_head.weights, target.projection_head.weights, strict=True
                )
                if prefix in s.name
            ]
            assert pairs
            equal = [np.array_equal(s, t) for s, t in pairs]
            assert all(equal) if i < copied else not any(equal), (selector, i, equal)
