"""What a finished run produced, read back from ML Metadata and the TFMA output.

The runners print it; tests assert on it. Reading from MLMD (not from paths we guess) means the
summary is about the run that just happened, including cached or skipped components.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import ml_metadata as mlmd
import tensorflow as tf
import tensorflow_model_analysis as tfma
from ml_metadata.proto import metadata_store_pb2

from models.tasks import registry
from pipeline.components.baseline_comparison import Comparison, read_comparison
from pipeline.names import (
    BASELINE_COMPARISON,
    BASELINE_COMPARISON_RESULT,
    IMAGE_REPORT_FILE,
    RESULTS_FILE,
    TOP1,
    TOP5,
    stage_of,
)


@dataclass
class RunSummary:
    run_id: str
    components: list[str] = field(default_factory=list)
    top1: float | None = None
    top5: float | None = None
    example_count: float | None = None
    baseline_top1: float | None = None
    blessed: bool | None = None
    failures: list[str] = field(default_factory=list)
    pushed: bool = False
    pushed_destination: str | None = None
    evaluation_uri: str | None = None
    model_run_uris: dict[str, str] = field(default_factory=dict)
    model_uris: dict[str, str] = field(default_factory=dict)
    examples_uri: str | None = None
    statistics_uri: str | None = None
    anomalies_uri: str | None = None
    transform_graph_uri: str | None = None
    per_label_top1: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    ingestion: dict[str, dict] = field(default_factory=dict)
    # Components this run took from the cache instead of executing.
    cached: list[str] = field(default_factory=list)
    # The protocol behind the evaluated model's accuracy (linear_eval, fine_tune, ...).
    protocol: str | None = None
    # Each Trainer's compute dtype (--mixed_precision as resolved for it), by node name.
    precision: dict[str, str] = field(default_factory=dict)
    # Each executed Trainer's phase seconds (its results.json), by node name.
    trainer_phases: dict[str, dict[str, float]] = field(default_factory=dict)
    # The pretrained model a --warm_start pretraining started from (its results.json).
    warm_start_from: str | None = None
    # Split -> the Trainer stages and Evaluator of this run that read it (their exec properties).
    split_readers: dict[str, list[str]] = field(default_factory=dict)
    # Each stage's results.json (steps, metrics, phase seconds), executed or cached.
    stage_results: dict[str, dict] = field(default_factory=dict)
    # The second evaluation: the candidate against the supervised baseline (--baseline).
    # The model the Evaluator judged (its blessing's current model).
    evaluated_model_uri: str | None = None
    # The last blessed model the no-regression gate compared it with (None on a first run).
    regression_baseline_uri: str | None = None
    comparison_uri: str | None = None
    comparison_result_uri: str | None = None
    comparison: Comparison | None = None

    def training_seconds(self) -> float:
        """Seconds spent in training steps: every Trainer's `train` phase (all steps but the
        first, which its `trace` phase holds together with the tracing)."""
        return sum(phases.get("train", 0.0) for phases in self.trainer_phases.values())

    def time_lines(self, wall_seconds: float) -> list[str]:
        """Where a run's wall time went: training steps against everything else."""
        training = self.training_seconds()
        components = sum(self.seconds.values())
        out = [
            f"time: {wall_seconds:.0f} s in all; training steps {training:.0f} s; everything "
            f"else (non-training overhead) {wall_seconds - training:.0f} s"
        ]
        for node, phases in self.trainer_phases.items():
            rest = ", ".join(
                f"{name} {secs:.1f}"
                for name, secs in phases.items()
                if name not in ("train", "total")
            )
            total = self.seconds.get(node, phases.get("total", 0.0))
            out.append(
                f"  {node}: {total:.0f} s, of which training steps {phases.get('train', 0.0):.1f}; "
                f"the rest: {rest}"
            )
        out.append(
            f"  outside components (start-up, orchestration, summary): "
            f"{wall_seconds - components:.0f} s"
        )
        return out

    def compute(self, stages: list[str]) -> tuple[int, float]:
        """Optimizer steps and training-phase seconds that `stages` used (their results)."""
        results = [self.stage_results.get(s, {}) for s in stages]
        steps = sum(int(r.get("total_steps", 0)) for r in results)
        seconds = sum(r.get("seconds", {}).get("train", 0.0) for r in results)
        return steps, seconds

    def compared_stages(self) -> tuple[list[str], list[str]]:
        """(stages that produced the candidate, the baseline's stages) of this run."""
        roles = {s.name: s.role for s in registry.stages()}
        ran = list(self.stage_results)
        baseline = [s for s in ran if roles.get(s) == registry.BASELINE]
        return [s for s in ran if s not in baseline], baseline

    def comparison_lines(self) -> list[str]:
        c = self.comparison
        if c is None:
            return []
        ci = ""
        if c.top1_gain_ci is not None:
            ci = f" (95% CI {c.top1_gain_ci[0]:+.4f} to {c.top1_gain_ci[1]:+.4f})"
        elif c.interval_note:
            ci = f" (no 95% CI: {c.interval_note})"
        candidate, baseline = self.compared_stages()
        c_steps, c_secs = self.compute(candidate)
        b_steps, b_secs = self.compute(baseline)
        out = [
            f"vs. supervised baseline on {c.examples} eval examples: candidate top-1 "
            f"{c.candidate_top1:.4f}, baseline top-1 {c.baseline_top1:.4f}, gain "
            f"{c.top1_gain:+.4f}{ci}; top-5 {c.candidate_top5:.4f} vs. {c.baseline_top5:.4f}",
            f"  compute: candidate {c_steps} steps, {c_secs:.0f} s of training "
            f"({' + '.join(candidate)}); baseline {b_steps} steps, {b_secs:.0f} s",
        ]
        if c.gate_passed is not None and c.min_gain is not None:
            verdict = "passed" if c.gate_passed else "FAILED"
            out.append(f"gain gate: {verdict}: {c.gate_message}")
        return out

    def lines(self) -> list[str]:
        out = [f"run {self.run_id}: {len(self.components)} components executed"]
        if self.seconds:
            out.append(
                "seconds per component: "
                + ", ".join(f"{name} {secs:.0f}" for name, secs in self.seconds.items())
            )
        if self.cached:
            out.append("taken from the cache: " + ", ".join(self.cached))
        if self.warm_start_from:
            out.append(f"pretraining started from (--warm_start): {self.warm_start_from}")
        if self.precision:
            dtypes = ", ".join(f"{node} {dtype}" for node, dtype in self.precision.items())
            out.append(f"precision: {dtypes}")
        for split, stats in sorted(self.ingestion.items()):
            labels = ""
            if "labeled" in stats:
                labels = f" ({stats['labeled']} labeled, {stats['unlabeled']} unlabeled)"
            out.append(
                f"ingested split '{split}': {stats.get('written', 0)} images{labels}, "
                f"{stats.get('skipped', 0)} skipped"
            )
        for split, readers in sorted(self.split_readers.items()):
            out.append(f"split '{split}' read by: {', '.join(readers)}")
        if self.top1 is not None:
            protocol = f" (protocol: {self.protocol})" if self.protocol else ""
            out.append(
                f"top-1 accuracy {self.top1:.4f}, top-5 accuracy {self.top5:.4f} "
                f"on {int(self.example_count or 0)} eval examples{protocol}"
            )
        if self.baseline_top1 is not None:
            out.append(f"baseline (last blessed model) top-1 {self.baseline_top1:.4f}")
        if self.blessed is not None:
            out.append("blessing: BLESSED" if self.blessed else "blessing: NOT_BLESSED")
        out += [f"  failed: {f}" for f in self.failures]
        out += self.comparison_lines()
        if self.pushed:
            out.append(f"pushed model: {self.pushed_destination}")
        else:
            out.append("pushed model: nothing pushed")
        if self.evaluation_uri:
            out.append(f"TFMA output: {self.evaluation_uri}")
        for stage, uri in sorted(self.model_run_uris.items()):
            out.append(f"TensorBoard logs ({stage}): tensorboard --logdir {uri}")
        return out


