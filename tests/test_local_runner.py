"""local_runner.py's start-up: what it imports to build and hand over the local pipeline."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CLOUD_ONLY = "google.cloud.aiplatform"

# local_runner.main as a user runs it, up to the LocalDagRunner call: that call reports the
# pipeline it was handed and what the process has imported by then, and ends the process.
_UP_TO_THE_RUN = """
import json, sys
import local_runner
from tfx.orchestration.local import local_dag_runner

def report(self, pipeline):
    print(json.dumps({
        "components": [c.id for c in pipeline.components],
        "cloud_modules": sorted(m for m in sys.modules if m.startswith(sys.argv[1])),
    }))
    raise SystemExit(0)

local_dag_runner.LocalDagRunner.run = report
sys.exit(local_runner.main(sys.argv[2:]))
"""


def test_the_local_runner_is_tfx_v1s():
    from tfx import v1
    from tfx.orchestration.local.local_dag_runner import LocalDagRunner

    assert LocalDagRunner is v1.orchestration.LocalDagRunner


def test_a_local_run_builds_its_pipeline_without_importing_the_vertex_ai_client(tmp_path):
    """Importing the Vertex AI client (through `tfx.v1`'s extensions) costs seconds of every
    local run's start-up; only the Vertex AI runner needs it."""
    result = subprocess.run(
        [sys.executable, "-c", _UP_TO_THE_RUN, CLOUD_ONLY, f"--model_dir={tmp_path / 'out'}"],
        cwd=REPO_ROOT,
        env=dict(os.environ, TF_USE_LEGACY_KERAS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    handed = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"pretrain_trainer", "finetune_trainer", "Evaluator", "Pusher"} <= set(
        handed["components"]
    )
    assert handed["cloud_modules"] == []
