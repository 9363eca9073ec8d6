"""SimCLR learning-rate schedule: batch-size scaled peak, linear warmup, cosine decay to zero."""

import math

import tensorflow as tf
import tf_keras as keras


def scaled_learning_rate(
    base_learning_rate: float, train_batch_size: int, learning_rate_scaling: str
) -> float:
    """Peak learning rate; 'linear' (base * batch / 256) suits SGD/LARS, 'sqrt' large batches."""
    if learning_rate_scaling == "linear":
        return base_learning_rate * train_batch_size / 256.0
    if learning_rate_scaling == "sqrt":
        return base_learning_rate * math.sqrt(train_batch_size)
    raise ValueError(
        f"Unknown learning_rate_scaling {learning_rate_scaling!r}; expected 'linear' or 'sqrt'."
    )


def warmup_steps(warmup_epochs: float, num_examples: int, train_batch_size: int) -> int:
    """Warmup length in steps, using floor division of epochs * examples by the batch size."""
    return int(round(warmup_epochs * num_examples // train_batch_size))


def total_train_steps(
    num_examples: int, train_batch_size: int, train_epochs: int, train_steps: int
) -> int:
    """`train_steps` when positive, else floor(examples * epochs / batch) + 1 (SimCLR's count)."""
    if train_steps > 0:
        return train_steps
    return num_examples * train_epochs // train_batch_size + 1


@keras.saving.register_keras_serializable(package="simclr")
class WarmUpAndCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to the scaled rate, then cosine decay reaching 0 at `total_steps`.

    The rate stays 0 after `total_steps`. With no warmup the schedule starts at the peak.
    """

    def __init__(
        self,
        base_learning_rate: float,
        num_examples: int,
        train_batch_size: int,
        warmup_epochs: float,
        total_steps: int,
        learning_rate_scaling: str = "linear",
        name: str | None = None,
    ):
        super().__init__()
        self.base_learning_rate = base_learning_rate
        self.num_examples = num_examples
        self.train_batch_size = train_batch_size
        self.warmup_epochs = warmup_epochs
        self.total_steps = total_steps
        self.learning_rate_scaling = learning_rate_scaling
        self.name = name
        # Computed eagerly so a bad scaling flag fails at construction, not mid-training.
        self.peak = scaled_learning_rate(
            base_learning_rate, train_batch_size, learning_rate_scaling
        )
        self.warmup = warmup_steps(warmup_epochs, num_examples, train_batch_size)

    def __call__(self, step):
        with tf.name_scope(self.name or "WarmUpAndCosineDecay"):
            step = tf.cast(step, tf.float32)
            peak = tf.constant(self.peak, tf.float32)
            if self.warmup > 0:
                warmup_lr = step / float(self.warmup) * peak
            else:
                warmup_lr = peak
            # Guard against total_steps <= warmup (tiny test runs): decay then finishes at once.
            decay_steps = float(max(self.total_steps - self.warmup, 1))
            progress = tf.minimum(step - float(self.warmup), decay_steps) / decay_steps
            cosine_lr = 0.5 * peak * (1.0 + tf.cos(math.pi * progress))
            return tf.where(step < float(self.warmup), warmup_lr, cosine_lr)

    def get_config(self):
        return {
            "base_learning_rate": self.base_learning_rate,
            "num_examples": self.num_examples,
            "train_batch_size": self.train_batch_size,
            "warmup_epochs": self.warmup_epochs,
            "total_steps": self.total_steps,
            "learning_rate_scaling": self.learning_rate_scaling,
            "name": self.name,
        }
