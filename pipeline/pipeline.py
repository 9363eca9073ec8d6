"""The SimCLR TFX pipeline definition, shared by every runner.

ExampleGen → StatisticsGen → SchemaGen → ExampleValidator → Transform → Trainer (pretrain) →
Trainer (finetune, base_model = pretrain, or an imported released model) → optional Trainer
(distill, teacher = finetune) → Evaluator (gates vs. floor and last blessed model) → Pusher (only
when blessed). Runners differ only in where components execute.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import tensorflow as tf
import tensorflow_model_analysis as tfma
from tfx import v1 as tfx
from tfx.components import ImportExampleGen
from tfx.dsl.components.base.base_component import BaseComponent

from pipeline.configs import DATASET_CLASSES, SimCLRConfig, chance_floor, trainer_config
from pipeline.image_example_gen.component import make_image_example_gen
from pipeline.image_example_gen.executor import check_class_folders, discover_splits

TRAINER_RUN_FN = "models.trainer.run_fn"
PREPROCESSING_FN = "transform.preprocessing.preprocessing_fn"
TOP1 = "sparse_categorical_accuracy"
TOP5 = "sparse_top_k_categorical_accuracy"
_TFDS_FILE = re.compile(r"-(?P<split>[A-Za-z0-9_]+)\.tfrecord(-\d+-of-\d+)?$")


@dataclass(frozen=True)
class DataLayout:
    """What the data directory holds: its format and split names."""

    data_dir: str
    data_format: str  # 'folders' | 'tfrecord'
    splits: tuple[str, ...]
    train_split: str
    eval_split: str
    # Classes in the data, when the layout tells without reading examples (None: unknown).
    num_classes: int | None = None


def tfrecord_splits(data_dir: str) -> list[str]:
    """Split names of TFDS-style files `<name>-<split>.tfrecord-NNNNN-of-NNNNN`."""
    names = [os.path.basename(p) for p in tf.io.gfile.glob(os.path.join(data_dir, "*.tfrecord*"))]
    return sorted({m["split"] for n in names if (m := _TFDS_FILE.search(n))})


def inspect_data(
    data_dir: str,
    data_format: str,
    train_split: str,
    eval_split: str,
    drop_empty_class_folders: bool = False,
) -> DataLayout:
    """Finds the format, splits and classes; a one-line ValueError naming the problem when they
    don't fit (a missing split, a class folder without images), before any component runs."""
    if data_format in ("auto", "tfrecord"):
        splits = tfrecord_splits(data_dir)
        if splits:
            data_format = "tfrecord"
        elif data_format == "tfrecord":
            raise ValueError(f"--data_dir: no TFDS-style *-<split>.tfrecord* files in {data_dir}")
    num_classes = None
    if data_format in ("auto", "folders"):
        data_format = "folders"
        splits = discover_splits(data_dir)
    if not eval_split:
        eval_split = "test" if "test" in splits else "validation"
    for flag, split in (("train_split", train_split), ("eval_split", eval_split)):
        if split not in splits:
            raise ValueError(f"--{flag}: split {split!r} not found in {data_dir} (found {splits})")
    if data_format == "folders":
        classes = check_class_folders(data_dir, splits, drop_empty=drop_empty_class_folders)
        num_classes = len(classes[train_split])
    else:
        num_classes = tfds_num_classes(data_dir)
    return DataLayout(data_dir, data_format, tuple(splits), train_split, eval_split, num_classes)


def tfds_num_classes(data_dir: str) -> int | None:
    """Number of classes from a TFDS-prepared folder's label list (`label.labels.txt`)."""
    for path in sorted(tf.io.gfile.glob(os.path.join(data_dir, "*labels.txt"))):
        with tf.io.gfile.GFile(path) as f:
            return sum(1 for line in f if line.strip())
    return None


