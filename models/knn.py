"""Weighted k-nearest-neighbour monitor of the backbone during pretraining.

Every few epochs each eval image is classified by a vote of its k most cosine-similar training
images in backbone feature space (`final_avg_pool`), each vote weighted exp(similarity / T), as
in instance discrimination (Wu et al., 2018) and the usual SimCLR kNN monitor. Nothing is
trained for it, so the number tracks representation quality across epochs and runs without the
noise of an online linear head.

Before the first step the same vote is taken twice more, as floors that pretraining has to
beat: with the randomly initialized backbone, and with the raw pixels themselves (the evaluation
view flattened). A number above both is what pretraining bought.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
import tf_keras as keras

from models import data as data_lib

METRIC = "eval/knn_top_1_accuracy"
RANDOM_INIT_METRIC = "eval/knn_top_1_random_init"
RAW_PIXELS_METRIC = "eval/knn_top_1_raw_pixels"
# Written beside the checkpoints at step 0, so a resumed run reports the floors it never
# recomputes (the random-init backbone is gone by then).
FLOORS_FILE = "knn_floors.json"
# The raw-pixel bank holds the whole training split as float32 pixels (CIFAR-10: 614 MB);
# above this (ImageNet-sized splits) that floor is left out.
MAX_PIXEL_BANK_BYTES = 2 << 30
DEFAULT_K = 200
DEFAULT_TEMPERATURE = 0.1
# Queries scored at once: bounds the [queries, bank] similarity matrix (256 x 50k = 51 MB).
QUERY_CHUNK = 256


def backbone_embedding(model: keras.Model) -> Callable[[tf.Tensor], tf.Tensor]:
    """images -> L2-normalized float32 `final_avg_pool` features, traced once for any batch.

    The backbone runs alone (`model.resnet`) in inference mode, so batch norm uses its moving
    statistics and the heads cost nothing. Keep the returned function: a new one traces the
    network again, and each trace costs seconds.
    """
    size = model.image_size

    @tf.function(
        input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)], autograph=False
    )
    def embed(images: tf.Tensor) -> tf.Tensor:
        features = model.resnet(images, training=False)["final_avg_pool"]
        return tf.math.l2_normalize(tf.cast(features, tf.float32), axis=-1)

    return embed


def pixel_embedding(images: tf.Tensor) -> tf.Tensor:
    """The raw-pixel baseline's features: each image flattened and L2-normalized (float32)."""
    flat = tf.reshape(tf.cast(images, tf.float32), [tf.shape(images)[0], -1])
    return tf.math.l2_normalize(flat, axis=-1)


def collect(
    dataset: tf.data.Dataset, embed: Callable[[tf.Tensor], tf.Tensor]
) -> tuple[tf.Tensor, tf.Tensor]:
    """`embed` of every image [N, D] and int64 labels [N] over one pass of (images, labels)."""
    features, labels = [], []
    for images, batch_labels in dataset:
        features.append(embed(images))
        labels.append(tf.cast(batch_labels, tf.int64))
    if not features:
        raise ValueError("kNN monitor: a split has no examples")
    return tf.concat(features, 0), tf.concat(labels, 0)


def extract_features(model: keras.Model, dataset: tf.data.Dataset) -> tuple[tf.Tensor, tf.Tensor]:
    """L2-normalized float32 `final_avg_pool` features [N, D] and int64 labels [N] of one pass."""
    return collect(dataset, backbone_embedding(model))


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

    # One trace for every chunk, the shorter last one included.
    @tf.function(
        input_signature=[tf.TensorSpec([None, bank.shape[1]], tf.float32)], autograph=False
    )
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


def knn_top1(
    bank: tf.Tensor,
    bank_labels: tf.Tensor,
    queries: tf.Tensor,
    labels: tf.Tensor,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
) -> float:
    """Fraction of queries whose weighted-kNN class (`weighted_knn_predict`) is their label."""
    predictions = weighted_knn_predict(bank, bank_labels, queries, num_classes, k, temperature)
    return float(np.mean(predictions.numpy() == np.asarray(labels)))


