"""ImportExampleGen for TFDS-style TFRecords whose unlabeled pool may lack a `label` feature.

The stock components need every split to carry `label`: SchemaGen relaxes (or, for a split
without any, deprecates) a feature some split lacks, and Transform then cannot parse it. TFDS
stores STL-10's `unlabelled` split with label -1; a pool written without the feature gets the
same -1 here, on the split named `unlabeled` only, so a labeled split that lost its labels still
fails loudly downstream instead of turning silently unlabeled.
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam
import tensorflow as tf
from tfx.components import ImportExampleGen
from tfx.components.example_gen.import_example_gen import executor as import_executor
from tfx.dsl.components.base import executor_spec
from tfx.proto import example_gen_pb2
from tfx.types import standard_component_specs
from tfx.utils import proto_utils

from models.config import UNLABELED_SPLIT

# The id runners, reports and tests know the TFRecord ExampleGen by (the stock one's).
COMPONENT_ID = "ImportExampleGen"
UNLABELED_LABEL = -1


def with_label(example: tf.train.Example) -> tf.train.Example:
    """`example`, with label -1 added when it has no `label` feature."""
    if "label" in example.features.feature:
        return example
    labeled = tf.train.Example()
    labeled.CopyFrom(example)
    labeled.features.feature["label"].int64_list.value.append(UNLABELED_LABEL)
    return labeled


def _pool_pattern(exec_properties: dict[str, Any]) -> str | None:
    input_config = example_gen_pb2.Input()
    proto_utils.json_to_proto(
        exec_properties[standard_component_specs.INPUT_CONFIG_KEY], input_config
    )
    return next((s.pattern for s in input_config.splits if s.name == UNLABELED_SPLIT), None)


class PoolImportExecutor(import_executor.Executor):
    """The stock import, then label -1 for the pool's records that carry no label."""

    def GetInputSourceToExamplePTransform(self) -> beam.PTransform:
        stock = super().GetInputSourceToExamplePTransform()

        @beam.ptransform_fn
        @beam.typehints.with_input_types(beam.Pipeline)
        def ImportWithPoolLabels(  # noqa: N802 - a Beam PTransform name
            pipeline: beam.Pipeline, exec_properties: dict[str, Any], split_pattern: str
        ) -> beam.pvalue.PCollection:
            records = pipeline | "Import" >> stock(exec_properties, split_pattern)
            if split_pattern != _pool_pattern(exec_properties):
                return records
            return records | "LabelMinusOne" >> beam.Map(with_label)

        return ImportWithPoolLabels


class PoolImportExampleGen(ImportExampleGen):
    """ImportExampleGen (tf.Example records) running `PoolImportExecutor`."""

    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(PoolImportExecutor)


def make_tfrecord_example_gen(input_base: str, input_config: example_gen_pb2.Input):
    return PoolImportExampleGen(input_base=input_base, input_config=input_config).with_id(
        COMPONENT_ID
    )