def min_top1(config: SimCLRConfig, num_classes: int | None) -> float:
    """The top-1 floor the Evaluator applies: --min_top1, or clearly above chance (-1)."""
    if config.eval.min_top1 >= 0:
        return config.eval.min_top1
    if config.data.labels_file and not config.data.labels_file.startswith("gs://"):
        # A local list is cheap to count; a gs:// one is read only where components run.
        with open(config.data.labels_file) as f:
            num_classes = sum(1 for line in f if line.strip())
    num_classes = num_classes or DATASET_CLASSES.get(config.data.dataset)
    if not num_classes:
        raise ValueError(
            "--min_top1: the number of classes is unknown for this data (no label list); "
            "give the top-1 floor explicitly"
        )
    return chance_floor(num_classes)


def eval_config(config: SimCLRConfig, top1_floor: float) -> tfma.EvalConfig:
    """TFMA on raw examples through `serving_default`: top-1/top-5, counts, slices, gates."""
    gates = config.eval
    top1_threshold = tfma.MetricThreshold(
        value_threshold=tfma.GenericValueThreshold(lower_bound={"value": top1_floor}),
        change_threshold=tfma.GenericChangeThreshold(
            direction=tfma.MetricDirection.HIGHER_IS_BETTER,
            absolute={"value": -gates.max_top1_regression},
        ),
    )
    top5_threshold = tfma.MetricThreshold(
        value_threshold=tfma.GenericValueThreshold(lower_bound={"value": gates.min_top5})
    )

    def overall(threshold: tfma.MetricThreshold) -> list[tfma.PerSliceMetricThreshold]:
        # Gate on the whole eval split only; per-label slices are reported, not gated.
        return [
            tfma.PerSliceMetricThreshold(slicing_specs=[tfma.SlicingSpec()], threshold=threshold)
        ]

    top1 = tfma.MetricConfig(
        class_name="SparseCategoricalAccuracy", per_slice_thresholds=overall(top1_threshold)
    )
    top5 = tfma.MetricConfig(class_name="SparseTopKCategoricalAccuracy", config='{"k": 5}')
    if gates.min_top5 > 0:
        top5.per_slice_thresholds.extend(overall(top5_threshold))
    return tfma.EvalConfig(
        model_specs=[
            tfma.ModelSpec(
                signature_name="serving_default",
                label_key="label",
                prediction_key="probabilities",
            )
        ],
        slicing_specs=[tfma.SlicingSpec(), tfma.SlicingSpec(feature_keys=["label"])],
        metrics_specs=[
            tfma.MetricsSpec(
                metrics=[
                    tfma.MetricConfig(class_name="ExampleCount"),
                    top1,
                    top5,
                    tfma.MetricConfig(class_name="MultiClassConfusionMatrixPlot"),
                ]
            )
        ],
    )


