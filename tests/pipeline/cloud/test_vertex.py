"""Cloud helpers offline: flag validation, the batch-size memory check, Dataflow and Vertex
arguments, the endpoint pusher's undeploying, the TPU image layout, the labeled subset, and the
storage cost of Transform's image encodings on real photographs."""

import gzip
import importlib.util
import pathlib
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from models import data as data_lib
from models import precision
from pipeline import configs
from pipeline.cloud import vertex as cloud
from pipeline.runner import cli
from tests.imagenet_fixture import write_imagenet_fixture
from transform import preprocessing as tp

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]

REQUIRED = {"project": "my-proj", "region": "us-central1", "bucket": "gs://my-bucket"}


def parse(argv: list[str]) -> tuple[configs.SimCLRConfig, cloud.CloudOptions]:
    config, extras = cli.parse_config(
        cloud.accelerator_defaults(argv) + argv, "t", "t", extra=cloud.cloud_flags()
    )
    return config, cloud.CloudOptions.from_flags(extras)


GCS_ARGS = [
    "--dataset=imagenet2012",
    "--data_dir=gs://my-bucket/imagenet/tfds",
    "--data_format=tfrecord",
    *(f"--{k}={v}" for k, v in REQUIRED.items()),
]


@pytest.mark.parametrize("missing", ["project", "region", "bucket"])
def test_each_required_flag_is_named(missing):
    options = cloud.CloudOptions(**{k: v for k, v in REQUIRED.items() if k != missing})
    with pytest.raises(configs.ConfigError, match=rf"^--{missing}: required"):
        options.validate()


@pytest.mark.parametrize(
    "change, flag",
    [
        ({"bucket": "my-bucket"}, "bucket"),
        ({"bucket": "gs://Bad_Bucket"}, "bucket"),
        ({"trainer_accelerator": "tpu_v9"}, "trainer_accelerator"),
        # TF >= 2.15 needs the PJRT runtime on v5e, which no job has proven in our image yet.
        ({"trainer_accelerator": "tpu_v5e"}, "trainer_accelerator"),
        ({"dataflow_max_workers": 0}, "dataflow_max_workers"),
        ({"trainer_accelerator_count": 4}, "trainer_accelerator_count"),
        (
            {"trainer_accelerator": "a100", "trainer_accelerator_count": 3},
            "trainer_accelerator_count",
        ),
        ({"compile_only": True, "submit": True}, "submit"),
        ({"trainer_timeout_hours": 0}, "trainer_timeout_hours"),
        ({"dataflow_timeout_hours": -1}, "dataflow_timeout_hours"),
    ],
)
def test_bad_values_are_one_line_naming_the_flag(change, flag):
    with pytest.raises(configs.ConfigError) as info:
        cloud.CloudOptions(**{**REQUIRED, **change}).validate()
    message = str(info.value)
    assert message.startswith(f"--{flag}:") and "\n" not in message


def _precision(config, options) -> str:
    return precision.choose(config.runtime.mixed_precision, cloud.trainer_device(options)).dtype


def test_tpu_defaults_apply_unless_the_flag_is_given():
    config, options = parse(GCS_ARGS)
    assert options.accelerator.is_tpu
    assert (config.runtime.strategy, config.runtime.tpu_name) == ("tpu", "local")
    assert config.runtime.accelerator == "tpu"
    assert _precision(config, options) == "bfloat16"
    config, options = parse(GCS_ARGS + ["--mixed_precision=float32"])
    assert _precision(config, options) == "float32"
    config, options = parse(GCS_ARGS + ["--trainer_accelerator=a100"])
    assert config.runtime.strategy == "mirrored" and not options.accelerator.is_tpu
    assert config.runtime.accelerator == "gpu"
    assert _precision(config, options) == "bfloat16"  # compute capability 8.0
    config, options = parse(GCS_ARGS + ["--trainer_accelerator=cpu"])
    assert (config.runtime.strategy, config.runtime.accelerator) == ("auto", "auto")
    # Decided by the Vertex machine (no AMX), not by the machine that compiles the pipeline.
    assert _precision(config, options) == "float32"


def test_dataflow_args_come_from_flags():
    _, options = parse(
        GCS_ARGS
        + [
            "--dataflow_machine_type=n2-highmem-16",
            "--dataflow_max_workers=50",
            "--dataflow_disk_size_gb=200",
            "--dataflow_experiments=use_runner_v2,enable_prime",
            "--service_account=sa@my-proj.iam.gserviceaccount.com",
            "--pipeline_image=us-docker.pkg.dev/p/r/img:1",
        ]
    )
    args = cloud.dataflow_beam_args(options, "simclr")
    assert args == [
        "--runner=DataflowRunner",
        "--project=my-proj",
        "--region=us-central1",
        "--temp_location=gs://my-bucket/tmp/dataflow",
        "--staging_location=gs://my-bucket/staging/dataflow",
        "--sdk_container_image=us-docker.pkg.dev/p/r/img:1",
        "--sdk_location=container",
        "--machine_type=n2-highmem-16",
        "--max_num_workers=50",
        "--disk_size_gb=200",
        "--autoscaling_algorithm=THROUGHPUT_BASED",
        "--dataflow_service_options=max_workflow_runtime_walltime_seconds=86400",
        "--labels=simclr-pipeline=simclr",
        "--experiments=use_runner_v2",
        "--experiments=enable_prime",
        "--service_account_email=sa@my-proj.iam.gserviceaccount.com",
    ]


