"""Tests for the projection and supervised heads against numpy references."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from models.heads import ProjectionHead, SupervisedHead
from models.resnet import BATCH_NORM_EPSILON


def _features(batch: int = 6, dim: int = 8, seed: int = 0) -> tf.Tensor:
    return tf.constant(np.random.default_rng(seed).normal(size=(batch, dim)), tf.float32)


def _np_bn_train(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    # Training-mode BN normalizes with the biased batch variance.
    return (x - x.mean(0)) / np.sqrt(x.var(0) + BATCH_NORM_EPSILON) * gamma + beta


def _randomize(layer: keras.layers.Layer, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    for v in layer.trainable_variables:
        v.assign(rng.normal(size=v.shape).astype(np.float32))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "mlp", "out_dim": 4, "num_layers": 2}, "proj_head_mode"),
        ({"mode": "nonlinear", "out_dim": 4, "num_layers": 0}, "num_proj_layers"),
        ({"mode": "linear", "out_dim": 0, "num_layers": 1}, "proj_out_dim"),
    ],
)
def test_projection_head_rejects_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProjectionHead(**kwargs)


def test_none_mode_passes_features_through():
    head = ProjectionHead("none", out_dim=4, num_layers=3)
    x = _features()
    out, hiddens = head(x, training=True)
    np.testing.assert_array_equal(out.numpy(), x.numpy())
    assert len(hiddens) == 1
    np.testing.assert_array_equal(hiddens[0].numpy(), x.numpy())
    assert head.trainable_variables == []


def test_linear_mode_is_one_dense_and_uncentered_batch_norm():
    head = ProjectionHead("linear", out_dim=4, num_layers=3)
    x = _features()
    head(x, training=False)
    _randomize(head)
    out, hiddens = head(x, training=True)
    assert len(head.linear_layers) == 1
    assert [tuple(h.shape) for h in hiddens] == [(6, 8), (6, 4)]
    layer = head.linear_layers[0]
    assert layer.dense.bias is None
    assert layer.batch_normalization.beta is None
    expected = _np_bn_train(
        x.numpy() @ layer.dense.kernel.numpy(), layer.batch_normalization.gamma.numpy(), 0.0
    )
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_nonlinear_mode_matches_numpy_mlp_and_exposes_hiddens():
    head = ProjectionHead("nonlinear", out_dim=3, num_layers=3, batch_norm_decay=0.8)
    x = _features()
    head(x, training=False)
    _randomize(head)
    out, hiddens = head(x, training=True)

    assert [tuple(h.shape) for h in hiddens] == [(6, 8), (6, 8), (6, 8), (6, 3)]
    expected = [x.numpy()]
    for i, layer in enumerate(head.linear_layers):
        bn = layer.batch_normalization
        last = i == len(head.linear_layers) - 1
        assert layer.dense.bias is None
        assert (bn.beta is None) == last
        assert bn.momentum == 0.8 and bn.epsilon == BATCH_NORM_EPSILON
        h = _np_bn_train(
            expected[-1] @ layer.dense.kernel.numpy(),
            bn.gamma.numpy(),
            0.0 if last else bn.beta.numpy(),
        )
        expected.append(h if last else np.maximum(h, 0))
    for got, want in zip(hiddens, expected, strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out.numpy(), hiddens[-1].numpy())


def test_projection_head_inference_uses_moving_statistics():
    """Inference BN uses the moving mean/variance, then gamma/beta. Every statistic is set to a
    random value first: with fresh ones (0, 1, 1, 0) BN is the identity up to 5e-6, which a
    head that skipped BN, or ignored the moving statistics, would also pass."""
    head = ProjectionHead("nonlinear", out_dim=4, num_layers=2)
    x = _features()
    head(x, training=False)
    _randomize(head)
    rng = np.random.default_rng(2)
    for layer in head.linear_layers:
        bn = layer.batch_normalization
        bn.moving_mean.assign(rng.normal(size=bn.moving_mean.shape))
        bn.moving_variance.assign(rng.uniform(0.5, 2.0, bn.moving_variance.shape))
    out, hiddens = head(x, training=False)

    expected = x.numpy().astype(np.float64)
    for i, layer in enumerate(head.linear_layers):
        bn = layer.batch_normalization
        z = expected @ layer.dense.kernel.numpy()
        z = (z - bn.moving_mean.numpy()) / np.sqrt(bn.moving_variance.numpy() + BATCH_NORM_EPSILON)
        z = z * bn.gamma.numpy() + (0.0 if bn.beta is None else bn.beta.numpy())
        expected = np.maximum(z, 0) if i == 0 else z
        np.testing.assert_allclose(hiddens[i + 1].numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.numpy(), hiddens[-1].numpy())


def test_projection_head_variable_names_and_initializer():
    head = ProjectionHead("nonlinear", out_dim=64, num_layers=2, global_bn=True)
    head(_features(dim=256), training=False)
    for v in head.variables:
        assert v.name.startswith("projection_head/")
        assert v.name.endswith("kernel:0") or "batch_normalization" in v.name, v.name
    assert all(layer.batch_normalization.synchronized for layer in head.linear_layers)
    kernel = head.linear_layers[0].dense.kernel.numpy()
    assert kernel.std() == pytest.approx(0.01, rel=0.05)


@pytest.mark.parametrize("zero_init", [False, True])
def test_supervised_head_is_affine_with_bias(zero_init):
    head = SupervisedHead(num_classes=5, zero_init=zero_init)
    x = _features(dim=64)
    logits = head(x)
    kernel, bias = head.dense.kernel.numpy(), head.dense.bias.numpy()
    assert kernel.shape == (64, 5) and bias.shape == (5,)
    assert all("head_supervised" in v.name for v in head.variables)
    if zero_init:
        assert np.all(kernel == 0) and np.all(bias == 0)
        assert np.all(logits.numpy() == 0)
    else:
        assert kernel.std() == pytest.approx(0.01, rel=0.2)
        assert np.all(bias == 0)
    _randomize(head, seed=3)
    np.testing.assert_allclose(
        head(x).numpy(),
        x.numpy() @ head.dense.kernel.numpy() + head.dense.bias.numpy(),
        rtol=1e-5,
        atol=1e-5,
    )


def test_supervised_head_rejects_empty_output():
    with pytest.raises(ValueError, match="num_classes"):
        SupervisedHead(num_classes=0)
