"""Stopping paid cloud jobs, offline: the real Vertex AI (google-cloud-aiplatform, REST) and
Dataflow (Beam's apitools) clients talk to a stub of both APIs on 127.0.0.1.

SIGTERM to the Trainer's step sends the custom job a cancel and records it in the lease beside
the checkpoints; a second job for the same checkpoint directory is refused while the first is
alive (CANCELLING counts), and a lease whose job ended or is unknown is taken over. SIGTERM to a
Beam step cancels the Dataflow job it is waiting for.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

import pytest

from pipeline.cloud import jobs as cloud_jobs
from pipeline.cloud import vertex as cloud
from pipeline.configs import trainer_config
from pipeline.runner import cli

REGION = "europe-west4"
PARENT = f"projects/my-proj/locations/{REGION}"


class CloudStub:
    """Vertex AI JobService (v1 REST) and Dataflow (v1b3) on 127.0.0.1, with canned state.

    `states[job name]` is what GET returns; `on_get(stub, name, count)` may change it or send
    a signal while the client polls."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.states: dict[str, str] = {}
        self.created: list[dict[str, Any]] = []
        self.gets: dict[str, int] = {}
        self.on_get = lambda stub, name, count: None
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> Any:
                data = self.rfile.read(int(self.headers.get("content-length") or 0))
                return json.loads(data) if data else None

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = urlparse(self.path).path
                stub.requests.append(("GET", path, None))
                if path.startswith("/v1b3/"):  # Dataflow: the job, and its (empty) messages
                    job_id = path.rsplit("/jobs/", 1)[-1].split("/")[0]
                    if path.endswith("/messages"):
                        return self._reply(200, {})
                    return self._reply(200, {"id": job_id, "currentState": stub.states[job_id]})
                name = path.removeprefix("/v1/")
                if name not in stub.states:
                    error = {"code": 404, "message": f"{name} not found", "status": "NOT_FOUND"}
                    return self._reply(404, {"error": error})
                stub.gets[name] = stub.gets.get(name, 0) + 1
                stub.on_get(stub, name, stub.gets[name])
                self._reply(200, {"name": name, "state": stub.states[name]})

            def do_POST(self) -> None:  # noqa: N802
                path, body = urlparse(self.path).path, self._body()
                stub.requests.append(("POST", path, body))
                if path.endswith(":cancel"):
                    stub.states[path.removeprefix("/v1/").removesuffix(":cancel")] = (
                        "JOB_STATE_CANCELLING"
                    )
                    return self._reply(200, {})
                name = f"{PARENT}/customJobs/{100 + len(stub.created)}"
                stub.created.append(body)
                stub.states[name] = "JOB_STATE_PENDING"
                self._reply(200, {**body, "name": name, "state": "JOB_STATE_PENDING"})

            def do_PUT(self) -> None:  # noqa: N802 - Dataflow's jobs.update
                path, body = urlparse(self.path).path, self._body()
                stub.requests.append(("PUT", path, body))
                job_id = path.rsplit("/", 1)[-1]
                stub.states[job_id] = "JOB_STATE_CANCELLING"
                self._reply(200, {"id": job_id})

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def cancels(self) -> list[str]:
        return [path for method, path, _ in self.requests if path.endswith(":cancel")]


@pytest.fixture
def stub(monkeypatch):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("SIGTERM handlers can only be set in the main thread")
    from google.auth.credentials import AnonymousCredentials
    from google.cloud.aiplatform import gapic

    server = CloudStub()

    def client(region: str) -> Any:
        assert region == REGION
        return gapic.JobServiceClient(
            credentials=AnonymousCredentials(),
            transport="rest",
            client_options={"api_endpoint": server.url},
        )

    monkeypatch.setattr(cloud_jobs, "job_service_client", client)
    monkeypatch.setattr(cloud_jobs, "POLL_SECONDS", 0.02)
    yield server
    server.server.shutdown()