@pytest.mark.parametrize(
    "accelerator, count, expected",
    [
        (
            "tpu_v3",
            0,
            {"machine_type": "cloud-tpu", "accelerator_type": "TPU_V3", "accelerator_count": 8},
        ),
        (
            "tpu_v2",
            0,
            {"machine_type": "cloud-tpu", "accelerator_type": "TPU_V2", "accelerator_count": 8},
        ),
        (
            "a100",
            4,
            {
                "machine_type": "a2-highgpu-4g",
                "accelerator_type": "NVIDIA_TESLA_A100",
                "accelerator_count": 4,
            },
        ),
        ("cpu", 0, {"machine_type": "n1-highmem-16"}),
    ],
)
def test_worker_pool_machine_specs(accelerator, count, expected):
    options = cloud.CloudOptions(
        **REQUIRED, trainer_accelerator=accelerator, trainer_accelerator_count=count
    )
    (pool,) = cloud.worker_pool_specs(options)
    assert pool["machine_spec"] == expected
    assert pool["replica_count"] == 1
    registry = "us-central1-docker.pkg.dev/my-proj/simclr"
    image = {"tpu_v2": "simclr-tfx-tpu", "tpu_v3": "simclr-tfx-tpu", "a100": "simclr-tfx-gpu"}
    image = image.get(accelerator, "simclr-tfx")
    assert pool["container_spec"]["image_uri"] == f"{registry}/{image}:latest"


def test_cloud_config_needs_gcs_paths_and_an_explicit_layout(tmp_path):
    config, _ = parse(GCS_ARGS + ["--eval_split=validation"])
    cloud.validate_cloud_config(config)
    layout = cloud.cloud_layout(config)
    assert (layout.data_format, layout.splits) == ("tfrecord", ("train", "validation"))
    local = tmp_path / "data"
    local.mkdir()
    bad = [
        (["--data_dir=" + str(local)], "--data_dir: must be a gs:// path"),
        (["--data_format=auto"], "--data_format: give 'tfrecord' or 'folders'"),
        (["--push_dir=/tmp/models"], "--push_dir: must be a gs:// path"),
    ]
    for extra, message in bad:
        config, _ = parse(GCS_ARGS + extra)
        with pytest.raises(configs.ConfigError, match=message):
            cloud.validate_cloud_config(config)


# ----- the labeled subset (1% / 10% lists) -----


def test_select_listed_matches_base_names(tmp_path):
    listing = tmp_path / "1percent.txt"
    listing.write_text("n01_2.JPEG\nn02_7.JPEG\n\nn09_1.JPEG\n")
    folder_keys = np.array([b"n01/n01_1.JPEG", b"n01/n01_2.JPEG", b"n02/n02_7.JPEG"], object)
    assert list(data_lib.select_listed(folder_keys, str(listing))) == [
        b"n01/n01_2.JPEG",
        b"n02/n02_7.JPEG",
    ]
    tfds_keys = np.array([b"n01_2.JPEG", b"n01_3.JPEG"], object)
    assert list(data_lib.select_listed(tfds_keys, str(listing))) == [b"n01_2.JPEG"]
    with pytest.raises(ValueError, match="none of the 3 files listed"):
        data_lib.select_listed(np.array([b"n05/x.JPEG"], object), str(listing))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="lists no files"):
        data_lib.select_listed(folder_keys, str(empty))


def _example(image: np.ndarray, label: int, key: str) -> bytes:
    def feature(value) -> tf.train.Feature:
        if isinstance(value, int):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    stored = tf.io.serialize_tensor(tf.constant(image)).numpy()
    features = {tp.IMAGE_KEY: stored, tp.LABEL_KEY: label, tp.KEY_KEY: key.encode()}
    return tf.train.Example(
        features=tf.train.Features(feature={k: feature(v) for k, v in features.items()})
    ).SerializeToString()


def test_finetune_input_keeps_only_listed_examples(tmp_path):
    """Transformed examples as the Trainer reads them; each label is unique to one example."""
    path = str(tmp_path / "transformed-00000-of-00001.gz")
    rng = np.random.default_rng(0)
    keys = [f"n{c:02d}/n{c:02d}_{i}.JPEG" for c in range(3) for i in range(4)]
    with tf.io.TFRecordWriter(path, options="GZIP") as writer:
        for label, key in enumerate(keys):
            writer.write(_example(rng.integers(0, 256, [32, 32, 3], np.uint8), label, key))
    listing = tmp_path / "subset.txt"
    listed = [keys[0], keys[5], keys[11]]
    listing.write_text("\n".join(k.split("/")[1] for k in listed) + "\nn77_1.JPEG\n")

    labels, all_keys = data_lib.read_labels_and_keys(path)
    keep = data_lib.select_listed(all_keys, str(listing))
    assert sorted(bytes(k).decode() for k in keep) == sorted(listed)
    dataset = data_lib.train_dataset(
        path,
        data_lib.ImageSpec(stored_size=32, image_format="raw", image_size=32),
        batch_size=4,
        contrastive=False,
        color_jitter_strength=0.5,
        color_jitter_impl="v2",
        use_blur=False,
        seed=0,
        keep_keys=keep,
    )
    seen = np.concatenate([batch[1].numpy() for batch in dataset.take(6)])
    assert set(seen) == {0, 5, 11}


def test_label_subset_flag_validation(tmp_path):
    listing = tmp_path / "1percent.txt"
    listing.write_text("a.JPEG\n")
    base = {"dataset": "cifar10", "data_dir": str(tmp_path)}
    config = configs.build_config({**base, "label_subset": str(listing)})
    assert config.finetune.label_subset == str(listing)
    with pytest.raises(configs.ConfigError, match="^--label_subset: no such file"):
        configs.build_config({**base, "label_subset": str(tmp_path / "missing.txt")})
    with pytest.raises(configs.ConfigError, match="^--label_subset: cannot be combined"):
        configs.build_config({**base, "label_subset": str(listing), "label_fraction": 0.1})


# ----- what Transform stores per ImageNet example -----


def _stored_example(image_jpeg: bytes, image_format: str) -> tuple[bytes, float]:
    """A transformed example as Transform writes it, and the seconds its image took."""
    started = time.perf_counter()
    stored = tp._encode_images(tf.constant([image_jpeg]), 256, image_format).numpy()[0]
    seconds = time.perf_counter() - started
    example = tf.train.Example(
        features=tf.train.Features(
            feature={
                tp.IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[stored])),
                tp.LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[123])),
                tp.KEY_KEY: tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[b"n01440764/n01440764_10026.JPEG"])
                ),
            }
        )
    )
    return example.SerializeToString(), seconds


