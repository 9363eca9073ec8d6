"""dataflow_runner.py offline: the compiled Vertex AI Pipelines JSON, one-line errors for missing
or bad flags and missing credentials, the TPU train step under XLA, and the local ImageNet
rehearsal.

Nothing here needs Google Cloud credentials or network access.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import tensorflow as tf

import dataflow_runner
from pipeline.runner import summary as summary_lib
from tests.imagenet_fixture import write_imagenet_fixture, write_subset_list

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
REGISTRY = "europe-west4-docker.pkg.dev/my-proj/simclr"
CLOUD_ARGS = [
    "--dataset=imagenet2012",
    "--data_dir=gs://my-bucket/imagenet/ILSVRC2012",
    "--data_format=folders",
    "--eval_split=val",
    "--label_subset=gs://my-bucket/imagenet_subsets/1percent.txt",
    # The largest power of two whose activations fit a v3-8 (docs/cloud.md, section 5).
    "--train_batch_size=1024",
    "--train_epochs=100",
    "--min_top1=0.6",
    "--max_top1_regression=0.01",
    "--project=my-proj",
    "--region=europe-west4",
    "--bucket=gs://my-bucket",
    "--dataflow_max_workers=64",
    "--dataflow_machine_type=n2-highmem-8",
    "--dataflow_disk_size_gb=250",
    "--vertex_endpoint=simclr-r50",
]
BEAM_COMPONENTS = ("FileBasedExampleGen", "StatisticsGen", "Transform", "Evaluator")
TRAINERS = ("pretrain_trainer", "finetune_trainer")


def clean_env(tmp_path: pathlib.Path) -> dict[str, str]:
    """No credentials, no gcloud config, and no probe of the GCE metadata server."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG")
    }
    env.update(
        TF_USE_LEGACY_KERAS="1",
        TF_CPP_MIN_LOG_LEVEL="3",
        NO_GCE_CHECK="true",
        HOME=str(tmp_path / "home"),
        CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
    )
    return env


def run_runner(
    args: list[str], tmp_path: pathlib.Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "dataflow_runner.py"), *args],
        cwd=tmp_path,
        env=clean_env(tmp_path) if env is None else env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _param(task: dict, name: str):
    value = task["inputs"]["parameters"][name]["runtimeValue"]["constantValue"]
    text = value.get("stringValue")
    return json.loads(text) if text is not None else value


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    pytest.importorskip(
        "kfp.pipeline_spec", reason="compiling for Vertex AI needs kfp-pipeline-spec"
    )
    out = tmp_path_factory.mktemp("compiled") / "job.json"
    assert dataflow_runner.main(CLOUD_ARGS + [f"--pipeline_json={out}", "--compile_only"]) == 0
    return json.loads(out.read_text())


def test_every_component_is_compiled(compiled):
    tasks = compiled["pipelineSpec"]["root"]["dag"]["tasks"]
    expected = {
        *BEAM_COMPONENTS,
        "SchemaGen",
        "ExampleValidator",
        *TRAINERS,
        "Pusher",
        "vertex_endpoint_pusher",
    }
    assert expected <= set(tasks)
    # The resolver of the last blessed model compiles into two resolver tasks.
    assert any(name.startswith("latest_blessed_model_resolver") for name in tasks)
    assert compiled["runtimeConfig"]["gcsOutputDirectory"] == "gs://my-bucket/pipeline_root/simclr"
    assert tasks["finetune_trainer"]["inputs"]["artifacts"]["base_model"]["taskOutputArtifact"][
        "producerTask"
    ] == ("pretrain_trainer")


