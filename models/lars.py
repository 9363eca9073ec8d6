"""LARS optimizer (You et al., 2017, arXiv:1708.03888) with SimCLR's classic-momentum variant.

Built on the new-style tf_keras optimizer so that gradient all-reduce under tf.distribute and
LearningRateSchedule handling come from the base class.
"""

import re

import tensorflow as tf
import tf_keras as keras


@keras.saving.register_keras_serializable(package="simclr")
class LARS(keras.optimizers.Optimizer):
    """Momentum SGD whose per-variable step is scaled by the trust ratio eeta * ||w|| / ||g||.

    Per variable: g += weight_decay * w (unless excluded from weight decay); the trust ratio is
    applied unless the variable is excluded from layer adaptation, and falls back to 1 when either
    norm is zero; then m = momentum * m + lr * trust_ratio * g and w -= m. Exclusions are regular
    expressions searched in the variable name (plain substrings in practice).
    """

    def __init__(
        self,
        learning_rate: float | keras.optimizers.schedules.LearningRateSchedule,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eeta: float = 0.001,
        exclude_from_weight_decay: list[str] | None = None,
        exclude_from_layer_adaptation: list[str] | None = None,
        name: str = "LARS",
        **kwargs,
    ):
        # The base class's decoupled weight decay must stay off: LARS folds decay into the gradient.
        super().__init__(name=name, weight_decay=None, **kwargs)
        self._learning_rate = self._build_learning_rate(learning_rate)
        self.momentum = momentum
        self.lars_weight_decay = weight_decay
        self.eeta = eeta
        self.decay_excludes = list(exclude_from_weight_decay or [])
        # Like the original LARS setup, an unset (or empty) adaptation list reuses the decay list.
        self.adaptation_excludes = list(exclude_from_layer_adaptation or self.decay_excludes)

    def build(self, var_list):
        super().build(var_list)
        if getattr(self, "_built", False):
            return
        self.momentums = [
            self.add_variable_from_reference(model_variable=var, variable_name="m")
            for var in var_list
        ]
        self._built = True

    def _applies_decay(self, name: str) -> bool:
        return bool(self.lars_weight_decay) and not _matches_any(self.decay_excludes, name)

    def _applies_adaptation(self, name: str) -> bool:
        return not _matches_any(self.adaptation_excludes, name)

    def update_step(self, gradient, variable):
        if isinstance(gradient, tf.IndexedSlices):
            raise TypeError(
                f"LARS needs dense gradients (norms are taken over the whole variable); got "
                f"IndexedSlices for {variable.name}. Densify it, e.g. tf.convert_to_tensor."
            )
        dtype = variable.dtype
        momentum_slot = self.momentums[self._index_dict[self._var_key(variable)]]
        grad = tf.cast(gradient, dtype)
        if self._applies_decay(variable.name):
            grad = grad + tf.cast(self.lars_weight_decay, dtype) * variable

        lr = tf.cast(self.learning_rate, dtype)
        if self._applies_adaptation(variable.name):
            w_norm = tf.norm(variable)
            g_norm = tf.norm(grad)
            usable = tf.logical_and(w_norm > 0, g_norm > 0)
            # Divide by a safe denominator so the unused branch cannot produce inf/NaN.
            ratio = (
                tf.cast(self.eeta, dtype) * w_norm / tf.where(usable, g_norm, tf.ones_like(g_norm))
            )
            lr = lr * tf.where(usable, ratio, tf.ones_like(ratio))

        momentum_slot.assign(tf.cast(self.momentum, dtype) * momentum_slot + lr * grad)
        variable.assign_sub(momentum_slot)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "learning_rate": self._serialize_hyperparameter(self._learning_rate),
                "momentum": self.momentum,
                "weight_decay": self.lars_weight_decay,
                "eeta": self.eeta,
                "exclude_from_weight_decay": self.decay_excludes,
                "exclude_from_layer_adaptation": self.adaptation_excludes,
            }
        )
        return config


def _matches_any(patterns: list[str], name: str) -> bool:
    return any(re.search(pattern, name) is not None for pattern in patterns)
