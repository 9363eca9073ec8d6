"""Google Cloud placement of the pipeline: Dataflow for Beam components, Vertex AI for Trainers
and serving, Vertex AI Pipelines for orchestration.

Everything here only builds arguments and components; nothing touches Google Cloud until
`submit_pipeline`, so the pipeline definition can be compiled and tested offline. TensorFlow and
TFX are imported only where needed, so flag errors come before their start-up cost and logs.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from pipeline.configs import ConfigError, SimCLRConfig

if TYPE_CHECKING:
    from pipeline.pipeline import DataLayout

# Vertex AI's TensorFlow serving image closest to the pipeline's TF 2.16.
DEFAULT_SERVING_IMAGE = "us-docker.pkg.dev/vertex-ai/prediction/tf2-cpu.2-15:latest"
_BUCKET = re.compile(r"^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


class CloudError(RuntimeError):
    """Submitting to Google Cloud failed; the message is one line."""


@dataclass(frozen=True)
class Accelerator:
    """A Vertex AI training machine and the runtime flags the trainer needs on it."""

    machine_type: str
    accelerator_type: str
    accelerator_count: int
    tpu_topology: str = ""
    # Config flags applied unless given on the command line.
    runtime_flags: tuple[str, ...] = ()
    # GPU machines come in sizes: the machine type for N accelerators, and the allowed N.
    machine_for_count: str = ""
    counts: tuple[int, ...] = ()

    @property
    def is_tpu(self) -> bool:
        return self.accelerator_type.startswith("TPU")


# On a Vertex TPU VM the chips are local: TPUClusterResolver(tpu="local").
_TPU_FLAGS = ("--strategy=tpu", "--tpu_name=local", "--mixed_precision=bfloat16")
ACCELERATORS: dict[str, Accelerator] = {
    "tpu_v2": Accelerator("cloud-tpu", "TPU_V2", 8, runtime_flags=_TPU_FLAGS),
    "tpu_v3": Accelerator("cloud-tpu", "TPU_V3", 8, runtime_flags=_TPU_FLAGS),
    "tpu_v5e": Accelerator("ct5lp-hightpu-8t", "TPU_V5_LITEPOD", 8, "2x4", _TPU_FLAGS),
    "a100": Accelerator(
        "a2-highgpu-8g",
        "NVIDIA_TESLA_A100",
        8,
        runtime_flags=("--strategy=mirrored", "--mixed_precision=bfloat16"),
        machine_for_count="a2-highgpu-{count}g",
        counts=(1, 2, 4, 8),
    ),
    "cpu": Accelerator("n1-highmem-16", "", 0),
}


@dataclass(frozen=True)
class CloudOptions:
    """Runner-only flags of dataflow_runner.py (see `cloud_flags` for their meaning)."""

    project: str = ""
    region: str = ""
    bucket: str = ""
    pipeline_image: str = ""
    trainer_image: str = ""
    trainer_accelerator: str = "tpu_v3"
    trainer_machine_type: str = ""
    trainer_accelerator_count: int = 0
    dataflow_machine_type: str = "n2-standard-8"
    dataflow_max_workers: int = 32
    dataflow_disk_size_gb: int = 100
    dataflow_experiments: str = "use_runner_v2"
    service_account: str = ""
    vertex_endpoint: str = ""
    serving_image: str = DEFAULT_SERVING_IMAGE
    serving_machine_type: str = "n1-standard-4"
    pipeline_json: str = ""
    compile_only: bool = False
    submit: bool = False

    @classmethod
    def from_flags(cls, extras: dict[str, Any]) -> CloudOptions:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in extras.items() if k in known})

    def validate(self) -> None:
        """One-line ConfigError naming the first missing or malformed flag."""
        for flag in ("project", "region", "bucket"):
            if not getattr(self, flag):
                raise ConfigError(f"--{flag}: required by dataflow_runner.py")
        if not _BUCKET.match(self.bucket.rstrip("/")):
            raise ConfigError(f"--bucket: expected gs://<bucket name>, got {self.bucket!r}")
        if self.trainer_accelerator not in ACCELERATORS:
            raise ConfigError(
                f"--trainer_accelerator: must be one of {tuple(ACCELERATORS)}, "
                f"got {self.trainer_accelerator!r}"
            )
        if self.dataflow_max_workers < 1:
            raise ConfigError("--dataflow_max_workers: must be >= 1")
        if self.dataflow_disk_size_gb < 10:
            raise ConfigError("--dataflow_disk_size_gb: must be >= 10")
        count, accelerator = self.trainer_accelerator_count, ACCELERATORS[self.trainer_accelerator]
        if count and count not in accelerator.counts:
            allowed = f"one of {accelerator.counts}" if accelerator.counts else "fixed"
            raise ConfigError(
                f"--trainer_accelerator_count: for {self.trainer_accelerator} it is {allowed}, "
                f"got {count}"
            )
        if self.compile_only and self.submit:
            raise ConfigError("--submit: cannot be combined with --compile_only")

    # ----- derived locations -----
    @property
    def bucket_root(self) -> str:
        return self.bucket.rstrip("/")

    def pipeline_root(self, pipeline_name: str) -> str:
        return f"{self.bucket_root}/pipeline_root/{pipeline_name}"

    def push_dir(self, pipeline_name: str) -> str:
        return f"{self.bucket_root}/serving_model/{pipeline_name}"

    @property
    def registry(self) -> str:
        return f"{self.region}-docker.pkg.dev/{self.project}/simclr"

    @property
    def resolved_pipeline_image(self) -> str:
        return self.pipeline_image or f"{self.registry}/simclr-tfx:latest"

    @property
    def accelerator(self) -> Accelerator:
        return ACCELERATORS[self.trainer_accelerator]

    @property
    def resolved_trainer_image(self) -> str:
        if self.trainer_image:
            return self.trainer_image
        if self.accelerator.is_tpu:
            return f"{self.registry}/simclr-tfx-tpu:latest"
        return self.resolved_pipeline_image


def cloud_flags() -> list[tuple[str, dict]]:
    """argparse specs of the runner-only flags, for `cli.parse_config(extra=...)`."""
    d = CloudOptions()
    return [
        ("--project", {"help": "Google Cloud project id (required)."}),
        ("--region", {"help": "Region for Dataflow, Vertex AI and images (required)."}),
        ("--bucket", {"help": "gs://bucket for pipeline artifacts, temp files and models."}),
        (
            "--pipeline_image",
            {
                "help": "Image for pipeline steps and Dataflow workers (docker/Dockerfile); "
                "default <region>-docker.pkg.dev/<project>/simclr/simclr-tfx:latest."
            },
        ),
        (
            "--trainer_image",
            {
                "help": "Image for the Vertex AI training jobs; default the TPU image "
                "(docker/Dockerfile.tpu, .../simclr-tfx-tpu:latest) on TPUs, else the "
                "pipeline image."
            },
        ),
        (
            "--trainer_accelerator",
            {
                "choices": tuple(ACCELERATORS),
                "help": f"Vertex AI training hardware (default {d.trainer_accelerator}); TPUs "
                "set --strategy=tpu --tpu_name=local --mixed_precision=bfloat16 unless given.",
            },
        ),
        ("--trainer_machine_type", {"help": "Override the accelerator's Vertex machine type."}),
        (
            "--trainer_accelerator_count",
            {"type": int, "help": "GPUs per machine for a100 (1, 2, 4 or 8; default 8)."},
        ),
        (
            "--dataflow_machine_type",
            {"help": f"Dataflow worker machine type (default {d.dataflow_machine_type})."},
        ),
        (
            "--dataflow_max_workers",
            {"type": int, "help": f"Dataflow autoscaling cap (default {d.dataflow_max_workers})."},
        ),
        (
            "--dataflow_disk_size_gb",
            {"type": int, "help": f"Dataflow worker disk (default {d.dataflow_disk_size_gb})."},
        ),
        (
            "--dataflow_experiments",
            {"help": f"Comma-separated Dataflow experiments (default {d.dataflow_experiments})."},
        ),
        (
            "--service_account",
            {"help": "Service account e-mail for Dataflow workers, training jobs and the run."},
        ),
        (
            "--vertex_endpoint",
            {"help": "Also deploy blessed models to this Vertex AI endpoint (display name)."},
        ),
        ("--serving_image", {"help": f"Vertex serving image (default {d.serving_image})."}),
        (
            "--serving_machine_type",
            {"help": f"Vertex endpoint machine type (default {d.serving_machine_type})."},
        ),
        (
            "--pipeline_json",
            {"help": "Where to write the Vertex AI Pipelines JSON; default <pipeline_name>.json."},
        ),
        (
            "--compile_only",
            {"action": "store_true", "help": "Write the pipeline JSON and stop (the default)."},
        ),
        (
            "--submit",
            {"action": "store_true", "help": "Write the JSON, then run it on Vertex AI Pipelines."},
        ),
    ]


def accelerator_defaults(argv: list[str]) -> list[str]:
    """Runtime flags implied by --trainer_accelerator; put them before argv so argv wins."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--trainer_accelerator", default=CloudOptions.trainer_accelerator)
    known, _ = parser.parse_known_args(argv)
    accelerator = ACCELERATORS.get(known.trainer_accelerator)
    return list(accelerator.runtime_flags) if accelerator else []