def test_beam_components_run_on_dataflow_in_the_pipeline_image(compiled):
    executors = compiled["pipelineSpec"]["deploymentSpec"]["executors"]
    for name in BEAM_COMPONENTS:
        container = executors[f"{name}_executor"]["container"]
        assert container["image"] == f"{REGISTRY}/simclr-tfx:latest", name
        args = container["args"]
        for expected in (
            "--runner=DataflowRunner",
            "--project=my-proj",
            "--region=europe-west4",
            "--temp_location=gs://my-bucket/tmp/dataflow",
            f"--sdk_container_image={REGISTRY}/simclr-tfx:latest",
            "--machine_type=n2-highmem-8",
            "--max_num_workers=64",
            "--disk_size_gb=250",
            "--experiments=use_runner_v2",
        ):
            assert expected in args, (name, expected)
    example_gen = executors["FileBasedExampleGen_executor"]["container"]["args"]
    assert "pipeline.components.image_example_gen.executor.ImageFolderExecutor" in example_gen


def test_trainers_run_on_a_vertex_tpu_worker_pool(compiled):
    tasks = compiled["pipelineSpec"]["root"]["dag"]["tasks"]
    executors = compiled["pipelineSpec"]["deploymentSpec"]["executors"]
    for name in TRAINERS:
        custom = _param(tasks[name], "custom_config")
        assert custom["ai_platform_enable_vertex"] is True
        assert custom["ai_platform_vertex_region"] == "europe-west4"
        training = custom["ai_platform_training_args"]
        assert training["project"] == "my-proj"
        (pool,) = training["job_spec"]["worker_pool_specs"]
        assert pool["machine_spec"] == {
            "machine_type": "cloud-tpu",
            "accelerator_type": "TPU_V3",
            "accelerator_count": 8,
        }
        assert pool["container_spec"]["image_uri"] == f"{REGISTRY}/simclr-tfx-tpu:latest"
        # run_fn's own keys travel next to the Vertex ones.
        stage = name.split("_")[0]
        trainer = json.loads(custom["trainer"])
        assert trainer["stage"] == stage
        assert trainer["runtime"]["strategy"] == "tpu"
        assert trainer["runtime"]["tpu_name"] == "local"
        assert trainer["runtime"]["mixed_precision"] == "bfloat16"
        assert trainer["input"]["image_format"] == "jpeg" and trainer["input"]["image_size"] == 224
        if stage == "pretrain":
            assert trainer["train"]["train_batch_size"] == 1024
        else:
            assert trainer["labels"]["label_subset"].endswith("1percent.txt")
        executor = executors[f"{name}_executor"]["container"]
        # The launcher that cancels its custom job when the step stops (pipeline/cloud/jobs.py).
        assert "pipeline.cloud.jobs.LeasedTrainerExecutor" in executor["args"]


def test_trainer_jobs_restart_in_place_and_checkpoint_under_the_pipeline_root(compiled):
    """A worker restart (TPU maintenance, a crash) restarts the job, which resumes from the
    checkpoints run_fn keeps under checkpoint_root; that must be on GCS, inside the pipeline
    root, so a retried execution finds them."""
    from google.cloud.aiplatform_v1.types import custom_job
    from tfx.extensions.google_cloud_ai_platform import training_clients

    tasks = compiled["pipelineSpec"]["root"]["dag"]["tasks"]
    root = compiled["runtimeConfig"]["gcsOutputDirectory"]
    assert root == "gs://my-bucket/pipeline_root/simclr"
    for name in TRAINERS:
        custom = _param(tasks[name], "custom_config")
        training = dict(custom["ai_platform_training_args"])
        assert training["job_spec"]["scheduling"] == {
            "restart_job_on_worker_restart": True,
            "timeout": "259200s",
        }
        assert training["labels"] == {"simclr-pipeline": "simclr"}
        # What TFX's Vertex client sends: the CustomJob proto built from this job_spec.
        training.pop("project")
        client = training_clients.VertexJobClient.__new__(training_clients.VertexJobClient)
        job = client.create_training_job({}, {}, {}, "x.Executor", training, None, None)
        assert custom_job.CustomJob(**job).job_spec.scheduling.restart_job_on_worker_restart
        assert "checkpoint_root" in custom, f"{name}: no checkpoint_root in custom_config"
        assert custom["checkpoint_root"].startswith(root + "/"), custom["checkpoint_root"]