def _store(metadata_path: str) -> mlmd.MetadataStore:
    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = metadata_path
    config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READONLY
    return mlmd.MetadataStore(config)


def _prop(artifact: metadata_store_pb2.Artifact | metadata_store_pb2.Execution, name: str):
    for props in (artifact.custom_properties, artifact.properties):
        if name in props:
            value = props[name]
            return value.string_value or value.int_value or value.double_value
    return None


def _trainer_config(execution: metadata_store_pb2.Execution) -> dict:
    """A Trainer execution's TrainerConfig (its custom_config property); empty for others."""
    text = _prop(execution, "custom_config")
    if not text:
        return {}
    parsed = json.loads(text)
    if not isinstance(parsed, dict) or not isinstance(parsed.get("trainer"), str):
        return {}
    return json.loads(parsed["trainer"])


def _protocol(trainer: dict) -> str | None:
    """The evaluation protocol of a candidate Trainer's configuration (None for the others)."""
    stage = trainer.get("stage")
    if stage not in registry.names() or registry.get(stage).role != registry.CANDIDATE:
        return None
    return registry.get(stage).protocol(trainer.get("train", {}))


def _splits_read(execution: metadata_store_pb2.Execution) -> list[str]:
    """The splits a Trainer (train_args) or the Evaluator (example_splits) read."""
    train_args = _prop(execution, "train_args")
    if train_args:
        return list(json.loads(train_args).get("splits", []))
    example_splits = _prop(execution, "example_splits")
    if example_splits:
        return list(json.loads(example_splits) or [])
    return []