def validate_cloud_config(config: SimCLRConfig) -> None:
    """Everything a container reads must be on GCS, and the layout must be known offline."""
    d = config.data
    paths = {
        "data_dir": d.data_dir,
        "labels_file": d.labels_file,
        "label_subset": config.finetune.label_subset,
        "push_dir": config.runner.push_dir,
        "checkpoint": config.finetune.checkpoint,
    }
    for flag, path in paths.items():
        if path and not path.startswith("gs://"):
            raise ConfigError(f"--{flag}: must be a gs:// path on Google Cloud, got {path!r}")
    if not d.data_dir:
        raise ConfigError("--data_dir: required (gs:// folder of TFRecords or class folders)")
    if d.data_format == "auto":
        raise ConfigError(
            "--data_format: give 'tfrecord' or 'folders' (the runner does not list gs:// while "
            "compiling)"
        )
    if not d.eval_split:
        raise ConfigError("--eval_split: required (e.g. 'validation' for TFDS, 'val' for ILSVRC)")


def cloud_layout(config: SimCLRConfig) -> DataLayout:
    """The data layout from flags alone (no listing of gs:// at compile time)."""
    from pipeline.pipeline import DataLayout

    d = config.data
    return DataLayout(
        data_dir=d.data_dir,
        data_format=d.data_format,
        splits=tuple(dict.fromkeys([d.train_split, d.eval_split])),
        train_split=d.train_split,
        eval_split=d.eval_split,
    )


