"""Weighted k-nearest-neighbour monitor of the backbone during pretraining.

Every few epochs each eval image is classified by a vote of its k most cosine-similar training
images in backbone feature space (`final_avg_pool`), each vote weighted exp(similarity / T), as
in instance discrimination (Wu et al., 2018) and the usual SimCLR kNN monitor. Nothing is
trained for it, so the number tracks representation quality across epochs and runs without the
noise of an online linear head.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import tf_keras as keras

from models import data as data_lib

METRIC = "eval/knn_top_1_accuracy"
DEFAULT_K = 200
DEFAULT_TEMPERATURE = 0.1
# Queries scored at once: bounds the [queries, bank] similarity matrix (256 x 50k = 51 MB).
QUERY_CHUNK = 256


def extract_features(model: keras.Model, dataset: tf.data.Dataset) -> tuple[tf.Tensor, tf.Tensor]:
    """L2-normalized float32 `final_avg_pool` features [N, D] and int64 labels [N] of one pass.

    Runs the backbone only (`model.resnet`) in inference mode on (images, labels) batches, so
    batch norm uses its moving statistics and the heads cost nothing.
    """

    @tf.function(reduce_retracing=True)
    def embed(images: tf.Tensor) -> tf.Tensor:
        features = model.resnet(images, training=False)["final_avg_pool"]
        return tf.math.l2_normalize(tf.cast(features, tf.float32), axis=-1)

    features, labels = [], []
    for images, batch_labels in dataset:
        features.append(embed(images))
        labels.append(tf.cast(batch_labels, tf.int64))
    if not features:
        raise ValueError("kNN monitor: a split has no examples")
    return tf.concat(features, 0), tf.concat(labels, 0)


def weighted_knn_predict(
    bank: tf.Tensor,
    bank_labels: tf.Tensor,
    queries: tf.Tensor,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
) -> tf.Tensor:
    """Top-1 class of each query: argmax_c sum over its k nearest bank rows of class c of
    exp(cos / T).

    `bank` [N, D] and `queries` [M, D] must be L2-normalized (dot product = cosine). k is capped
    at N. Returns int64 [M].
    """
    if k < 1:
        raise ValueError(f"kNN monitor: k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"kNN monitor: temperature must be positive, got {temperature}")
    bank = tf.convert_to_tensor(bank, tf.float32)
    bank_labels = tf.convert_to_tensor(bank_labels, tf.int64)
    queries = tf.convert_to_tensor(queries, tf.float32)
    k = min(k, int(bank.shape[0]))

    @tf.function(reduce_retracing=True)
    def predict(chunk: tf.Tensor) -> tf.Tensor:
        similarity = tf.matmul(chunk, bank, transpose_b=True)
        top_similarity, top_index = tf.math.top_k(similarity, k=k)
        weights = tf.exp(top_similarity / temperature)
        neighbour_classes = tf.one_hot(tf.gather(bank_labels, top_index), num_classes)
        votes = tf.reduce_sum(neighbour_classes * weights[..., tf.newaxis], axis=1)
        return tf.argmax(votes, axis=-1)

    count = int(queries.shape[0])
    return tf.concat(
        [predict(queries[i : i + QUERY_CHUNK]) for i in range(0, count, QUERY_CHUNK)]
        or [tf.zeros([0], tf.int64)],
        axis=0,
    )


def knn_due(step: int, every_steps: int, checkpoint_every: int, total_steps: int) -> bool:
    """Whether the checkpoint at `step` runs the monitor.

    Checkpoints need not fall on epoch boundaries, so the monitor runs at the first checkpoint
    at or after each multiple of `every_steps` (one that lies in (step - checkpoint_every,
    step]), and always at the last step so every run ends with a kNN number.
    """
    if step >= total_steps:
        return True
    return step // every_steps > max(step - checkpoint_every, 0) // every_steps


class KnnMonitor:
    """`on_checkpoint` callback of `train_loop.run`: {METRIC: accuracy} when due, else {}.

    The memory bank is the whole training split under evaluation preprocessing (center crop, no
    augmentation), recomputed at each evaluation because the backbone has changed.
    """

    def __init__(
        self,
        model: keras.Model,
        train_files: Sequence[str] | str,
        eval_files: Sequence[str] | str,
        spec: data_lib.ImageSpec,
        *,
        batch_size: int,
        num_classes: int,
        every_steps: int,
        checkpoint_every: int,
        total_steps: int,
        k: int = DEFAULT_K,
        temperature: float = DEFAULT_TEMPERATURE,
    ):
        if every_steps < 1:
            raise ValueError(
                f"--knn_every_epochs: kNN interval must be >= 1 step, got {every_steps}"
            )
        self.model = model
        self.train_files = train_files
        self.eval_files = eval_files
        self.spec = spec
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.every_steps = every_steps
        self.checkpoint_every = checkpoint_every
        self.total_steps = total_steps
        self.k = k
        self.temperature = temperature
        self.last: dict[str, float] = {}

    def accuracy(self) -> float:
        bank, bank_labels = extract_features(
            self.model, data_lib.eval_dataset(self.train_files, self.spec, self.batch_size)
        )
        queries, labels = extract_features(
            self.model, data_lib.eval_dataset(self.eval_files, self.spec, self.batch_size)
        )
        predictions = weighted_knn_predict(
            bank, bank_labels, queries, self.num_classes, self.k, self.temperature
        )
        return float(np.mean(predictions.numpy() == labels.numpy()))

    def __call__(self, step: int) -> dict[str, float]:
        if not knn_due(step, self.every_steps, self.checkpoint_every, self.total_steps):
            return {}
        self.last = {METRIC: self.accuracy()}
        return self.last