def latest_run(metadata_path: str) -> RunSummary:
    store = _store(metadata_path)
    runs = store.get_contexts_by_type("pipeline_run")
    if not runs:
        raise ValueError(f"no pipeline run recorded in {metadata_path}")
    run = max(runs, key=lambda c: (c.create_time_since_epoch, c.id))
    summary = RunSummary(run_id=run.name)
    executions = store.get_executions_by_context(run.id)
    run_execution_ids = {e.id for e in executions}
    node_of: dict[int, str] = {}
    for ctx in store.get_contexts_by_type("node"):
        for e in store.get_executions_by_context(ctx.id):
            if e.id in run_execution_ids:
                node_of[e.id] = ctx.name.split(".")[-1]
    summary.components = sorted(set(node_of.values()))
    for e in sorted(executions, key=lambda e: e.create_time_since_epoch):
        if e.id in node_of:
            elapsed = (e.last_update_time_since_epoch - e.create_time_since_epoch) / 1000
            summary.seconds[node_of[e.id]] = elapsed
            if e.last_known_state == metadata_store_pb2.Execution.CACHED:
                summary.cached.append(node_of[e.id])
            trainer = _trainer_config(e)
            protocol = _protocol(trainer)
            if protocol:
                summary.protocol = protocol  # the last Trainer's: the evaluated candidate
            if trainer.get("runtime", {}).get("mixed_precision"):
                summary.precision[node_of[e.id]] = trainer["runtime"]["mixed_precision"]
            for split in _splits_read(e):
                summary.split_readers.setdefault(split, []).append(node_of[e.id])
    artifact_types = {t.id: t.name for t in store.get_artifact_types()}
    events = store.get_events_by_execution_ids(list(run_execution_ids))
    outputs = [
        ev
        for ev in events
        if ev.type in (metadata_store_pb2.Event.OUTPUT, metadata_store_pb2.Event.DECLARED_OUTPUT)
    ]
    producer_of = {ev.artifact_id: node_of.get(ev.execution_id, "") for ev in outputs}
    artifacts = store.get_artifacts_by_id(list(producer_of))
    for a in artifacts:
        kind = artifact_types.get(a.type_id)
        producer = producer_of[a.id]
        stage = stage_of(producer) or producer
        if kind == "ModelEvaluation" and producer == BASELINE_COMPARISON:
            summary.comparison_uri = a.uri
        elif kind == "ModelEvaluation":
            summary.evaluation_uri = a.uri
        elif kind == BASELINE_COMPARISON_RESULT:
            summary.comparison_result_uri = a.uri
        elif kind == "ModelBlessing":
            summary.blessed = bool(_prop(a, "blessed"))
            summary.evaluated_model_uri = _prop(a, "current_model") or None
            summary.regression_baseline_uri = _prop(a, "baseline_model") or None
        elif kind == "PushedModel":
            summary.pushed = bool(_prop(a, "pushed"))
            summary.pushed_destination = _prop(a, "pushed_destination") or None
        elif kind == "ModelRun":
            summary.model_run_uris[stage] = a.uri
            results = read_results(a.uri)
            summary.stage_results[stage] = results
            if results.get("warm_start_from"):
                summary.warm_start_from = results["warm_start_from"]
            phases = results.get("seconds", {})
            if phases and producer not in summary.cached:
                summary.trainer_phases[producer] = phases
        elif kind == "Model":
            summary.model_uris[stage] = a.uri
        elif kind == "Examples" and "ExampleGen" in producer:
            summary.examples_uri = a.uri
        elif kind == "ExampleStatistics" and producer == "StatisticsGen":
            summary.statistics_uri = a.uri
        elif kind == "ExampleAnomalies" and producer == "ExampleValidator":
            summary.anomalies_uri = a.uri
        elif kind == "TransformGraph":
            summary.transform_graph_uri = a.uri
    if summary.evaluation_uri:
        _read_evaluation(summary)
    if summary.comparison_uri:
        summary.comparison = read_comparison(summary.comparison_uri, summary.comparison_result_uri)
    summary.ingestion = read_ingestion_report(summary.examples_uri).get("splits", {})
    return summary


