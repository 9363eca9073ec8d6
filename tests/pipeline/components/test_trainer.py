"""The pipeline's Trainer: TFX's, plus the split sizes StatisticsGen counted."""

from __future__ import annotations

import json

import pytest
from tensorflow_metadata.proto.v0 import path_pb2, statistics_pb2
from tfx import v1 as tfx
from tfx.types import artifact_utils, channel, standard_artifacts, standard_component_specs

from models.split_records import SPLIT_SIZES_KEY, SplitSize
from pipeline.components import trainer as trainer_lib


def _dataset(examples: int, label: tuple | str | None, missing: int = 0):
    """DatasetFeatureStatistics as StatisticsGen writes them: an int label's range, or a string
    label, or none."""
    dataset = statistics_pb2.DatasetFeatureStatistics(num_examples=examples)
    dataset.features.add(
        path=path_pb2.Path(step=["image"]), type=statistics_pb2.FeatureNameStatistics.BYTES
    )
    if label == "string":
        feature = dataset.features.add(path=path_pb2.Path(step=["label"]))
        feature.type = statistics_pb2.FeatureNameStatistics.STRING
        feature.string_stats.common_stats.num_non_missing = examples
    elif label is not None:
        feature = dataset.features.add(path=path_pb2.Path(step=["label"]))
        feature.type = statistics_pb2.FeatureNameStatistics.INT
        feature.num_stats.min, feature.num_stats.max = label
        feature.num_stats.common_stats.num_non_missing = examples - missing
        feature.num_stats.common_stats.num_missing = missing
    return dataset


@pytest.mark.parametrize(
    "dataset, size, unlabeled",
    [
        (_dataset(200, (0, 9)), SplitSize(200, 0, 9), 0),
        (_dataset(300, (-1, -1)), SplitSize(300, -1, -1), 300),
        (_dataset(50, (-1, 9)), SplitSize(50, -1, 9), None),  # some unlabeled: read them
        (_dataset(40, "string"), SplitSize(40), None),
        (_dataset(40, (0, 9), missing=3), SplitSize(40), None),  # a record without a label
        (_dataset(40, None), SplitSize(40), None),
    ],
)
def test_split_size_reads_the_count_and_a_label_range_that_settles_unlabeled(
    dataset, size, unlabeled
):
    assert trainer_lib.split_size(dataset) == size
    assert size.unlabeled() == unlabeled


def _statistics_artifact(tmp_path, datasets: dict) -> standard_artifacts.ExampleStatistics:
    artifact = standard_artifacts.ExampleStatistics()
    artifact.uri = str(tmp_path / "statistics")
    artifact.split_names = artifact_utils.encode_split_names(sorted(datasets))
    for split, dataset in datasets.items():
        folder = tmp_path / "statistics" / f"Split-{split}"
        folder.mkdir(parents=True)
        stats = statistics_pb2.DatasetFeatureStatisticsList(datasets=[dataset])
        (folder / "FeatureStats.pb").write_bytes(stats.SerializeToString())
    return artifact


def test_the_executor_hands_run_fn_every_splits_size_in_its_custom_config(tmp_path):
    artifact = _statistics_artifact(
        tmp_path,
        {
            "train": _dataset(200, (0, 9)),
            "test": _dataset(40, (0, 9)),
            "unlabeled": _dataset(300, (-1, -1)),
        },
    )
    key = standard_component_specs.CUSTOM_CONFIG_KEY
    props = {key: json.dumps({"trainer": "{}"}), "run_fn": "models.trainer.run_fn"}
    out = trainer_lib.with_split_sizes({"statistics": [artifact]}, props)
    custom = json.loads(out[key])
    assert custom["trainer"] == "{}" and out["run_fn"] == props["run_fn"]
    assert custom[SPLIT_SIZES_KEY] == {
        "train": {"examples": 200, "min_label": 0, "max_label": 9},
        "test": {"examples": 40, "min_label": 0, "max_label": 9},
        "unlabeled": {"examples": 300, "min_label": -1, "max_label": -1},
    }
    assert SPLIT_SIZES_KEY not in json.loads(props[key])  # the caller's copy is left alone
    assert trainer_lib.with_split_sizes({}, props) is props  # no statistics: nothing added


def test_the_component_is_tfx_trainer_with_the_statistics_input():
    """It builds its spec itself (TFX's Trainer.__init__ has no statistics input): everything
    else must come out as TFX's Trainer sets it."""
    kwargs = dict(
        run_fn="models.trainer.run_fn",
        examples=channel.Channel(type=standard_artifacts.Examples),
        transform_graph=channel.Channel(type=standard_artifacts.TransformGraph),
        schema=channel.Channel(type=standard_artifacts.Schema),
        base_model=channel.Channel(type=standard_artifacts.Model),
        train_args=tfx.proto.TrainArgs(splits=["train", "unlabeled"]),
        eval_args=tfx.proto.EvalArgs(splits=["test"]),
        custom_config={"trainer": "{}", "code_digest": "abc"},
    )
    stock = tfx.components.Trainer(**kwargs)
    statistics = channel.Channel(type=standard_artifacts.ExampleStatistics)
    ours = trainer_lib.Trainer(statistics=statistics, **kwargs)
    assert ours.exec_properties == stock.exec_properties
    assert set(ours.inputs) == set(stock.inputs) | {"statistics"}
    assert ours.inputs["statistics"] is statistics
    for name, value in stock.inputs.items():
        assert ours.inputs[name] is value, name
    assert {k: v.type for k, v in ours.outputs.items()} == {
        k: v.type for k, v in stock.outputs.items()
    }
    assert ours.executor_spec.executor_class is trainer_lib.Executor


def test_the_tfx_objects_it_imports_are_the_ones_tfx_v1_exposes():
    """The module imports them from their defining modules (`tfx.v1` also imports its Vertex
    AI extensions); a TFX release that moves one must fail here."""
    assert trainer_lib.Trainer.__bases__ == (tfx.components.Trainer,)
    assert trainer_lib.trainer_pb2.TrainArgs is tfx.proto.TrainArgs
    assert trainer_lib.trainer_pb2.EvalArgs is tfx.proto.EvalArgs
