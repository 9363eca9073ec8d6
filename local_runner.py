"""Run the SimCLR TFX pipeline on this machine (LocalDagRunner + Beam DirectRunner).

python local_runner.py                       # embedded digits dataset, minutes on a laptop
python local_runner.py --dataset=cifar10 --data_dir=../shared/data/cifar10 --train_steps=200
python local_runner.py --help                # every option, its meaning and default
"""

from __future__ import annotations

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import logging
import sys
import time
import warnings

# The user's clock starts here: start-up counts as overhead in the run's time summary.
STARTED = time.time()

# Cloud client libraries warn about Python 3.10 support on import; not actionable here.
warnings.filterwarnings("ignore", category=FutureWarning)

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))


def _beam_args(mode: str, workers: int) -> list[str]:
    """DirectRunner flags; none for its default in_memory mode. Given any Beam flags, each TFX
    Beam executor also packages TFX for remote workers (a 48 MB copy of it and an sdist left
    in the temp folder, about a second each), which in-process Beam never reads."""
    if mode == "in_memory":
        return []
    workers = workers or os.cpu_count() or 1
    return [f"--direct_running_mode={mode}", f"--direct_num_workers={workers}"]


def main(argv: list[str] | None = None) -> int:
    from pipeline.runner import cli

    config, _ = cli.parse_config(
        argv,
        prog="local_runner.py",
        description="SimCLR pretraining, fine-tuning, TFMA evaluation and pushing as a TFX "
        "pipeline, run locally.",
    )
    # Beam workers in other processes import the project's modules by name.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p
    )
    logging.getLogger().setLevel(logging.WARNING)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    from tfx.orchestration.local.local_dag_runner import LocalDagRunner

    from pipeline import pipeline as pipeline_lib
    from pipeline.runner import report as report_lib
    from pipeline.runner import summary as summary_lib
    from pipeline.runner.digits import write_digits_dataset

    model_dir = config.runner.resolved_model_dir(config.data.dataset)
    from models.precision import resolve
    from models.strategy import AcceleratorMissing, check_accelerator, local_replicas
    from pipeline.configs import ConfigError, baseline_plan, validate

    rt = config.runtime
    try:
        validate(config, num_replicas=local_replicas(rt.strategy))
        check_accelerator(rt.accelerator, rt.strategy)
    except (ConfigError, AcceleratorMissing) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Decided here, so that each Trainer's cache and checkpoint keys hold the dtype it uses.
    precision = resolve(rt.mixed_precision, rt.strategy)
    rt.mixed_precision = precision.dtype
    try:
        if config.data.dataset == "digits" and not config.data.data_dir:
            config.data.data_dir = str(write_digits_dataset(os.path.join(model_dir, "data")))
        layout = pipeline_lib.inspect_data(
            config.data.data_dir,
            config.data.data_format,
            config.data.train_split,
            config.data.eval_split,
            config.data.drop_empty_class_folders,
            unlabeled_dir=config.data.unlabeled_dir,
        )
        floor = pipeline_lib.min_top1(config, layout.num_classes)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config.data.eval_split = layout.eval_split
    push_dir = os.path.abspath(config.runner.push_dir or os.path.join(model_dir, "serving_model"))
    metadata_path = os.path.join(model_dir, "metadata.sqlite")
    pipeline = pipeline_lib.create_pipeline(
        config,
        layout,
        pipeline_root=os.path.join(model_dir, "pipeline"),
        metadata_path=metadata_path,
        push_dir=push_dir,
        beam_pipeline_args=_beam_args(config.runner.beam_mode, config.runner.beam_workers),
    )
    print(
        f"data: {layout.data_dir} ({layout.data_format}, splits {list(layout.splits)}, "
        f"train={layout.train_split}, eval={layout.eval_split}"
        + (f", unlabeled pool: {layout.unlabeled}" if layout.unlabeled else "")
        + ")",
        flush=True,
    )
    readers = layout.split_readers(config)
    print(
        "reads: " + "; ".join(f"{split} -> {', '.join(by)}" for split, by in readers.items()),
        flush=True,
    )
    print(f"outputs: {model_dir}", flush=True)
    print(
        "cache: on (finished components are reused and a killed Trainer resumes; "
        "--noenable_cache recomputes everything)"
        if config.runner.enable_cache
        else "cache: off (every component runs again; training starts from step 0)",
        flush=True,
    )
    print(precision.line(), flush=True)
    how = "--min_top1" if config.eval.min_top1 >= 0 else "default: clearly above chance"
    print(
        f"evaluation: protocol {config.finetune.finetune_protocol}; gate top-1 >= {floor:.4f} "
        f"({how}), at most {config.eval.max_top1_regression:.4f} below the last blessed model",
        flush=True,
    )
    plan = baseline_plan(config)
    if plan:
        print(plan, flush=True)
    started = time.time()
    try:
        LocalDagRunner().run(pipeline)
    except Exception as e:  # noqa: BLE001 - report one line, keep what was produced
        message = str(e).strip().splitlines()
        print(
            f"error: pipeline failed: {type(e).__name__}: {message[-1] if message else ''}",
            file=sys.stderr,
        )
        print(f"(outputs produced so far are kept under {model_dir})", file=sys.stderr)
        return 1
    print(f"pipeline finished in {time.time() - started:.0f} s", flush=True)
    summary = summary_lib.latest_run(metadata_path)
    for line in summary.lines():
        print(line, flush=True)
    report = report_lib.write_report(metadata_path, os.path.join(model_dir, "report"), config)
    print(f"report: {report}", flush=True)
    for line in summary.time_lines(time.time() - STARTED):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    # Before TensorFlow loads: its C++ start-up noise goes straight to file descriptor 2.
    from pipeline.runner.console import install_noise_filter

    install_noise_filter()
    sys.exit(main())
