"""The SimCLR TFX pipeline definition, shared by every runner.

ExampleGen → StatisticsGen → SchemaGen → ExampleValidator → Transform → one Trainer per stage
the run has (models/tasks/registry.py: pretrain → finetune, base_model = pretrain or an imported
released model → optional distill, teacher = finetune; optional supervised baseline) → Evaluator
(gates vs. floor and last blessed model) → with a baseline, the TFMA comparison of candidate and
baseline → Pusher (only when blessed, and inside a Cond when the gain over the baseline is
gated). Runners differ only in where components execute.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
from collections.abc import Callable
from dataclasses import dataclass

import tensorflow as tf
import tensorflow_model_analysis as tfma
from tfx.components import (
    Evaluator,
    ExampleValidator,
    ImportExampleGen,
    Pusher,
    SchemaGen,
    StatisticsGen,
    Transform,
)
from tfx.dsl.components.base.base_component import BaseComponent
from tfx.dsl.components.common.importer import Importer
from tfx.dsl.components.common.resolver import Resolver, ResolverStrategy
from tfx.dsl.experimental.conditionals.conditional import Cond
from tfx.dsl.input_resolution.strategies.latest_blessed_model_strategy import (
    LatestBlessedModelStrategy,
)
from tfx.orchestration.metadata import sqlite_metadata_connection_config
from tfx.orchestration.pipeline import Pipeline
from tfx.proto import example_gen_pb2, pusher_pb2, trainer_pb2, transform_pb2
from tfx.types import standard_artifacts
from tfx.types.channel import Channel

from models.tasks import registry
from pipeline.components.baseline_comparison import BaselineComparison, comparison_eval_config
from pipeline.components.image_example_gen.component import make_image_example_gen
from pipeline.components.image_example_gen.executor import (
    UNLABELED_SPLIT,
    check_class_folders,
    discover_splits,
)
from pipeline.components.tfrecord_example_gen import make_tfrecord_example_gen
from pipeline.components.trainer import Trainer
from pipeline.configs import (
    DATASET_CLASSES,
    UNLABELED_TFRECORD_SPLITS,
    SimCLRConfig,
    chance_floor,
    trainer_config,
)
from pipeline.names import BASELINE_COMPARISON, trainer_id

TRAINER_RUN_FN = "models.trainer.run_fn"
PREPROCESSING_FN = "transform.preprocessing.preprocessing_fn"
# The packages whose code each component runs by import path. TFX's cache key sees the import
# path only, so the digest of that code goes into an execution property: an edited source file
# re-runs the component (locally and on Vertex AI, whose cache keys on the same properties).
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
INGESTION_CODE = ("pipeline/components/image_example_gen",)
TRANSFORM_CODE = ("transform",)
TRAINER_CODE = ("models", "transform")
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
    # The unlabeled pool, ingested as the split 'unlabeled': for folders the pool folder
    # ('unlabeled' inside data_dir, or a full path); for TFRecords the source split's name.
    unlabeled: str = ""

    def stage_splits(self, stage: str) -> list[str]:
        """The ExampleGen splits a Trainer stage trains on (its epochs count over them)."""
        if registry.get(stage).reads_unlabeled and self.unlabeled:
            return [self.train_split, UNLABELED_SPLIT]
        return [self.train_split]

    def split_readers(self, config: SimCLRConfig) -> dict[str, list[str]]:
        """Split -> the pipeline steps that read it, as summaries show it."""
        readers: dict[str, list[str]] = {}
        for stage in registry.active(config):
            for split in self.stage_splits(stage.name):
                readers.setdefault(split, []).append(stage.name)
        if config.train_mode == "pretrain" and config.pretrain.knn_every_epochs > 0:
            readers.setdefault(self.train_split, []).append("kNN memory bank")
            readers.setdefault(self.eval_split, []).append("kNN queries")
        readers.setdefault(self.eval_split, []).append("Evaluator")
        if registry.baseline(config) is not None:
            readers[self.eval_split].append(BASELINE_COMPARISON)
        return readers


def code_digest(packages: tuple[str, ...], root: pathlib.Path | None = None) -> str:
    """sha256 over every `*.py` file under `packages` (recursively): names and contents."""
    root = root or REPO_ROOT
    digest = hashlib.sha256()
    files = sorted(p for package in packages for p in (root / package).rglob("*.py"))
    if not files:
        raise ValueError(f"no Python sources under {[str(root / p) for p in packages]}")
    for path in files:
        name = path.relative_to(root).as_posix().encode()
        content = path.read_bytes()
        digest.update(b"%d:%s%d:" % (len(name), name, len(content)) + content)
    return digest.hexdigest()


def tfrecord_splits(data_dir: str) -> list[str]:
    """Split names of TFDS-style files `<name>-<split>.tfrecord-NNNNN-of-NNNNN`."""
    names = [os.path.basename(p) for p in tf.io.gfile.glob(os.path.join(data_dir, "*.tfrecord*"))]
    return sorted({m["split"] for n in names if (m := _TFDS_FILE.search(n))})


def _first_label(data_dir: str, split: str) -> int | None:
    """The integer `label` of a TFRecord split's first record (0 for a string label); None
    when it has no such feature."""
    files = sorted(tf.io.gfile.glob(os.path.join(data_dir, f"*-{split}.tfrecord*")))
    for compression in ("", "GZIP"):
        try:
            for record in tf.data.TFRecordDataset(files[:1], compression).take(1):
                feature = tf.train.Example.FromString(record.numpy()).features.feature
                if "label" not in feature:
                    return None
                values = feature["label"].int64_list.value
                return int(values[0]) if values else 0
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError, ValueError):
            continue
    raise ValueError(f"--data_dir: the {split!r} TFRecord files in {data_dir} are unreadable")


def _refuse_eval_only_labels(labeled: list[str], train_split: str, eval_split: str) -> None:
    """Everything but the eval split unlabeled: nothing to fine-tune on that is not evaluated.

    Refused before any component runs; other mistakes (a misspelt --train_split) fall through
    to the split checks of `inspect_data`.
    """
    if not [s for s in labeled if s != eval_split]:
        raise ValueError(
            f"--train_split: the only labeled images are the eval split {eval_split!r} "
            "(everything else is unlabeled); fine-tuning, the online probe and the kNN bank "
            f"need a labeled train split {train_split!r} besides it"
        )


def inspect_data(
    data_dir: str,
    data_format: str,
    train_split: str,
    eval_split: str,
    drop_empty_class_folders: bool = False,
    unlabeled_dir: str = "",
) -> DataLayout:
    """Finds the format, splits, classes and unlabeled pool; a one-line ValueError naming the
    problem when they don't fit (a missing split, a class folder without images, labels only
    in the eval split), before any component runs."""
    unlabeled = ""
    if data_format in ("auto", "tfrecord"):
        splits = tfrecord_splits(data_dir)
        if splits:
            data_format = "tfrecord"
        elif data_format == "tfrecord":
            raise ValueError(f"--data_dir: no TFDS-style *-<split>.tfrecord* files in {data_dir}")
    num_classes = None
    if data_format == "tfrecord":
        if unlabeled_dir:
            raise ValueError(
                "--unlabeled_dir: takes a folder of images beside class folders; TFRecord data "
                f"holds its unlabeled pool as a split {'/'.join(UNLABELED_TFRECORD_SPLITS)}"
            )
        pools = [s for s in splits if s in UNLABELED_TFRECORD_SPLITS]
        if len(pools) > 1:
            raise ValueError(f"--data_dir: more than one unlabeled split in {data_dir}: {pools}")
        if pools:
            unlabeled = pools[0]
            splits = [s for s in splits if s != unlabeled]
    if data_format in ("auto", "folders"):
        data_format = "folders"
        pool_in_tree = tf.io.gfile.isdir(os.path.join(data_dir, UNLABELED_SPLIT))
        if unlabeled_dir and pool_in_tree:
            raise ValueError(
                f"--unlabeled_dir: {data_dir} has an {UNLABELED_SPLIT}/ folder too; give one pool"
            )
        if unlabeled_dir and not tf.io.gfile.isdir(unlabeled_dir):
            raise ValueError(f"--unlabeled_dir: no such directory: {unlabeled_dir}")
        if unlabeled_dir:
            unlabeled = unlabeled_dir if "://" in unlabeled_dir else os.path.abspath(unlabeled_dir)
        elif pool_in_tree:
            unlabeled = UNLABELED_SPLIT
        try:
            splits = discover_splits(data_dir)
        except ValueError:
            if not unlabeled:
                raise
            splits = []
    if not eval_split:
        eval_split = "test" if "test" in splits else "validation"
    if unlabeled:
        labeled = list(splits)
        if data_format == "tfrecord" and train_split in labeled:
            label = _first_label(data_dir, train_split)
            if label is None or label < 0:
                labeled.remove(train_split)  # records without a label are a pool too
        _refuse_eval_only_labels(labeled, train_split, eval_split)
        if train_split in splits and train_split not in labeled:
            raise ValueError(
                f"--train_split: split {train_split!r} has no labels (no label feature, or -1)"
            )
    for flag, split in (("train_split", train_split), ("eval_split", eval_split)):
        if split not in splits:
            raise ValueError(f"--{flag}: split {split!r} not found in {data_dir} (found {splits})")
    if data_format == "folders":
        classes = check_class_folders(data_dir, splits, drop_empty=drop_empty_class_folders)
        num_classes = len(classes[train_split])
    else:
        num_classes = tfds_num_classes(data_dir)
    return DataLayout(
        data_dir, data_format, tuple(splits), train_split, eval_split, num_classes, unlabeled
    )


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


class NewestArtifact(ResolverStrategy):
    """The newest artifact (highest id) of each channel, or none.

    LatestArtifactStrategy fails the resolver with a logged traceback when a channel is empty,
    as it is on the first --warm_start run; here that run simply gets no base model.
    """

    def resolve_artifacts(self, store, input_dict):  # noqa: ARG002 - the strategy's signature
        return {key: sorted(items, key=lambda a: a.id)[-1:] for key, items in input_dict.items()}


def warm_start_source(uri: str | None, stage: str) -> BaseComponent:
    """Where --warm_start's pretrained model comes from.

    Locally: the newest Model that the pretraining Trainer of this pipeline produced in an
    earlier run (a channel filtered by producer; the latest-blessed resolver's unfiltered
    channel would also see fine-tuned models). Killed executions leave no live Model, so a
    killed warm-started run that is rerun resolves the same model and resumes. Vertex AI
    compiles a resolver's query by type alone, so there the runner resolves a URI and it is
    imported instead.
    """
    model = standard_artifacts.Model
    if uri:
        return Importer(source_uri=uri, artifact_type=model).with_id("warm_start_importer")
    return Resolver(
        strategy_class=NewestArtifact,
        model=Channel(type=model, producer_component_id=trainer_id(stage), output_key="model"),
    ).with_id("warm_start_model_resolver")


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
    warm_start_model: str | None = None,
) -> Pipeline:
    """The pipeline; the optional factories let a runner choose where Trainers and pushes run.

    trainer_factory takes the keyword arguments of `pipeline.components.trainer.Trainer` (TFX's
    Trainer with the statistics as an input) and returns the component (default: that Trainer,
    run in-process); e.g. the Vertex AI Trainer.
    extra_pusher, if given, takes `model=` and `model_blessing=` and returns a second pusher
    (e.g. to a Vertex AI endpoint) that runs next to the filesystem Pusher.
    warm_start_model, with --warm_start: the URI of the pretrained Model to start from, resolved
    by the runner and imported; None resolves it in the pipeline (`warm_start_source`).
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
            unlabeled_dir=layout.unlabeled or None,
            code_digest=code_digest(INGESTION_CODE),
        )
    else:
        input_splits = [
            example_gen_pb2.Input.Split(name=s, pattern=f"*-{s}.tfrecord*") for s in layout.splits
        ]
        input_config = example_gen_pb2.Input(splits=input_splits)
        if layout.unlabeled:
            # One name for the pool whatever the source calls it (STL-10: 'unlabelled'); its
            # records without a label get -1 (the stock import where there is no pool).
            input_config.splits.append(
                example_gen_pb2.Input.Split(
                    name=UNLABELED_SPLIT, pattern=f"*-{layout.unlabeled}.tfrecord*"
                )
            )
            example_gen = make_tfrecord_example_gen(layout.data_dir, input_config)
        else:
            example_gen = ImportExampleGen(input_base=layout.data_dir, input_config=input_config)
    # Statistics, schema and validation cover the unlabeled pool like any split: its records
    # carry every feature (label -1, label_name ''), so one schema fits all splits.
    statistics_gen = StatisticsGen(examples=example_gen.outputs["examples"])
    schema_gen = SchemaGen(
        statistics=statistics_gen.outputs["statistics"], infer_feature_shape=True
    )
    example_validator = ExampleValidator(
        statistics=statistics_gen.outputs["statistics"], schema=schema_gen.outputs["schema"]
    )
    transform_config = {
        "image_size": d.stored_size,
        "image_format": d.image_format,
        "code_digest": code_digest(TRANSFORM_CODE),
    }
    if d.labels_file:
        transform_config["labels_file"] = d.labels_file  # read when Transform runs
    transform = Transform(
        examples=example_gen.outputs["examples"],
        schema=schema_gen.outputs["schema"],
        preprocessing_fn=PREPROCESSING_FN,
        custom_config=transform_config,
        # The label vocabulary comes from the labeled train split alone; the pool is
        # transformed (decoded and stored) for the stages that read it.
        splits_config=transform_pb2.SplitsConfig(
            analyze=[layout.train_split],
            transform=[layout.train_split, layout.eval_split]
            + ([UNLABELED_SPLIT] if layout.unlabeled else []),
        ),
        # TFDV statistics of the raw and decoded image bytes: StatisticsGen and
        # ExampleValidator already cover the raw examples, and nothing reads statistics of
        # decoded pixels stored as bytes, while computing them is a pass over every image.
        disable_statistics=True,
    )

    components = [example_gen, statistics_gen, schema_gen, example_validator, transform]
    trainers = _trainers(
        config,
        layout,
        transform,
        schema_gen,
        statistics_gen,
        pipeline_root,
        components,
        trainer_factory,
        warm_start_model,
    )
    components += _evaluate_and_push(config, layout, example_gen, trainers, push_dir, extra_pusher)
    return Pipeline(
        pipeline_name=config.runner.pipeline_name,
        pipeline_root=pipeline_root,
        components=components,
        enable_cache=config.runner.enable_cache,
        metadata_connection_config=(
            sqlite_metadata_connection_config(metadata_path) if metadata_path else None
        ),
        beam_pipeline_args=beam_pipeline_args,
    )


