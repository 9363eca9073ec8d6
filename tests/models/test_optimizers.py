import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from models.lars import LARS
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
    schedule = WarmUpAndCosineDecay(0.3, 1000, 256, 1, 10, "linear")
    optimizer = build_optimizer("lars", schedule, momentum=0.9, weight_decay=0.0)
    assert isinstance(optimizer._learning_rate, WarmUpAndCosineDecay)


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
