import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from models.loss import contrastive_metrics, nt_xent_loss

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _numpy_nt_xent(hidden: np.ndarray, temperature: float, hidden_norm: bool) -> float:
    """Sum over all 2B anchors of -log softmax(positive) over the other 2B-1 rows, divided by B.

    Dividing by B (not 2B) gives the SimCLR scale: the two directions' batch means added.
    """
    z = hidden.astype(np.float64)
    if hidden_norm:
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n = z.shape[0]
    b = n // 2
    sim = z @ z.T / temperature
    total = 0.0
    for i in range(n):
        pos = (i + b) % n
        others = np.array([sim[i, k] for k in range(n) if k != i])
        top = others.max()
        log_denominator = top + np.log(np.exp(others - top).sum())
        total += log_denominator - sim[i, pos]
    return total / b


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("hidden_norm", [True, False])
def test_loss_matches_numpy_formula(temperature, hidden_norm):
    rng = np.random.default_rng(7)
    hidden = rng.normal(size=(10, 6)).astype(np.float32)
    if not hidden_norm:
        hidden *= 0.3  # keep unnormalized logits in a range float32 handles exactly enough
    out = nt_xent_loss(tf.constant(hidden), temperature, hidden_norm=hidden_norm)
    expected = _numpy_nt_xent(hidden, temperature, hidden_norm)
    np.testing.assert_allclose(out.loss.numpy(), expected, rtol=1e-5)


def test_logits_and_labels_layout():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(6, 4)).astype(np.float32)
    temperature = 0.2
    out = nt_xent_loss(tf.constant(hidden), temperature)
    z = hidden / np.linalg.norm(hidden, axis=1, keepdims=True)
    view1, view2 = z[:3], z[3:]
    logits = out.logits.numpy()
    assert logits.shape == (3, 6)
    np.testing.assert_allclose(logits[:, :3], view1 @ view2.T / temperature, rtol=1e-5, atol=1e-6)
    off_diagonal = ~np.eye(3, dtype=bool)
    np.testing.assert_allclose(
        logits[:, 3:][off_diagonal], (view1 @ view1.T / temperature)[off_diagonal], rtol=1e-5
    )
    assert np.all(np.diag(logits[:, 3:]) < -1e8)
    np.testing.assert_array_equal(out.labels.numpy(), np.eye(3, 6))


def test_low_precision_input_is_computed_in_float32():
    rng = np.random.default_rng(3)
    hidden = tf.constant(rng.normal(size=(8, 5)), tf.bfloat16)
    out = nt_xent_loss(hidden, 0.5)
    assert out.loss.dtype == tf.float32 and out.logits.dtype == tf.float32
    expected = _numpy_nt_xent(tf.cast(hidden, tf.float32).numpy(), 0.5, True)
    np.testing.assert_allclose(out.loss.numpy(), expected, rtol=1e-5)


def test_metrics_on_hand_made_logits():
    logits = tf.constant([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 3.0, 0.0, -1e9]])
    labels = tf.constant([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0]])
    metrics = contrastive_metrics(logits, labels)
    # Row 0 hits; row 1 ties resolve to index 0 (miss); row 2 picks index 1 (miss).
    np.testing.assert_allclose(metrics["contrast_acc"].numpy(), 1 / 3, rtol=1e-6)

    def entropy(row):
        p = np.exp(row - row.max())
        p /= p.sum()
        return -(p * np.log(p + 1e-8)).sum()

    rows = [np.array([2.0, 0, 0, 0]), np.zeros(4), np.array([1.0, 3.0, 0, -1e9])]
    expected = np.mean([entropy(r) for r in rows])
    np.testing.assert_allclose(metrics["contrast_entropy"].numpy(), expected, rtol=1e-5)
    assert np.isclose(entropy(rows[1]), np.log(4), rtol=1e-6)


def _numpy_view2_block_metrics(hidden: np.ndarray, temperature: float) -> tuple[float, float]:
    """Top-1 accuracy and mean softmax entropy of each view-1 anchor scored against the B view-2
    rows only (its positive and the other images' second views)."""
    z = hidden.astype(np.float64) / np.linalg.norm(hidden, axis=1, keepdims=True)
    b = z.shape[0] // 2
    logits = z[:b] @ z[b:].T / temperature
    accuracy = float(np.mean(logits.argmax(axis=1) == np.arange(b)))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    entropy = float(np.mean(-(p * np.log(p)).sum(axis=1)))
    return accuracy, entropy