def dataflow_beam_args(options: CloudOptions) -> list[str]:
    """Beam pipeline options that run every Beam-powered component on Dataflow."""
    root = options.bucket_root
    args = [
        "--runner=DataflowRunner",
        f"--project={options.project}",
        f"--region={options.region}",
        f"--temp_location={root}/tmp/dataflow",
        f"--staging_location={root}/staging/dataflow",
        # The pipeline image holds this package, so workers need no staged SDK or setup.py.
        f"--sdk_container_image={options.resolved_pipeline_image}",
        "--sdk_location=container",
        f"--machine_type={options.dataflow_machine_type}",
        f"--max_num_workers={options.dataflow_max_workers}",
        f"--disk_size_gb={options.dataflow_disk_size_gb}",
        "--autoscaling_algorithm=THROUGHPUT_BASED",
    ]
    args += [f"--experiments={e.strip()}" for e in options.dataflow_experiments.split(",") if e]
    if options.service_account:
        args.append(f"--service_account_email={options.service_account}")
    return args


def worker_pool_specs(options: CloudOptions) -> list[dict[str, Any]]:
    """One Vertex AI worker pool: the accelerator machine running the trainer image."""
    accelerator = options.accelerator
    count = options.trainer_accelerator_count or accelerator.accelerator_count
    machine_type = accelerator.machine_type
    if options.trainer_accelerator_count and accelerator.machine_for_count:
        machine_type = accelerator.machine_for_count.format(count=count)
    machine_spec: dict[str, Any] = {"machine_type": options.trainer_machine_type or machine_type}
    if accelerator.accelerator_type:
        machine_spec["accelerator_type"] = accelerator.accelerator_type
        machine_spec["accelerator_count"] = count
    if accelerator.tpu_topology:
        machine_spec["tpu_topology"] = accelerator.tpu_topology
    return [
        {
            "machine_spec": machine_spec,
            "replica_count": 1,
            "disk_spec": {"boot_disk_type": "pd-ssd", "boot_disk_size_gb": 100},
            # The Trainer extension sets the command (tfx.scripts.run_executor).
            "container_spec": {
                "image_uri": options.resolved_trainer_image,
                "env": [{"name": "TF_USE_LEGACY_KERAS", "value": "1"}],
            },
        }
    ]


