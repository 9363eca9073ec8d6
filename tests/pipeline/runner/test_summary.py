"""pipeline/runner/summary.py: the closing time summary of a run (the e2e tests cover reading
MLMD)."""

import json

from pipeline.runner.summary import RunSummary, read_results


def test_time_lines_split_wall_time_into_training_steps_and_overhead():
    summary = RunSummary(run_id="r")
    summary.seconds = {"ExampleGen": 3.0, "pretrain_trainer": 50.0, "finetune_trainer": 20.0}
    summary.trainer_phases = {
        "pretrain_trainer": {
            "setup": 2.0,
            "trace": 6.0,
            "train": 38.5,
            "export": 3.5,
            "total": 50.0,
        },
        "finetune_trainer": {"setup": 1.0, "train": 12.0, "export": 7.0, "total": 20.0},
    }
    assert summary.training_seconds() == 50.5
    lines = summary.time_lines(100.0)
    assert lines[0] == (
        "time: 100 s in all; training steps 50 s; everything else (non-training overhead) 50 s"
    )
    assert lines[1] == (
        "  pretrain_trainer: 50 s, of which training steps 38.5; the rest: setup 2.0, trace 6.0, "
        "export 3.5"
    )
    # 100 s of wall time, 73 s inside components.
    assert lines[-1] == "  outside components (start-up, orchestration, summary): 27 s"


def test_time_lines_without_trainers_count_no_training():
    summary = RunSummary(run_id="r", seconds={"Evaluator": 9.0})
    assert summary.time_lines(30.0)[0].startswith("time: 30 s in all; training steps 0 s;")


def test_read_results_reads_a_stage_folder_and_tolerates_its_absence(tmp_path):
    assert read_results(None) == {} and read_results(str(tmp_path)) == {}
    (tmp_path / "results.json").write_text(json.dumps({"top1": 0.5, "seconds": {"train": 2.0}}))
    assert read_results(str(tmp_path)) == {"top1": 0.5, "seconds": {"train": 2.0}}


def test_lines_show_labeled_and_unlabeled_images_and_who_read_each_split():
    summary = RunSummary(run_id="r")
    summary.ingestion = {
        "train": {"written": 287, "skipped": 1, "labeled": 287, "unlabeled": 0},
        "unlabeled": {"written": 1150, "skipped": 0, "labeled": 0, "unlabeled": 1150},
    }
    summary.split_readers = {
        "train": ["pretrain_trainer", "finetune_trainer"],
        "unlabeled": ["pretrain_trainer"],
    }
    lines = summary.lines()
    assert "ingested split 'train': 287 images (287 labeled, 0 unlabeled), 1 skipped" in lines
    assert "ingested split 'unlabeled': 1150 images (0 labeled, 1150 unlabeled), 0 skipped" in lines
    assert "split 'train' read by: pretrain_trainer, finetune_trainer" in lines
    assert "split 'unlabeled' read by: pretrain_trainer" in lines


def test_lines_record_each_trainers_precision():
    summary = RunSummary(run_id="r")
    summary.precision = {"pretrain_trainer": "bfloat16", "finetune_trainer": "float32"}
    assert "precision: pretrain_trainer bfloat16, finetune_trainer float32" in summary.lines()
    assert not any(line.startswith("precision") for line in RunSummary(run_id="r").lines())


def test_lines_say_which_model_a_warm_started_pretraining_began_from():
    summary = RunSummary(run_id="r", warm_start_from="/out/pipeline/pretrain_trainer/model/7")
    assert (
        "pretraining started from (--warm_start): /out/pipeline/pretrain_trainer/model/7"
        in summary.lines()
    )
    assert not any("--warm_start" in line for line in RunSummary(run_id="r").lines())


def test_lines_keep_the_baseline_comparison_apart_with_the_compute_each_used(compared_summary):
    lines = compared_summary().lines()
    # The regression gate's baseline (the last blessed model) and the supervised baseline are
    # two evaluations, on two lines.
    assert "baseline (last blessed model) top-1 0.5000" in lines
    assert (
        "vs. supervised baseline on 40 eval examples: candidate top-1 0.5500, baseline top-1 "
        "0.6000, gain -0.0500 (95% CI -0.1200 to +0.0200); top-5 0.9000 vs. 0.9200"
    ) in lines
    assert (
        "  compute: candidate 40 steps, 24 s of training (pretrain + finetune); baseline 40 "
        "steps, 15 s"
    ) in lines
    assert "gain gate: FAILED: candidate top-1 0.5500 is 0.0500 below the baseline's 0.6000" in (
        lines
    )
    lines = compared_summary(min_gain=None, gate_passed=None, top1_gain_ci=None).lines()
    assert not any(line.startswith("gain gate") for line in lines)
    assert any(line.endswith("gain -0.0500; top-5 0.9000 vs. 0.9200") for line in lines)
    note = "CI not computed because only 19 samples were non-empty. Expected 20."
    lines = compared_summary(top1_gain_ci=None, interval_note=note).lines()
    assert any(
        line.endswith(f"gain -0.0500 (no 95% CI: {note}); top-5 0.9000 vs. 0.9200")
        for line in lines
    )