def test_jpeg_storage_is_a_fraction_of_raw_pixels(tmp_path):
    """Bytes per transformed example (256 px stored side) on full-size crops of photographs.

    Raw uint8 is 256*256*3 = 196,608 bytes of pixels whatever the photo; the JPEG (quality 95)
    depends on content. GZIP is what the Transform component's TFRecords use.
    """
    root = write_imagenet_fixture(tmp_path / "imagenet", train_per_class=4, val_per_class=0)
    files = sorted((root / "train").rglob("*.JPEG"))
    sizes = {"raw": [], "jpeg": []}
    gzipped = {"raw": [], "jpeg": []}
    seconds = []
    for path in files:
        for image_format in ("raw", "jpeg"):
            example, took = _stored_example(path.read_bytes(), image_format)
            sizes[image_format].append(len(example))
            gzipped[image_format].append(len(gzip.compress(example)))
            if image_format == "jpeg":
                seconds.append(took)
    raw, jpeg = np.mean(sizes["raw"]), np.mean(sizes["jpeg"])
    source = np.mean([p.stat().st_size for p in files])
    print(
        f"\n{len(files)} photos, mean source JPEG {source:.0f} B; per transformed example: "
        f"raw {raw:.0f} B (gzip {np.mean(gzipped['raw']):.0f}), jpeg q95 {jpeg:.0f} B "
        f"(gzip {np.mean(gzipped['jpeg']):.0f}); decode+resize+encode "
        f"{1000 * np.median(seconds):.1f} ms median"
    )
    assert min(sizes["raw"]) >= 256 * 256 * 3 and max(sizes["raw"]) < 256 * 256 * 3 + 200
    assert jpeg < raw / 3
    # Both stored forms decode back to what the Trainer crops from: the raw 256x256 square, the
    # whole photo with its shorter side at 256 for JPEG.
    original = tf.io.decode_jpeg(files[0].read_bytes())
    for image_format in ("raw", "jpeg"):
        stored = tp._encode_images(tf.constant([files[0].read_bytes()]), 256, image_format)[0]
        shape = tp.decode_stored_image(stored, 256, image_format).shape
        if image_format == "raw":
            assert shape == (256, 256, 3)
        else:
            assert min(shape[:2]) == 256 and shape[2] == 3
            ratio = original.shape[1] / original.shape[0]
            assert shape[1] / shape[0] == pytest.approx(ratio, rel=0.01)


# ----- pipeline name -----


def test_pipeline_name_is_checked_before_compiling():
    """What KubeflowV2DagRunner compiles and Vertex AI Pipelines then runs: the run id is
    `<name>-<YYYYmmddHHMMSS>` (google-cloud-aiplatform's PipelineJob), checked against the
    library's own pattern; a one-line error naming the flag up front."""
    from google.cloud.aiplatform.constants import pipeline as pipeline_constants
    from tfx.orchestration.kubeflow.v2 import pipeline_builder

    names = ["simclr", "simclr-smoke-1", "0x", "1simclr", "a" * 113, "a" * 114, "a" * 128]
    names += ["My_Pipeline", "-x", "a b", "a" * 129]
    for name in names:
        config, _ = parse(GCS_ARGS + [f"--pipeline_name={name}"])
        try:
            pipeline_builder._check_name(name)
            tfx_accepts = True
        except ValueError:
            tfx_accepts = False
        run_id = f"{name}-20261206235959"
        vertex_accepts = bool(pipeline_constants._VALID_NAME_PATTERN.match(run_id))
        if tfx_accepts and vertex_accepts:
            cloud.validate_cloud_config(config)
            continue
        with pytest.raises(configs.ConfigError) as info:
            cloud.validate_cloud_config(config)
        message = str(info.value)
        assert message.startswith("--pipeline_name: ") and "\n" not in message
        assert repr(name) in message


# ----- does the batch fit the accelerator's memory? -----


def test_activation_count_matches_the_resnet(monkeypatch):
    """`activation_elements` counts exactly the conv (and max-pool) outputs models/resnet.py
    produces, at odd sizes too, so the memory check follows the real network."""
    from models import resnet

    sizes: list[int] = []
    original = resnet.FixedPaddingConv2D.call

    def recording_call(self, inputs):
        out = original(self, inputs)
        sizes.append(int(tf.size(out)))
        return out

    monkeypatch.setattr(resnet.FixedPaddingConv2D, "call", recording_call)
    for depth, width, size in [(50, 0.125, 70), (18, 0.25, 64), (34, 0.125, 32)]:
        sizes.clear()
        model = resnet.ResNet(depth, width, cifar_stem=size <= 32)
        endpoints = model(tf.zeros([1, size, size, 3]), training=True)
        pooled = 0 if size <= 32 else int(tf.size(endpoints["initial_max_pool"]))
        assert cloud.activation_elements(depth, width, size) == sum(sizes) + pooled, depth


def _imagenet(*extra: str) -> tuple[configs.SimCLRConfig, cloud.CloudOptions]:
    return parse(GCS_ARGS + ["--eval_split=validation", *extra])


def test_a_batch_that_cannot_fit_the_tpu_is_rejected_with_the_arithmetic():
    config, options = _imagenet("--train_batch_size=4096")
    with pytest.raises(configs.ConfigError) as info:
        cloud.check_batch_fits(config, options)
    message = str(info.value)
    # ResNet-50 at 224 px: 11,314,688 elements x 2 kept tensors x 2 bytes (bfloat16) = 43 MiB.
    assert cloud.activation_elements(50, 1, 224) == 11_314_688
    assert message == (
        "--train_batch_size: 4096 does not fit tpu_v3 (8 x 16 GiB): 512 images x 2 views per "
        "core x 43 MiB of ResNet-50 (width 1) activations at 224 px in bfloat16 + 1 GiB = "
        "44.2 GiB > 16 GiB; at most 1416 fits (177 per core)"
    )
    # What the docs recommend on a v3-8 passes; just above the limit does not.
    cloud.check_batch_fits(*_imagenet("--train_batch_size=1024"))
    cloud.check_batch_fits(*_imagenet("--train_batch_size=1416"))
    with pytest.raises(configs.ConfigError, match="^--train_batch_size: 1424 does not fit"):
        cloud.check_batch_fits(*_imagenet("--train_batch_size=1424"))