def _trainer_step(tmp_path) -> tuple[dict, dict, dict]:
    """input_dict, output_dict and exec_properties of the pretrain Trainer's Vertex step, as
    dataflow_runner.py builds the component."""
    from google.protobuf import message
    from tfx.proto import trainer_pb2
    from tfx.types import Channel, standard_artifacts
    from tfx.utils import proto_utils

    argv = [
        "--dataset=imagenet2012",
        "--data_dir=gs://my-bucket/imagenet",
        "--data_format=tfrecord",
        "--project=my-proj",
        f"--region={REGION}",
        "--bucket=gs://my-bucket",
        "--trainer_timeout_hours=30",
    ]
    config, extras = cli.parse_config(
        cloud.accelerator_defaults(argv) + argv, "t", "t", extra=cloud.cloud_flags()
    )
    options = cloud.CloudOptions.from_flags(extras)
    component = cloud.vertex_trainer_factory(options, "simclr")(
        custom_config={
            "trainer": trainer_config(config, "pretrain").to_json(),
            "checkpoint_root": str(tmp_path / "checkpoints"),
            "code_digest": "0123abcd",
        },
        run_fn="models.trainer.run_fn",
        examples=Channel(type=standard_artifacts.Examples),
        transform_graph=Channel(type=standard_artifacts.TransformGraph),
        schema=Channel(type=standard_artifacts.Schema),
        train_args=trainer_pb2.TrainArgs(splits=["train"]),
        eval_args=trainer_pb2.EvalArgs(splits=["validation"]),
    )
    assert isinstance(component, cloud_jobs.VertexTrainer)
    exec_properties = {
        k: proto_utils.proto_to_json(v) if isinstance(v, message.Message) else v
        for k, v in component.exec_properties.items()
        if v is not None
    }
    examples = standard_artifacts.Examples()
    examples.uri = str(tmp_path / "transformed")
    examples.split_names = '["train", "validation"]'
    graph = standard_artifacts.TransformGraph()
    graph.uri = str(tmp_path / "transform_graph")
    schema = standard_artifacts.Schema()
    schema.uri = str(tmp_path / "schema")
    os.makedirs(schema.uri)
    open(os.path.join(schema.uri, "schema.pbtxt"), "w").close()
    model, run = standard_artifacts.Model(), standard_artifacts.ModelRun()
    model.uri, run.uri = str(tmp_path / "model"), str(tmp_path / "model_run")
    inputs = {"examples": [examples], "transform_graph": [graph], "schema": [schema]}
    return inputs, {"model": [model], "model_run": [run]}, exec_properties


def _lease(tmp_path) -> tuple[str, dict]:
    (path,) = (tmp_path / "checkpoints").glob(f"pretrain-*/{cloud_jobs.LEASE_FILE}")
    return str(path), json.loads(path.read_text())


def test_sigterm_cancels_the_job_and_the_lease_refuses_then_hands_over(stub, tmp_path):
    step = _trainer_step(tmp_path)
    previous = signal.getsignal(signal.SIGTERM)

    # Vertex Pipelines stops the run: the step gets SIGTERM while the job runs.
    def terminate_while_running(stub, name, count):
        stub.states[name] = "JOB_STATE_RUNNING"
        if count == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    stub.on_get = terminate_while_running
    with pytest.raises(cloud_jobs.StepTerminated):
        cloud_jobs.LeasedTrainerExecutor().Do(*step)
    assert signal.getsignal(signal.SIGTERM) is previous
    (first,) = [name for name in stub.states]
    assert stub.cancels() == [f"/v1/{first}:cancel"]
    lease_path, lease = _lease(tmp_path)
    assert lease["job"] == first and "cancel_requested" in lease
    # The lease sits beside the checkpoints run_fn writes: the same directory, same digest.
    assert os.path.exists(os.path.join(os.path.dirname(lease_path), "training.json"))

    # What was sent: the TFX CustomJob with the pipeline's timeout and labels.
    (job,) = stub.created
    assert job["jobSpec"]["scheduling"] == {"restartJobOnWorkerRestart": True, "timeout": "108000s"}
    assert job["labels"]["simclr-pipeline"] == "simclr"
    assert job["labels"]["simclr-stage"] == "pretrain"
    assert job["displayName"].startswith("simclr-pretrain-")
    (pool,) = job["jobSpec"]["workerPoolSpecs"]
    assert pool["containerSpec"]["command"][:3] == ["python", "-m", "tfx.scripts.run_executor"]

    # Resubmitted while the first job is still cancelling: refused in one line, nothing created.
    stub.on_get = lambda stub, name, count: None
    with pytest.raises(cloud_jobs.LeaseHeld) as info:
        cloud_jobs.LeasedTrainerExecutor().Do(*step)
    message = str(info.value)
    assert "\n" not in message and first in message and "JOB_STATE_CANCELLING" in message
    assert len(stub.created) == 1

    # Once the first job has ended, the next launch takes the lease over and runs to the end.
    stub.states[first] = "JOB_STATE_CANCELLED"

    def succeed(stub, name, count):
        stub.states[name] = "JOB_STATE_RUNNING" if count < 3 else "JOB_STATE_SUCCEEDED"

    stub.on_get = succeed
    cloud_jobs.LeasedTrainerExecutor().Do(*step)
    assert len(stub.created) == 2 and len(stub.cancels()) == 1
    second = f"{PARENT}/customJobs/101"
    assert _lease(tmp_path)[1]["job"] == second and stub.states[second] == "JOB_STATE_SUCCEEDED"