def vertex_training_args(options: CloudOptions) -> dict[str, Any]:
    """`ai_platform_training_args` of the Vertex Trainer: project plus a CustomJob spec."""
    job_spec: dict[str, Any] = {"worker_pool_specs": worker_pool_specs(options)}
    if options.service_account:
        job_spec["service_account"] = options.service_account
    return {"project": options.project, "job_spec": job_spec}


def vertex_trainer_factory(options: CloudOptions) -> Callable[..., Any]:
    """Trainer factory for `create_pipeline`: the same Trainer, run as a Vertex AI CustomJob.

    The Vertex keys join the run_fn's own custom_config ({"stage", "config"}), which the job
    hands through to run_fn unchanged.
    """
    from tfx.extensions.google_cloud_ai_platform import constants
    from tfx.extensions.google_cloud_ai_platform.trainer import component, executor

    def make(*, custom_config: dict[str, Any], **kwargs: Any) -> Any:
        return component.Trainer(
            custom_config={
                **custom_config,
                constants.ENABLE_VERTEX_KEY: True,
                constants.VERTEX_REGION_KEY: options.region,
                executor.TRAINING_ARGS_KEY: vertex_training_args(options),
            },
            **kwargs,
        )

    return make


def vertex_pusher_factory(options: CloudOptions) -> Callable[..., Any] | None:
    """A Pusher that deploys blessed models to a Vertex AI endpoint, when one is named."""
    if not options.vertex_endpoint:
        return None
    from tfx.extensions.google_cloud_ai_platform import constants
    from tfx.extensions.google_cloud_ai_platform.pusher import component

    def make(*, model: Any, model_blessing: Any) -> Any:
        return component.Pusher(
            model=model,
            model_blessing=model_blessing,
            custom_config={
                constants.ENABLE_VERTEX_KEY: True,
                constants.VERTEX_REGION_KEY: options.region,
                constants.VERTEX_CONTAINER_IMAGE_URI_KEY: options.serving_image,
                constants.SERVING_ARGS_KEY: {
                    "project_id": options.project,
                    "endpoint_name": options.vertex_endpoint,
                    "machine_type": options.serving_machine_type,
                    "min_replica_count": 1,
                    "max_replica_count": 1,
                },
            },
        ).with_id("vertex_endpoint_pusher")

    return make


def compile_pipeline(pipeline: Any, options: CloudOptions, output_path: str) -> str:
    """Writes the Vertex AI Pipelines job JSON (KubeflowV2DagRunner); needs no credentials."""
    try:
        from tfx.orchestration.kubeflow.v2 import kubeflow_v2_dag_runner as v2
    except ImportError as e:  # kfp-pipeline-spec is an optional TFX dependency.
        raise ConfigError(
            f"--compile_only: compiling for Vertex AI needs the kfp-pipeline-spec package ({e})"
        ) from e
    output_path = os.path.abspath(output_path)
    os.makedirs(os.path.dirname(output_path), exist_ok=True)
    runner = v2.KubeflowV2DagRunner(
        config=v2.KubeflowV2DagRunnerConfig(default_image=options.resolved_pipeline_image),
        output_dir=os.path.dirname(output_path),
        output_filename=os.path.basename(output_path),
    )
    runner.run(pipeline)
    return output_path


def submit_pipeline(
    json_path: str, options: CloudOptions, pipeline_root: str, enable_cache: bool
) -> str:
    """Starts the compiled pipeline on Vertex AI Pipelines; returns the job's resource name."""
    import logging

    import google.auth
    from google.auth import exceptions as auth_exceptions

    # google.auth logs each credential source it tries; the error below says it in one line.
    logging.getLogger("google.auth").setLevel(logging.ERROR)
    try:
        google.auth.default()
    except auth_exceptions.DefaultCredentialsError as e:
        raise CloudError(
            "--submit: no Google Cloud credentials (run `gcloud auth application-default "
            "login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service account key file)"
        ) from e
    from google.cloud import aiplatform

    try:
        aiplatform.init(project=options.project, location=options.region)
        job = aiplatform.PipelineJob(
            display_name=os.path.splitext(os.path.basename(json_path))[0],
            template_path=json_path,
            pipeline_root=pipeline_root,
            enable_caching=enable_cache,
        )
        job.submit(service_account=options.service_account or None)
    except Exception as e:  # noqa: BLE001 - the API raises many types; report one line.
        raise CloudError(f"--submit: {type(e).__name__}: {' '.join(str(e).split())}") from e
    return job.resource_name