@pytest.mark.parametrize(
    "extra, flag",
    [
        # One view when fine-tuning: twice the pretraining batch fits.
        (["--finetune_train_batch_size=2816"], None),
        (["--finetune_train_batch_size=2880"], "finetune_train_batch_size"),
        # float32 keeps twice the bytes.
        (["--train_batch_size=1024", "--mixed_precision=float32"], "train_batch_size"),
        # v2 cores have half the memory of v3 cores.
        (["--trainer_accelerator=tpu_v2", "--train_batch_size=1024"], "train_batch_size"),
        (["--trainer_accelerator=tpu_v2", "--train_batch_size=512"], None),
        # Two 40 GiB A100s hold 2 x 462 images x 2 views.
        (
            [
                "--trainer_accelerator=a100",
                "--trainer_accelerator_count=2",
                "--train_batch_size=1024",
            ],
            "train_batch_size",
        ),
        (
            [
                "--trainer_accelerator=a100",
                "--trainer_accelerator_count=2",
                "--train_batch_size=896",
            ],
            None,
        ),
        # The student's depth counts for distillation.
        (
            ["--distill", "--distill_resnet_depth=152", "--distill_train_batch_size=2048"],
            "distill_train_batch_size",
        ),
        (["--distill", "--distill_resnet_depth=18", "--distill_train_batch_size=2048"], None),
        # With --train_mode=finetune the single stage's flag has no prefix.
        (["--train_mode=finetune", "--train_batch_size=4096"], "train_batch_size"),
        # No limit is known for CPU machines.
        (["--trainer_accelerator=cpu", "--train_batch_size=65536"], None),
    ],
)
def test_batch_check_per_stage_precision_and_hardware(extra, flag):
    config, options = _imagenet(*extra)
    if flag is None:
        cloud.check_batch_fits(config, options)
        return
    with pytest.raises(configs.ConfigError) as info:
        cloud.check_batch_fits(config, options)
    assert str(info.value).startswith(f"--{flag}: ") and "\n" not in str(info.value)


# ----- Vertex AI training job: restart in place -----


def test_training_job_restarts_on_worker_restart_as_vertex_reads_it():
    """The job spec goes through TFX's Vertex client into the CustomJob proto unchanged."""
    from google.cloud.aiplatform_v1.types import custom_job
    from tfx.extensions.google_cloud_ai_platform import training_clients

    training = cloud.vertex_training_args(
        cloud.CloudOptions(**REQUIRED, service_account="sa@my-proj.iam.gserviceaccount.com"),
        "simclr",
    )
    assert training["job_spec"]["scheduling"] == {
        "restart_job_on_worker_restart": True,
        "timeout": "259200s",  # --trainer_timeout_hours=72
    }
    job_args = {k: v for k, v in training.items() if k != "project"}  # as start_cloud_training
    client = training_clients.VertexJobClient.__new__(training_clients.VertexJobClient)
    job = client.create_training_job({}, {}, {}, "x.Executor", job_args, None, None)
    proto = custom_job.CustomJob(**job)
    assert proto.job_spec.scheduling.restart_job_on_worker_restart is True
    assert proto.job_spec.scheduling.timeout.total_seconds() == 72 * 3600
    assert proto.labels["simclr-pipeline"] == "simclr"
    assert proto.job_spec.service_account == "sa@my-proj.iam.gserviceaccount.com"
    (pool,) = proto.job_spec.worker_pool_specs
    assert pool.machine_spec.accelerator_count == 8


# ----- the compiled job uses the listing driver for class folders only -----


def test_listing_driver_replaces_tfx_driver_only_for_the_image_example_gen():
    from pipeline.components.image_example_gen.driver import VERTEX_DRIVER_COMMAND

    tfx_driver = ["python", "-m", "tfx.orchestration.kubeflow.v2.file_based_example_gen.driver"]

    def executor(executor_class: str) -> dict:
        return {
            "container": {
                "args": ["--executor_class_path", executor_class, "--runner=DataflowRunner"],
                "lifecycle": {"preCacheCheck": {"command": list(tfx_driver), "args": ["x"]}},
            }
        }

    job = {
        "pipelineSpec": {
            "deploymentSpec": {
                "executors": {
                    "FileBasedExampleGen_executor": executor(
                        "pipeline.components.image_example_gen.executor.ImageFolderExecutor"
                    ),
                    "ImportExampleGen_executor": executor(
                        "tfx.components.example_gen.import_example_gen.executor.Executor"
                    ),
                    "Transform_executor": {"container": {"args": ["--executor_class_path", "t"]}},
                }
            }
        }
    }
    assert cloud.use_listing_driver(job) == 1
    executors = job["pipelineSpec"]["deploymentSpec"]["executors"]
    image_hook = executors["FileBasedExampleGen_executor"]["container"]["lifecycle"]
    assert image_hook["preCacheCheck"] == {"command": list(VERTEX_DRIVER_COMMAND), "args": ["x"]}
    tfrecord_hook = executors["ImportExampleGen_executor"]["container"]["lifecycle"]
    assert tfrecord_hook["preCacheCheck"]["command"] == tfx_driver


# ----- the endpoint pusher undeploys what the new model replaces -----


class FakeDeployed:
    def __init__(self, deployed_id: str, model: str):
        self.id, self.model = deployed_id, model


class FakeEndpoint:
    def __init__(self, name: str, models: list[FakeDeployed]):
        self.resource_name = f"projects/123/locations/europe-west4/endpoints/{name}"
        self.models = models
        self.undeployed: list[str] = []

    def list_models(self) -> list[FakeDeployed]:
        return list(self.models)

    def undeploy(self, deployed_model_id: str, sync: bool) -> None:
        assert sync
        self.models = [m for m in self.models if m.id != deployed_model_id]
        self.undeployed.append(deployed_model_id)


