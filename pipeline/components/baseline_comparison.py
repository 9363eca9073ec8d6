"""Candidate vs. supervised baseline: TFX's Evaluator, with a result that is not a blessing.

The supervised baseline (same architecture from random init, trained on the same labelled
examples as fine-tuning) tells whether pretraining paid off. TFMA compares two models natively
(a baseline ModelSpec, `*_diff` metrics, change thresholds), so the comparison runs the stock
Evaluator executor unchanged. Its output must not be a `ModelBlessing`, though: TFX's
LatestBlessedModelStrategy takes any blessed ModelBlessing whose `current_model_id` is the
model, so a second blessing of the candidate would make the regression gate of the next run
compare against the wrong model (and a failed comparison would not stop the Pusher anyway).
The component therefore declares its own output type, `BaselineComparisonResult`, on which the
executor sets the same custom properties ('blessed', model ids/URIs) and BLESSED/NOT_BLESSED
file as on a blessing. Nothing in TFX resolves ModelEvaluation, so that output type is kept.
"""

from __future__ import annotations

import dataclasses
import math
import os

import tensorflow as tf
import tensorflow_model_analysis as tfma
from tfx import types
from tfx.components.evaluator import constants as evaluator_constants
from tfx.components.evaluator import executor as evaluator_executor
from tfx.dsl.components.base import base_beam_component, executor_spec
from tfx.types import standard_artifacts
from tfx.types import standard_component_specs as keys
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter
from tfx.utils import json_utils

from pipeline.names import BASELINE_COMPARISON_RESULT, TOP1, TOP5

EXAMPLE_COUNT = "example_count"
LABEL_KEY = "label"


class BaselineComparisonResult(types.Artifact):
    """Whether the candidate beat the supervised baseline by the required margin.

    Carries the Evaluator's 'blessed' custom property and BLESSED/NOT_BLESSED file when a
    minimum gain is configured, and nothing when the comparison is ungated.
    """

    TYPE_NAME = BASELINE_COMPARISON_RESULT


class BaselineComparisonSpec(ComponentSpec):
    """The Evaluator's spec, less the options this comparison does not use; both models are
    required, and the blessing output has the comparison's own type."""

    PARAMETERS = {
        keys.EVAL_CONFIG_KEY: ExecutionParameter(type=tfma.EvalConfig),
        keys.EXAMPLE_SPLITS_KEY: ExecutionParameter(type=str, optional=True),
    }
    INPUTS = {
        keys.EXAMPLES_KEY: ChannelParameter(type=standard_artifacts.Examples),
        keys.MODEL_KEY: ChannelParameter(type=standard_artifacts.Model),
        keys.BASELINE_MODEL_KEY: ChannelParameter(type=standard_artifacts.Model),
    }
    OUTPUTS = {
        keys.EVALUATION_KEY: ChannelParameter(type=standard_artifacts.ModelEvaluation),
        keys.BLESSING_KEY: ChannelParameter(type=BaselineComparisonResult),
    }


class BaselineComparison(base_beam_component.BaseBeamComponent):
    """Evaluates `model` against `baseline_model` on the same examples with TFMA.

    Outputs `evaluation` (ModelEvaluation: candidate and baseline metrics, their diffs, per
    slice) and `blessing` (BaselineComparisonResult, never a ModelBlessing). The Evaluator's
    constructor hard-codes its spec and a ModelBlessing channel, so this subclasses the Beam
    component base with the Evaluator's executor rather than the Evaluator itself.
    """

    SPEC_CLASS = BaselineComparisonSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(evaluator_executor.Executor)

    def __init__(
        self,
        examples: types.BaseChannel,
        model: types.BaseChannel,
        baseline_model: types.BaseChannel,
        eval_config: tfma.EvalConfig,
        example_splits: list[str] | None = None,
    ):
        spec = BaselineComparisonSpec(
            examples=examples,
            model=model,
            baseline_model=baseline_model,
            eval_config=eval_config,
            example_splits=json_utils.dumps(example_splits),
            evaluation=types.Channel(type=standard_artifacts.ModelEvaluation),
            blessing=types.Channel(type=BaselineComparisonResult),
        )
        super().__init__(spec=spec)


