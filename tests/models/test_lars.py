import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from models.lars import LARS

# Large decay and trust coefficient on purpose: with the reference's 1e-6 / 0.001 the decay term
# moves a weight by less than a float32 comparison can resolve, so a test could not tell whether
# it was applied. Here decay and trust ratio each change every step by percents or more.
MOMENTUM, WEIGHT_DECAY, EETA = 0.9, 0.5, 0.1


def _numpy_lars_step(w, m, g, lr, decay, adapt, weight_decay=WEIGHT_DECAY):
    """Classic-momentum LARS step written out from the paper's rule."""
    if decay:
        g = g + weight_decay * w
    trust = 1.0
    w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
    if adapt and w_norm > 0 and g_norm > 0:
        trust = EETA * w_norm / g_norm
    m = MOMENTUM * m + lr * trust * g
    return w - m, m


def _variables(rng):
    return {
        "dense/kernel": rng.normal(size=(3, 2)).astype(np.float32),
        "dense/bias": rng.normal(size=(2,)).astype(np.float32),
        "batch_normalization/gamma": rng.normal(size=(2,)).astype(np.float32),
    }


def _run(optimizer, init, grads_per_step):
    variables = {name: tf.Variable(value, name=name) for name, value in init.items()}
    for grads in grads_per_step:
        optimizer.apply_gradients(
            [(tf.constant(grads[name]), variables[name]) for name in variables]
        )
    return {name: v.numpy() for name, v in variables.items()}


@pytest.mark.parametrize(
    "adaptation_excludes, adapted",
    [
        (None, {"dense/kernel"}),  # defaults to the weight-decay list
        (["bias"], {"dense/kernel", "batch_normalization/gamma"}),
    ],
)
def test_two_steps_match_numpy(adaptation_excludes, adapted):
    rng = np.random.default_rng(0)
    init = _variables(rng)
    grads = [
        {k: rng.normal(size=v.shape).astype(np.float32) for k, v in init.items()} for _ in range(2)
    ]
    lr = 0.5
    optimizer = LARS(
        lr,
        momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY,
        eeta=EETA,
        exclude_from_weight_decay=["batch_normalization", "bias"],
        exclude_from_layer_adaptation=adaptation_excludes,
    )
    got = _run(optimizer, init, grads)

    def numpy_run(name, decay, adapt):
        w, m = init[name], np.zeros_like(init[name])
        for step_grads in grads:
            w, m = _numpy_lars_step(w, m, step_grads[name], lr, decay=decay, adapt=adapt)
        return w

    rtol = 1e-5
    for name in init:
        decay, adapt = name == "dense/kernel", name in adapted
        expected = numpy_run(name, decay, adapt)
        np.testing.assert_allclose(got[name], expected, rtol=rtol, err_msg=name)
        # Flipping either exclusion moves the result by over 100 tolerances.
        for wrong in [(not decay, adapt), (decay, not adapt)]:
            gap = np.abs(numpy_run(name, *wrong) - expected) / np.abs(expected)
            assert gap.max() > 100 * rtol, (name, wrong)


def test_learning_rate_schedule_is_followed():
    rng = np.random.default_rng(1)
    init = {"dense/kernel": rng.normal(size=(4,)).astype(np.float32)}
    grads = [{"dense/kernel": rng.normal(size=(4,)).astype(np.float32)} for _ in range(2)]
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([0], [0.1, 0.03])
    optimizer = LARS(schedule, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, eeta=EETA)
    got = _run(optimizer, init, grads)

    w, m = init["dense/kernel"], np.zeros(4, np.float32)
    for lr, step_grads in zip([0.1, 0.03], grads, strict=True):
        w, m = _numpy_lars_step(w, m, step_grads["dense/kernel"], lr, decay=True, adapt=True)
    np.testing.assert_allclose(got["dense/kernel"], w, rtol=1e-5)


def test_zero_norms_fall_back_to_unit_trust_ratio():
    init = {
        "zero/kernel": np.zeros(3, np.float32),
        "still/kernel": np.array([1.0, -2.0, 2.0], np.float32),
    }
    grads = {
        "zero/kernel": np.array([1.0, 2.0, 3.0], np.float32),
        "still/kernel": np.zeros(3, np.float32),
    }
    optimizer = LARS(0.1, momentum=MOMENTUM, weight_decay=0.0, eeta=EETA)
    got = _run(optimizer, init, [grads])
    # ||w|| = 0: plain momentum SGD step, no eeta scaling, no NaN.
    np.testing.assert_allclose(got["zero/kernel"], -0.1 * grads["zero/kernel"], rtol=1e-6)
    # ||g|| = 0 (no decay): nothing moves.
    np.testing.assert_array_equal(got["still/kernel"], init["still/kernel"])


def test_works_under_mirrored_strategy():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    rng = np.random.default_rng(2)
    w0 = rng.normal(size=(3,)).astype(np.float32)
    g = rng.normal(size=(3,)).astype(np.float32)
    with strategy.scope():
        var = tf.Variable(w0, name="dense/kernel")
        optimizer = LARS(0.2, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, eeta=EETA)

    @tf.function
    def step():
        strategy.run(lambda: optimizer.apply_gradients([(tf.constant(g), var)]))

    step()
    expected, _ = _numpy_lars_step(w0, np.zeros(3), g, 0.2, decay=True, adapt=True)
    np.testing.assert_allclose(var.numpy(), expected, rtol=1e-5)


def test_config_round_trip():
    optimizer = LARS(
        0.3,
        momentum=0.8,
        weight_decay=1e-6,
        eeta=0.002,
        exclude_from_weight_decay=["bias"],
    )
    config = optimizer.get_config()
    assert config["exclude_from_layer_adaptation"] == ["bias"]
    clone = LARS.from_config(config)
    assert (clone.momentum, clone.lars_weight_decay, clone.eeta) == (0.8, 1e-6, 0.002)
    assert clone.weight_decay is None  # the base class's decoupled decay stays off
    assert clone.decay_excludes == ["bias"] and clone.adaptation_excludes == ["bias"]
    np.testing.assert_allclose(float(clone.learning_rate.numpy()), 0.3, rtol=1e-6)


def test_sparse_gradients_are_rejected():
    var = tf.Variable(np.ones((4, 2), np.float32), name="embedding")
    sparse = tf.IndexedSlices(tf.ones((1, 2)), tf.constant([1]), tf.constant([4, 2]))
    with pytest.raises(TypeError, match="dense gradients"):
        LARS(0.1).apply_gradients([(sparse, var)])