MODELS = "projects/123/locations/europe-west4/models"


def _push(tmp_path, monkeypatch, endpoints, *, blessed=True, undeploy=True, labels=None):
    """Runs the endpoint Pusher's executor with Vertex replaced by fakes; returns the pushed
    model artifact and the recorded deploy calls. `labels`: the Model Registry's labels per
    model id; by default every model carries this pipeline's (`simclr`)."""
    from google.cloud import aiplatform
    from tfx.extensions.google_cloud_ai_platform import runner
    from tfx.types import Channel, standard_artifacts
    from tfx.utils import path_utils

    from pipeline.components import vertex_endpoint

    deploys = []

    def deploy(**kwargs):
        deploys.append(kwargs)
        new = FakeDeployed("d-new", f"{MODELS}/new")
        endpoints[0].models.append(new)  # TFX deploys to the first endpoint of that name
        return f"{MODELS}/new"

    monkeypatch.setattr(runner, "deploy_model_for_aip_prediction", deploy)
    monkeypatch.setattr(aiplatform, "init", lambda **kwargs: None)
    monkeypatch.setattr(aiplatform.Endpoint, "list", staticmethod(lambda filter: endpoints))
    registry = {} if labels is None else labels

    def labels_of(resource_name):
        model_id = resource_name.split("@")[0].rsplit("/", 1)[-1]
        return registry.get(model_id, {} if labels else {"simclr-pipeline": "simclr"})

    def label(resource_name, new_labels):
        registry[resource_name.rsplit("/", 1)[-1]] = new_labels

    monkeypatch.setattr(vertex_endpoint, "_model_labels", labels_of)
    monkeypatch.setattr(vertex_endpoint, "_label_model", label)

    model = standard_artifacts.Model()
    model.uri = str(tmp_path / "model")
    serving = pathlib.Path(path_utils.serving_model_dir(model.uri, False))
    serving.mkdir(parents=True)
    (serving / "saved_model.pb").write_bytes(b"pb")
    blessing = standard_artifacts.ModelBlessing()
    blessing.uri = str(tmp_path / "blessing")
    blessing.set_int_custom_property("blessed", int(blessed))
    pushed = standard_artifacts.PushedModel()
    pushed.uri = str(tmp_path / "pushed")
    options = cloud.CloudOptions(
        **REQUIRED, vertex_endpoint="simclr-r50", keep_previous_deployments=not undeploy
    )
    component = cloud.vertex_pusher_factory(options)(
        model=Channel(type=standard_artifacts.Model),
        model_blessing=Channel(type=standard_artifacts.ModelBlessing),
    )
    assert isinstance(component, vertex_endpoint.EndpointPusher)
    vertex_endpoint.Executor().Do(
        {"model": [model], "model_blessing": [blessing]},
        {"pushed_model": [pushed]},
        {"custom_config": component.exec_properties["custom_config"]},
    )
    return pushed, deploys


def test_endpoint_push_undeploys_the_previous_models(tmp_path, monkeypatch):
    old = [FakeDeployed("d1", f"{MODELS}/m1"), FakeDeployed("d2", f"{MODELS}/m2@3")]
    other = FakeEndpoint("e0", [FakeDeployed("x", f"{MODELS}/unrelated")])
    endpoint = FakeEndpoint("e1", list(old))
    # A second endpoint with the same display name that does not serve the new model.
    pushed, deploys = _push(tmp_path, monkeypatch, [endpoint, other])
    assert len(deploys) == 1 and deploys[0]["ai_platform_serving_args"]["endpoint_name"] == (
        "simclr-r50"
    )
    assert pushed.get_int_custom_property("pushed") == 1
    assert endpoint.undeployed == ["d1", "d2"]
    assert [m.id for m in endpoint.models] == ["d-new"]
    assert other.undeployed == []


def test_endpoint_push_undeploys_only_this_pipelines_models(tmp_path, monkeypatch):
    """Another pipeline's model and one deployed by hand (no label) share the endpoint's
    display name; only the model this pipeline deployed before is undeployed, and the new one
    is labelled so that the next push finds it."""
    deployed = [
        FakeDeployed("mine", f"{MODELS}/m1"),
        FakeDeployed("theirs", f"{MODELS}/m2"),
        FakeDeployed("by-hand", f"{MODELS}/m3@2"),
    ]
    endpoint = FakeEndpoint("e1", deployed)
    registry = {"m1": {"simclr-pipeline": "simclr"}, "m2": {"simclr-pipeline": "other"}}
    _push(tmp_path, monkeypatch, [endpoint], labels=registry)
    assert endpoint.undeployed == ["mine"]
    assert [m.id for m in endpoint.models] == ["theirs", "by-hand", "d-new"]
    assert registry["new"] == {"simclr-pipeline": "simclr"}


def test_endpoint_push_keeps_previous_models_when_asked_or_not_blessed(tmp_path, monkeypatch):
    endpoint = FakeEndpoint("e1", [FakeDeployed("d1", f"{MODELS}/m1")])
    _push(tmp_path / "keep", monkeypatch, [endpoint], undeploy=False)
    assert endpoint.undeployed == [] and len(endpoint.models) == 2
    endpoint = FakeEndpoint("e1", [FakeDeployed("d1", f"{MODELS}/m1")])
    pushed, deploys = _push(tmp_path / "unblessed", monkeypatch, [endpoint], blessed=False)
    assert deploys == [] and pushed.get_int_custom_property("pushed") == 0
    assert endpoint.undeployed == []


def test_failed_undeploy_is_one_line_that_says_what_still_bills(tmp_path, monkeypatch):
    endpoint = FakeEndpoint("e1", [FakeDeployed("d1", f"{MODELS}/m1")])

    def refuse(deployed_model_id: str, sync: bool) -> None:
        raise PermissionError("403 aiplatform.endpoints.undeploy denied")

    endpoint.undeploy = refuse
    with pytest.raises(RuntimeError) as info:
        _push(tmp_path, monkeypatch, [endpoint])
    message = str(info.value)
    assert "\n" not in message and "could not undeploy" in message
    assert "403 aiplatform.endpoints.undeploy denied" in message


