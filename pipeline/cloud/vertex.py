"""Google Cloud placement of the pipeline: Dataflow for Beam components, Vertex AI for Trainers
and serving, Vertex AI Pipelines for orchestration.

Everything here only builds arguments and components; nothing touches Google Cloud until
`submit_pipeline`, so the pipeline definition can be compiled and tested offline. TensorFlow and
TFX are imported only where needed, so flag errors come before their start-up cost and logs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from models.config import BLOCKS_PER_GROUP
from models.precision import Device, choose
from models.tasks import registry
from pipeline.configs import ConfigError, SimCLRConfig, stage_flag, trainer_config

if TYPE_CHECKING:
    from pipeline.pipeline import DataLayout

# Vertex AI's TensorFlow serving image closest to the pipeline's TF 2.16.
DEFAULT_SERVING_IMAGE = "us-docker.pkg.dev/vertex-ai/prediction/tf2-cpu.2-15:latest"
_BUCKET = re.compile(r"^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
# Vertex AI Pipelines names the run `<pipeline name>-<YYYYmmddHHMMSS>` and requires run ids of
# `[a-z][-a-z0-9]{0,127}`: a name that starts with a letter and leaves room for 15 characters.
_RUN_ID_SUFFIX = len("-20260101000000")
_PIPELINE_NAME = re.compile(rf"[a-z][-a-z0-9]{{0,{127 - _RUN_ID_SUFFIX}}}")
# Label values: at most 63 lowercase letters, digits, '-' or '_'.
_LABEL_LENGTH = 63


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
    # Memory of one replica's device (a TPU core, a GPU), for the batch-size check.
    device_memory_gib: float = 0.0
    # NVIDIA compute capability, which decides --mixed_precision=auto on GPUs.
    gpu_capability: tuple[int, int] | None = None

    @property
    def is_tpu(self) -> bool:
        return self.accelerator_type.startswith("TPU")

    @property
    def is_gpu(self) -> bool:
        return self.accelerator_type.startswith("NVIDIA")


# On a Vertex TPU VM the chips are local: TPUClusterResolver(tpu="local").
# --mixed_precision=auto (the default) picks bfloat16 on both TPUs and the A100 (see
# `trainer_device`); --accelerator makes a worker that cannot see its device stop at once.
_TPU_FLAGS = ("--strategy=tpu", "--tpu_name=local", "--accelerator=tpu")
# v2-8 and v3-8 hosts: 4 chips, 8 cores (the replicas), 8 / 16 GiB HBM per core. TPU v5e and
# newer are left out: TensorFlow >= 2.15 drives them only through the PJRT runtime, which the
# trainer image does not configure and no job has proven yet (docs/cloud.md).
ACCELERATORS: dict[str, Accelerator] = {
    "tpu_v2": Accelerator("cloud-tpu", "TPU_V2", 8, runtime_flags=_TPU_FLAGS, device_memory_gib=8),
    "tpu_v3": Accelerator("cloud-tpu", "TPU_V3", 8, runtime_flags=_TPU_FLAGS, device_memory_gib=16),
    "a100": Accelerator(
        "a2-highgpu-8g",
        "NVIDIA_TESLA_A100",
        8,
        runtime_flags=("--strategy=mirrored", "--accelerator=gpu"),
        gpu_capability=(8, 0),
        machine_for_count="a2-highgpu-{count}g",
        counts=(1, 2, 4, 8),
        device_memory_gib=40,
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
    trainer_replicas: int = 1
    dataflow_machine_type: str = "n2-standard-8"
    dataflow_max_workers: int = 32
    dataflow_disk_size_gb: int = 100
    dataflow_experiments: str = "use_runner_v2"
    dataflow_timeout_hours: float = 24.0
    trainer_timeout_hours: float = 72.0
    service_account: str = ""
    vertex_endpoint: str = ""
    serving_image: str = DEFAULT_SERVING_IMAGE
    serving_machine_type: str = "n1-standard-4"
    keep_previous_deployments: bool = False
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
        for flag in ("dataflow_timeout_hours", "trainer_timeout_hours"):
            if getattr(self, flag) <= 0:
                raise ConfigError(f"--{flag}: must be > 0 (hours), got {getattr(self, flag)}")
        count, accelerator = self.trainer_accelerator_count, ACCELERATORS[self.trainer_accelerator]
        if count and count not in accelerator.counts:
            allowed = f"one of {accelerator.counts}" if accelerator.counts else "fixed"
            raise ConfigError(
                f"--trainer_accelerator_count: for {self.trainer_accelerator} it is {allowed}, "
                f"got {count}"
            )
        if self.trainer_replicas < 1:
            raise ConfigError(f"--trainer_replicas: must be >= 1, got {self.trainer_replicas}")
        if self.trainer_replicas > 1 and not accelerator.is_gpu:
            raise ConfigError(
                f"--trainer_replicas: more than one machine is offered for GPUs (a100), not "
                f"{self.trainer_accelerator} (TPU slices beyond one host are not launched)"
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
    def devices_per_machine(self) -> int:
        return self.trainer_accelerator_count or self.accelerator.accelerator_count

    @property
    def total_replicas(self) -> int:
        """Devices the global batch is split over: per machine, times machines."""
        return max(1, self.devices_per_machine) * self.trainer_replicas

    @property
    def resolved_trainer_image(self) -> str:
        if self.trainer_image:
            return self.trainer_image
        if self.accelerator.is_tpu:
            return f"{self.registry}/simclr-tfx-tpu:latest"
        if self.accelerator.is_gpu:  # the pipeline image has no CUDA libraries
            return f"{self.registry}/simclr-tfx-gpu:latest"
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
                "help": "Image for the Vertex AI training jobs; default "
                ".../simclr-tfx-tpu:latest (docker/Dockerfile.tpu) on TPUs, "
                ".../simclr-tfx-gpu:latest (docker/Dockerfile.gpu) on GPUs, else the "
                "pipeline image."
            },
        ),
        (
            "--trainer_accelerator",
            {
                "choices": tuple(ACCELERATORS),
                "help": f"Vertex AI training hardware (default {d.trainer_accelerator}); TPUs "
                "set --strategy=tpu --tpu_name=local --accelerator=tpu unless given.",
            },
        ),
        ("--trainer_machine_type", {"help": "Override the accelerator's Vertex machine type."}),
        (
            "--trainer_accelerator_count",
            {"type": int, "help": "GPUs per machine for a100 (1, 2, 4 or 8; default 8)."},
        ),
        (
            "--trainer_replicas",
            {
                "type": int,
                "help": "Machines for each Trainer (a100 only; default 1): N machines of "
                "--trainer_accelerator_count GPUs under MultiWorkerMirroredStrategy "
                "(--strategy=multi_worker); --train_batch_size is the global batch over all.",
            },
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
            "--dataflow_timeout_hours",
            {
                "type": float,
                "help": "Dataflow cancels each job that runs longer (default "
                f"{d.dataflow_timeout_hours:g}).",
            },
        ),
        (
            "--trainer_timeout_hours",
            {
                "type": float,
                "help": "Vertex AI ends each Trainer's custom job that runs longer (default "
                f"{d.trainer_timeout_hours:g}: 3x the 100-epoch ImageNet estimate on a TPU v3-8; "
                "a resubmitted run resumes from the checkpoints).",
            },
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
            "--keep_previous_deployments",
            {
                "action": "store_true",
                "help": "Keep models deployed to --vertex_endpoint by earlier pushes (each "
                "bills its machines around the clock); default: undeploy them once a new "
                "model is deployed.",
            },
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


def trainer_device(options: CloudOptions) -> Device:
    """The device the Vertex AI Trainers compute on, for --mixed_precision=auto: decided by
    the hardware asked for, not by the machine that compiles the pipeline."""
    accelerator = options.accelerator
    if accelerator.is_tpu:
        return Device("tpu", accelerator.accelerator_type)
    if accelerator.is_gpu:
        capability = accelerator.gpu_capability
        return Device("gpu", accelerator.accelerator_type, gpu_capability=capability)
    # General-purpose N1 machines (Skylake and older) have no AMX.
    return Device("cpu", options.trainer_machine_type or accelerator.machine_type)


def accelerator_defaults(argv: list[str]) -> list[str]:
    """Runtime flags implied by --trainer_accelerator (and --trainer_replicas: several machines
    train under MultiWorkerMirroredStrategy); put them before argv so argv wins."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--trainer_accelerator", default=CloudOptions.trainer_accelerator)
    parser.add_argument("--trainer_replicas", type=int, default=CloudOptions.trainer_replicas)
    known, _ = parser.parse_known_args(argv)
    accelerator = ACCELERATORS.get(known.trainer_accelerator)
    flags = list(accelerator.runtime_flags) if accelerator else []
    if known.trainer_replicas > 1:
        flags = [f for f in flags if not f.startswith("--strategy=")] + ["--strategy=multi_worker"]
    return flags