def test_every_step_stops_its_cloud_jobs_when_it_is_stopped(compiled):
    """Each TFX step runs TFX's entry point under pipeline/cloud/jobs.py's, which turns
    SIGTERM (Vertex AI Pipelines stopping the run) into cancelling its Dataflow or Vertex job;
    Dataflow jobs carry the pipeline's label and a wall-time limit."""
    from pipeline.cloud.jobs import STEP_COMMAND

    executors = compiled["pipelineSpec"]["deploymentSpec"]["executors"]
    containers = {name: e["container"] for name, e in executors.items() if "container" in e}
    assert {f"{name}_executor" for name in (*BEAM_COMPONENTS, *TRAINERS)} <= set(containers)
    for name, container in containers.items():
        assert container["command"] == list(STEP_COMMAND), name
    for name in BEAM_COMPONENTS:
        args = containers[f"{name}_executor"]["args"]
        assert "--labels=simclr-pipeline=simclr" in args
        assert "--dataflow_service_options=max_workflow_runtime_walltime_seconds=86400" in args


def test_trainer_replicas_compile_into_a_chief_and_worker_pool(tmp_path):
    """--trainer_replicas=2 on a100: both Trainers' compiled CustomJob spec has a chief pool and
    a worker pool of 8-GPU machines, and their run_fn config trains under multi_worker."""
    pytest.importorskip(
        "kfp.pipeline_spec", reason="compiling for Vertex AI needs kfp-pipeline-spec"
    )
    out = tmp_path / "job.json"
    args = [a for a in CLOUD_ARGS if not a.startswith("--train_batch_size")]
    args += ["--trainer_accelerator=a100", "--trainer_replicas=2", "--train_batch_size=2048"]
    assert dataflow_runner.main(args + [f"--pipeline_json={out}", "--compile_only"]) == 0
    tasks = json.loads(out.read_text())["pipelineSpec"]["root"]["dag"]["tasks"]
    for name in TRAINERS:
        custom = _param(tasks[name], "custom_config")
        pools = custom["ai_platform_training_args"]["job_spec"]["worker_pool_specs"]
        assert [p["replica_count"] for p in pools] == [1, 1]
        for pool in pools:
            assert pool["machine_spec"] == {
                "machine_type": "a2-highgpu-8g",
                "accelerator_type": "NVIDIA_TESLA_A100",
                "accelerator_count": 8,
            }
            assert pool["container_spec"]["image_uri"] == f"{REGISTRY}/simclr-tfx-gpu:latest"
        assert json.loads(custom["trainer"])["runtime"]["strategy"] == "multi_worker"


def test_example_gen_checks_the_cache_with_the_listing_driver(compiled):
    from pipeline.components.image_example_gen.driver import VERTEX_DRIVER_COMMAND

    container = compiled["pipelineSpec"]["deploymentSpec"]["executors"][
        "FileBasedExampleGen_executor"
    ]["container"]
    hook = container["lifecycle"]["preCacheCheck"]
    assert hook["command"] == list(VERTEX_DRIVER_COMMAND)
    assert hook["args"][:2] == ["--json_serialized_invocation_args", "{{$}}"]