def test_keep_previous_deployments_flag():
    _, options = parse(GCS_ARGS + ["--vertex_endpoint=e"])
    assert options.keep_previous_deployments is False
    _, options = parse(GCS_ARGS + ["--vertex_endpoint=e", "--keep_previous_deployments"])
    assert options.keep_previous_deployments is True


# ----- the TPU trainer image: libtpu where TensorFlow looks for it -----


def _tpu_image_module():
    spec = importlib.util.spec_from_file_location("tpu_image", REPO_ROOT / "docker/tpu_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_site(site: pathlib.Path, *, libtpu_version="2.16.0rc0", pinned="2.16.0rc0") -> None:
    """site-packages as pip leaves it after `pip install tensorflow-tpu==2.16.2`: libtpu.so
    only inside the libtpu package (wheel layout of the real libtpu distribution)."""
    (site / "libtpu").mkdir(parents=True)
    (site / "libtpu" / "__init__.py").write_text("")
    (site / "libtpu" / "libtpu.so").write_bytes(b"\x7fELF" + b"\x02\x01\x01" + bytes(200))
    info = site / f"libtpu-{libtpu_version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: libtpu\nVersion: {libtpu_version}\n"
    )
    (info / "RECORD").write_text(
        f"libtpu/__init__.py,,\nlibtpu/libtpu.so,,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n"
    )
    tf_info = site / "tensorflow_tpu-2.16.2.dist-info"
    tf_info.mkdir()
    (tf_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: tensorflow-tpu\nVersion: 2.16.2\n"
        f"Requires-Dist: absl-py >=1.0.0\nRequires-Dist: libtpu =={pinned}\n"
    )


def test_tpu_image_places_libtpu_in_lib_and_checks_the_layout(tmp_path):
    tpu_image = _tpu_image_module()
    site, root = tmp_path / "site", tmp_path / "root"
    _fake_site(site)
    env = {"TPU_LIBRARY_PATH": "/lib/libtpu.so"}
    # The image before this fix: libtpu.so only in site-packages.
    with pytest.raises(tpu_image.ImageError, match="^/lib/libtpu.so is missing"):
        tpu_image.check(str(root), [str(site)], env)
    installed = tpu_image.install_libtpu(str(root), [str(site)])
    assert installed == root / "lib" / "libtpu.so"
    assert installed.read_bytes() == (site / "libtpu" / "libtpu.so").read_bytes()
    done = tpu_image.check(str(root), [str(site)], env)
    assert done[1] == "TPU_LIBRARY_PATH=/lib/libtpu.so"
    assert done[2] == "tensorflow-tpu 2.16.2 with libtpu 2.16.0rc0"

    with pytest.raises(tpu_image.ImageError, match="^TPU_LIBRARY_PATH is None"):
        tpu_image.check(str(root), [str(site)], {})
    (site / "libtpu" / "libtpu.so").write_bytes(b"\x7fELF" + bytes(300))  # wheel upgraded
    with pytest.raises(tpu_image.ImageError, match="differs from the installed wheel"):
        tpu_image.check(str(root), [str(site)], env)
    installed.write_bytes(b"not a library")
    with pytest.raises(tpu_image.ImageError, match="is not an ELF shared object"):
        tpu_image.check(str(root), [str(site)], env)