def _read_json(folder: str | None, name: str) -> dict:
    """`<folder>/<name>` parsed; empty when there is no folder or no such file."""
    path = os.path.join(folder or "", name)
    if not folder or not tf.io.gfile.exists(path):
        return {}
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def read_ingestion_report(examples_uri: str | None) -> dict:
    """The image-folder ExampleGen's report; empty for TFRecord input (ImportExampleGen)."""
    return _read_json(examples_uri, IMAGE_REPORT_FILE)


def read_results(model_run_uri: str | None) -> dict:
    """A Trainer stage's results.json (metrics, kNN figures, phase seconds); empty without it."""
    return _read_json(model_run_uri, RESULTS_FILE)


def _metric(metrics: dict, name: str) -> float | None:
    for key, value in metrics.items():
        if key == name or key.endswith(name):
            return value.get("doubleValue")
    return None


def _read_evaluation(summary: RunSummary) -> None:
    result = tfma.load_eval_result(summary.evaluation_uri)
    for slice_key, metrics_by_output in result.slicing_metrics:
        metrics = metrics_by_output.get("", {}).get("", {})
        if not slice_key:
            summary.top1 = _metric(metrics, TOP1)
            summary.top5 = _metric(metrics, TOP5)
            summary.example_count = _metric(metrics, "example_count")
        elif slice_key[0][0] == "label":
            value = _metric(metrics, TOP1)
            if value is not None:
                summary.per_label_top1[str(slice_key[0][1])] = value
    try:
        baseline = tfma.load_eval_result(summary.evaluation_uri, model_name="baseline")
    except Exception:  # noqa: BLE001 - no baseline in a first run
        baseline = None
    if baseline is not None:
        for slice_key, metrics_by_output in baseline.slicing_metrics:
            if not slice_key:
                summary.baseline_top1 = _metric(metrics_by_output.get("", {}).get("", {}), TOP1)
    validation = tfma.load_validation_result(summary.evaluation_uri)
    for per_slice in validation.metric_validations_per_slice:
        for failure in per_slice.failures:
            name = failure.metric_key.name
            value = failure.metric_value.double_value.value
            threshold = failure.metric_threshold
            if failure.metric_key.is_diff:
                allowed = threshold.change_threshold.absolute.value
                baseline = summary.baseline_top1 if name == TOP1 else None
                base = f", baseline {baseline:.4f}" if baseline is not None else ""
                candidate = summary.top1 if name == TOP1 else None
                cand = f"candidate {candidate:.4f}{base}: " if candidate is not None else ""
                summary.failures.append(
                    f"{name}: {cand}change vs. baseline {value:+.4f} (threshold: change >= "
                    f"{allowed:+.4f})"
                )
            else:
                floor = threshold.value_threshold.lower_bound.value
                summary.failures.append(
                    f"{name}: candidate {value:.4f} (threshold: >= {floor:.4f})"
                )