def check_trainer_layout(config: SimCLRConfig, options: CloudOptions) -> None:
    """Several machines need the multi-worker strategy, and every stage's global batch must
    split evenly over all devices (tf.distribute refuses it otherwise, on the accelerator)."""
    if options.trainer_replicas > 1 and config.runtime.strategy != "multi_worker":
        raise ConfigError(
            f"--strategy: --trainer_replicas={options.trainer_replicas} trains on several "
            f"machines, which needs --strategy=multi_worker, got {config.runtime.strategy!r}"
        )
    replicas = options.total_replicas
    for stage in registry.active(config):
        batch = config.stage(stage.name).train_batch_size
        if batch % replicas:
            flag = stage_flag(config, stage.name, "train_batch_size")
            raise ConfigError(
                f"--{flag}: {batch} does not split evenly over {replicas} devices "
                f"({options.trainer_replicas} machine(s) x {options.devices_per_machine}); "
                f"use a multiple of {replicas}"
            )


def validate_cloud_config(config: SimCLRConfig) -> None:
    """Everything a container reads must be on GCS, and the layout must be known offline."""
    d = config.data
    paths = {
        "data_dir": d.data_dir,
        "labels_file": d.labels_file,
        "unlabeled_dir": d.unlabeled_dir,
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
    if d.unlabeled_dir and d.data_format != "folders":
        raise ConfigError("--unlabeled_dir: a pool of image files goes with --data_format=folders")
    if not d.eval_split:
        raise ConfigError("--eval_split: required (e.g. 'validation' for TFDS, 'val' for ILSVRC)")
    name = config.runner.pipeline_name
    if not _PIPELINE_NAME.fullmatch(name):
        raise ConfigError(
            "--pipeline_name: Vertex AI Pipelines needs lowercase letters, digits and '-', "
            f"starting with a letter, at most {128 - _RUN_ID_SUFFIX} characters (its run id "
            f"adds -<timestamp>); got {name!r}"
        )


def job_labels(pipeline_name: str) -> dict[str, str]:
    """Labels on every Dataflow and Vertex AI job of the pipeline, to find (and cancel) them."""
    return {"simclr-pipeline": pipeline_name[:_LABEL_LENGTH]} if pipeline_name else {}


# ----- will the batch fit the accelerator? -----

# Tensors of each convolution's size that the backward pass keeps: the conv's output and its
# batch-norm(+ReLU) output.
_KEPT_PER_CONV = 2
# Set aside on each device for weights, gradients, optimizer slots and compiler scratch.
RESERVED_GIB = 1.0
_GIB = 1024**3


def activation_elements(depth: int, width_multiplier: float, image_size: int) -> int:
    """Elements of every convolution output (and the stem's max pool) of one image's forward
    pass through the ResNet of models/resnet.py: what training keeps until the backward pass.

    Selective-kernel and squeeze-excitation extras are not counted.
    """
    width = max(1, round(64 * width_multiplier))
    bottleneck = depth >= 50
    if image_size <= 32:  # CIFAR stem: one 3x3/1 convolution, no pooling.
        side = image_size
        total = side * side * width
    else:  # 7x7/2 convolution, then a 3x3/2 max pool.
        side = math.ceil(image_size / 2)
        total = side * side * width
        side = math.ceil(side / 2)
        total += side * side * width
    for group, blocks in enumerate(BLOCKS_PER_GROUP[depth]):
        filters = width * 2**group
        out_channels = filters * (4 if bottleneck else 1)
        for block in range(blocks):
            in_side = side
            if block == 0 and group > 0:
                side = math.ceil(side / 2)
            if bottleneck:  # 1x1 at the input resolution, strided 3x3, 1x1 expansion
                total += in_side**2 * filters + side**2 * filters + side**2 * out_channels
            else:  # two 3x3
                total += 2 * side**2 * filters
            if block == 0:  # projection shortcut
                total += side**2 * out_channels
    return total


def check_batch_fits(config: SimCLRConfig, options: CloudOptions) -> None:
    """Rejects a per-stage batch whose activations cannot fit one replica's device memory.

    An out-of-memory error would otherwise surface on the accelerator hours into the run, after
    Dataflow has ingested and transformed the data. The estimate counts the activations that
    training keeps for the backward pass (`activation_elements`, two tensors per convolution in
    the compute dtype) for each image and view on one replica, plus `RESERVED_GIB`. It is an
    estimate, consistent with the reference's own run (batch 4096 on 32 v3 cores: 128 images x
    2 views of ResNet-50 per 16 GiB core, 11.8 GiB by this count).
    """
    accelerator = options.accelerator
    if not accelerator.device_memory_gib:
        return
    replicas = options.total_replicas
    # The dtype the Trainers will use: --mixed_precision=auto decided for this hardware.
    dtype = choose(config.runtime.mixed_precision, trainer_device(options)).dtype
    dtype_bytes = 4 if dtype == "float32" else 2
    for stage in registry.active(config):
        model = trainer_config(config, stage.name).model  # the student's, for distillation
        depth, width = model.resnet_depth, model.width_multiplier
        views = 2 if stage.contrastive else 1
        image_gib = (
            activation_elements(depth, width, config.data.image_size)
            * _KEPT_PER_CONV
            * dtype_bytes
            / _GIB
        )
        batch = config.stage(stage.name).train_batch_size
        per_replica = math.ceil(batch / replicas)
        need = per_replica * views * image_gib + RESERVED_GIB
        if need <= accelerator.device_memory_gib:
            continue
        fits = int((accelerator.device_memory_gib - RESERVED_GIB) / (views * image_gib))
        flag = stage_flag(config, stage.name, "train_batch_size")
        device = "core" if accelerator.is_tpu else "GPU"
        machines = f"{options.trainer_replicas} machines, " if options.trainer_replicas > 1 else ""
        raise ConfigError(
            f"--{flag}: {batch} does not fit {options.trainer_accelerator} "
            f"({machines}{replicas} x {accelerator.device_memory_gib:g} GiB): "
            f"{per_replica} images x {views} view{'s' if views > 1 else ''} per {device} x "
            f"{image_gib * 1024:.0f} MiB "
            f"of ResNet-{depth} (width {width:g}) activations at {config.data.image_size} px "
            f"in {dtype} + {RESERVED_GIB:g} GiB = {need:.1f} GiB > "
            f"{accelerator.device_memory_gib:g} GiB; at most {fits * replicas} fits "
            f"({fits} per {device})"
        )


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
        # Only a pool named on the command line: nothing on gs:// is listed while compiling.
        unlabeled=d.unlabeled_dir,
    )


