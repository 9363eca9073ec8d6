import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from models.config import ModelConfig
from models.lars import LARS
from models.model import SimCLRModel
from models.optimizers import build_optimizer, weight_decay_loss
from models.schedule import WarmUpAndCosineDecay


def test_build_lars_with_reference_exclusions():
    optimizer = build_optimizer("lars", 0.1, momentum=0.8, weight_decay=1e-6, eeta=0.002)
    assert isinstance(optimizer, LARS)
    assert (optimizer.momentum, optimizer.lars_weight_decay, optimizer.eeta) == (0.8, 1e-6, 0.002)
    assert optimizer.decay_excludes == ["batch_normalization", "bias", "head_supervised"]
    assert optimizer.adaptation_excludes == optimizer.decay_excludes


def test_build_momentum_and_adam():
    sgd = build_optimizer("momentum", 0.1, momentum=0.9, weight_decay=1e-4)
    assert isinstance(sgd, keras.optimizers.SGD)
    assert sgd.nesterov and sgd.momentum == 0.9 and sgd.weight_decay is None
    adam = build_optimizer("adam", 1e-3, momentum=0.9, weight_decay=1e-4)
    assert isinstance(adam, keras.optimizers.Adam) and adam.weight_decay is None
    assert float(adam.learning_rate) == pytest.approx(1e-3)


def test_build_accepts_schedule():
    """A step takes the schedule's rate at the optimizer's own step counter."""
    schedule = WarmUpAndCosineDecay(0.3, 1000, 256, 1, 10, "linear")  # 3 warmup steps, peak 0.3
    optimizer = build_optimizer("lars", schedule, momentum=0.9, weight_decay=0.0)
    assert isinstance(optimizer._learning_rate, WarmUpAndCosineDecay)
    # A bias is excluded from decay and trust ratio: the first step is w -= lr(step) * g.
    bias = tf.Variable(np.zeros(2, np.float32), name="dense/bias")
    optimizer.iterations.assign(1)
    optimizer.apply_gradients([(tf.constant([1.0, -2.0]), bias)])
    np.testing.assert_allclose(bias.numpy(), [-0.1, 0.2], rtol=1e-6)


def test_unknown_optimizer_names_the_flag():
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer("rmsprop", 0.1, momentum=0.9, weight_decay=0.0)


@pytest.fixture()
def named_variables():
    rng = np.random.default_rng(5)
    names = [
        "conv2d/kernel",
        "batch_normalization/gamma",
        "projection_head/dense/kernel",
        "projection_head/dense/bias",
        "head_supervised/dense/kernel",
        "head_supervised/dense/bias",
    ]
    values = {n: rng.normal(size=(3, 2)).astype(np.float32) for n in names}
    return values, [tf.Variable(v, name=n) for n, v in values.items()]


def _half_squared_norm(arrays):
    return sum(0.5 * float((a.astype(np.float64) ** 2).sum()) for a in arrays)


def test_weight_decay_loss_for_lars_covers_only_supervised_head_weights(named_variables):
    values, variables = named_variables
    got = weight_decay_loss(variables, 1e-3, "lars")
    expected = 1e-3 * _half_squared_norm([values["head_supervised/dense/kernel"]])
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_weight_decay_loss_for_other_optimizers_skips_batch_norm(named_variables):
    values, variables = named_variables
    kept = [v for n, v in values.items() if "batch_normalization" not in n]
    for name in ["momentum", "adam"]:
        got = weight_decay_loss(variables, 1e-4, name)
        np.testing.assert_allclose(float(got), 1e-4 * _half_squared_norm(kept), rtol=1e-5)


def test_weight_decay_loss_without_candidates_is_zero():
    bn = tf.Variable(np.ones(2, np.float32), name="batch_normalization/beta")
    assert float(weight_decay_loss([bn], 1e-4, "lars")) == 0.0
    assert float(weight_decay_loss([bn], 1e-4, "momentum")) == 0.0


# --- exclusions on the real network --------------------------------------------------------------


def _tiny_model() -> SimCLRModel:
    """ResNet-18 at 1/8 width with squeeze-excitation (whose convolutions carry biases)."""
    config = ModelConfig(resnet_depth=18, width_multiplier=0.125, se_ratio=0.25)
    model = SimCLRModel(config, num_classes=3, image_size=8, pretraining=True)
    model.build_for()
    return model


