"""Paid Google Cloud jobs that stop when the pipeline step that started them stops.

A Vertex AI Pipelines step that starts a Vertex AI custom job (the Trainers) or a Dataflow job
(ExampleGen, StatisticsGen, Transform, Evaluator) only waits for it; cancel the run, and Vertex
sends the step SIGTERM and then kills it, while the job it started goes on billing. TFX's own
launcher (`tfx.extensions.google_cloud_ai_platform.runner`) polls the custom job and never
cancels it. This module:

- runs every step of the compiled pipeline under `main` (`STEP_COMMAND`), which turns SIGTERM
  into `StepTerminated` and, when a step ends by any exception, cancels the Dataflow jobs its
  Beam pipelines started;
- replaces TFX's Vertex training launcher (`VertexTrainer`, `LeasedTrainerExecutor`): it owns
  the create-and-poll loop, so it knows the job's resource name, and cancels the job when the
  step is terminated or fails. It sends the cancel and records it without waiting for the job
  to reach CANCELLED (Vertex gives a stopped step a short grace period);
- keeps a lease beside the Trainer's checkpoints (`LEASE_FILE`) naming the custom job that
  writes them, so that a second job for the same checkpoint directory (a resubmitted run, a
  retried step whose first job is still cancelling) is refused while the first is alive. The
  lease is checked against the job's real state, so a job that ended, was cancelled or no longer
  exists leaves a lease that the next launch takes over.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tfx.components.trainer import executor as tfx_trainer_executor
from tfx.dsl.components.base import executor_spec
from tfx.extensions.google_cloud_ai_platform import constants, training_clients
from tfx.extensions.google_cloud_ai_platform.trainer import executor as vertex_executor
from tfx.types import standard_component_specs
from tfx.utils import json_utils, name_utils

from models.trainer import LEASE_FILE
from pipeline.components.trainer import Trainer, with_split_sizes

# What every step of the compiled pipeline runs instead of TFX's executor entry point: the same
# entry point (`TFX_STEP_MODULE`), under `main`.
TFX_STEP_MODULE = "tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor"
STEP_COMMAND = ("python", "-m", "pipeline.cloud.jobs")

# Custom job states in which the job can no longer write checkpoints or bill.
ENDED_STATES = frozenset(
    {
        "JOB_STATE_SUCCEEDED",
        "JOB_STATE_FAILED",
        "JOB_STATE_CANCELLED",
        "JOB_STATE_EXPIRED",
        "JOB_STATE_PARTIALLY_SUCCEEDED",
    }
)
POLL_SECONDS = 30.0  # TFX's launcher polls every 30 s too
# Consecutive failed polls (transient API or network errors) before the step gives up.
POLL_RETRIES = 10
# What `StepTerminated` exits with: 128 + SIGTERM, as a process killed by it would.
TERMINATED_EXIT_CODE = 128 + signal.SIGTERM


class StepTerminated(BaseException):
    """The step received SIGTERM. A BaseException, so no `except Exception` swallows it."""


class LeaseHeld(RuntimeError):
    """Another live job writes this checkpoint directory; the message is one line."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@contextmanager