def test_logged_metrics_use_the_view2_block_of_view1_anchors():
    """contrast_acc/contrast_entropy as the training step logs them: contrastive_metrics on the
    first half of the loss's logits/labels columns (view-1 anchors against view-2 rows).

    Images 0/1 and 2/3 have near-identical first views, so over the full row those anchors pick
    their twin's view 1 instead of their positive, and the extra candidates raise the entropy:
    the full-row metrics differ from the reference by 1/3 in accuracy and ~0.4 in entropy.
    """
    rng = np.random.default_rng(4)
    b, dim, temperature = 6, 8, 0.2
    view1 = rng.normal(size=(b, dim))
    view1[1] = view1[0] + 0.05 * rng.normal(size=dim)
    view1[3] = view1[2] + 0.05 * rng.normal(size=dim)
    view2 = view1 + 0.4 * rng.normal(size=(b, dim))
    hidden = np.concatenate([view1, view2]).astype(np.float32)

    con = nt_xent_loss(tf.constant(hidden), temperature)
    half = tf.shape(con.logits)[1] // 2
    logged = contrastive_metrics(con.logits[:, :half], con.labels[:, :half])
    full_row = contrastive_metrics(con.logits, con.labels)

    accuracy, entropy = _numpy_view2_block_metrics(hidden, temperature)
    assert logged["contrast_acc"].numpy() == pytest.approx(accuracy, abs=1e-6)
    np.testing.assert_allclose(logged["contrast_entropy"].numpy(), entropy, rtol=1e-5)
    assert abs(full_row["contrast_acc"].numpy() - accuracy) > 0.3
    assert abs(full_row["contrast_entropy"].numpy() - entropy) > 0.3


_CROSS_REPLICA_SCRIPT = textwrap.dedent(
    """
    import json
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    from models.loss import nt_xent_loss

    replicas, b, dim, temperature = 2, 3, 5, 0.3
    rng = np.random.default_rng(11)
    view1 = rng.normal(size=(replicas * b, dim)).astype(np.float32)
    view2 = rng.normal(size=(replicas * b, dim)).astype(np.float32)

    full = tf.constant(np.concatenate([view1, view2]))
    with tf.GradientTape() as tape:
        tape.watch(full)
        single = nt_xent_loss(full, temperature)
    single_grad = tape.gradient(single.loss, full).numpy()

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    local = [
        np.concatenate([view1[r * b:(r + 1) * b], view2[r * b:(r + 1) * b]])
        for r in range(replicas)
    ]
    inputs = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(local[ctx.replica_id_in_sync_group])
    )

    @tf.function
    def step(x):
        def replica_fn(h):
            with tf.GradientTape() as tape:
                tape.watch(h)
                out = nt_xent_loss(h, temperature)
                scaled = out.loss / strategy.num_replicas_in_sync
            return out.loss, tape.gradient(scaled, h), out.logits, out.labels
        return strategy.run(replica_fn, args=(x,))

    losses, grads, logits, labels = step(inputs)
    # What each replica would compute with only its own negatives.
    local_losses = [float(nt_xent_loss(tf.constant(h), temperature).loss) for h in local]
    unpack = lambda v: [t.numpy() for t in strategy.experimental_local_results(v)]
    grads = unpack(grads)
    global_grad = np.concatenate(
        [np.concatenate([g[:b] for g in grads]), np.concatenate([g[b:] for g in grads])]
    )
    print(json.dumps({
        "single_loss": float(single.loss.numpy()),
        "replica_losses": [float(v) for v in unpack(losses)],
        "local_losses": local_losses,
        "grad_max_err": float(np.abs(global_grad - single_grad).max()),
        "logits": [v.tolist() for v in unpack(logits)],
        "labels": [v.tolist() for v in unpack(labels)],
        "single_logits": single.logits.numpy().tolist(),
    }))
    """
)


def test_cross_replica_negatives_match_single_device():
    """Per-replica losses with negatives gathered from all replicas average to the single-device
    loss. The same anchors with local negatives only differ by far more than the tolerance, so
    a missing or misplaced gather cannot pass."""
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-c", _CROSS_REPLICA_SCRIPT],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    np.testing.assert_allclose(np.mean(result["replica_losses"]), result["single_loss"], atol=1e-5)
    assert abs(np.mean(result["local_losses"]) - result["single_loss"]) > 0.1
    assert result["grad_max_err"] < 1e-5
    b = 3
    single_logits = np.array(result["single_logits"])
    for r in range(2):
        np.testing.assert_allclose(
            np.array(result["logits"][r]), single_logits[r * b : (r + 1) * b], atol=1e-5
        )
        labels = np.array(result["labels"][r])
        assert labels.shape == (b, 4 * b)
        np.testing.assert_array_equal(labels.argmax(axis=1), r * b + np.arange(b))