def dataflow_beam_args(options: CloudOptions, pipeline_name: str = "") -> list[str]:
    """Beam pipeline options that run every Beam-powered component on Dataflow.

    Each job carries the pipeline's label, so that `gcloud dataflow jobs list` finds what is
    left running, and a wall-time limit after which Dataflow cancels it.
    """
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
        "--dataflow_service_options=max_workflow_runtime_walltime_seconds="
        f"{round(options.dataflow_timeout_hours * 3600)}",
    ]
    args += [f"--labels={k}={v}" for k, v in job_labels(pipeline_name).items()]
    args += [f"--experiments={e.strip()}" for e in options.dataflow_experiments.split(",") if e]
    if options.service_account:
        args.append(f"--service_account_email={options.service_account}")
    return args


def worker_pool_specs(options: CloudOptions) -> list[dict[str, Any]]:
    """Vertex AI worker pools: the accelerator machine running the trainer image; with
    --trainer_replicas=N, pool 0 is the chief and pool 1 holds the N-1 other workers (Vertex AI
    sets TF_CONFIG with a 'chief' and 'worker' tasks from them)."""
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

    def pool(replicas: int) -> dict[str, Any]:
        return {
            "machine_spec": dict(machine_spec),
            "replica_count": replicas,
            "disk_spec": {"boot_disk_type": "pd-ssd", "boot_disk_size_gb": 100},
            # The Trainer extension sets the command (tfx.scripts.run_executor).
            "container_spec": {
                "image_uri": options.resolved_trainer_image,
                "env": [{"name": "TF_USE_LEGACY_KERAS", "value": "1"}],
            },
        }

    pools = [pool(1)]
    if options.trainer_replicas > 1:
        pools.append(pool(options.trainer_replicas - 1))
    return pools


