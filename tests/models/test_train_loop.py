"""The custom training loop: learning on a fixed batch, summaries, progress line, resume, eval,
the start callback and the wall time per phase."""

from __future__ import annotations

import contextlib
import pathlib
import re

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from models import data as data_lib
from models import train_loop
from models.config import ModelConfig, PretrainConfig
from models.model import SimCLRModel
from models.optimizers import build_optimizer
from models.schedule import WarmUpAndCosineDecay
from tests.models import fixtures

SPEC = data_lib.ImageSpec(stored_size=32, image_format="raw", image_size=32)
PRETRAIN_SUMMARIES = {
    "train/total_loss",
    "train/contrast_loss",
    "train/contrast_acc",
    "train/contrast_entropy",
    "train/supervised_loss",
    "train/supervised_acc",
    "train/weight_decay",
    "learning_rate",
}


@pytest.fixture(scope="module")
def real_images(transformed) -> tuple[np.ndarray, np.ndarray]:
    """The 30 eval images (float, 32x32) and their labels, in file order."""
    images, labels = [], []
    for x, y in data_lib.eval_dataset(transformed.eval_files, SPEC, batch_size=64):
        images.append(x.numpy())
        labels.append(y.numpy())
    return np.concatenate(images), np.concatenate(labels)


def _model(seed: int) -> SimCLRModel:
    keras.utils.set_random_seed(seed)
    config = ModelConfig(resnet_depth=18, width_multiplier=0.125, proj_out_dim=16, global_bn=False)
    model = SimCLRModel(config, 10, 32, pretraining=True)
    model.build_for()
    return model


def _optimizer(total_steps: int, learning_rate: float = 0.5) -> keras.optimizers.Optimizer:
    # Cosine decay makes the rate depend on the step, so a lost step count would show.
    schedule = WarmUpAndCosineDecay(
        base_learning_rate=learning_rate,
        num_examples=16,
        train_batch_size=8,
        warmup_epochs=0.0,
        total_steps=total_steps,
        learning_rate_scaling="linear",
    )
    return build_optimizer("momentum", schedule, momentum=0.9, weight_decay=0.0)


def _dataset_fn(images: np.ndarray, labels: np.ndarray, batch: int):
    """Examples in a fixed order (view 2 = mirrored view 1), repeated; `skip` counts examples."""
    view2 = images[:, :, ::-1, :].copy()

    def make(ctx: tf.distribute.InputContext, skip: int) -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices((images, view2, labels)).repeat().skip(skip)
        return ds.batch(batch, drop_remainder=True)

    return make


def _run(model, optimizer, make_dataset, run_dir: pathlib.Path, total_steps: int, **settings):
    task = fixtures.step_task(
        PretrainConfig(temperature=0.5, weight_decay=1e-4, optimizer="momentum")
    )
    metrics = task.build_metrics()
    step_fn = task.train_step(model, optimizer, metrics)
    if "traces" in settings:
        traced, step = settings["traces"], step_fn

        def step_fn(*batch):
            traced.append(1)  # Python runs this once per trace, never per step
            return step(*batch)

    loop = train_loop.LoopSettings(
        stage="pretrain",
        total_steps=total_steps,
        checkpoint_every=settings.get("checkpoint_every", total_steps),
        log_every=settings.get("log_every", 1),
        global_batch_size=8,
        keep_checkpoint_max=5,
        progress_metrics=task.progress_metrics,
    )
    return train_loop.run(
        tf.distribute.get_strategy(),
        model,
        optimizer,
        step_fn,
        make_dataset,
        metrics,
        loop,
        checkpoint_dir=str(run_dir / "checkpoints"),
        summary_dir=str(run_dir / "train"),
        on_start=settings.get("on_start"),
        clock=settings.get("clock"),
    )


