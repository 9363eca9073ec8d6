"""bench/finetune_spread.py: its arguments, the spread arithmetic (against numpy), the seeded
stage configuration and reading a quality run's record; no stage is trained here."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import pytest

from bench import finetune_spread as fs
from bench import quality
from pipeline.configs import build_config, trainer_config


def _run_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    """A quality run's folder as bench/quality.py leaves it: results.json with its config and
    data (the values only need to be the right shape here)."""
    run = tmp_path / "run"
    run.mkdir()
    record = {
        "config": {
            "label_fractions": [0.1],
            "unlabeled_share": 0.0,
            "work_dir": str(run / "work"),
            "seed": 7,
            "mixed_precision": "float32",
            "model": "ResNet-18 x0.25",
        },
        "data": {
            "source": "given Transform output",
            "transform_graph": "/t/graph",
            "train_files": ["/t/train/*"],
            "test_files": ["/t/test/*"],
            "unlabeled_files": [],
            "test": {"examples": 10, "classes": 2, "records_sha256": "x"},
        },
        "budget": {"steps": {"finetune": 122}},
        "rows": [],
    }
    (run / "results.json").write_text(json.dumps(record))
    return run


def test_parse_seeds():
    assert fs.parse_seeds("0,1,2,3") == [0, 1, 2, 3]
    assert fs.parse_seeds(" 5 , 9 ") == [5, 9]
    for bad in ("", "0,0", "-1,2", "a,1", "1.5"):
        with pytest.raises(ValueError, match="--seeds"):
            fs.parse_seeds(bad)


def test_spread_is_mean_and_sample_sd():
    values = [0.4140, 0.4087, 0.4213, 0.4002]
    got = fs.spread(values)
    assert got["mean"] == pytest.approx(np.mean(values))
    assert got["sd"] == pytest.approx(np.std(values, ddof=1))
    assert got["sd"] != pytest.approx(np.std(values))  # not the population sd
    assert fs.spread([0.5]) == {"mean": 0.5, "sd": None}


def test_run_fraction_defaults_to_the_runs_only_fraction():
    assert fs.run_fraction(0.0, [0.1]) == 0.1
    assert fs.run_fraction(1.0, [0.1]) == 1.0
    with pytest.raises(ValueError, match="name one"):
        fs.run_fraction(0.0, [0.1, 0.01])


def test_with_seed_changes_only_the_runtime_seed():
    flags = {"finetune_protocol": "fine_tune", "label_fraction": 0.1, "label_fraction_seed": 7}
    config = trainer_config(build_config({**flags, "seed": 7}), "finetune")
    seeded = fs.with_seed(config, 3)
    assert seeded.runtime.seed == 3
    assert seeded.labels == config.labels and seeded.labels.label_fraction_seed == 7
    assert dataclasses.replace(seeded, runtime=config.runtime) == config
    assert config.runtime.seed == 7  # the original is left as it was


def test_parse_args(tmp_path):
    run = _run_dir(tmp_path)
    args = fs.parse_args([f"--run={run}", "--steps=122", "--seeds=0,1"])
    assert (args.steps, args.seeds, args.label_fraction) == (122, [0, 1], 0.0)
    assert args.out == str(run / "finetune_spread")
    for bad in (
        [f"--run={tmp_path}"],
        [f"--run={run}", "--seeds=1,1"],
        [f"--run={run}", "--steps=-1"],
    ):
        with pytest.raises(SystemExit):
            fs.parse_args(bad)


def test_load_run_gives_the_runs_arguments_and_transform_output(tmp_path):
    run = _run_dir(tmp_path)
    record, args, data = fs.load_run(str(run))
    assert record["budget"]["steps"]["finetune"] == 122
    assert (args.seed, args.label_fractions, args.work_dir) == (7, [0.1], str(run / "work"))
    assert not hasattr(args, "model")
    assert data == quality.TransformedData("/t/graph", ["/t/train/*"], ["/t/test/*"], data.source)
