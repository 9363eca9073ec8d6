"""Names a run's readers share with the pipeline that writes them: node ids, artifact files and
TFMA metric keys.

Plain strings only, with no TensorFlow or TFX import, so the run summary, the report and the
tests read a run without loading the pipeline definition or a component's executor.
"""

from __future__ import annotations

# TFMA's metric keys of the two accuracies the Evaluator computes and gates on.
TOP1 = "sparse_categorical_accuracy"
TOP5 = "sparse_top_k_categorical_accuracy"

# A Trainer's node id is `<stage>_trainer` (the stages: models/stages.py).
TRAINER_SUFFIX = "_trainer"
# The TFMA comparison of the candidate with the supervised baseline (a second evaluation).
BASELINE_COMPARISON = "baseline_comparison"
# Its verdict's artifact type (Vertex AI needs `<namespace>.<Name>` for a custom type).
BASELINE_COMPARISON_RESULT = "simclr.BaselineComparisonResult"

# Files inside artifacts: the class-folder ExampleGen's skip report (beside its splits) and each
# Trainer's results (metrics, kNN figures, phase seconds; in its model_run artifact).
IMAGE_REPORT_FILE = "image_report.json"
RESULTS_FILE = "results.json"


def trainer_id(stage: str) -> str:
    """The node id of a stage's Trainer (also its MLMD node context and artifact folder)."""
    return f"{stage}{TRAINER_SUFFIX}"


def stage_of(node_id: str) -> str | None:
    """The stage a Trainer node id names; None for any other node."""
    return node_id.removesuffix(TRAINER_SUFFIX) if node_id.endswith(TRAINER_SUFFIX) else None
