"""Optimizer factory and the explicit L2 term that complements each optimizer's own decay."""

from collections.abc import Iterable

import tensorflow as tf
import tf_keras as keras

from models.lars import LARS

# LARS decays everything else itself; the supervised head gets its L2 through the loss instead.
LARS_DECAY_EXCLUDES = ("batch_normalization", "bias", "head_supervised")

LearningRate = float | keras.optimizers.schedules.LearningRateSchedule


def build_optimizer(
    name: str,
    learning_rate: LearningRate,
    momentum: float,
    weight_decay: float,
    eeta: float = 0.001,
) -> keras.optimizers.Optimizer:
    """Returns 'lars', 'momentum' (Nesterov SGD) or 'adam'.

    Only LARS consumes `weight_decay`; for the others it is added to the loss by
    `weight_decay_loss`.
    """
    if name == "lars":
        return LARS(
            learning_rate,
            momentum=momentum,
            weight_decay=weight_decay,
            eeta=eeta,
            exclude_from_weight_decay=list(LARS_DECAY_EXCLUDES),
        )
    if name == "momentum":
        return keras.optimizers.SGD(learning_rate, momentum=momentum, nesterov=True)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    raise ValueError(f"Unknown optimizer {name!r}; expected 'lars', 'momentum' or 'adam'.")


def weight_decay_loss(
    variables: Iterable[tf.Variable], weight_decay: float, optimizer_name: str
) -> tf.Tensor:
    """weight_decay * sum(||v||^2 / 2) over the variables the optimizer does not decay itself.

    With LARS only the supervised head's non-bias weights are covered (LARS excludes that head
    from its own decay); otherwise every variable except batch-norm ones. Returns a float32
    scalar, 0 when no variable qualifies.
    """
    if optimizer_name == "lars":
        selected = [v for v in variables if "head_supervised" in v.name and "bias" not in v.name]
    else:
        selected = [v for v in variables if "batch_normalization" not in v.name]
    if not selected:
        return tf.constant(0.0, tf.float32)
    l2 = tf.add_n([tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in selected])
    return weight_decay * l2
