"""Cloud helpers offline: flag validation, Dataflow and Vertex arguments, the labeled subset, and
the storage cost of Transform's image encodings on real photographs."""

import gzip
import time

import numpy as np
import pytest
import tensorflow as tf

from models import data as data_lib
from pipeline import cli, cloud, configs
from tests.imagenet_fixture import write_imagenet_fixture
from transform import preprocessing as tp

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
        ({"dataflow_max_workers": 0}, "dataflow_max_workers"),
        ({"trainer_accelerator_count": 4}, "trainer_accelerator_count"),
        (
            {"trainer_accelerator": "a100", "trainer_accelerator_count": 3},
            "trainer_accelerator_count",
        ),
        ({"compile_only": True, "submit": True}, "submit"),
    ],
)
def test_bad_values_are_one_line_naming_the_flag(change, flag):
    with pytest.raises(configs.ConfigError) as info:
        cloud.CloudOptions(**{**REQUIRED, **change}).validate()
    message = str(info.value)
    assert message.startswith(f"--{flag}:") and "\n" not in message


def test_tpu_defaults_apply_unless_the_flag_is_given():
    config, options = parse(GCS_ARGS)
    assert options.accelerator.is_tpu
    assert (config.runtime.strategy, config.runtime.tpu_name) == ("tpu", "local")
    assert config.runtime.mixed_precision == "bfloat16"
    config, _ = parse(GCS_ARGS + ["--mixed_precision=float32"])
    assert config.runtime.mixed_precision == "float32"
    config, options = parse(GCS_ARGS + ["--trainer_accelerator=a100"])
    assert config.runtime.strategy == "mirrored" and not options.accelerator.is_tpu
    config, _ = parse(GCS_ARGS + ["--trainer_accelerator=cpu"])
    assert (config.runtime.strategy, config.runtime.mixed_precision) == ("auto", "float32")


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
    args = cloud.dataflow_beam_args(options)
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
            "tpu_v5e",
            0,
            {
                "machine_type": "ct5lp-hightpu-8t",
                "accelerator_type": "TPU_V5_LITEPOD",
                "accelerator_count": 8,
                "tpu_topology": "2x4",
            },
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
    image = "simclr-tfx-tpu" if accelerator.startswith("tpu") else "simclr-tfx"
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
    # Both stored forms decode back to the 256x256 image the Trainer crops from.
    assert tp.decode_stored_image(
        tp._encode_images(tf.constant([files[0].read_bytes()]), 256, "jpeg")[0], 256, "jpeg"
    ).shape == (256, 256, 3)
