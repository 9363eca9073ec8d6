"""NT-Xent contrastive loss (SimCLR) with negatives shared across replicas, plus its metrics."""

from typing import NamedTuple

import tensorflow as tf

# Subtracted from self-similarity logits so they vanish from the softmax without producing the
# NaNs that -inf would give inside softmax cross entropy.
_MASK_PENALTY = 1e9


class ContrastiveOutput(NamedTuple):
    """Loss of the local batch plus the view-1 logits/labels used for contrastive metrics.

    `logits` and `labels` have shape [B, 2 * B_global]: row i scores local view-1 anchor i against
    all view-2 rows of the global batch followed by all view-1 rows (its own column masked out).
    """

    loss: tf.Tensor
    logits: tf.Tensor
    labels: tf.Tensor


def _gather_replicas(tensor: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Concatenates `tensor` over replicas (replica order) and returns it with the row offset.

    Outside a multi-replica context nothing is gathered and the offset is 0.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync <= 1:
        return tensor, tf.constant(0, tf.int32)
    replica_id = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
    offset = replica_id * tf.shape(tensor)[0]
    return ctx.all_gather(tensor, axis=0), offset


def nt_xent_loss(
    hidden: tf.Tensor, temperature: float, hidden_norm: bool = True
) -> ContrastiveOutput:
    """NT-Xent loss of a [2B, D] batch laid out as [view1; view2] of the same B images.

    Each anchor's positive is the other view of its image; every other row of both views on all
    replicas is a negative. The loss is the sum of the two directions' (view1->view2 and
    view2->view1) cross entropies, each averaged over the local B anchors, i.e. twice the mean
    per-anchor loss; this is the scale SimCLR reports.

    Under a multi-replica strategy the returned loss is the mean over this replica's anchors
    (negatives still come from all replicas). With equal per-replica batches the global loss is
    the mean of the replica losses, so a training step should scale each replica's loss by
    1 / num_replicas_in_sync before taking gradients (they are summed by the all-reduce).
    """
    hidden = tf.cast(hidden, tf.float32)
    if hidden_norm:
        hidden = tf.math.l2_normalize(hidden, axis=-1)
    view1, view2 = tf.split(hidden, 2, axis=0)

    view1_all, offset = _gather_replicas(view1)
    view2_all, _ = _gather_replicas(view2)
    global_batch = tf.shape(view1_all)[0]
    positives = offset + tf.range(tf.shape(view1)[0])

    # Candidates are [other view (global); same view (global)]: the positive sits in the first
    # half at the anchor's global index, the anchor itself in the second half at the same index.
    labels = tf.one_hot(positives, 2 * global_batch)
    self_mask = tf.one_hot(global_batch + positives, 2 * global_batch) * _MASK_PENALTY

    def directional_loss(anchors: tf.Tensor, other: tf.Tensor, same: tf.Tensor):
        candidates = tf.concat([other, same], axis=0)
        logits = tf.matmul(anchors, candidates, transpose_b=True) / temperature - self_mask
        return tf.nn.softmax_cross_entropy_with_logits(labels, logits), logits

    loss_1, logits_1 = directional_loss(view1, view2_all, view1_all)
    loss_2, _ = directional_loss(view2, view1_all, view2_all)
    return ContrastiveOutput(tf.reduce_mean(loss_1 + loss_2), logits_1, labels)


def contrastive_metrics(logits: tf.Tensor, labels: tf.Tensor) -> dict[str, tf.Tensor]:
    """Top-1 accuracy of picking the positive and mean softmax entropy of the contrastive logits."""
    logits = tf.cast(logits, tf.float32)
    hits = tf.equal(tf.argmax(logits, axis=1), tf.argmax(labels, axis=1))
    probs = tf.nn.softmax(logits)
    entropy = -tf.reduce_sum(probs * tf.math.log(probs + 1e-8), axis=-1)
    return {
        "contrast_acc": tf.reduce_mean(tf.cast(hits, tf.float32)),
        "contrast_entropy": tf.reduce_mean(entropy),
    }


def supervised_loss(labels: tf.Tensor, logits: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Mean softmax cross entropy and top-1 accuracy of integer labels, computed in float32."""
    logits = tf.cast(logits, tf.float32)
    loss = tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    )
    acc = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, -1), labels), tf.float32))
    return loss, acc


def partially_labeled_loss(labels: tf.Tensor, logits: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """`supervised_loss` over the examples whose label is >= 0 (-1 marks unlabeled ones).

    Both are 0 for a batch without labels, so a step on unlabeled images stays finite.
    """
    logits = tf.cast(logits, tf.float32)
    labeled = labels >= 0
    count = tf.reduce_sum(tf.cast(labeled, tf.float32))
    per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.maximum(labels, 0), logits=logits
    )
    correct = tf.cast(tf.equal(tf.argmax(logits, -1), labels), tf.float32)
    loss = tf.math.divide_no_nan(tf.reduce_sum(tf.where(labeled, per_example, 0.0)), count)
    acc = tf.math.divide_no_nan(tf.reduce_sum(tf.where(labeled, correct, 0.0)), count)
    return loss, acc


def distillation_loss(
    teacher_logits: tf.Tensor, student_logits: tf.Tensor, temperature: float
) -> tf.Tensor:
    """SimCLRv2's distillation loss: T^2 * mean CE(softmax(teacher / T), student / T).

    The T^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    """
    targets = tf.nn.softmax(tf.cast(teacher_logits, tf.float32) / temperature)
    logits = tf.cast(student_logits, tf.float32) / temperature
    per_example = tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=logits)
    return temperature**2 * tf.reduce_mean(per_example)
