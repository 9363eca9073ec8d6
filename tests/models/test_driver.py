"""The Trainer's wall time per phase: every stage reports it, it adds up to the stage's time, and
each phase holds the work it names."""

from __future__ import annotations

import functools
import json
import pathlib
import time

import pytest

from models import driver, export, train_loop
from tests.models import fixtures

# Time outside any phase or outside the clock: a few prints and Python calls, on a shared CPU.
SLACK_S = 1.0


def _seconds(run_dir: str) -> dict[str, float]:
    return json.loads((pathlib.Path(run_dir) / "results.json").read_text())["seconds"]


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_every_stage_reports_its_seconds_per_phase(stage, request):
    run = request.getfixturevalue(f"{stage}_run")
    seconds = _seconds(run.model_run_dir)

    assert list(seconds) == [*driver.PHASES, "total"]
    assert all(value >= 0 for value in seconds.values())
    phases = sum(v for k, v in seconds.items() if k != "total")
    # What no phase covers (Python between phases): small, and no larger on a busy machine
    # than a few percent of the stage.
    assert 0 <= seconds["total"] - phases <= max(SLACK_S, 0.05 * seconds["total"])
    # Both stages trace, train (3+ steps), checkpoint, evaluate and export; no kNN monitor here.
    assert all(seconds[k] > 0 for k in ("setup", "build", "trace", "train", "eval", "export"))
    assert seconds["knn"] == 0
    # The same numbers, printed once as the stage's last line of its own.
    [line] = [line for line in run.stdout.splitlines() if line.startswith(f"{stage}: seconds ")]
    assert line == train_loop.format_seconds(stage, seconds)


def _timed(monkeypatch, owner: object, name: str, spent: dict[str, float]) -> None:
    """Replaces owner.<name> by a wrapper that adds its wall time to spent[name]."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - begin

    monkeypatch.setattr(owner, name, wrapper)


def test_phases_hold_the_work_they_name(cifar_dir, transformed, tmp_path, monkeypatch):
    spent: dict[str, float] = {}
    for owner, name in (
        (export.ServingModule, "__init__"),
        (export, "export_serving_model"),
        (train_loop, "evaluate"),
        (train_loop, "log_eval"),
        (train_loop, "run"),
    ):
        _timed(monkeypatch, owner, name, spent)
    # Which phase holds which work does not depend on the backbone's depth; a shallower one
    # traces and exports faster.
    fixtures.one_block_per_group(monkeypatch)
    config = fixtures.tiny_config(
        cifar_dir, **{"pretrain.train_steps": 2, "pretrain.checkpoint_steps": 2}
    )
    kwargs = fixtures.run_stage_args(transformed, tmp_path)
    begin = time.perf_counter()
    fixtures.run_stage(config, "pretrain", **kwargs)
    wall = time.perf_counter() - begin
    seconds = _seconds(kwargs["model_run_dir"])

    # The stage's own total is the call's wall time, less what happens before its clock starts.
    assert wall - SLACK_S <= seconds["total"] <= wall
    exporting = spent["__init__"] + spent["export_serving_model"]
    assert exporting <= seconds["export"] <= exporting + SLACK_S
    evaluating = spent["evaluate"] + spent["log_eval"]
    assert evaluating <= seconds["eval"] <= evaluating + SLACK_S
    # The loop's phases (restore, input, trace, steps, checkpoints) are all inside its call.
    looped = sum(seconds[k] for k in ("trace", "train", "checkpoint"))
    assert looped <= spent["run"] <= looped + seconds["build"] + seconds["setup"] + SLACK_S