class KnnMonitor:
    """`on_checkpoint` callback of `train_loop.run`: {METRIC: accuracy} when due, else {};
    `floors` is its `on_start` callback.

    The memory bank is the whole training split under evaluation preprocessing (center crop, no
    augmentation), recomputed at each evaluation because the backbone has changed. `last` holds
    the latest accuracy and the floors, as results.json records them.
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
        starts_trained: bool = False,
        bank_size: int | None = None,
    ):
        if every_steps < 1:
            raise ValueError(
                f"--knn_every_epochs: kNN interval must be >= 1 step, got {every_steps}"
            )
        self.model = model
        self.train_files = train_files
        self.bank_size = bank_size  # records in train_files, when known without reading them
        self.eval_files = eval_files
        self.spec = spec
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.every_steps = every_steps
        self.checkpoint_every = checkpoint_every
        self.total_steps = total_steps
        self.k = k
        self.temperature = temperature
        # A warm-started encoder: its step-0 kNN is where training starts, not a floor.
        self.starts_trained = starts_trained
        self.floor_values: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self._embed = backbone_embedding(model)

    def _splits(self) -> tuple[tf.data.Dataset, tf.data.Dataset]:
        return (
            data_lib.eval_dataset(self.train_files, self.spec, self.batch_size),
            data_lib.eval_dataset(self.eval_files, self.spec, self.batch_size),
        )

    def _top1(self, embed: Callable[[tf.Tensor], tf.Tensor]) -> float:
        train, evals = self._splits()
        bank, bank_labels = collect(train, embed)
        queries, labels = collect(evals, embed)
        return knn_top1(
            bank, bank_labels, queries, labels, self.num_classes, self.k, self.temperature
        )

    def accuracy(self) -> float:
        """kNN top-1 of the backbone as it is now."""
        return self._top1(self._embed)

    def raw_pixel_accuracy(self) -> float | None:
        """kNN top-1 on raw pixels; None when their bank would exceed MAX_PIXEL_BANK_BYTES."""
        count = self.bank_size
        if count is None:
            count = len(data_lib.read_labels_and_keys(self.train_files)[0])
        per_image = 4 * 3 * self.spec.image_size**2
        if count * per_image > MAX_PIXEL_BANK_BYTES:
            print(
                f"kNN monitor: no raw-pixel floor: {count} training images of "
                f"{per_image} bytes exceed the {MAX_PIXEL_BANK_BYTES / 2**30:.1f} GiB bank limit",
                flush=True,
            )
            return None
        return self._top1(pixel_embedding)

    def floors(self, step: int, save_dir: str = "", restore_dir: str = "") -> dict[str, float]:
        """Random-init and raw-pixel kNN top-1, computed before the first step (`step` 0).

        They are saved as FLOORS_FILE in `save_dir` (the checkpoint directory). A run resumed
        past step 0 reads them back from `restore_dir` (default: save_dir) into `last` rather
        than recomputing them (the backbone is no longer at its initialization) and returns {},
        so they are logged once, by the run that measured them. An encoder that `starts_trained`
        (warm start) has no random-init floor: its step-0 kNN is logged as the kNN accuracy at
        step 0, where training starts from.
        """
        if step > 0:
            directory = restore_dir or save_dir
            path = os.path.join(directory, FLOORS_FILE)
            if directory and tf.io.gfile.exists(path):
                with tf.io.gfile.GFile(path) as f:
                    self.floor_values = {k: float(v) for k, v in json.load(f).items()}
                self.last = {**self.last, **self.floor_values}
            return {}
        start = {METRIC if self.starts_trained else RANDOM_INIT_METRIC: self.accuracy()}
        floors = {} if self.starts_trained else dict(start)
        raw = self.raw_pixel_accuracy()
        if raw is not None:
            floors[RAW_PIXELS_METRIC] = raw
        if save_dir:
            tf.io.gfile.makedirs(save_dir)
            with tf.io.gfile.GFile(os.path.join(save_dir, FLOORS_FILE), "w") as f:
                json.dump(floors, f, indent=2)
        self.floor_values = floors
        self.last = {**start, **floors}
        return dict(self.last)

    def __call__(self, step: int) -> dict[str, float]:
        if not knn_due(step, self.every_steps, self.checkpoint_every, self.total_steps):
            return {}
        accuracy = {METRIC: self.accuracy()}
        self.last = {**accuracy, **self.floor_values}
        return accuracy