def create_pipeline(
    config: SimCLRConfig,
    layout: DataLayout,
    *,
    pipeline_root: str,
    metadata_path: str,
    push_dir: str,
    beam_pipeline_args: list[str],
    trainer_factory: Callable[..., BaseComponent] | None = None,
    extra_pusher: Callable[..., BaseComponent] | None = None,
) -> tfx.dsl.Pipeline:
    """The pipeline; the optional factories let a runner choose where Trainers and pushes run.

    trainer_factory takes the keyword arguments of `tfx.components.Trainer` and returns the
    component (default: that Trainer, run in-process); e.g. the Vertex AI Trainer extension.
    extra_pusher, if given, takes `model=` and `model_blessing=` and returns a second pusher
    (e.g. to a Vertex AI endpoint) that runs next to the filesystem Pusher.
    """
    d = config.data
    if layout.data_format == "folders":
        example_gen = make_image_example_gen(
            layout.data_dir,
            layout.splits,
            labels_file=d.labels_file or None,
            max_bad_fraction=d.max_bad_fraction,
            max_images_per_class=d.max_images_per_class or None,
            drop_empty_class_folders=d.drop_empty_class_folders,
        )
    else:
        example_gen = ImportExampleGen(
            input_base=layout.data_dir,
            input_config=tfx.proto.Input(
                splits=[
                    tfx.proto.Input.Split(name=s, pattern=f"*-{s}.tfrecord*") for s in layout.splits
                ]
            ),
        )
    statistics_gen = tfx.components.StatisticsGen(examples=example_gen.outputs["examples"])
    schema_gen = tfx.components.SchemaGen(
        statistics=statistics_gen.outputs["statistics"], infer_feature_shape=True
    )
    example_validator = tfx.components.ExampleValidator(
        statistics=statistics_gen.outputs["statistics"], schema=schema_gen.outputs["schema"]
    )
    transform_config = {"image_size": d.stored_size, "image_format": d.image_format}
    if d.labels_file:
        transform_config["labels_file"] = d.labels_file  # read when Transform runs
    transform = tfx.components.Transform(
        examples=example_gen.outputs["examples"],
        schema=schema_gen.outputs["schema"],
        preprocessing_fn=PREPROCESSING_FN,
        custom_config=transform_config,
        splits_config=tfx.proto.SplitsConfig(
            analyze=[layout.train_split],
            transform=[layout.train_split, layout.eval_split],
        ),
    )

    def trainer(stage: str, base_model=None) -> BaseComponent:
        return (trainer_factory or tfx.components.Trainer)(
            run_fn=TRAINER_RUN_FN,
            examples=transform.outputs["transformed_examples"],
            transform_graph=transform.outputs["transform_graph"],
            schema=schema_gen.outputs["schema"],
            base_model=base_model,
            train_args=tfx.proto.TrainArgs(splits=[layout.train_split]),
            eval_args=tfx.proto.EvalArgs(splits=[layout.eval_split]),
            # Only what the stage reads (its cache key), and where its checkpoints outlive a
            # killed execution so that a rerun resumes.
            custom_config={
                "trainer": trainer_config(config, stage).to_json(),
                "checkpoint_root": os.path.join(pipeline_root, "checkpoints"),
            },
        ).with_id(f"{stage}_trainer")

    components = [example_gen, statistics_gen, schema_gen, example_validator, transform]
    base_model = None
    if config.train_mode == "pretrain":
        pretrain = trainer("pretrain")
        components.append(pretrain)
        base_model = pretrain.outputs["model"]
    elif config.finetune.checkpoint:
        # A released SimCLR SavedModel (or one of our exports) replaces pretraining.
        importer = tfx.dsl.Importer(
            source_uri=config.finetune.checkpoint,
            artifact_type=tfx.types.standard_artifacts.Model,
        ).with_id("base_model_importer")
        components.append(importer)
        base_model = importer.outputs["result"]
    finetune = trainer("finetune", base_model)
    candidate = finetune
    if config.distill.distill:
        candidate = trainer("distill", finetune.outputs["model"])
        components.append(finetune)
    model_resolver = tfx.dsl.Resolver(
        strategy_class=tfx.dsl.experimental.LatestBlessedModelStrategy,
        model=tfx.dsl.Channel(type=tfx.types.standard_artifacts.Model),
        model_blessing=tfx.dsl.Channel(type=tfx.types.standard_artifacts.ModelBlessing),
    ).with_id("latest_blessed_model_resolver")
    evaluator = tfx.components.Evaluator(
        examples=example_gen.outputs["examples"],
        model=candidate.outputs["model"],
        baseline_model=model_resolver.outputs["model"],
        eval_config=eval_config(config, min_top1(config, layout.num_classes)),
        example_splits=[layout.eval_split],
    )
    pusher = tfx.components.Pusher(
        model=candidate.outputs["model"],
        model_blessing=evaluator.outputs["blessing"],
        push_destination=tfx.proto.PushDestination(
            filesystem=tfx.proto.PushDestination.Filesystem(base_directory=push_dir)
        ),
    )
    components += [candidate, model_resolver, evaluator, pusher]
    if extra_pusher is not None:
        components.append(
            extra_pusher(
                model=candidate.outputs["model"], model_blessing=evaluator.outputs["blessing"]
            )
        )
    return tfx.dsl.Pipeline(
        pipeline_name=config.runner.pipeline_name,
        pipeline_root=pipeline_root,
        components=components,
        enable_cache=config.runner.enable_cache,
        metadata_connection_config=(
            tfx.orchestration.metadata.sqlite_metadata_connection_config(metadata_path)
            if metadata_path
            else None
        ),
        beam_pipeline_args=beam_pipeline_args,
    )