def test_pretraining_on_a_fixed_batch_learns_and_reports(real_images, tmp_path, capsys):
    images, labels = real_images
    steps = 6
    final = _run(
        _model(seed=0),
        _optimizer(steps),
        _dataset_fn(images[:8], labels[:8], 8),
        tmp_path,
        steps,
        log_every=2,
        checkpoint_every=3,
    )
    assert final == steps

    # Summaries (running means since the previous one) at every log and checkpoint boundary.
    scalars = fixtures.read_scalars(tmp_path / "train")
    assert set(scalars) == PRETRAIN_SUMMARIES
    boundaries = [2, 3, 4, 6]
    assert all(sorted(v) == boundaries for v in scalars.values())
    contrast = [scalars["train/contrast_loss"][s] for s in boundaries]
    assert contrast[-1] < contrast[0] - 0.1, contrast
    supervised = [scalars["train/supervised_loss"][s] for s in boundaries]
    assert supervised[-1] < supervised[0], supervised
    # total = contrastive + supervised + weight decay; `learning_rate` at step s is the rate the
    # optimizer applied in step s, i.e. the schedule at s - 1 (the reference logs the one at s).
    for s in boundaries:
        parts = sum(
            scalars[f"train/{k}"][s] for k in ("contrast_loss", "supervised_loss", "weight_decay")
        )
        assert scalars["train/total_loss"][s] == pytest.approx(parts, rel=1e-5)
        expected_lr = 0.5 * 8 / 256 * 0.5 * (1 + np.cos(np.pi * (s - 1) / steps))
        assert scalars["learning_rate"][s] == pytest.approx(expected_lr, abs=1e-7)
    assert 0.0 <= scalars["train/contrast_acc"][steps] <= 1.0
    assert scalars["train/contrast_entropy"][steps] > 0.0
    state = tf.train.get_checkpoint_state(str(tmp_path / "checkpoints"))
    assert [pathlib.Path(p).name for p in state.all_model_checkpoint_paths] == ["ckpt-3", "ckpt-6"]

    printed = capsys.readouterr().out
    progress = re.findall(
        r"^pretrain step (\d+)/6 \| total_loss [\d.]+ \| contrast_loss ([\d.]+) \| "
        r"contrast_acc [\d.]+ \| supervised_acc [\d.]+ \| lr [\d.e+-]+ \| "
        r"([\d.]+) img/s \| ETA (\d+)m(\d\d)s$",
        printed,
        flags=re.MULTILINE,
    )
    assert [int(p[0]) for p in progress] == [2, 4, 6], printed
    assert float(progress[-1][1]) == pytest.approx(contrast[-1], abs=1e-4)
    assert all(float(p[2]) > 0 for p in progress)
    assert progress[-1][3:] == ("0", "00")


def _slots(optimizer: keras.optimizers.Optimizer) -> list[np.ndarray]:
    return [v.numpy() for v in optimizer.momentums]