def test_the_lease_is_in_the_directory_run_fn_checkpoints_to(tmp_path, monkeypatch):
    """run_fn, handed the function arguments TFX's Trainer executor builds for this step, picks
    the directory the launcher leased."""
    from tfx.components.trainer import executor as tfx_trainer_executor

    from models import trainer

    input_dict, output_dict, exec_properties = _trainer_step(tmp_path)
    lease_path = cloud_jobs._lease_path(input_dict, exec_properties)
    seen = {}
    monkeypatch.setattr(trainer, "run_stage", lambda config, **kwargs: seen.update(kwargs))
    fn_args = tfx_trainer_executor.GenericExecutor()._GetFnArgs(
        input_dict, output_dict, exec_properties
    )
    trainer.run_fn(fn_args)
    assert seen["checkpoint_dir"] == os.path.dirname(lease_path)
    assert os.path.basename(seen["checkpoint_dir"]).startswith("pretrain-")


def test_a_lease_of_a_job_vertex_no_longer_knows_is_taken_over(stub, tmp_path):
    lease = str(tmp_path / cloud_jobs.LEASE_FILE)
    cloud_jobs.write_lease(lease, {"job": f"{PARENT}/customJobs/999"})  # not in the stub: 404
    stub.on_get = lambda stub, name, count: stub.states.update({name: "JOB_STATE_SUCCEEDED"})
    client = cloud_jobs.job_service_client(REGION)
    name = cloud_jobs.run_custom_job(client, PARENT, {"display_name": "x"}, lease)
    assert cloud_jobs.read_lease(lease)["job"] == name == f"{PARENT}/customJobs/100"
    # Ended: released, so the Trainers' checkpoint retention may remove the directory.
    assert cloud_jobs.read_lease(lease)["state"] == "JOB_STATE_SUCCEEDED"
    assert cloud_jobs.read_lease(lease)["released"]


def test_a_failed_poll_cancels_and_a_failed_job_is_one_line(stub, tmp_path):
    client = cloud_jobs.job_service_client(REGION)
    lease = str(tmp_path / cloud_jobs.LEASE_FILE)

    def vanish(stub, name, count):  # the job's GET starts failing: the step gives up
        del stub.states[name]

    stub.on_get = vanish
    with pytest.raises(Exception, match="not found"):
        cloud_jobs.run_custom_job(client, PARENT, {"display_name": "x"}, lease)
    assert stub.cancels() == [f"/v1/{PARENT}/customJobs/100:cancel"]

    stub.on_get = lambda stub, name, count: stub.states.update({name: "JOB_STATE_FAILED"})
    with pytest.raises(RuntimeError) as info:
        cloud_jobs.run_custom_job(client, PARENT, {"display_name": "y"}, lease)
    assert str(info.value) == f"Vertex AI custom job {PARENT}/customJobs/101 ended JOB_STATE_FAILED"
    assert len(stub.cancels()) == 1  # an ended job is not cancelled


