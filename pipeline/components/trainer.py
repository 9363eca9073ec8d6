"""TFX's Trainer, also given StatisticsGen's output, so that a stage knows its split sizes.

Counting the records of a split at Trainer start reads every image (tens of GB from GCS on
ImageNet, again on every restart); StatisticsGen has already counted every split exactly. The
executor reads those counts (and the integer label range, which says whether a split holds
unlabeled records) and passes them to `run_fn` in `custom_config[SPLIT_SIZES_KEY]`: added
when the step runs, so the cache key and the compiled pipeline hold only the statistics
artifact, whose identity follows the data.
"""

from __future__ import annotations

import json
from typing import Any

from tfx.components.statistics_gen import stats_artifact_utils
from tfx.components.trainer import component as trainer_component
from tfx.components.trainer import executor as trainer_executor
from tfx.dsl.components.base import base_component, executor_spec
from tfx.proto import trainer_pb2
from tfx.types import artifact_utils, channel, standard_artifacts, standard_component_specs
from tfx.types.component_spec import ChannelParameter
from tfx.utils import json_utils

from models.split_records import SPLIT_SIZES_KEY, SplitSize
from transform.preprocessing import LABEL_KEY

STATISTICS_KEY = "statistics"


class TrainerSpec(standard_component_specs.TrainerSpec):
    INPUTS = {
        **standard_component_specs.TrainerSpec.INPUTS,
        STATISTICS_KEY: ChannelParameter(type=standard_artifacts.ExampleStatistics, optional=True),
    }


def split_size(statistics: Any) -> SplitSize:
    """One split's size from its DatasetFeatureStatistics, with the range of an integer label
    that no record lacks (otherwise the range is left unknown)."""
    low = high = None
    for feature in statistics.features:
        if list(feature.path.step) != [LABEL_KEY] or feature.WhichOneof("stats") != "num_stats":
            continue
        num = feature.num_stats
        if num.common_stats.num_missing == 0 and num.common_stats.num_non_missing:
            low, high = int(num.min), int(num.max)
    return SplitSize(int(statistics.num_examples), low, high)


def split_sizes(statistics: list[Any]) -> dict[str, SplitSize]:
    """Every split's size from a StatisticsGen output artifact."""
    sizes = {}
    for artifact in statistics:
        for split in artifact_utils.decode_split_names(artifact.split_names):
            stats = stats_artifact_utils.load_statistics(artifact, split).proto()
            if stats.datasets:
                sizes[split] = split_size(stats.datasets[0])
    return sizes


def with_split_sizes(
    input_dict: dict[str, list[Any]], exec_properties: dict[str, Any]
) -> dict[str, Any]:
    """`exec_properties` whose custom_config also holds the split sizes (a copy; unchanged
    without statistics)."""
    statistics = input_dict.get(STATISTICS_KEY)
    if not statistics:
        return exec_properties
    key = standard_component_specs.CUSTOM_CONFIG_KEY
    custom = json_utils.loads(exec_properties.get(key) or "null") or {}
    sizes = {split: vars(size) for split, size in split_sizes(statistics).items()}
    custom[SPLIT_SIZES_KEY] = sizes
    print("split sizes from the statistics: " + json.dumps(sizes), flush=True)
    return {**exec_properties, key: json_utils.dumps(custom)}


class Executor(trainer_executor.GenericExecutor):
    """TFX's Trainer executor, with the split sizes added to `run_fn`'s custom_config."""

    def Do(
        self,
        input_dict: dict[str, list[Any]],
        output_dict: dict[str, list[Any]],
        exec_properties: dict[str, Any],
    ) -> None:
        super().Do(input_dict, output_dict, with_split_sizes(input_dict, exec_properties))


class Trainer(trainer_component.Trainer):
    """`tfx.components.Trainer` with the generic executor's arguments this project uses, plus
    `statistics` (StatisticsGen's output on the same examples)."""

    SPEC_CLASS = TrainerSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(Executor)

    def __init__(
        self,
        *,
        run_fn: str,
        examples: channel.BaseChannel,
        transform_graph: channel.BaseChannel,
        schema: channel.BaseChannel,
        statistics: channel.BaseChannel | None = None,
        base_model: channel.BaseChannel | None = None,
        train_args: trainer_pb2.TrainArgs,
        eval_args: trainer_pb2.EvalArgs,
        custom_config: dict[str, Any],
    ):
        spec = TrainerSpec(
            examples=examples,
            transform_graph=transform_graph,
            schema=schema,
            base_model=base_model,
            statistics=statistics,
            train_args=train_args,
            eval_args=eval_args,
            module_file=None,
            run_fn=run_fn,
            custom_config=json_utils.dumps(custom_config),
            model=channel.Channel(type=standard_artifacts.Model),
            model_run=channel.Channel(type=standard_artifacts.ModelRun),
        )
        # TFX's Trainer.__init__ builds its own spec, without the statistics input.
        base_component.BaseComponent.__init__(self, spec=spec)