def _trainers(
    config: SimCLRConfig,
    layout: DataLayout,
    transform: BaseComponent,
    schema_gen: BaseComponent,
    statistics_gen: BaseComponent,
    pipeline_root: str,
    components: list[BaseComponent],
    trainer_factory: Callable[..., BaseComponent] | None,
    warm_start_model: str | None,
) -> dict[str, BaseComponent]:
    """One Trainer per stage the run has (the registry's order), each given the model it starts
    from; appends them, and the components that supply base models, to `components`."""
    trainer_code = code_digest(TRAINER_CODE)

    def trainer(stage: str, base_model=None) -> BaseComponent:
        return (trainer_factory or Trainer)(
            run_fn=TRAINER_RUN_FN,
            examples=transform.outputs["transformed_examples"],
            transform_graph=transform.outputs["transform_graph"],
            schema=schema_gen.outputs["schema"],
            # Split sizes without reading the records (Transform writes one record per input).
            statistics=statistics_gen.outputs["statistics"],
            base_model=base_model,
            train_args=trainer_pb2.TrainArgs(splits=layout.stage_splits(stage)),
            eval_args=trainer_pb2.EvalArgs(splits=[layout.eval_split]),
            # Only what the stage reads (its cache key), where its checkpoints outlive a killed
            # execution so that a rerun resumes, and the digest of the code it runs (in both
            # the cache key and the checkpoint key).
            custom_config={
                "trainer": trainer_config(config, stage).to_json(),
                "checkpoint_root": os.path.join(pipeline_root, "checkpoints"),
                "code_digest": trainer_code,
            },
        ).with_id(trainer_id(stage))

    trainers: dict[str, BaseComponent] = {}
    for stage in registry.active(config):
        section = config.stage(stage.name)
        base_model = None
        if stage.base in trainers:
            base_model = trainers[stage.base].outputs["model"]
        elif getattr(section, "checkpoint", ""):
            # A released SimCLR SavedModel (or one of our exports) replaces the base stage.
            importer = Importer(
                source_uri=section.checkpoint,
                artifact_type=standard_artifacts.Model,
            ).with_id("base_model_importer")
            components.append(importer)
            base_model = importer.outputs["result"]
        elif getattr(section, "warm_start", False):
            warm = warm_start_source(warm_start_model, stage.name)
            components.append(warm)
            base_model = warm.outputs["result" if warm_start_model else "model"]
        trainers[stage.name] = trainer(stage.name, base_model)
        components.append(trainers[stage.name])
    return trainers


