"""Session-wide Trainer fixtures: one pretrain run and one finetune run on the shared
Transform output (`transformed`, tests/conftest.py)."""

from __future__ import annotations

import contextlib
import io
import pathlib
from dataclasses import dataclass

import pytest

from pipeline.configs import SimCLRConfig
from tests.models import fixtures


@dataclass(frozen=True)
class StageRun:
    """What one run_stage call was given and what it printed and returned."""

    config: SimCLRConfig
    serving_model_dir: str
    model_run_dir: str
    results: dict
    stdout: str


def _run_stage(
    config: SimCLRConfig,
    stage: str,
    data: fixtures.TransformedData,
    run_dir: pathlib.Path,
    base_model: str | None = None,
) -> StageRun:
    kwargs = fixtures.run_stage_args(data, run_dir, base_model)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        results = fixtures.run_stage(config, stage, **kwargs)
    print(out.getvalue())
    return StageRun(
        config, kwargs["serving_model_dir"], kwargs["model_run_dir"], results, out.getvalue()
    )


@pytest.fixture(scope="session")
def pretrain_run(cifar_dir, transformed, tmp_path_factory) -> StageRun:
    """4 contrastive steps with online linear evaluation, exported."""
    return _run_stage(
        fixtures.tiny_config(cifar_dir),
        "pretrain",
        transformed,
        tmp_path_factory.mktemp("pretrain"),
    )


@pytest.fixture(scope="session")
def finetune_run(cifar_dir, transformed, pretrain_run, tmp_path_factory) -> StageRun:
    """Linear evaluation on 10% of the labels from the pretrain export, zero-initialized head."""
    config = fixtures.tiny_config(
        cifar_dir,
        **{
            "finetune.label_fraction": 0.1,
            "finetune.fine_tune_after_block": 4,
            "finetune.zero_init_logits_layer": True,
        },
    )
    return _run_stage(
        config,
        "finetune",
        transformed,
        tmp_path_factory.mktemp("finetune"),
        base_model=pretrain_run.serving_model_dir,
    )
