"""SimCLR model: backbone, heads, loss, optimizer, input pipeline, training loop and export.

Importing this package pins Keras 2 (tf_keras) before TensorFlow is imported."""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