def vertex_training_args(options: CloudOptions, pipeline_name: str = "") -> dict[str, Any]:
    """`ai_platform_training_args` of the Vertex Trainer: project plus a CustomJob spec.

    TFX hands `job_spec` to the CustomJob as it is (snake_case proto field names). With
    `restart_job_on_worker_restart` a worker that restarts (TPU host maintenance, a crash)
    restarts the job in place instead of failing it, and run_fn resumes from the checkpoints it
    keeps under the Trainer's `checkpoint_root`. `timeout` ends a job that runs longer than
    `--trainer_timeout_hours` (Vertex's own default is 7 days).
    """
    job_spec: dict[str, Any] = {
        "worker_pool_specs": worker_pool_specs(options),
        "scheduling": {
            "restart_job_on_worker_restart": True,
            "timeout": f"{round(options.trainer_timeout_hours * 3600)}s",
        },
    }
    if options.service_account:
        job_spec["service_account"] = options.service_account
    args: dict[str, Any] = {"project": options.project, "job_spec": job_spec}
    if pipeline_name:
        args["labels"] = job_labels(pipeline_name)
    return args


def vertex_trainer_factory(options: CloudOptions, pipeline_name: str = "") -> Callable[..., Any]:
    """Trainer factory for `create_pipeline`: the same Trainer, run as a Vertex AI CustomJob
    by `cloud_jobs.VertexTrainer` (which cancels the job when its step stops, and leases the
    checkpoint directory to it).

    The Vertex keys join the run_fn's own custom_config ({"trainer", "checkpoint_root"}), which
    the job hands through to run_fn unchanged.
    """
    from tfx.extensions.google_cloud_ai_platform import constants
    from tfx.extensions.google_cloud_ai_platform.trainer import executor

    from pipeline.cloud import jobs as cloud_jobs

    def make(*, custom_config: dict[str, Any], **kwargs: Any) -> Any:
        return cloud_jobs.VertexTrainer(
            custom_config={
                **custom_config,
                constants.ENABLE_VERTEX_KEY: True,
                constants.VERTEX_REGION_KEY: options.region,
                executor.TRAINING_ARGS_KEY: vertex_training_args(options, pipeline_name),
            },
            **kwargs,
        )

    return make