def terminate_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises `StepTerminated` in the main thread.

    Outside the main thread signal handlers cannot be set; the block then runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise StepTerminated(f"received signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----- Dataflow -----


@contextmanager
def cancel_dataflow_on_exit() -> Iterator[list[Any]]:
    """Records the result of every Beam pipeline run in the block; if the block ends with an
    exception (SIGTERM included), cancels each Dataflow job among them that has not ended.

    TFX's Beam executors run `with beam.Pipeline(...) as p:`, which calls `Pipeline.run` and
    then waits in the main thread; only the returned result knows the Dataflow job id.
    """
    import apache_beam as beam

    results: list[Any] = []
    run = beam.Pipeline.run

    def recording_run(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = run(self, *args, **kwargs)
        results.append(result)
        return result

    beam.Pipeline.run = recording_run
    try:
        yield results
    except SystemExit as e:  # absl's app.run exits with 0 (or None) when the step succeeded
        if e.code not in (None, 0):
            cancel_dataflow_jobs(results)
        raise
    except BaseException:
        cancel_dataflow_jobs(results)
        raise
    finally:
        beam.Pipeline.run = run


def cancel_dataflow_jobs(results: list[Any]) -> list[str]:
    """Sends a cancel for each Dataflow job of `results` that is not in a terminal state;
    returns their job ids. Other runners' results are left alone."""
    from apache_beam.runners.dataflow.dataflow_runner import DataflowPipelineResult

    cancelled = []
    for result in results:
        if not isinstance(result, DataflowPipelineResult) or not result.has_job:
            continue
        try:
            if result.is_in_terminal_state():
                continue
            result.cancel()
            cancelled.append(result.job_id())
            print(f"cancel requested for Dataflow job {result.job_id()}", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - report every job, then let the step fail
            print(
                f"error: could not cancel Dataflow job {result.job_id()} "
                f"({type(e).__name__}: {' '.join(str(e).split())}); it bills until cancelled: "
                f"gcloud dataflow jobs cancel {result.job_id()}",
                file=sys.stderr,
            )
    return cancelled


def main(argv: list[str] | None = None) -> int:
    """The compiled pipeline's step entry point: TFX's, with SIGTERM and failures cancelling
    the Dataflow jobs the step started."""
    import runpy

    sys.argv = [TFX_STEP_MODULE, *(sys.argv[1:] if argv is None else argv)]
    try:
        with terminate_raises(), cancel_dataflow_on_exit():
            runpy.run_module(TFX_STEP_MODULE, run_name="__main__", alter_sys=True)
    except StepTerminated:
        print("step terminated (SIGTERM); its cloud jobs were sent a cancel", file=sys.stderr)
        return TERMINATED_EXIT_CODE
    except SystemExit as e:  # absl's app.run ends with sys.exit
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def use_stopping_step_command(job: dict[str, Any]) -> int:
    """Points every step of a compiled Vertex AI Pipelines job that runs TFX's executor entry
    point at `STEP_COMMAND` (same arguments). Returns how many steps were changed."""
    changed = 0
    tfx_command = ["python", "-m", TFX_STEP_MODULE]
    for executor in job["pipelineSpec"]["deploymentSpec"]["executors"].values():
        container = executor.get("container", {})
        if container.get("command") == tfx_command:
            container["command"] = list(STEP_COMMAND)
            changed += 1
    return changed


# ----- Vertex AI custom jobs -----


def job_service_client(region: str) -> Any:
    """Vertex AI's JobService client for `region`, as TFX's launcher makes it."""
    from google.cloud.aiplatform import gapic

    return gapic.JobServiceClient(
        client_options={"api_endpoint": f"{region}-aiplatform.googleapis.com"}
    )


def _state_name(state: Any) -> str:
    return getattr(state, "name", str(state))


def job_state(client: Any, name: str) -> str:
    """The job's state name; JOB_STATE_NOT_FOUND when Vertex no longer knows the job."""
    from google.api_core import exceptions

    try:
        return _state_name(client.get_custom_job(name=name).state)
    except exceptions.NotFound:
        return "JOB_STATE_NOT_FOUND"


def read_lease(path: str) -> dict[str, Any] | None:
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.loads(f.read())


def write_lease(path: str, lease: dict[str, Any]) -> None:
    import tensorflow as tf

    with tf.io.gfile.GFile(path, "w") as f:
        f.write(json.dumps(lease, indent=2, sort_keys=True))


def check_lease(path: str, client: Any) -> dict[str, Any] | None:
    """Refuses (`LeaseHeld`) when the lease at `path` names a job that is still alive; returns
    the dead lease that the caller may take over (None when there was none)."""
    lease = read_lease(path)
    if not lease or not lease.get("job"):
        return None
    state = job_state(client, lease["job"])
    if state not in ENDED_STATES and state != "JOB_STATE_NOT_FOUND":
        raise LeaseHeld(
            f"{os.path.dirname(path)} is being written by Vertex AI custom job {lease['job']} "
            f"({state}); wait for it to end or cancel it (gcloud ai custom-jobs cancel "
            f"{lease['job']}) before starting another"
        )
    return {**lease, "state": state}


def cancel_job(client: Any, name: str, lease_path: str) -> None:
    """Sends the cancel and records it in the lease; does not wait for CANCELLED."""
    try:
        client.cancel_custom_job(name=name)
    except Exception as e:  # noqa: BLE001 - the step is already failing; say what still bills
        print(
            f"error: could not cancel Vertex AI custom job {name} ({type(e).__name__}: "
            f"{' '.join(str(e).split())}); it bills until cancelled: gcloud ai custom-jobs "
            f"cancel {name}",
            file=sys.stderr,
        )
        return
    print(f"cancel requested for Vertex AI custom job {name}", file=sys.stderr)
    try:
        write_lease(lease_path, {**(read_lease(lease_path) or {}), "cancel_requested": _now()})
    except Exception as e:  # noqa: BLE001 - the cancel was sent; the lease is checked anyway
        print(f"warning: could not record the cancel in {lease_path}: {e}", file=sys.stderr)


def run_custom_job(
    client: Any,
    parent: str,
    custom_job: dict[str, Any],
    lease_path: str,
    poll_seconds: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Creates the custom job, leases its checkpoint directory to it, and waits for it.

    If anything ends the wait early (SIGTERM as `StepTerminated`, a polling error, an
    interrupt), the job is sent a cancel before the exception goes on. A job that ends other
    than SUCCEEDED raises a one-line RuntimeError. Returns the job's resource name.
    """
    previous = check_lease(lease_path, client)
    if previous:
        print(
            f"taking over the lease of {os.path.dirname(lease_path)} from {previous['job']} "
            f"({previous['state']})",
            file=sys.stderr,
        )
    response = client.create_custom_job(parent=parent, custom_job=custom_job)
    name = response.name
    try:
        write_lease(lease_path, {"job": name, "leased": _now()})
        print(f"Vertex AI custom job {name} writes {os.path.dirname(lease_path)}", flush=True)
        state, failures = _state_name(response.state), 0
        while state not in ENDED_STATES:
            sleep(POLL_SECONDS if poll_seconds is None else poll_seconds)
            try:
                response = client.get_custom_job(name=name)
                state, failures = _state_name(response.state), 0
            except Exception:  # noqa: BLE001 - transient API errors; give up after a few
                failures += 1
                if failures > POLL_RETRIES:
                    raise
    except BaseException:
        cancel_job(client, name, lease_path)
        raise
    # Ended: the directory is free for the next job, and for the Trainers' retention.
    write_lease(lease_path, {**(read_lease(lease_path) or {}), "released": _now(), "state": state})
    if state != "JOB_STATE_SUCCEEDED":
        error = " ".join(str(getattr(response.error, "message", "") or "").split())
        raise RuntimeError(
            f"Vertex AI custom job {name} ended {state}" + (f": {error}" if error else "")
        )
    return name


def _lease_path(input_dict: dict[str, list[Any]], exec_properties: dict[str, Any]) -> str:
    """The lease beside the checkpoints run_fn will use: the same directory, computed from the
    same function arguments TFX's Trainer executor hands run_fn."""
    from tfx.components.trainer import fn_args_utils

    from models.config import TrainerConfig
    from models.trainer import checkpoint_dir

    fn_args = fn_args_utils.get_common_fn_args(input_dict, exec_properties)
    custom = fn_args.custom_config or {}
    root = custom.get("checkpoint_root")
    if not root:
        raise ValueError("custom_config has no checkpoint_root; nothing to lease")
    inputs = {
        "train_files": list(fn_args.train_files),
        "eval_files": list(fn_args.eval_files),
        "transform_output": fn_args.transform_graph_path,
        "base_model": fn_args.base_model,
    }
    config = TrainerConfig.from_json(custom["trainer"])
    directory = checkpoint_dir(root, config, inputs, custom.get("code_digest", ""))
    return os.path.join(directory, LEASE_FILE)


class LeasedTrainerExecutor(vertex_executor.GenericExecutor):
    """TFX's Vertex AI Trainer launcher with a loop of its own: lease, cancel on stop."""

    def Do(
        self,
        input_dict: dict[str, list[Any]],
        output_dict: dict[str, list[Any]],
        exec_properties: dict[str, Any],
    ) -> None:
        self._log_startup(input_dict, output_dict, exec_properties)
        # The job's run_fn gets the split sizes: the statistics are read here, once.
        exec_properties = with_split_sizes(input_dict, exec_properties)
        custom_config = json_utils.loads(
            exec_properties.get(standard_component_specs.CUSTOM_CONFIG_KEY, "null")
        )
        job_args = dict(custom_config[vertex_executor.TRAINING_ARGS_KEY])
        project = job_args.pop("project")
        region = custom_config[constants.VERTEX_REGION_KEY]
        stage = json.loads(custom_config["trainer"])["stage"]
        display_name = f"simclr-{stage}-{datetime.datetime.now():%Y%m%d%H%M%S}"
        # TFX's client builds the CustomJob (container command, labels) as its own launcher
        # does; `run_custom_job` replaces its launch-and-poll loop.
        builder = training_clients.VertexJobClient.__new__(training_clients.VertexJobClient)
        custom_job = builder.create_training_job(
            input_dict,
            output_dict,
            exec_properties,
            name_utils.get_full_name(tfx_trainer_executor.GenericExecutor),
            job_args,
            display_name,
            None,
        )
        custom_job["labels"]["simclr-stage"] = stage
        lease_path = _lease_path(input_dict, exec_properties)
        with terminate_raises():
            run_custom_job(
                job_service_client(region),
                f"projects/{project}/locations/{region}",
                custom_job,
                lease_path,
            )


class VertexTrainer(Trainer):
    """The pipeline's Trainer as TFX's Vertex AI Trainer runs it, by `LeasedTrainerExecutor`."""

    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(LeasedTrainerExecutor)


if __name__ == "__main__":
    sys.exit(main())