def test_sigterm_cancels_the_dataflow_job_a_beam_step_waits_for(stub):
    """A Beam pipeline whose run returns a Dataflow result, as DataflowRunner's does; the step
    waits for it in the main thread (Beam's `with Pipeline() as p:`) and gets SIGTERM."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.dataflow.dataflow_runner import DataflowPipelineResult, DataflowRunner
    from apache_beam.runners.dataflow.internal import apiclient
    from apache_beam.runners.dataflow.internal.clients import dataflow
    from apache_beam.runners.runner import PipelineRunner

    options = PipelineOptions(
        ["--project=my-proj", f"--region={REGION}", "--no_auth", "--temp_location=gs://b/t"]
        + [f"--dataflow_endpoint={stub.url}"]
    )
    dataflow_runner = DataflowRunner()
    dataflow_runner.dataflow_client = apiclient.DataflowApplicationClient(options)
    stub.states["df-1"] = "JOB_STATE_RUNNING"
    running = dataflow.Job.CurrentStateValueValuesEnum.JOB_STATE_RUNNING

    terminate = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))

    class SubmitsToDataflow(PipelineRunner):
        def run_pipeline(self, pipeline, options):
            if not terminate.is_alive() and not terminate.finished.is_set():
                terminate.start()
            return DataflowPipelineResult(
                dataflow.Job(id="df-1", currentState=running), dataflow_runner
            )

    try:
        with pytest.raises(cloud_jobs.StepTerminated):
            with cloud_jobs.terminate_raises(), cloud_jobs.cancel_dataflow_on_exit() as results:
                with beam.Pipeline(runner=SubmitsToDataflow()) as p:
                    _ = p | beam.Create([1])
    finally:
        terminate.cancel()  # never a SIGTERM outside the handler
    assert len(results) == 1
    puts = [(path, body) for method, path, body in stub.requests if method == "PUT"]
    assert puts == [
        (
            f"/v1b3/projects/my-proj/locations/{REGION}/jobs/df-1",
            {"requestedState": "JOB_STATE_CANCELLED"},
        )
    ]
    assert beam.Pipeline.run.__name__ == "run"  # the recording wrapper is gone again

    # A step that ends with absl's sys.exit(0) cancels nothing; one that exits 1 cancels.
    stub.states["df-1"] = "JOB_STATE_RUNNING"
    for code, puts_after in ((0, 1), (1, 2)):
        with pytest.raises(SystemExit):
            with cloud_jobs.cancel_dataflow_on_exit():
                beam.Pipeline(runner=SubmitsToDataflow()).run()
                raise SystemExit(code)
        assert sum(method == "PUT" for method, _, _ in stub.requests) == puts_after


def test_every_tfx_step_runs_under_the_stopping_entry_point(tmp_path):
    job = {
        "pipelineSpec": {
            "deploymentSpec": {
                "executors": {
                    "Transform_executor": {
                        "container": {
                            "command": ["python", "-m", cloud_jobs.TFX_STEP_MODULE],
                            "args": ["--executor_class_path", "x"],
                        }
                    },
                    "resolver_executor": {"resolver": {}},
                }
            }
        }
    }
    assert cloud_jobs.use_stopping_step_command(job) == 1
    container = job["pipelineSpec"]["deploymentSpec"]["executors"]["Transform_executor"][
        "container"
    ]
    assert container["command"] == list(cloud_jobs.STEP_COMMAND)
    assert container["args"] == ["--executor_class_path", "x"]


def test_the_entry_point_runs_tfx_step_entry_point():
    """`python -m pipeline.cloud.jobs` is TFX's executor entry point (its flags, its exit)."""
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "pipeline.cloud.jobs", "--help"],
        cwd=str(pathlib.Path(__file__).resolve().parents[3]),
        env={**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert (
        "--executor_class_path" in run.stdout and "--json_serialized_invocation_args" in run.stdout
    )
