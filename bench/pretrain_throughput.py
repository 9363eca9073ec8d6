"""Pretraining throughput and peak memory of the real train step and input pipeline.

    python bench/pretrain_throughput.py --resnet_depth=18 --width_multiplier=1 --image_size=32 \
        --train_batch_size=256 --steps=3 --warmup_steps=1 [--jit_compile] [--cached_batch] \
        [--mixed_precision=bfloat16] [--batch_norm=unfused] [--intra_op_threads=N] \
        [--onednn_auto_mixed_precision]

Levers compared one by one in one run: bench/step_levers.py.

The data are CIFAR-10 JPEGs (--data_dir, class folders <data_dir>/train/<class>/*.jpg) passed
once through this project's tf.Transform `preprocessing_fn` with tf.Transform's Beam
implementation and written as GZIP TFRecords, exactly what the Transform component hands the
Trainer; the result is cached under --work_dir. Training reads them with
`models.data.train_dataset` (decode, two augmented views, batch, prefetch) and runs
the pretraining task's step (`models.tasks.pretrain.PretrainTask`: LARS, contrastive +
linear-eval loss) as the Trainer does.

Reported: images/s counting each source image once (the batch size per step, not the 2x views
the network sees), over --steps timed steps after --warmup_steps untimed ones (tracing, XLA
compilation); with --cached_batch one batch taken from the real pipeline is repeated from
memory, so the difference to a run without it is what the input pipeline costs. The pipeline's
own rate (batches pulled without training) is printed too. Peak memory is the process's maximum
resident set size and, on GPU, TensorFlow's peak device allocation. The step's FLOPs are counted
from its traced graph (bench/hardware.py) and set against the CPU's peak for the precision.
"""

from __future__ import annotations

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import functools
import json
import pathlib
import resource
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import tensorflow as tf  # noqa: E402

from bench import hardware  # noqa: E402
from models import cpu_elementwise, side_by_side  # noqa: E402
from models import data as data_lib  # noqa: E402
from models.config import (  # noqa: E402
    RESNET_DEPTHS,
    AugmentConfig,
    InputConfig,
    ModelConfig,
    PretrainConfig,
    RuntimeConfig,
    TrainerConfig,
)
from models.model import SimCLRModel  # noqa: E402
from models.optimizers import build_optimizer  # noqa: E402
from models.resnet import ResNet  # noqa: E402
from models.schedule import WarmUpAndCosineDecay  # noqa: E402
from models.strategy import make_strategy, set_precision, wrap_optimizer  # noqa: E402
from models.tasks.pretrain import PretrainTask  # noqa: E402

