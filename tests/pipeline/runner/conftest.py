"""A run summary with a baseline comparison, for the summary's and the report's tests."""

import pytest


@pytest.fixture
def compared_summary():
    """Factory: a RunSummary of pretrain (30 steps, 20 s), finetune (10, 4 s) and a baseline (40,
    15 s) whose comparison lost by 0.05 top-1 and failed a 0.02 gain gate; keyword arguments
    replace fields of the Comparison."""
    from pipeline.components.baseline_comparison import Comparison
    from pipeline.runner.summary import RunSummary

    def make(**comparison) -> RunSummary:
        summary = RunSummary(run_id="r", top1=0.55, top5=0.9, example_count=40, baseline_top1=0.5)
        summary.stage_results = {
            "pretrain": {"total_steps": 30, "seconds": {"train": 20.0}},
            "finetune": {"total_steps": 10, "seconds": {"train": 4.0}},
            "baseline": {"total_steps": 40, "seconds": {"train": 15.0}},
        }
        values = dict(
            examples=40,
            candidate_top1=0.55,
            candidate_top5=0.9,
            baseline_top1=0.6,
            baseline_top5=0.92,
            top1_gain=-0.05,
            top5_gain=-0.02,
            top1_gain_ci=(-0.12, 0.02),
            top5_gain_ci=None,
            candidate_top1_by_class={0: 0.5, 1: 0.6},
            baseline_top1_by_class={0: 0.7, 1: 0.5},
            min_gain=0.02,
            gate_passed=False,
            gate_message="candidate top-1 0.5500 is 0.0500 below the baseline's 0.6000",
        )
        summary.comparison = Comparison(**{**values, **comparison})
        return summary

    return make