def _roles(model: keras.Model) -> dict:
    """Each trainable variable's role found from the layer that owns it, not from its name."""
    roles = {}
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            roles.update({v.ref(): "batch_norm" for v in layer.trainable_weights})
        elif isinstance(layer, keras.layers.Conv2D | keras.layers.Dense):
            roles[layer.kernel.ref()] = "kernel"
            if layer.bias is not None:
                roles[layer.bias.ref()] = "bias"
    roles.update({v.ref(): "supervised_head" for v in model.supervised_head.trainable_variables})
    return roles


def _random_with_norm(rng: np.random.Generator, shape) -> np.ndarray:
    """A random direction with a norm in [0.5, 2], whatever the size: every variable then weighs
    about the same in a norm-based quantity, so none hides below a tolerance."""
    x = rng.normal(size=shape)
    return (x * rng.uniform(0.5, 2.0) / np.linalg.norm(x)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_model():
    model = _tiny_model()
    rng = np.random.default_rng(0)
    # Zero-initialized gammas and biases would hide decay terms.
    for v in model.trainable_variables:
        v.assign(_random_with_norm(rng, v.shape))
    roles = _roles(model)
    assert {v.ref() for v in model.trainable_variables} == set(roles)
    assert set(roles.values()) == {"batch_norm", "bias", "kernel", "supervised_head"}
    return model, roles


def _numpy_lars_step(w, g, lr, weight_decay, eeta, decay, adapt):
    """The first LARS step (momentum buffer still zero): w - lr * trust * (g + wd * w)."""
    w, g = w.astype(np.float64), g.astype(np.float64)
    if decay:
        g = g + weight_decay * w
    trust = eeta * np.linalg.norm(w) / np.linalg.norm(g) if adapt else 1.0
    return w - lr * trust * g


def test_lars_excludes_batch_norm_bias_and_supervised_head_of_the_real_model(tiny_model):
    """One step of the training optimizer on every variable of a real SimCLRModel.

    Kernels (convolutions, projection head) get weight decay and the trust ratio; batch-norm
    gammas/betas, biases and the supervised head (whose L2 goes through the loss) get neither.
    Each variable is checked against the numpy step for its role, and every wrong treatment is
    verified to land at least 100 tolerances away, so no exclusion error can slip through.
    """
    model, roles = tiny_model
    # Decay and trust ratio both change every update by tens of percent at these settings.
    lr, momentum, weight_decay, eeta = 1.0, 0.9, 1.0, 0.1
    rng = np.random.default_rng(1)
    before = [v.numpy() for v in model.trainable_variables]
    grads = [_random_with_norm(rng, w.shape) for w in before]
    optimizer = build_optimizer("lars", lr, momentum, weight_decay, eeta)
    optimizer.apply_gradients(zip(map(tf.constant, grads), model.trainable_variables, strict=True))

    checked = set()
    for v, w, g in zip(model.trainable_variables, before, grads, strict=True):
        role = roles[v.ref()]
        included = role == "kernel"
        atol = 1e-5 * np.abs(w).max()
        step = {
            (decay, adapt): _numpy_lars_step(w, g, lr, weight_decay, eeta, decay, adapt)
            for decay in (False, True)
            for adapt in (False, True)
        }
        right = step[included, included]
        np.testing.assert_allclose(v.numpy(), right, atol=atol, err_msg=v.name)
        for wrong in [(not included, included), (included, not included)]:
            assert np.abs(step[wrong] - right).max() > 100 * atol, (v.name, wrong)
        checked.add(role)
    assert checked == {"batch_norm", "bias", "kernel", "supervised_head"}


@pytest.mark.parametrize("optimizer_name", ["lars", "momentum", "adam"])
def test_weight_decay_loss_on_the_real_model(tiny_model, optimizer_name):
    """With LARS the loss carries L2 only for the supervised head's kernel (LARS decays the other
    kernels and nothing decays biases or batch norm); otherwise everything but batch norm."""
    model, roles = tiny_model
    if optimizer_name == "lars":
        kept = [model.supervised_head.dense.kernel]
    else:
        kept = [v for v in model.trainable_variables if roles[v.ref()] != "batch_norm"]
    expected = 1e-3 * _half_squared_norm([v.numpy() for v in kept])
    got = float(weight_decay_loss(model.trainable_variables, 1e-3, optimizer_name))
    rtol = 1e-5
    np.testing.assert_allclose(got, expected, rtol=rtol)
    # The smallest variable a wrong selection could add or drop moves the loss by far more.
    smallest = min(1e-3 * _half_squared_norm([v.numpy()]) for v in model.trainable_variables)
    assert smallest > 100 * rtol * expected