def _evaluate_and_push(
    config: SimCLRConfig,
    layout: DataLayout,
    example_gen: BaseComponent,
    trainers: dict[str, BaseComponent],
    push_dir: str,
    extra_pusher: Callable[..., BaseComponent] | None,
) -> list[BaseComponent]:
    """The Evaluator's gates (floor, no regression vs. the last blessed model) on the model to
    push; with a baseline stage, the TFMA comparison of candidate and baseline, whose gain gate
    (--min_gain_over_baseline) holds the Pusher in a Cond. Only the Evaluator writes a
    ModelBlessing, so the latest-blessed resolver never sees the comparison's verdict."""
    candidate = trainers[registry.candidate(config).name]
    baseline_stage = registry.baseline(config)
    baseline = trainers[baseline_stage.name] if baseline_stage else None
    pushed = baseline if config.eval.push == "baseline" and baseline else candidate
    model_resolver = Resolver(
        strategy_class=LatestBlessedModelStrategy,
        model=Channel(type=standard_artifacts.Model),
        model_blessing=Channel(type=standard_artifacts.ModelBlessing),
    ).with_id("latest_blessed_model_resolver")
    evaluator = Evaluator(
        examples=example_gen.outputs["examples"],
        model=pushed.outputs["model"],
        baseline_model=model_resolver.outputs["model"],
        eval_config=eval_config(config, min_top1(config, layout.num_classes)),
        example_splits=[layout.eval_split],
    )
    components: list[BaseComponent] = [model_resolver, evaluator]

    def pushers() -> list[BaseComponent]:
        out = [
            Pusher(
                model=pushed.outputs["model"],
                model_blessing=evaluator.outputs["blessing"],
                push_destination=pusher_pb2.PushDestination(
                    filesystem=pusher_pb2.PushDestination.Filesystem(base_directory=push_dir)
                ),
            )
        ]
        if extra_pusher is not None:
            out.append(
                extra_pusher(
                    model=pushed.outputs["model"], model_blessing=evaluator.outputs["blessing"]
                )
            )
        return out

    if baseline is None:
        return components + pushers()
    gain = config.eval.min_gain_over_baseline
    pushes_baseline = pushed is baseline
    comparison = BaselineComparison(
        examples=example_gen.outputs["examples"],
        model=candidate.outputs["model"],
        baseline_model=baseline.outputs["model"],
        # Pushing the baseline asks whether it won: the candidate's gain fell short of the
        # given margin (0 without one).
        eval_config=comparison_eval_config(0.0 if pushes_baseline and gain is None else gain),
        example_splits=[layout.eval_split],
    ).with_id(BASELINE_COMPARISON)
    components.append(comparison)
    if gain is None and not pushes_baseline:
        return components + pushers()
    verdict = comparison.outputs["blessing"].future()[0].custom_property("blessed")
    with Cond(verdict == (0 if pushes_baseline else 1)):
        gated = pushers()
    return components + gated