@pytest.mark.parametrize(
    "change, message",
    [
        ("cpu_tensorflow", "tensorflow is installed next to tensorflow-tpu; uninstall it"),
        ("wrong_libtpu", "tensorflow-tpu 2.16.2 pins libtpu 2.16.0rc0, found 0.0.9"),
    ],
)
def test_tpu_image_check_names_a_broken_install_in_one_line(tmp_path, change, message):
    site, root = tmp_path / "site", tmp_path / "root"
    _fake_site(site, libtpu_version="0.0.9" if change == "wrong_libtpu" else "2.16.0rc0")
    if change == "cpu_tensorflow":
        info = site / "tensorflow-2.16.2.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tensorflow\nVersion: 2.16.2\n")
    script = [sys.executable, str(REPO_ROOT / "docker/tpu_image.py")]
    where = ["--root", str(root), "--site", str(site)]
    env = {"TPU_LIBRARY_PATH": "/lib/libtpu.so", "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        script + ["install-libtpu", *where], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    run = subprocess.run(script + ["check", *where], env=env, capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [f"error: {message}"]


def _dockerfile(path: pathlib.Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\s*\\\n\s*", " ", "\n".join(lines))
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
        for line in text.splitlines()
        if line.strip()
    ]


def test_tpu_dockerfile_runs_the_layout_script_after_installing_tensorflow_tpu():
    tpu_image = _tpu_image_module()
    steps = _dockerfile(REPO_ROOT / "docker/Dockerfile.tpu")
    index = {i: step for i, step in enumerate(steps)}
    install = next(i for i, (op, args) in index.items() if "tensorflow-tpu==2.16.2" in args)
    assert "libtpu-tf-releases" in steps[install][1] and steps[install][0] == "RUN"
    env = next(i for i, (op, args) in index.items() if op == "ENV" and "TPU_LIBRARY_PATH" in args)
    assert steps[env][1] == f"TPU_LIBRARY_PATH={tpu_image.LIBTPU_IN_IMAGE}"
    copy = steps.index(("COPY", "docker/tpu_image.py /simclr/docker/tpu_image.py"))
    layout = next(i for i, (op, args) in index.items() if "tpu_image.py install-libtpu" in args)
    assert re.search(
        r"tpu_image\.py install-libtpu && python \S+tpu_image\.py check", steps[layout][1]
    )
    # The env is set before the check reads it; the script is copied before it runs; both after
    # pip has put libtpu.so into site-packages.
    assert install < env < layout and copy < layout
    # BuildKit sends only the script in the build context.
    ignore = (REPO_ROOT / "docker/Dockerfile.tpu.dockerignore").read_text().split()
    assert "*" in ignore and "!docker/tpu_image.py" in ignore
    # The a100 image is its own file: a CUDA build has no libtpu to check.
    gpu = _dockerfile(REPO_ROOT / "docker/Dockerfile.gpu")
    assert any("tensorflow[and-cuda]==2.16.2" in args for _, args in gpu)
    assert not any("tpu" in args.lower() for _, args in gpu)


# ----- class names of TFDS records -----


def test_tfds_label_list_names_the_classes_of_integer_labels(tmp_path):
    """TFDS records carry ids only; `--labels_file=<data_dir>/label.labels.txt` (what `tfds
    build` writes, docs/cloud.md section 3) turns them into synsets, and without it the names
    are the ids as text."""
    labels = tmp_path / "label.labels.txt"
    labels.write_text("n01440764\nn01443537\nn01484850\n")
    config, _ = parse(GCS_ARGS + ["--labels_file=gs://my-bucket/imagenet/tfds/label.labels.txt"])
    cloud.validate_cloud_config(config)
    assert config.data.labels_file == "gs://my-bucket/imagenet/tfds/label.labels.txt"
    ids = tf.constant([2, 0, 7], tf.int64)
    named = tp._configured_names(ids, tp._label_names({"labels_file": str(labels)}))
    assert [n.decode() for n in named.numpy()] == ["n01484850", "n01440764", "7"]
    unnamed = tp._configured_names(ids, tp._label_names({}))
    assert [n.decode() for n in unnamed.numpy()] == ["2", "0", "7"]


def test_dataflow_cost_arithmetic_in_the_docs_uses_the_runner_defaults():
    """docs/cloud.md section 8 prices a worker of the default machine and disk, and the
    start-up bound uses the default worker cap; the sums are what the table says."""
    text = (REPO_ROOT / "docs/cloud.md").read_text()
    d = cloud.CloudOptions()
    assert d.dataflow_machine_type == "n2-standard-8"  # 8 vCPUs, 32 GB
    rate = re.search(
        r"8 x ([\d.]+) \+ 32 x ([\d.]+) \+ (\d+) x ([\d.]+) = \$([\d.]+) an hour", text
    )
    vcpu, memory, disk, disk_price, total = map(float, rate.groups())
    assert disk == d.dataflow_disk_size_gb
    assert round(8 * vcpu + 32 * memory + disk * disk_price, 3) == total
    startup = re.search(r"4 jobs x (\d+) workers x 5/60 h = ([\d.]+) worker-hours", text)
    assert int(startup.group(1)) == d.dataflow_max_workers
    assert round(4 * d.dataflow_max_workers * 5 / 60, 1) == float(startup.group(2))
    work = re.search(r"= ([\d.]+) vCPU-hours = ([\d.]+) worker-hours x \$([\d.]+)", text)
    assert round(float(work.group(1)) / 8, 1) == float(work.group(2))


# ----- several GPU machines per Trainer -----


def test_trainer_replicas_make_a_chief_and_worker_pool_under_multi_worker():
    """--trainer_replicas=3 on a100: three 8-GPU machines, pool 0 the chief and pool 1 two
    workers, the same machine and image; MultiWorkerMirroredStrategy unless given; the CustomJob
    as TFX's Vertex client sends it runs the executor on every pool."""
    from google.cloud.aiplatform_v1.types import custom_job
    from tfx.extensions.google_cloud_ai_platform import training_clients

    config, options = parse(GCS_ARGS + ["--trainer_accelerator=a100", "--trainer_replicas=3"])
    options.validate()
    assert config.runtime.strategy == "multi_worker" and options.total_replicas == 24
    chief, workers = cloud.worker_pool_specs(options)
    assert (chief["replica_count"], workers["replica_count"]) == (1, 2)
    assert (
        chief["machine_spec"]
        == workers["machine_spec"]
        == {
            "machine_type": "a2-highgpu-8g",
            "accelerator_type": "NVIDIA_TESLA_A100",
            "accelerator_count": 8,
        }
    )
    assert chief["container_spec"]["image_uri"] == workers["container_spec"]["image_uri"]
    job_args = {k: v for k, v in cloud.vertex_training_args(options).items() if k != "project"}
    client = training_clients.VertexJobClient.__new__(training_clients.VertexJobClient)
    job = custom_job.CustomJob(
        **client.create_training_job({}, {}, {}, "x.Executor", job_args, None, None)
    )
    assert [p.replica_count for p in job.job_spec.worker_pool_specs] == [1, 2]
    for pool in job.job_spec.worker_pool_specs:
        assert list(pool.container_spec.command[:3]) == ["python", "-m", "tfx.scripts.run_executor"]
    # One machine stays one pool under MirroredStrategy.
    config, options = parse(GCS_ARGS + ["--trainer_accelerator=a100"])
    assert config.runtime.strategy == "mirrored" and len(cloud.worker_pool_specs(options)) == 1


def test_trainer_replicas_split_the_global_batch_and_are_checked():
    # The memory check divides the global batch over every GPU of every machine: 3,696 fits one
    # a2-highgpu-8g (462 per GPU); the same per-GPU share fits three machines at 3 x 3,696.
    config, options = parse(
        GCS_ARGS
        + [
            "--trainer_accelerator=a100",
            "--trainer_replicas=3",
            "--train_batch_size=11088",
            "--finetune_train_batch_size=2400",
        ]
    )
    cloud.check_trainer_layout(config, options)
    cloud.check_batch_fits(config, options)
    config, options = parse(
        GCS_ARGS
        + ["--trainer_accelerator=a100", "--trainer_replicas=3", "--train_batch_size=11112"]
    )
    with pytest.raises(
        configs.ConfigError,
        match=r"^--train_batch_size: 11112 does not fit a100 \(3 machines, 24 x 40",
    ):
        cloud.check_batch_fits(config, options)
    config, options = parse(
        GCS_ARGS + ["--trainer_accelerator=a100", "--trainer_replicas=2", "--train_batch_size=1000"]
    )
    with pytest.raises(
        configs.ConfigError,
        match=r"^--train_batch_size: 1000 does not split evenly over 16 devices",
    ):
        cloud.check_trainer_layout(config, options)
    config, options = parse(
        GCS_ARGS + ["--trainer_accelerator=a100", "--trainer_replicas=2", "--strategy=mirrored"]
    )
    with pytest.raises(
        configs.ConfigError, match=r"^--strategy: --trainer_replicas=2 .* --strategy=multi_worker"
    ):
        cloud.check_trainer_layout(config, options)
    for accelerator in ("tpu_v3", "cpu"):
        _, options = parse(
            GCS_ARGS + [f"--trainer_accelerator={accelerator}", "--trainer_replicas=2"]
        )
        with pytest.raises(configs.ConfigError, match="^--trainer_replicas: more than one machine"):
            options.validate()


# ----- every image: pinned to its base, importing what its steps import -----


def _image_check_module():
    spec = importlib.util.spec_from_file_location(
        "image_check", REPO_ROOT / "docker/image_check.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dist(site: pathlib.Path, name: str, version: str) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_image_build_keeps_the_base_versions_or_names_each_change(tmp_path):
    """As the pipeline image's build runs it: the base's versions win over constraints.txt for
    what the base ships, and an install that moves one anyway fails the build in one line."""
    script = [sys.executable, str(REPO_ROOT / "docker/image_check.py")]
    site = tmp_path / "site"
    for name, version in (("keras", "3.3.3"), ("wrapt", "1.14.1"), ("grpcio", "1.62.2")):
        _dist(site, name, version)
    project = tmp_path / "constraints.txt"
    project.write_text("keras==3.6.0\nwrapt==1.16.0\ntf-keras==2.16.0  # comment\n\n")
    base, merged = tmp_path / "base.txt", tmp_path / "merged.txt"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(script + list(args), capture_output=True, text=True)

    assert run("freeze", str(base), "--site", str(site)).returncode == 0
    assert base.read_text() == "grpcio==1.62.2\nkeras==3.3.3\nwrapt==1.14.1\n"
    assert run("constraints", str(base), str(project), str(merged)).returncode == 0
    assert merged.read_text() == ("grpcio==1.62.2\nkeras==3.3.3\ntf-keras==2.16.0\nwrapt==1.14.1\n")
    _dist(site, "tf-keras", "2.16.0")  # what the base lacked: added, not a change
    assert run("unchanged", str(base), "--site", str(site)).returncode == 0
    # An install that upgrades wrapt and removes grpcio anyway.
    for info in site.glob("wrapt-*"):
        shutil.rmtree(info)
    for info in site.glob("grpcio-*"):
        shutil.rmtree(info)
    _dist(site, "wrapt", "1.16.0")
    result = run("unchanged", str(base), "--site", str(site))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: the build changed what the base image ships: grpcio 1.62.2 removed, wrapt "
        "1.14.1 -> 1.16.0; pin them to the base versions or allow each with --allow NAME=REASON"
    ]
    allow = ["--allow", "grpcio=not used", "--allow", "wrapt=needed by x"]
    result = run("unchanged", str(base), "--site", str(site), *allow)
    assert result.returncode == 0, result.stderr
    assert "changed on purpose: wrapt 1.14.1 -> 1.16.0 (needed by x)" in result.stdout
    result = run("unchanged", str(base), "--site", str(site), *allow, "--allow", "keras=x")
    assert result.stderr.strip() == "error: --allow names what did not change: keras"


def test_image_import_check_covers_every_project_module_and_names_a_failure():
    image_check = _image_check_module()
    modules = image_check.project_modules(REPO_ROOT)
    for name in (
        "pipeline.cloud.jobs",
        "pipeline.components.image_example_gen.executor",
        "models.trainer",
    ):
        assert name in modules
    assert "transform.preprocessing" in modules
    assert image_check.check_imports(["json", "pipeline.cloud.vertex"]) == 2
    with pytest.raises(image_check.ImageError) as info:
        image_check.check_imports(["json", "tensorflow_no_such_module"])
    assert str(info.value) == (
        "import tensorflow_no_such_module failed: ModuleNotFoundError: No module named "
        "'tensorflow_no_such_module'"
    )


def test_image_device_step_trains_and_checks_its_result():
    """The step the GPU and TPU builds run on their device, here under the default strategy:
    the loss and the updated weights are checked, so a device that computes wrongly fails."""
    image_check = _image_check_module()
    assert image_check.training_step(tf.distribute.get_strategy()) == 256.0


def test_each_dockerfile_pins_to_its_base_then_checks_imports_and_device():
    def runs(path: str) -> str:
        return " && ".join(args for op, args in _dockerfile(REPO_ROOT / path) if op == "RUN")

    for path, device, install in (
        ("docker/Dockerfile", None, "tf-keras pillow"),
        ("docker/Dockerfile.gpu", "gpu", '"tensorflow[and-cuda]==2.16.2"'),
        ("docker/Dockerfile.tpu", "tpu", "tensorflow-tpu==2.16.2"),
    ):
        text = runs(path)
        order = [
            text.index("image_check.py freeze"),
            text.index("image_check.py constraints"),
            text.index(f"-c {'' if path == 'docker/Dockerfile' else '/simclr/'}"),
            text.index(install),
            text.index("image_check.py unchanged"),
            text.index("image_check.py imports"),
        ]
        assert order == sorted(order), path
        assert "-c constraints.txt" not in text and "-c /simclr/constraints.txt" not in text
        if device:
            assert text.index(f"image_check.py device {device}") > order[-1], path
    tpu = runs("docker/Dockerfile.tpu")
    assert re.search(r"unchanged \S+ --allow \"tensorflow=replaced by tensorflow-tpu", tpu)
    ignore = (REPO_ROOT / "docker/Dockerfile.dockerignore").read_text().split()
    assert "!docker/image_check.py" in ignore