def comparison_eval_config(
    min_gain: float | None, confidence_intervals: bool = True
) -> tfma.EvalConfig:
    """TFMA config for candidate vs. baseline on raw examples through `serving_default`.

    One unnamed ModelSpec: given a baseline model, the Evaluator's executor copies it into
    `candidate` and `baseline` (is_baseline) specs (tfma.utils.update_eval_config_with_defaults),
    and TFMA then adds each candidate metric's `*_diff`. With `min_gain`, the candidate's
    overall top-1 must exceed the baseline's by at least `min_gain` (absolute); without it no
    threshold is set, so the comparison is reported and never fails. Jackknife confidence
    intervals give the diffs an error bar (the value itself stays the unsampled one).
    """
    top1 = tfma.MetricConfig(class_name="SparseCategoricalAccuracy")
    if min_gain is not None:
        if not math.isfinite(min_gain):
            raise ValueError(f"minimum gain over the baseline must be a finite number: {min_gain}")
        top1.per_slice_thresholds.append(
            tfma.PerSliceMetricThreshold(
                slicing_specs=[tfma.SlicingSpec()],
                threshold=tfma.MetricThreshold(
                    change_threshold=tfma.GenericChangeThreshold(
                        direction=tfma.MetricDirection.HIGHER_IS_BETTER,
                        absolute={"value": min_gain},
                    )
                ),
            )
        )
    config = tfma.EvalConfig(
        model_specs=[
            tfma.ModelSpec(
                signature_name="serving_default",
                label_key=LABEL_KEY,
                prediction_key="probabilities",
            )
        ],
        slicing_specs=[tfma.SlicingSpec(), tfma.SlicingSpec(feature_keys=[LABEL_KEY])],
        metrics_specs=[
            tfma.MetricsSpec(
                metrics=[
                    tfma.MetricConfig(class_name="ExampleCount"),
                    top1,
                    tfma.MetricConfig(
                        class_name="SparseTopKCategoricalAccuracy", config='{"k": 5}'
                    ),
                ]
            )
        ],
    )
    if confidence_intervals:
        config.options.compute_confidence_intervals.value = True
        config.options.confidence_intervals.method = tfma.ConfidenceIntervalOptions.JACKKNIFE
    return config


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Candidate vs. baseline on the evaluation examples, as plain numbers.

    Gains are TFMA's `*_diff` metrics (candidate minus baseline); `*_ci` are their confidence
    bounds (lower, upper) where intervals were computed, else None. Per-class maps go from the
    label value to top-1 on the examples of that label. `gate_passed` is None when no minimum
    gain was configured; `gate_message` says in one line why it failed ('' otherwise).
    `interval_note` is TFMA's reason when it computed no interval for the overall slice although
    intervals were asked for ('' otherwise).
    """

    examples: int
    candidate_top1: float
    candidate_top5: float
    baseline_top1: float
    baseline_top5: float
    top1_gain: float
    top5_gain: float
    top1_gain_ci: tuple[float, float] | None
    top5_gain_ci: tuple[float, float] | None
    candidate_top1_by_class: dict[int, float]
    baseline_top1_by_class: dict[int, float]
    min_gain: float | None
    gate_passed: bool | None
    gate_message: str
    interval_note: str = ""


def _metric_value(value) -> float:
    """A MetricValue proto as a float (double or, from older writers, bounded)."""
    kind = value.WhichOneof("type")
    if kind == "double_value":
        return value.double_value.value
    if kind == "bounded_value":
        return value.bounded_value.value.value
    raise ValueError(f"evaluation: metric value of unexpected kind {kind!r}")


def _slice_label(slice_key) -> int | None | str:
    """None for the overall slice, the label for a `label:<id>` slice, '' for any other."""
    columns = list(slice_key.single_slice_keys)
    if not columns:
        return None
    if len(columns) == 1 and columns[0].column == LABEL_KEY:
        single = columns[0]
        kind = single.WhichOneof("kind")
        if kind == "int64_value":
            return int(single.int64_value)
        if kind == "bytes_value":
            return int(single.bytes_value)
        if kind == "float_value":
            return int(single.float_value)
    return ""


def _read_metrics(records) -> tuple[dict, dict]:
    """From TFMA's MetricsForSlice records: ({slice (None|label): {(name, model, is_diff):
    (value, ci | None)}}, {slice: TFMA's note}).

    TFMA adds a text metric, `__ERROR__`, to a slice whose bootstrap samples it could not all
    fill (a slice of a few examples leaves some samples empty): that slice's values stand
    without intervals, and the note says why.
    """
    sliced: dict = {}
    notes: dict = {}
    for record in records:
        if record.HasField("cross_slice_key"):
            continue
        label = _slice_label(record.slice_key)
        if label == "":
            continue
        metrics = sliced.setdefault(label, {})
        for item in record.metric_keys_and_values:
            if item.key.name == tfma.constants.ERROR_METRIC_NAME:
                notes[label] = item.value.bytes_value.decode("utf-8", "replace")
                continue
            key = (item.key.name, item.key.model_name, item.key.is_diff)
            ci = None
            if item.HasField("confidence_interval"):
                interval = item.confidence_interval
                ci = (_metric_value(interval.lower_bound), _metric_value(interval.upper_bound))
            metrics[key] = (_metric_value(item.value), ci)
    return sliced, notes


def _blessing_uri(blessing: str | types.Artifact | None) -> str | None:
    if blessing is None or isinstance(blessing, str):
        return blessing
    return blessing.uri


def _configured_min_gain(evaluation_uri: str) -> float | None:
    """The overall top-1 change threshold in the config TFMA wrote with the results."""
    config = tfma.load_eval_result(evaluation_uri, model_name=tfma.CANDIDATE_KEY).config
    for spec in config.metrics_specs:
        for metric in spec.metrics:
            if metric.class_name != "SparseCategoricalAccuracy":
                continue
            for per_slice in metric.per_slice_thresholds:
                threshold = per_slice.threshold
                if threshold.HasField("change_threshold"):
                    return threshold.change_threshold.absolute.value
    return None


def read_comparison(
    evaluation_uri: str, blessing: str | types.Artifact | None = None
) -> Comparison:
    """Reads a BaselineComparison's `evaluation` (and `blessing`) outputs.

    Works with and without confidence intervals (TFMA then stores the unsampled value plus
    bounds). The gate's verdict is the executor's BLESSED/NOT_BLESSED file where a `blessing`
    URI or artifact is given, else TFMA's validation result; either way it is None when the
    config set no minimum gain.
    """
    sliced, notes = _read_metrics(tfma.load_metrics(evaluation_uri))
    if None not in sliced:
        raise ValueError(f"evaluation {evaluation_uri}: no overall slice in the TFMA metrics")
    overall = sliced[None]

    def get(metrics, name: str, model: str, diff: bool = False):
        try:
            return metrics[(name, model, diff)]
        except KeyError:
            what = f"{name}{'_diff' if diff else ''} of the {model} model"
            raise ValueError(
                f"evaluation {evaluation_uri}: no {what}; was it a candidate vs. baseline run?"
            ) from None

    candidate, baseline = tfma.CANDIDATE_KEY, tfma.BASELINE_KEY
    top1_gain, top1_ci = get(overall, TOP1, candidate, True)
    top5_gain, top5_ci = get(overall, TOP5, candidate, True)
    by_class = {label: m for label, m in sliced.items() if label is not None}

    min_gain = _configured_min_gain(evaluation_uri)
    gate_passed = None
    message = ""
    if min_gain is not None:
        uri = _blessing_uri(blessing)
        if uri is not None:
            if tf.io.gfile.exists(os.path.join(uri, evaluator_constants.BLESSED_FILE_NAME)):
                gate_passed = True
            elif tf.io.gfile.exists(os.path.join(uri, evaluator_constants.NOT_BLESSED_FILE_NAME)):
                gate_passed = False
            else:
                raise ValueError(f"comparison result {uri}: neither BLESSED nor NOT_BLESSED")
        else:
            gate_passed = tfma.load_validation_result(evaluation_uri).validation_ok
        if not gate_passed:
            cand = get(overall, TOP1, candidate)[0]
            base = get(overall, TOP1, baseline)[0]
            side = "above" if top1_gain >= 0 else "below"
            message = (
                f"candidate top-1 {cand:.4f} is {abs(top1_gain):.4f} {side} the baseline's "
                f"{base:.4f}; the required minimum gain is {min_gain:.4f}"
            )
    return Comparison(
        examples=int(get(overall, EXAMPLE_COUNT, candidate)[0]),
        candidate_top1=get(overall, TOP1, candidate)[0],
        candidate_top5=get(overall, TOP5, candidate)[0],
        baseline_top1=get(overall, TOP1, baseline)[0],
        baseline_top5=get(overall, TOP5, baseline)[0],
        top1_gain=top1_gain,
        top5_gain=top5_gain,
        top1_gain_ci=top1_ci,
        top5_gain_ci=top5_ci,
        candidate_top1_by_class={
            k: get(m, TOP1, candidate)[0] for k, m in sorted(by_class.items())
        },
        baseline_top1_by_class={k: get(m, TOP1, baseline)[0] for k, m in sorted(by_class.items())},
        min_gain=min_gain,
        gate_passed=gate_passed,
        gate_message=message,
        interval_note=notes.get(None, ""),
    )
