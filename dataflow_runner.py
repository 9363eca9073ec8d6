"""Run the SimCLR TFX pipeline on Google Cloud: Vertex AI Pipelines orchestrates, Dataflow runs
ExampleGen/StatisticsGen/Transform/Evaluator, Vertex AI training runs the Trainers on TPUs (or
GPUs), the Pusher writes to GCS and optionally deploys to a Vertex AI endpoint.

python dataflow_runner.py --dataset=imagenet2012 \\
    --data_dir=gs://BUCKET/tensorflow_datasets/imagenet2012/5.1.0 --data_format=tfrecord \\
    --project=PROJECT --region=us-central1 --bucket=gs://BUCKET \\
    --compile_only                           # writes simclr.json, needs no credentials
python dataflow_runner.py ... --submit       # writes it and starts the run on Vertex AI
python dataflow_runner.py --help             # every option (docs/cloud.md walks through set-up)
"""

from __future__ import annotations

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import logging
import sys
import warnings

# Cloud client libraries warn about Python 3.10 support on import; not actionable here.
warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    from models.precision import choose
    from pipeline.cloud import vertex as cloud
    from pipeline.configs import ConfigError
    from pipeline.runner import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    config, extras = cli.parse_config(
        cloud.accelerator_defaults(argv) + argv,
        prog="dataflow_runner.py",
        description="SimCLR pretraining, fine-tuning, TFMA evaluation and pushing as a TFX "
        "pipeline on Vertex AI Pipelines, Dataflow and Vertex AI training.",
        extra=cloud.cloud_flags(),
    )
    options = cloud.CloudOptions.from_flags(extras)
    try:
        options.validate()
        if config.pretrain.warm_start:
            raise ConfigError(
                "--warm_start: supported by local_runner.py only; Vertex AI compiles resolvers "
                "that filter by artifact type alone, so it could start from a fine-tuned model"
            )
        # The Trainers' device decides --mixed_precision=auto, before the batch-memory check.
        precision = choose(config.runtime.mixed_precision, cloud.trainer_device(options))
        config.runtime.mixed_precision = precision.dtype
        cloud.validate_cloud_config(config)
        cloud.check_trainer_layout(config, options)
        cloud.check_batch_fits(config, options)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    logging.getLogger().setLevel(logging.WARNING)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    from pipeline import pipeline as pipeline_lib

    print(precision.line(), flush=True)
    name = config.runner.pipeline_name
    pipeline_root = options.pipeline_root(name)
    pipeline = pipeline_lib.create_pipeline(
        config,
        cloud.cloud_layout(config),
        pipeline_root=pipeline_root,
        metadata_path="",  # Vertex AI Pipelines keeps the metadata.
        push_dir=config.runner.push_dir or options.push_dir(name),
        beam_pipeline_args=cloud.dataflow_beam_args(options, name),
        trainer_factory=cloud.vertex_trainer_factory(options, name),
        extra_pusher=cloud.vertex_pusher_factory(options, name),
    )
    try:
        path = cloud.compile_pipeline(pipeline, options, options.pipeline_json or f"{name}.json")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"pipeline JSON: {path}", flush=True)
    if not options.submit:
        print("not submitted (add --submit to run it on Vertex AI Pipelines)", flush=True)
        return 0
    try:
        job = cloud.submit_pipeline(path, options, pipeline_root, config.runner.enable_cache)
    except cloud.CloudError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"submitted: {job}", flush=True)
    return 0


if __name__ == "__main__":
    # Before TensorFlow loads: its C++ start-up noise goes straight to file descriptor 2.
    from pipeline.runner.console import install_noise_filter

    install_noise_filter()
    sys.exit(main())