def vertex_pusher_factory(
    options: CloudOptions, pipeline_name: str = "simclr"
) -> Callable[..., Any] | None:
    """A Pusher that deploys blessed models to a Vertex AI endpoint, when one is named, and
    then undeploys the models this pipeline deployed there before, unless
    --keep_previous_deployments."""
    if not options.vertex_endpoint:
        return None
    from tfx.extensions.google_cloud_ai_platform import constants

    from pipeline.components import vertex_endpoint

    def make(*, model: Any, model_blessing: Any) -> Any:
        return vertex_endpoint.EndpointPusher(
            model=model,
            model_blessing=model_blessing,
            custom_config={
                vertex_endpoint.UNDEPLOY_PREVIOUS_KEY: not options.keep_previous_deployments,
                vertex_endpoint.PIPELINE_KEY: job_labels(pipeline_name)["simclr-pipeline"],
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
    with open(output_path) as f:
        job = json.load(f)
    use_listing_driver(job)
    from pipeline.cloud.jobs import use_stopping_step_command

    use_stopping_step_command(job)
    with open(output_path, "w") as f:
        json.dump(job, f, indent=2, sort_keys=True)
    return output_path


def use_listing_driver(job: dict[str, Any]) -> int:
    """Points the class-folder ExampleGen's pre-cache-check step at its own driver.

    The Kubeflow V2 compiler gives every FileBasedExampleGen TFX's driver command, whatever the
    component's DRIVER_CLASS; that driver stats each input file
    (pipeline/components/image_example_gen/driver.py says why that is hours on ImageNet).
    Returns how many steps were changed.
    """
    from pipeline.components.image_example_gen.driver import VERTEX_DRIVER_COMMAND
    from pipeline.components.image_example_gen.executor import ImageFolderExecutor

    executor_path = f"{ImageFolderExecutor.__module__}.{ImageFolderExecutor.__name__}"
    changed = 0
    for executor in job["pipelineSpec"]["deploymentSpec"]["executors"].values():
        container = executor.get("container", {})
        hook = container.get("lifecycle", {}).get("preCacheCheck")
        if hook is not None and executor_path in container.get("args", []):
            hook["command"] = list(VERTEX_DRIVER_COMMAND)
            changed += 1
    return changed


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
