"""The single-kernel benchmark on tiny shapes: every pair runs and both forms agree."""

from __future__ import annotations

import json

from bench import cpu_kernels


def test_every_pair_runs_and_both_forms_agree(tmp_path):
    rows = cpu_kernels.main(
        [
            f"--out={tmp_path}",
            "--batch=4",
            "--activation=4x8",
            "--conv_maps=4x16",
            "--rounds=2",
            "--repeats=1",
        ]
    )
    assert [r["kernel"] for r in rows] == [
        "relu(x + shortcut)",
        "ReLU gradient",
        "gradient sum, then ReLU gradient",
        "4x4x16 forward",
        "4x4x16 input gradient",
        "4x4x16 kernel gradient",
    ]
    for r in rows:
        assert len(r["ms"]["tensorflow"]) == len(r["ms"]["replacement"]) == 2
        assert r["max_relative_difference"] < 0.05, r  # bfloat16 rounding only
    assert json.loads((tmp_path / "kernels.json").read_text()) == rows
    assert "| 4x4x16 kernel gradient |" in (tmp_path / "kernels.md").read_text()
