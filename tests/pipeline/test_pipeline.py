"""The pipeline definition: what each component is handed, the gates, nothing read at compile."""

import functools
import json
import shutil

import pytest
import tensorflow as tf

from pipeline import configs
from pipeline import pipeline as pipeline_lib
from pipeline.components.tfrecord_example_gen import PoolImportExecutor


def _build(config, layout, tmp_path):
    return pipeline_lib.create_pipeline(
        config,
        layout,
        pipeline_root=str(tmp_path / "root"),
        metadata_path="",
        push_dir=str(tmp_path / "push"),
        beam_pipeline_args=[],
    )


def _layout(**kwargs):
    values = dict(
        data_dir="gs://bucket/tfrecords",
        data_format="tfrecord",
        splits=("train", "validation"),
        train_split="train",
        eval_split="validation",
    )
    return pipeline_lib.DataLayout(**{**values, **kwargs})


def test_labels_file_on_gcs_is_not_read_while_building(tmp_path, monkeypatch):
    def no_reads(*args, **kwargs):
        raise AssertionError(f"read while building the pipeline: {args}")

    monkeypatch.setattr(tf.io.gfile, "GFile", no_reads)
    config = configs.SimCLRConfig()
    config.data.labels_file = "gs://bucket/labels.txt"
    config.eval.min_top1 = 0.1
    built = _build(config, _layout(), tmp_path)
    [transform] = [c for c in built.components if c.id == "Transform"]
    custom = json.loads(transform.exec_properties["custom_config"])
    assert custom["labels_file"] == "gs://bucket/labels.txt" and "label_names" not in custom


def test_transform_computes_no_statistics_of_decoded_images(tmp_path):
    """StatisticsGen covers the raw examples; Transform's own TFDV passes over every image
    (before and after decoding) would be read by nothing."""
    built = _build(configs.SimCLRConfig(), _layout(), tmp_path)
    [transform] = [c for c in built.components if c.id == "Transform"]
    assert transform.exec_properties["disable_statistics"] == 1
    assert set(transform.outputs) == {
        "transform_graph",
        "transformed_examples",
        "updated_analyzer_cache",
    }


def test_each_trainer_is_handed_its_own_config_and_a_stable_checkpoint_root(tmp_path):
    config = configs.SimCLRConfig()
    built = _build(config, _layout(num_classes=10), tmp_path)
    trainers = {c.id: c for c in built.components if c.id.endswith("_trainer")}
    assert set(trainers) == {"pretrain_trainer", "finetune_trainer"}
    for stage in ("pretrain", "finetune"):
        custom = json.loads(trainers[f"{stage}_trainer"].exec_properties["custom_config"])
        assert set(custom) == {"trainer", "checkpoint_root", "code_digest"}
        assert custom["checkpoint_root"] == str(tmp_path / "root" / "checkpoints")
        assert custom["trainer"] == configs.trainer_config(config, stage).to_json()
        assert custom["code_digest"] == pipeline_lib.code_digest(("models", "transform"))


def _code_keys(tmp_path) -> dict[str, str]:
    """Each component's code digest, from the execution properties TFX caches on."""
    config = configs.SimCLRConfig()
    layout = _layout(num_classes=10, data_format="folders", data_dir=str(tmp_path / "images"))
    built = _build(config, layout, tmp_path)
    keys = {
        c.id: json.loads(c.exec_properties["custom_config"])["code_digest"]
        for c in built.components
        if c.id in ("Transform", "pretrain_trainer", "finetune_trainer")
    }
    # The class-folder ExampleGen carries its package's digest in its CustomConfig proto.
    [example_gen] = [c for c in built.components if c.id == "FileBasedExampleGen"]
    digest = pipeline_lib.code_digest(pipeline_lib.INGESTION_CODE)
    assert digest in example_gen.exec_properties["custom_config"]
    keys["FileBasedExampleGen"] = digest
    return keys