NUM_CLASSES = 10
# The reference's CIFAR-10 recipe (also this project's cifar10 preset).
TEMPERATURE = 0.5
LEARNING_RATE = 1.0
WEIGHT_DECAY = 1e-4
COLOR_JITTER_STRENGTH = 0.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resnet_depth", type=int, default=18, choices=RESNET_DEPTHS)
    p.add_argument("--width_multiplier", type=float, default=1.0)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--train_batch_size", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="Timed train steps.")
    p.add_argument("--warmup_steps", type=int, default=1, help="Untimed steps first (tracing).")
    p.add_argument("--jit_compile", action="store_true", help="Compile the step with XLA.")
    p.add_argument(
        "--cached_batch",
        action="store_true",
        help="Repeat one in-memory batch instead of running the input pipeline.",
    )
    p.add_argument(
        "--mixed_precision", default="float32", choices=("float32", "bfloat16", "float16")
    )
    p.add_argument(
        "--batch_norm",
        default="fused",
        choices=("fused", "unfused"),
        help="fused: Keras picks the fused kernel (this project's model); unfused: the reference.",
    )
    p.add_argument(
        "--onednn_auto_mixed_precision",
        action="store_true",
        help="Grappler's oneDNN bfloat16 rewrite of the float32 graph (instead of a Keras "
        "mixed-precision policy).",
    )
    p.add_argument(
        "--side_by_side_max_width",
        type=int,
        default=side_by_side.MAX_WIDTH,
        help="bfloat16 convolutions on CPU with output maps at most this wide run on the images "
        "laid side by side (models/side_by_side.py); 0: every convolution as oneDNN has it.",
    )
    p.add_argument(
        "--elementwise",
        default="xla",
        choices=("xla", "tensorflow"),
        help="The residual blocks' element-wise work in bfloat16 on CPU: compiled by XLA "
        "(this project's model) or TensorFlow's own kernels.",
    )
    p.add_argument("--intra_op_threads", type=int, default=0, help="0: TensorFlow's default.")
    p.add_argument("--inter_op_threads", type=int, default=0, help="0: TensorFlow's default.")
    p.add_argument(
        "--num_images",
        type=int,
        default=1024,
        help="Training images (the first of each class, round robin) to transform and cycle.",
    )
    p.add_argument("--data_dir", default=str(REPO_ROOT.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--work_dir", default="/tmp/simclr_bench", help="Cache of transformed data.")
    p.add_argument(
        "--profile_dir",
        default="",
        help="Record the timed steps with TensorFlow's profiler into this folder "
        "(bench/op_breakdown.py reads it).",
    )
    args = p.parse_args(argv)
    for flag in ("train_batch_size", "steps", "image_size", "num_images"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be positive")
    if args.warmup_steps < 0:
        p.error("--warmup_steps must be >= 0")
    if not (pathlib.Path(args.data_dir) / "train").is_dir():
        p.error(f"--data_dir: no train/ class folders under {args.data_dir}")
    return args


def transformed_records(data_dir: str, num_images: int, image_size: int, work_dir: str) -> str:
    """GZIP TFRecords of `num_images` training JPEGs after `preprocessing_fn`; a file pattern."""
    out = pathlib.Path(work_dir) / f"cifar10_train_{num_images}_{image_size}"
    pattern = str(out / "examples" / "*.gz")
    if tf.io.gfile.glob(pattern):
        return pattern

    import apache_beam as beam
    import tensorflow_transform.beam as tft_beam
    from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

    from transform import preprocessing as tp

    root = pathlib.Path(data_dir) / "train"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [sorted((root / name).glob("*.jpg")) for name in classes]
    rows = []
    for i in range(num_images):
        label = i % len(classes)
        path = files[label][i // len(classes)]
        rows.append(
            {
                "image": path.read_bytes(),
                "label": label,
                "filename": f"{classes[label]}/{path.name}".encode(),
            }
        )
    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "filename": tf.io.FixedLenFeature([], tf.string),
    }
    metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(spec))
    fn = functools.partial(
        tp.preprocessing_fn, custom_config={"image_size": image_size, "image_format": "raw"}
    )
    with beam.Pipeline() as pipeline:
        with tft_beam.Context(temp_dir=str(out / "tmp")):
            raw = pipeline | beam.Create(rows, reshuffle=False)
            transformed, _ = (raw, metadata) | tft_beam.AnalyzeAndTransformDataset(fn)
            _ = (
                transformed
                | tft_beam.EncodeTransformedDataset()
                | beam.io.WriteToTFRecord(
                    str(out / "examples" / "train"), file_name_suffix=".gz", num_shards=2
                )
            )
    return pattern


def peak_memory() -> dict[str, float]:
    """Maximum resident set size of this process and, per GPU, TensorFlow's peak allocation."""
    peak = {"max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    for i, _ in enumerate(tf.config.list_logical_devices("GPU")):
        info = tf.config.experimental.get_memory_info(f"GPU:{i}")
        peak[f"gpu{i}_peak_mib"] = info["peak"] / 2**20
    return peak


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # Thread pools are fixed when TensorFlow first runs an op; set them before anything runs.
    tf.config.threading.set_intra_op_parallelism_threads(args.intra_op_threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)
    set_precision(args.mixed_precision)
    cpu_elementwise.set_enabled(args.elementwise == "xla")
    side_by_side.set_max_width(args.side_by_side_max_width)
    if args.onednn_auto_mixed_precision:
        tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": True})
    strategy = make_strategy("auto")
    batch = args.train_batch_size
    t = time.perf_counter()
    files = transformed_records(args.data_dir, args.num_images, args.image_size, args.work_dir)
    prepare_s = time.perf_counter() - t
    spec = data_lib.ImageSpec(args.image_size, "raw", args.image_size)

    def make_dataset(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        return data_lib.train_dataset(
            files,
            spec,
            ctx.get_per_replica_batch_size(batch),
            contrastive=True,
            color_jitter_strength=COLOR_JITTER_STRENGTH,
            color_jitter_impl="v2",
            use_blur=False,
            seed=ctx.input_pipeline_id,
            shard=(ctx.num_input_pipelines, ctx.input_pipeline_id),
        )

    # The input pipeline on its own: batches pulled as fast as it makes them.
    pipeline_iter = iter(make_dataset(tf.distribute.InputContext()))
    for _ in range(2):  # fills the shuffle buffer and starts the parallel maps
        next(pipeline_iter)
    t = time.perf_counter()
    pipeline_batches = max(10, args.steps)
    for _ in range(pipeline_batches):
        next(pipeline_iter)
    pipeline_rate = pipeline_batches * batch / (time.perf_counter() - t)
    del pipeline_iter

    if args.cached_batch:
        one = next(iter(make_dataset(tf.distribute.InputContext())))

        def make_input(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
            return tf.data.Dataset.from_tensors(one).repeat()

    else:

        def make_input(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
            return make_dataset(ctx)

    config = ModelConfig(
        resnet_depth=args.resnet_depth,
        width_multiplier=args.width_multiplier,
        global_bn=strategy.num_replicas_in_sync > 1,
    )
    total_steps = args.warmup_steps + args.steps
    train = PretrainConfig(temperature=TEMPERATURE, weight_decay=WEIGHT_DECAY, optimizer="lars")
    task = PretrainTask.without_inputs(
        TrainerConfig("pretrain", InputConfig(), AugmentConfig(), config, train, RuntimeConfig())
    )
    with strategy.scope():
        backbone = ResNet(
            depth=config.resnet_depth,
            width_multiplier=config.width_multiplier,
            cifar_stem=args.image_size <= 32,
            batch_norm_decay=config.batch_norm_decay,
            global_bn=config.global_bn,
            fused_batch_norm=False if args.batch_norm == "unfused" else None,
        )
        model = SimCLRModel(
            config, NUM_CLASSES, args.image_size, pretraining=True, backbone=backbone
        )
        model.build_for()
        schedule = WarmUpAndCosineDecay(
            LEARNING_RATE, args.num_images, batch, warmup_epochs=0.0, total_steps=total_steps
        )
        optimizer = wrap_optimizer(
            build_optimizer("lars", schedule, 0.9, WEIGHT_DECAY), args.mixed_precision
        )
        metrics = task.build_metrics()
    step_fn = plain_step = task.train_step(model, optimizer, metrics)
    # As train_loop.run does: XLA compiles the replica step, the distribution loop stays outside.
    if args.jit_compile:
        step_fn = tf.function(step_fn, jit_compile=True)
    iterator = iter(strategy.distribute_datasets_from_function(make_input))

    @tf.function
    def train_step(iterator) -> None:
        strategy.run(step_fn, args=next(iterator))

    def run_steps(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            train_step(iterator)
        loss = float(metrics["total_loss"].result())  # waits for the last step to finish
        if loss != loss:
            raise FloatingPointError("the benchmark's loss is NaN")
        return time.perf_counter() - t

    warmup_s = run_steps(args.warmup_steps) if args.warmup_steps else 0.0
    traces = train_step.experimental_get_tracing_count()
    # Wall-clock bounds of the timed steps, to cut a trace (e.g. ONEDNN_VERBOSE's) to them.
    if args.profile_dir:
        tf.profiler.experimental.start(args.profile_dir)
    timed_from_ms = time.time() * 1000
    timed_s = run_steps(args.steps)
    timed_to_ms = time.time() * 1000
    if args.profile_dir:
        tf.profiler.experimental.stop()
    # Counted on a second trace of the same step with the batch's static shapes; nothing runs.
    # The network's own convolutions: the zero columns of side-by-side rows are not work done.
    sample = next(iter(make_dataset(tf.distribute.InputContext())))
    side_by_side.set_max_width(0)
    flops = hardware.count_flops(
        tf.function(lambda *batch: strategy.run(plain_step, args=batch)).get_concrete_function(
            *sample
        )
    )
    side_by_side.set_max_width(args.side_by_side_max_width)
    step_flops = sum(flops.values())
    cpu = hardware.cpu_info()
    bf16 = args.mixed_precision == "bfloat16" or args.onednn_auto_mixed_precision
    peak = hardware.peak_gflops(cpu, "bfloat16" if bf16 else "float32")
    achieved = step_flops / (timed_s / args.steps) / 1e9
    result = {
        "config": {k: v for k, v in vars(args).items() if k not in ("data_dir", "work_dir")},
        "device": "GPU" if tf.config.list_logical_devices("GPU") else "CPU",
        "replicas": strategy.num_replicas_in_sync,
        "cpu_cores": os.cpu_count(),
        "cpu": cpu.as_dict(),
        # TensorFlow's x86 Linux builds turn oneDNN on unless this says 0.
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)"),
        "step_gflop": round(step_flops / 1e9, 2),
        "step_gflop_by_op": {k: round(v / 1e9, 3) for k, v in sorted(flops.items())},
        "gflops_per_s": round(achieved, 1),
        "peak_gflops_per_s": peak,
        "percent_of_peak": round(100 * achieved / peak, 1) if peak else None,
        # Other processes on the machine slow every number down; this says how busy it was.
        "load_average_1min": round(os.getloadavg()[0], 2),
        "prepare_data_s": round(prepare_s, 1),
        "warmup_s": round(warmup_s, 1),
        "step_s": round(timed_s / args.steps, 2),
        "timed_window_ms": [round(timed_from_ms, 3), round(timed_to_ms, 3)],
        "images_per_s": round(args.steps * batch / timed_s, 1),
        "input_pipeline_images_per_s": round(pipeline_rate, 1),
        # 0: every timed step ran the already traced graph, no Python in between.
        "timed_step_retraces": train_step.experimental_get_tracing_count() - traces,
        **{k: round(v) for k, v in peak_memory().items()},
    }
    print(
        f"{result['images_per_s']} img/s ({result['step_s']} s/step, batch {batch}), input "
        f"pipeline alone {result['input_pipeline_images_per_s']} img/s, warm-up "
        f"{result['warmup_s']} s, peak RSS {result['max_rss_mib']} MiB, "
        f"{result['step_gflop']} GFLOP/step = {result['gflops_per_s']} GFLOP/s "
        f"({result['percent_of_peak']}% of {peak} peak)",
        flush=True,
    )
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