def test_resumed_training_matches_uninterrupted_training(
    real_images, tmp_path, capsys, monkeypatch
):
    """Restart from the step-2 checkpoint of a 3-step run in fresh objects: weights, BN statistics,
    momentum and step count must equal the uninterrupted run's (step 3 reads examples 16..23)."""
    images, labels = real_images
    make = _dataset_fn(images[:24], labels[:24], 8)
    # Resuming does not depend on the backbone's depth: a shallower one traces both runs faster.
    fixtures.one_block_per_group(monkeypatch)
    reference, reference_opt = _model(seed=0), _optimizer(3)
    _run(reference, reference_opt, make, tmp_path / "straight", 3, checkpoint_every=2)

    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    for f in (tmp_path / "straight" / "checkpoints").glob("ckpt-2.*"):
        (resumed_dir / f.name).write_bytes(f.read_bytes())
    tf.compat.v1.train.update_checkpoint_state(str(resumed_dir), str(resumed_dir / "ckpt-2"))
    capsys.readouterr()

    resumed = _model(seed=1)  # different initial weights: all state must come from the checkpoint
    resumed_opt = _optimizer(3)
    starts: list[int] = []
    on_start = lambda step: starts.append(step) or {}  # noqa: E731
    assert _run(resumed, resumed_opt, make, tmp_path / "resumed", 3, on_start=on_start) == 3
    assert "pretrain: resuming from" in capsys.readouterr().out
    assert starts == [2]  # told where training starts, so it can skip step-0 work
    assert int(resumed_opt.iterations.numpy()) == int(reference_opt.iterations.numpy()) == 3
    for got, want in zip(resumed.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    slots, reference_slots = _slots(resumed_opt), _slots(reference_opt)
    assert slots and len(slots) == len(reference_slots)
    for got, want in zip(slots, reference_slots, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


class _StepClock(train_loop.PhaseClock):
    """Records each phase entered and the optimizer's step count when it was left."""

    def __init__(self, optimizer: keras.optimizers.Optimizer) -> None:
        super().__init__()
        self.optimizer = optimizer
        self.entered: list[tuple[str, int]] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        with super().phase(name):
            yield
        self.entered.append((name, int(self.optimizer.iterations.numpy())))


def test_loop_times_its_phases_and_traces_the_first_step_alone(real_images, tmp_path, capsys):
    images, labels = real_images
    optimizer = _optimizer(5)
    clock = _StepClock(optimizer)
    starts: list[int] = []

    def on_start(step: int) -> dict[str, float]:
        starts.append(step)
        return {"eval/floor": 0.25}

    make = _dataset_fn(images[:8], labels[:8], 8)
    traces: list[int] = []
    kwargs = {"log_every": 2, "checkpoint_every": 2, "on_start": on_start, "clock": clock}
    assert _run(_model(seed=0), optimizer, make, tmp_path, 5, traces=traces, **kwargs) == 5
    # One trace of the step: the optimizer's slots exist before it (a first trace that creates
    # variables makes tf.function trace again).
    assert len(traces) == 1

    # The first step runs alone in `trace`; the rest of each boundary's steps in `train`.
    assert clock.entered == [
        ("build", 0),
        ("setup", 0),
        ("trace", 1),
        ("train", 2),
        ("checkpoint", 2),
        ("train", 4),
        ("checkpoint", 4),
        ("train", 5),
        ("checkpoint", 5),
    ]
    assert set(clock.seconds) == {"build", "setup", "trace", "train", "checkpoint"}
    assert all(v >= 0 for v in clock.seconds.values())
    assert sum(clock.seconds.values()) <= clock.total()
    # on_start: once, at step 0, logged at step 0 and printed like the checkpoint callback.
    assert starts == [0]
    scalars = fixtures.read_scalars(tmp_path / "train")
    assert scalars["eval/floor"] == {0: 0.25}
    assert "pretrain step 0: eval/floor 0.2500" in capsys.readouterr().out.splitlines()


def test_phase_clock_summary_and_line():
    clock = train_loop.PhaseClock()
    with clock.phase("train"):
        pass
    with clock.phase("export"):
        pass
    with clock.phase("train"):
        pass
    summary = clock.summary(("setup", "train"))
    assert list(summary) == ["setup", "train", "export", "total"]
    assert summary["setup"] == 0.0 and summary["total"] >= summary["train"] + summary["export"]
    line = train_loop.format_seconds("pretrain", {"setup": 1.25, "train": 200.34, "total": 203})
    assert line == "pretrain: seconds setup 1.2 | train 200.3 | total 203.0"


class _KnownLogits(keras.Model):
    """Stands in for SimCLRModel: its 'images' are the logits themselves."""

    def call(self, images: tf.Tensor, training: bool = False) -> dict[str, tf.Tensor]:
        return {"logits_sup": tf.identity(images)}


@pytest.mark.parametrize("num_classes", [10, 3])
def test_evaluate_top1_top5_against_numpy(num_classes):
    rng = np.random.default_rng(num_classes)
    logits = rng.normal(size=(53, num_classes)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=53)
    # Make some examples right at top-1 and some at exactly rank 5.
    logits[:10, :] -= 10.0
    logits[np.arange(10), labels[:10]] = 5.0
    dataset = tf.data.Dataset.from_tensor_slices((logits, labels)).batch(8)
    results = train_loop.evaluate(_KnownLogits(), dataset)

    rank = (logits > logits[np.arange(53), labels][:, None]).sum(axis=1)
    assert results["eval/num_examples"] == 53
    assert results["eval/label_top_1_accuracy"] == pytest.approx(np.mean(rank == 0))
    assert results["eval/label_top_5_accuracy"] == pytest.approx(
        np.mean(rank < min(5, num_classes))
    )
    if num_classes == 3:
        assert results["eval/label_top_5_accuracy"] == 1.0


def test_evaluate_rejects_an_empty_split():
    empty = tf.data.Dataset.from_tensor_slices(
        (np.zeros([0, 4], np.float32), np.zeros([0], np.int64))
    ).batch(4)
    with pytest.raises(ValueError, match="empty"):
        train_loop.evaluate(_KnownLogits(), empty)


def test_a_checkpoint_of_another_model_is_refused_not_restored_in_part(tmp_path):
    """A network with squeeze-excitation shares every other variable with the checkpoint;
    restoring those and leaving the new ones initialized would be a silent partial restore.
    One with a deeper head fails on shapes; both end in one line."""
    keras.utils.set_random_seed(0)
    saved = _model(seed=0)
    path = tf.train.Checkpoint(model=saved).save(str(tmp_path / "ckpt"))
    base = dict(resnet_depth=18, width_multiplier=0.125, proj_out_dim=16, global_bn=False)
    for change in ({"se_ratio": 0.25}, {"num_proj_layers": 4}):
        other = SimCLRModel(ModelConfig(**base, **change), 10, 32, pretraining=True)
        other.build_for()
        with pytest.raises(ValueError, match=r"^pretrain: checkpoint .* does not match") as e:
            train_loop.restore_whole(tf.train.Checkpoint(model=other), path, "pretrain")
        assert "\n" not in str(e.value), change
    same = _model(seed=1)
    train_loop.restore_whole(tf.train.Checkpoint(model=same), path, "pretrain")
    for got, want in zip(same.get_weights(), saved.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_checkpoint_of_another_stage_is_refused_though_its_variables_match(tmp_path):
    """A pretraining network has the variables of a fine-tuning one, so its checkpoint restores
    whole into it (step count included); the stage the loop writes beside its checkpoints is
    what refuses it, before any step."""
    ckpt_dir = tmp_path / "checkpoints"
    pretrained, optimizer = _model(seed=0), _optimizer(2)

    def objects(model, opt=None) -> tf.train.Checkpoint:
        step = tf.Variable(0, dtype=tf.int64)
        return tf.train.Checkpoint(model=model, optimizer=opt or _optimizer(2), global_step=step)

    def make(ctx: tf.distribute.InputContext, skip: int) -> tf.data.Dataset:
        zeros = np.zeros([8, 32, 32, 3], np.float32)
        return tf.data.Dataset.from_tensors((zeros, zeros, np.zeros([8], np.int64))).repeat()

    def loop(stage: str, model, opt) -> int:
        settings = train_loop.LoopSettings(
            stage=stage,
            total_steps=0,
            checkpoint_every=1,
            log_every=1,
            global_batch_size=8,
            keep_checkpoint_max=1,
            progress_metrics=("total_loss",),
        )
        return train_loop.run(
            tf.distribute.get_strategy(),
            model,
            opt,
            lambda *batch: None,
            make,
            {},
            settings,
            checkpoint_dir=str(ckpt_dir),
            summary_dir=str(tmp_path / "train"),
        )

    assert loop("pretrain", pretrained, optimizer) == 0  # no step: only the stage is written
    path = objects(pretrained, optimizer).save(str(ckpt_dir / "ckpt"))
    assert (ckpt_dir / train_loop.STAGE_FILE).read_text() == "pretrain"

    config = ModelConfig(resnet_depth=18, width_multiplier=0.125, proj_out_dim=16, global_bn=False)
    finetuned = SimCLRModel(config, 10, 32, pretraining=False)
    finetuned.build_for()
    # The variables alone do not tell the stages apart: the pretraining stage restores it whole.
    train_loop.restore_whole(objects(finetuned), path, "pretrain")
    for got, want in zip(finetuned.get_weights(), pretrained.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)

    other = _model(seed=1)
    before = other.get_weights()
    with pytest.raises(ValueError) as e:
        loop("finetune", other, _optimizer(2))
    assert str(e.value) == (
        f"finetune: checkpoint {path} was written by the pretrain stage; remove its directory "
        "to train afresh"
    )
    for got, want in zip(other.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, want)
    assert (ckpt_dir / train_loop.STAGE_FILE).read_text() == "pretrain"