def test_evaluator_gates_and_pushers(compiled):
    tasks = compiled["pipelineSpec"]["root"]["dag"]["tasks"]
    eval_config = _param(tasks["Evaluator"], "eval_config")
    (metrics,) = eval_config["metrics_specs"]
    top1 = next(m for m in metrics["metrics"] if m["class_name"] == "SparseCategoricalAccuracy")
    (gate,) = top1["per_slice_thresholds"]
    assert gate["threshold"]["value_threshold"]["lower_bound"] == pytest.approx(0.6)
    assert gate["threshold"]["change_threshold"]["absolute"] == pytest.approx(-0.01)
    assert _param(tasks["Evaluator"], "example_splits") == ["val"]
    push = _param(tasks["Pusher"], "push_destination")
    assert push["filesystem"]["base_directory"] == "gs://my-bucket/serving_model/simclr"
    endpoint = _param(tasks["vertex_endpoint_pusher"], "custom_config")
    assert endpoint["undeploy_previous"] is True
    executors = compiled["pipelineSpec"]["deploymentSpec"]["executors"]
    assert (
        "pipeline.components.vertex_endpoint.Executor"
        in executors["vertex_endpoint_pusher_executor"]["container"]["args"]
    )
    assert endpoint["ai_platform_serving_args"]["endpoint_name"] == "simclr-r50"
    assert endpoint["ai_platform_serving_args"]["project_id"] == "my-proj"
    assert endpoint["ai_platform_vertex_region"] == "europe-west4"