def test_an_edited_source_file_reruns_the_components_that_run_it(tmp_path, monkeypatch):
    """With caching on by default, code handed over by import path must be in the cache key: an
    edit under models/ re-runs the Trainers (not Transform), one under transform/ re-runs all."""
    source = tmp_path / "source"
    for package in ("models", "transform", "pipeline"):
        shutil.copytree(
            pipeline_lib.REPO_ROOT / package,
            source / package,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    monkeypatch.setattr(pipeline_lib, "REPO_ROOT", source)
    before = _code_keys(tmp_path)
    assert before["pretrain_trainer"] == before["finetune_trainer"] != before["Transform"]
    # Files outside the packages the components run do not count.
    (source / "pipeline" / "runner" / "report.py").write_text("# edited\n", "utf-8")
    assert _code_keys(tmp_path) == before
    # An edit of the ingestion code re-runs ExampleGen (and, with new examples, all after it).
    with open(source / "pipeline" / "components" / "image_example_gen" / "executor.py", "a") as f:
        f.write("\n# decode differently\n")
    ingestion = _code_keys(tmp_path)
    assert ingestion["FileBasedExampleGen"] != before["FileBasedExampleGen"]
    assert ingestion["Transform"] == before["Transform"]
    before = ingestion
    with open(source / "models" / "loss.py", "a") as f:
        f.write("\nTEMPERATURE_FLOOR = 1e-3\n")
    edited = _code_keys(tmp_path)
    assert edited["Transform"] == before["Transform"]
    assert edited["pretrain_trainer"] != before["pretrain_trainer"]
    # Recursively: a new module in a sub-package counts too.
    (source / "models" / "tasks" / "extra.py").write_text("X = 1\n")
    added = _code_keys(tmp_path)
    assert added["pretrain_trainer"] not in (edited["pretrain_trainer"], before["pretrain_trainer"])
    with open(source / "transform" / "preprocessing.py", "a") as f:
        f.write("\n# resize differently\n")
    transform_edited = _code_keys(tmp_path)
    assert transform_edited["Transform"] != before["Transform"]
    assert transform_edited["pretrain_trainer"] != added["pretrain_trainer"]


@pytest.mark.parametrize(
    "min_top1, classes, dataset, floor",
    [
        (-1.0, 10, "folder", 0.2),
        (-1.0, 2, "folder", 0.75),
        (0.35, 10, "folder", 0.35),
        (-1.0, None, "imagenet2012", 0.002),
    ],
)
def test_top1_floor(min_top1, classes, dataset, floor):
    config = configs.SimCLRConfig()
    config.eval.min_top1, config.data.dataset = min_top1, dataset
    assert pipeline_lib.min_top1(config, classes) == pytest.approx(floor)
    gate = pipeline_lib.eval_config(config, floor).metrics_specs[0].metrics[1]
    bound = gate.per_slice_thresholds[0].threshold.value_threshold.lower_bound.value
    assert bound == pytest.approx(floor)


def test_unknown_class_count_needs_an_explicit_floor():
    config = configs.SimCLRConfig()
    config.data.dataset = "folder"
    with pytest.raises(ValueError, match="^--min_top1: the number of classes is unknown"):
        pipeline_lib.min_top1(config, None)


# ----- the unlabeled pool -----


def _tfrecords(root, splits: dict[str, list[int | None]]):
    """STL-10's TFDS layout: `stl10-<split>.tfrecord-...` files; None writes no label at all."""
    root.mkdir(parents=True, exist_ok=True)
    for split, labels in splits.items():
        path = root / f"stl10-{split}.tfrecord-00000-of-00001"
        with tf.io.TFRecordWriter(str(path)) as writer:
            for label in labels:
                feature = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x"]))}
                if label is not None:
                    feature["label"] = tf.train.Feature(
                        int64_list=tf.train.Int64List(value=[label])
                    )
                example = tf.train.Example(features=tf.train.Features(feature=feature))
                writer.write(example.SerializeToString())
    return root


def test_stl10_layout_ingests_unlabelled_as_the_unlabeled_split(tmp_path):
    data = _tfrecords(
        tmp_path / "stl10", {"train": [0, 1], "test": [1, 0], "unlabelled": [-1, -1, -1]}
    )
    layout = pipeline_lib.inspect_data(str(data), "auto", "train", "")
    assert (layout.data_format, layout.splits, layout.unlabeled) == (
        "tfrecord",
        ("test", "train"),
        "unlabelled",
    )
    config = configs.SimCLRConfig()
    config.data.data_dir = str(data)
    config.distill.distill = True
    config.eval.min_top1 = 0.1
    built = {c.id: c for c in _build(config, layout, tmp_path).components}
    example_gen = json.loads(built["ImportExampleGen"].exec_properties["input_config"])
    assert {"name": "unlabeled", "pattern": "*-unlabelled.tfrecord*"} in example_gen["splits"]
    # Statistics, schema and validation see every split; the vocabulary only labeled train.
    for component in ("StatisticsGen", "SchemaGen", "ExampleValidator"):
        assert json.loads(built[component].exec_properties["exclude_splits"]) == []
    splits = json.loads(built["Transform"].exec_properties["splits_config"])
    assert splits == {"analyze": ["train"], "transform": ["train", "test", "unlabeled"]}
    read = {
        stage: json.loads(built[f"{stage}_trainer"].exec_properties["train_args"])["splits"]
        for stage in ("pretrain", "finetune", "distill")
    }
    assert read == {
        "pretrain": ["train", "unlabeled"],
        "finetune": ["train"],
        "distill": ["train", "unlabeled"],
    }
    assert json.loads(built["Evaluator"].exec_properties["example_splits"]) == ["test"]


def test_a_tfrecord_pool_is_imported_by_the_executor_that_labels_it(tmp_path):
    data = _tfrecords(tmp_path / "d", {"train": [0, 1], "test": [0], "unlabeled": [None, -1]})
    layout = pipeline_lib.inspect_data(str(data), "auto", "train", "")
    config = configs.SimCLRConfig()
    config.eval.min_top1 = 0.1
    built = {c.id: c for c in _build(config, layout, tmp_path).components}
    example_gen = built["ImportExampleGen"]
    assert example_gen.executor_spec.executor_class is PoolImportExecutor
    splits = json.loads(example_gen.exec_properties["input_config"])["splits"]
    assert splits[-1] == {"name": "unlabeled", "pattern": "*-unlabeled.tfrecord*"}
    # Without a pool the stock component imports the records untouched.
    plain = _tfrecords(tmp_path / "plain", {"train": [0], "test": [0]})
    layout = pipeline_lib.inspect_data(str(plain), "auto", "train", "")
    [component] = [c for c in _build(config, layout, tmp_path).components if "ExampleGen" in c.id]
    assert component.id == "ImportExampleGen"
    assert component.executor_spec.executor_class is not PoolImportExecutor


def test_a_train_split_without_labels_beside_a_pool_is_refused(tmp_path):
    data = _tfrecords(
        tmp_path / "d", {"train": [None], "validation": [0], "test": [0], "unlabelled": [-1]}
    )
    with pytest.raises(ValueError, match="split 'train' has no labels"):
        pipeline_lib.inspect_data(str(data), "auto", "train", "")


@pytest.mark.parametrize("layout", ["folders", "tfrecord"])
def test_labels_only_in_the_eval_split_are_refused_in_one_line(tmp_path, layout):
    if layout == "tfrecord":
        # A 'train' split of label -1 records is no labeled train split.
        data = _tfrecords(tmp_path / "d", {"train": [-1], "test": [0], "unlabelled": [-1]})
    else:
        data = tmp_path / "d"
        for folder in ("test/cat", "unlabeled/more"):
            (data / folder).mkdir(parents=True)
            (data / folder / "a.png").write_bytes(b"x")
    with pytest.raises(ValueError) as error:
        pipeline_lib.inspect_data(str(data), "auto", "train", "")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("--train_split: the only labeled images are the eval split 'test'")


def test_unlabeled_dir_beside_an_unlabeled_folder_is_refused(tmp_path):
    data = tmp_path / "d"
    for folder in ("train/cat", "test/cat", "unlabeled/x"):
        (data / folder).mkdir(parents=True)
        (data / folder / "a.png").write_bytes(b"x")
    pool = tmp_path / "pool"
    pool.mkdir()
    with pytest.raises(ValueError, match="--unlabeled_dir: .* has an unlabeled/ folder too"):
        pipeline_lib.inspect_data(str(data), "auto", "train", "", unlabeled_dir=str(pool))
    layout = pipeline_lib.inspect_data(str(data), "auto", "train", "")
    assert (layout.splits, layout.unlabeled, layout.num_classes) == (
        ("test", "train"),
        "unlabeled",
        1,
    )


def test_warm_start_resolves_the_pretraining_trainers_model_only(tmp_path):
    """--warm_start feeds the pretraining Trainer the newest Model *that Trainer* produced: the
    compiled (local) resolver queries by producer node and output key, not by type alone, which
    would also see fine-tuned models."""
    from tfx.dsl.compiler import compiler

    config = configs.SimCLRConfig()
    config.pretrain.warm_start = True
    built = _build(config, _layout(num_classes=10), tmp_path)
    ids = [c.id for c in built.components]
    assert ids.index("warm_start_model_resolver") < ids.index("pretrain_trainer")
    ir = compiler.Compiler().compile(built)
    nodes = {n.pipeline_node.node_info.id: n.pipeline_node for n in ir.nodes}
    [channel] = nodes["warm_start_model_resolver"].inputs.inputs["_pretrain_trainer.model"].channels
    contexts = {q.type.name: q.name.field_value.string_value for q in channel.context_queries}
    # Across runs of this pipeline (no pipeline_run filter), from the pretraining node only.
    assert contexts == {"pipeline": "simclr", "node": "simclr.pretrain_trainer"}
    assert channel.output_key == "model" and channel.artifact_query.type.name == "Model"
    base = nodes["pretrain_trainer"].inputs.inputs["base_model"].channels
    assert [c.producer_node_query.id for c in base] == ["warm_start_model_resolver"]
    # Without the flag there is no such input; with a URI resolved by the runner it is imported.
    plain = _build(configs.SimCLRConfig(), _layout(num_classes=10), tmp_path)
    assert "warm_start_model_resolver" not in [c.id for c in plain.components]
    imported = pipeline_lib.create_pipeline(
        config,
        _layout(num_classes=10),
        pipeline_root=str(tmp_path / "root"),
        metadata_path="",
        push_dir=str(tmp_path / "push"),
        beam_pipeline_args=[],
        warm_start_model="gs://bucket/pretrain/model/7",
    )
    [importer] = [c for c in imported.components if c.id == "warm_start_importer"]
    assert importer.exec_properties["artifact_uri"] == "gs://bucket/pretrain/model/7"


def test_the_warm_start_resolver_gives_the_newest_model_or_none():
    """The first --warm_start run has no earlier model: no base model, and no resolver error."""
    from tfx.types import standard_artifacts

    def model(artifact_id):
        artifact = standard_artifacts.Model()
        artifact.id = artifact_id
        return artifact

    strategy = pipeline_lib.NewestArtifact()
    assert strategy.resolve_artifacts(None, {"model": []}) == {"model": []}
    [newest] = strategy.resolve_artifacts(None, {"model": [model(3), model(9), model(5)]})["model"]
    assert newest.id == 9


def _by_id(built) -> dict:
    return {c.id: c for c in built.components}


def _input_producer(component, key: str) -> str:
    return component.inputs[key].producer_component_id


def test_a_baseline_is_compared_by_a_second_evaluation_that_writes_no_model_blessing(tmp_path):
    """--baseline=supervised: its own Trainer on the labeled split, a TFMA comparison of the
    candidate with it, and still one ModelBlessing (the Evaluator's), which the Pusher reads."""
    from pipeline.components.baseline_comparison import BaselineComparisonResult

    config = configs.build_config({"baseline": "supervised"})
    built = _build(config, _layout(num_classes=10, unlabeled="unlabelled"), tmp_path)
    nodes = _by_id(built)
    baseline = nodes["baseline_trainer"]
    assert json.loads(baseline.exec_properties["train_args"])["splits"] == ["train"]
    trainer = json.loads(json.loads(baseline.exec_properties["custom_config"])["trainer"])
    assert [m["stage"] for m in trainer["matched"]] == ["pretrain", "finetune"]
    assert "base_model" not in baseline.inputs  # random initialization
    comparison = nodes["baseline_comparison"]
    assert _input_producer(comparison, "model") == "finetune_trainer"
    assert _input_producer(comparison, "baseline_model") == "baseline_trainer"
    assert comparison.outputs["blessing"].type is BaselineComparisonResult
    blessings = [
        c.id
        for c in built.components
        for channel in c.outputs.values()
        if channel.type_name == "ModelBlessing" and not c.id.endswith("_resolver")
    ]
    assert blessings == ["Evaluator"]
    assert _input_producer(nodes["Evaluator"], "model") == "finetune_trainer"
    assert _input_producer(nodes["Pusher"], "model_blessing") == "Evaluator"
    # Ungated: no thresholds, and the Pusher outside any condition.
    [spec] = _eval_config(comparison).metrics_specs
    assert not any(m.threshold.ByteSize() or m.per_slice_thresholds for m in spec.metrics)
    assert not _conditions(built, nodes["Pusher"])


def _eval_config(component):
    import tensorflow_model_analysis as tfma
    from google.protobuf import json_format

    return json_format.Parse(component.exec_properties["eval_config"], tfma.EvalConfig())


def _conditions(built, component) -> list:
    contexts = built.dsl_context_registry.get_contexts(component)
    return [c for c in contexts if type(c).__name__ == "CondContext"]


@pytest.mark.parametrize("push, blessed_value", [("candidate", 1), ("baseline", 0)])
def test_the_gain_gate_holds_the_pusher_in_a_cond(tmp_path, push, blessed_value):
    config = configs.build_config(
        {"baseline": "supervised", "min_gain_over_baseline": 0.05, "push": push}
    )
    built = _build(config, _layout(num_classes=10), tmp_path)
    nodes = _by_id(built)
    pushed_by = "baseline_trainer" if push == "baseline" else "finetune_trainer"
    assert _input_producer(nodes["Pusher"], "model") == pushed_by
    assert _input_producer(nodes["Evaluator"], "model") == pushed_by  # gates judge what's pushed
    [cond] = _conditions(built, nodes["Pusher"])
    predicate = str(cond.predicate.encode())
    assert "baseline_comparison" in predicate and "blessed" in predicate
    assert f"int_value: {blessed_value}" in predicate
    [spec] = _eval_config(nodes["baseline_comparison"]).metrics_specs
    [top1] = [m for m in spec.metrics if m.class_name == "SparseCategoricalAccuracy"]
    [gate] = top1.per_slice_thresholds
    assert gate.threshold.change_threshold.absolute.value == pytest.approx(0.05)


# Where tfx.v1 exposes each TFX object pipeline.py uses, and the name pipeline.py binds it to.
# pipeline.py imports them from their defining modules: `tfx.v1` also imports its Vertex AI
# extensions, seconds of start-up a local run never needs.
V1_NAMES = {
    "components.Evaluator": "Evaluator",
    "components.ExampleValidator": "ExampleValidator",
    "components.ImportExampleGen": "ImportExampleGen",
    "components.Pusher": "Pusher",
    "components.SchemaGen": "SchemaGen",
    "components.StatisticsGen": "StatisticsGen",
    "components.Transform": "Transform",
    "dsl.Channel": "Channel",
    "dsl.Cond": "Cond",
    "dsl.Importer": "Importer",
    "dsl.Pipeline": "Pipeline",
    "dsl.Resolver": "Resolver",
    "dsl.experimental.LatestBlessedModelStrategy": "LatestBlessedModelStrategy",
    "dsl.experimental.ResolverStrategy": "ResolverStrategy",
    "orchestration.metadata.sqlite_metadata_connection_config": (
        "sqlite_metadata_connection_config"
    ),
    "proto.EvalArgs": "trainer_pb2.EvalArgs",
    "proto.Input": "example_gen_pb2.Input",
    "proto.PushDestination": "pusher_pb2.PushDestination",
    "proto.SplitsConfig": "transform_pb2.SplitsConfig",
    "proto.TrainArgs": "trainer_pb2.TrainArgs",
    "types.standard_artifacts.Model": "standard_artifacts.Model",
    "types.standard_artifacts.ModelBlessing": "standard_artifacts.ModelBlessing",
}


def _attribute(root, dotted: str):
    return functools.reduce(getattr, dotted.split("."), root)


@pytest.mark.parametrize("v1_name, name", sorted(V1_NAMES.items()))
def test_each_tfx_object_is_the_one_tfx_v1_exposes(v1_name, name):
    from tfx import v1

    assert _attribute(pipeline_lib, name) is _attribute(v1, v1_name)
