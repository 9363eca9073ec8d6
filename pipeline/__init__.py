"""Importing this package pins Keras 2 (tf_keras) for TensorFlow, TFX, tf.Transform and TFMA."""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