@pytest.mark.parametrize("missing", ["--project", "--region", "--bucket"])
def test_missing_cloud_flag_is_one_line_before_anything_runs(missing, tmp_path):
    args = [a for a in CLOUD_ARGS if not a.startswith(missing + "=")]
    result = run_runner(args + ["--pipeline_json=out.json"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {missing}: required by dataflow_runner.py"
    ]
    assert not (tmp_path / "out.json").exists()


def test_local_data_dir_is_rejected_in_one_line(tmp_path):
    args = [a for a in CLOUD_ARGS if not a.startswith("--data_dir=")]
    result = run_runner(args + [f"--data_dir={tmp_path}"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --data_dir: must be a gs:// path on Google Cloud, got '{tmp_path}'"
    ]


@pytest.mark.parametrize(
    "change, error",
    [
        (
            "--pipeline_name=SimCLR_ImageNet",
            "error: --pipeline_name: Vertex AI Pipelines needs lowercase letters, digits and "
            "'-', starting with a letter, at most 113 characters (its run id adds -<timestamp>); "
            "got 'SimCLR_ImageNet'",
        ),
        (
            "--pipeline_name=2024-simclr",
            "error: --pipeline_name: Vertex AI Pipelines needs lowercase letters, digits and "
            "'-', starting with a letter, at most 113 characters",
        ),
        # docs/cloud.md: batch 4096 needs more than one v3-8 host.
        ("--train_batch_size=4096", "error: --train_batch_size: 4096 does not fit tpu_v3 (8 x "),
        # Vertex's compiled resolvers filter by type alone: they could pick a fine-tuned model.
        ("--warm_start", "error: --warm_start: supported by local_runner.py only"),
    ],
)
def test_bad_name_or_batch_is_one_line_before_anything_is_built(change, error, tmp_path):
    flag = change.split("=")[0]
    args = [a for a in CLOUD_ARGS if not a.startswith(flag + "=")] + [change]
    result = run_runner(args + ["--pipeline_json=out.json"], tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(error)
    assert not (tmp_path / "out.json").exists()


def test_submit_without_credentials_fails_in_one_line(tmp_path):
    pytest.importorskip(
        "kfp.pipeline_spec", reason="compiling for Vertex AI needs kfp-pipeline-spec"
    )
    # TensorFlow's own log level as a user has it: the console filter, not TF_CPP_MIN_LOG_LEVEL,
    # keeps its CUDA factory-registration lines off the console (pipeline/runner/console.py).
    env = {k: v for k, v in clean_env(tmp_path).items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = run_runner(CLOUD_ARGS + ["--pipeline_json=job.json", "--submit"], tmp_path, env)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: --submit: no Google Cloud credentials (run `gcloud auth")
    assert (tmp_path / "job.json").exists()


# ----- TPU path: static shapes, so the ImageNet train step compiles with XLA -----


def _xla_step(resnet_depth: int, width: float, stage: str, run: bool = True):
    """The ImageNet config's train step under XLA (`--jit_compile`, and a TPU, compile it
    whole): run on the CPU's XLA backend, or with `run=False` only lowered to XLA's HLO. The
    lowering is where an op without an XLA kernel or a shape XLA cannot make static fails, for
    any XLA device; the CPU's code generation afterwards says nothing about a TPU."""
    from models.model import SimCLRModel
    from models.optimizers import build_optimizer
    from models.strategy import set_precision
    from models.tasks import TASKS
    from pipeline import configs

    config = configs.build_config(
        {
            "dataset": "imagenet2012",
            "data_dir": str(REPO_ROOT),
            "resnet_depth": resnet_depth,
            "width_multiplier": width,
            "mixed_precision": "bfloat16",
        }
    )
    set_precision(config.runtime.mixed_precision)
    trainer = configs.trainer_config(config, stage)
    size = trainer.input.image_size
    model = SimCLRModel(trainer.model, 1000, size, pretraining=stage == "pretrain")
    model.build_for()
    optimizer = build_optimizer("lars", 0.1, 0.9, 1e-6)
    images = tf.random.uniform([2, size, size, 3], seed=1)
    labels = tf.constant([3, 7], tf.int64)
    # The step reads only the task's config; no input files are needed for it.
    task = TASKS[stage].without_inputs(trainer)
    metrics = task.build_metrics()
    step = tf.function(task.train_step(model, optimizer, metrics), jit_compile=True)
    if stage == "pretrain":
        args = (images, tf.image.flip_left_right(images), labels)
    else:
        args = (images, labels)
    if not run:
        return step.experimental_get_compiler_ir(*args)(stage="hlo")
    step(*args)
    return {name: float(m.result()) for name, m in metrics.items()}


@pytest.fixture
def restore_policy():
    import tf_keras as keras

    yield
    keras.mixed_precision.set_global_policy("float32")


def test_imagenet_finetune_step_compiles_with_xla_in_bfloat16(restore_policy):
    """The ImageNet config (224 px, bfloat16) on a narrow ResNet-18 (basic blocks), compiled
    and run; the full-size pretraining step is lowered below."""
    results = _xla_step(18, 0.25, "finetune")
    assert all(tf.math.is_finite(v) for v in results.values())
    assert results["total_loss"] > 0


def test_resnet50_imagenet_pretrain_step_lowers_to_xla(restore_policy):
    """ResNet-50 at 224, batch 2, bfloat16, the whole pretraining step (two views, NT-Xent, the
    probe, LARS): every op lowers to XLA with static shapes, in bfloat16 convolutions."""
    hlo = _xla_step(50, 1, "pretrain", run=False)
    # 53 convolutions forward (ResNet-50 with its projection shortcuts), then their input and
    # kernel gradients; both views go through the encoder as one batch of 4.
    assert hlo.count(" convolution(") > 2 * 53
    assert "bf16[4,112,112,64]" in hlo and "bf16[4,7,7,2048]" in hlo


def test_train_input_has_static_shapes(tmp_path):
    """drop_remainder and fixed crops: every tensor the TPU step receives has a static shape."""
    from models import data as data_lib

    path = str(tmp_path / "t.gz")
    image = tf.io.encode_jpeg(tf.zeros([256, 256, 3], tf.uint8)).numpy()
    with tf.io.TFRecordWriter(path, options="GZIP") as writer:
        for i in range(3):
            feature = {
                "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[i])),
                "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"k%d" % i])),
            }
            writer.write(
                tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
            )
    spec = data_lib.ImageSpec(stored_size=256, image_format="jpeg", image_size=224)
    for contrastive in (True, False):
        dataset = data_lib.train_dataset(
            path,
            spec,
            2,
            contrastive=contrastive,
            color_jitter_strength=1.0,
            color_jitter_impl="v2",
            use_blur=True,
            seed=0,
        )
        for element in dataset.element_spec:
            assert element.shape.is_fully_defined(), element
        assert dataset.element_spec[0].shape == (2, 224, 224, 3)


# ----- local rehearsal: the ImageNet configuration end to end on a handful of photographs -----


@pytest.mark.e2e
def test_local_imagenet_rehearsal(tmp_path):
    """local_runner.py --dataset=imagenet2012 on ILSVRC-layout folders: 224 px JPEG storage, one
    step per stage, fine-tuning on a 1%-style file list, through Evaluator and Pusher. The
    network is a narrow ResNet-18: this checks the ImageNet plumbing; the ResNet-50 step at 224
    is lowered by test_resnet50_imagenet_pretrain_step_lowers_to_xla."""
    data = write_imagenet_fixture(tmp_path / "imagenet")
    subset = tmp_path / "1percent.txt"
    listed = write_subset_list(data, subset, per_class=2)
    out = tmp_path / "out"
    env = clean_env(tmp_path)
    env["TMPDIR"] = str(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "local_runner.py",
            "--dataset=imagenet2012",
            f"--data_dir={data}",
            "--eval_split=val",
            f"--model_dir={out}",
            f"--label_subset={subset}",
            "--resnet_depth=18",
            "--width_multiplier=0.25",
            "--train_batch_size=4",
            "--train_steps=1",
            "--finetune_train_batch_size=4",
            "--finetune_train_steps=1",
            "--eval_batch_size=4",
            "--min_top1=0",
            "--max_top1_regression=1",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    print(result.stdout[-4000:])
    print(result.stderr[-4000:], file=sys.stderr)
    assert result.returncode == 0
    assert f"finetune: {len(listed)} of 12 labeled examples" in result.stdout
    run = summary_lib.latest_run(str(out / "metadata.sqlite"))
    assert {"Transform", "pretrain_trainer", "finetune_trainer", "Evaluator", "Pusher"} <= set(
        run.components
    )
    assert run.example_count == 6
    assert run.blessed is True and run.pushed
    assert (pathlib.Path(run.pushed_destination) / "saved_model.pb").exists()
    results = json.loads(
        (pathlib.Path(run.model_run_uris["pretrain"]) / "results.json").read_text()
    )
    assert results["num_train_examples"] == 12
    # In-process Beam: no TFX executor packaged TFX for remote workers (a 48 MB copy each).
    assert not list((tmp_path / "tmp").glob("*/build/tfx")), "TFX was packaged for Beam"


def test_the_baseline_comparison_and_gain_gate_compile_for_vertex(tmp_path):
    """--baseline with a gain gate: the baseline Trainer runs on Vertex AI like the others, the
    comparison on Dataflow, and both pushers only when the comparison's verdict says so."""
    pytest.importorskip(
        "kfp.pipeline_spec", reason="compiling for Vertex AI needs kfp-pipeline-spec"
    )
    out = tmp_path / "job.json"
    args = [*CLOUD_ARGS, "--baseline=supervised", "--min_gain_over_baseline=0.02"]
    assert dataflow_runner.main(args + [f"--pipeline_json={out}", "--compile_only"]) == 0
    spec = json.loads(out.read_text())["pipelineSpec"]
    tasks = spec["root"]["dag"]["tasks"]
    custom = _param(tasks["baseline_trainer"], "custom_config")
    assert custom["ai_platform_training_args"]["job_spec"]["worker_pool_specs"]
    executors = spec["deploymentSpec"]["executors"]
    assert (
        "--runner=DataflowRunner" in executors["baseline_comparison_executor"]["container"]["args"]
    )
    for pusher in ("Pusher", "vertex_endpoint_pusher"):
        condition = tasks[pusher]["triggerPolicy"]["condition"]
        assert "baseline_comparison" in condition and "blessed" in condition
    assert "triggerPolicy" not in tasks["Evaluator"]
