"""The run report: one self-contained `report.html` with PNG plots beside it, per pipeline run.

Everything comes from what the run recorded (ML Metadata, TensorBoard event files, the TFMA
output, StatisticsGen/ExampleValidator artifacts, the ExampleGen's ingestion report), so the page
shows the run that happened, not what the configuration meant to happen. The page links its
images by relative paths, so a report folder can be copied or served anywhere.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tensorflow_model_analysis as tfma
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from tensorflow_metadata.proto.v0 import anomalies_pb2, statistics_pb2

from models import knn as knn_lib
from models.tasks import registry
from pipeline.configs import SimCLRConfig
from pipeline.names import TOP1, TOP5
from pipeline.runner import summary as summary_lib

REPORT_FILE = "report.html"
LATEST_DIR = "latest"
CONFUSION_PLOT_KEY = "multiClassConfusionMatrixAtThresholds"
NO_PREDICTION = -1  # TFMA's predicted class id when no class passes the threshold
# Counting integer labels reads every example; beyond this a split shows its total only
# rather than stall the report for minutes (ImageNet: 1.28M images).
MAX_EXAMPLES_TO_COUNT = 200_000
# Beyond these class counts, cell numbers and tick names make the heatmap unreadable.
MAX_ANNOTATED_CLASSES = 20
MAX_NAMED_CLASSES = 60

# What each scalar means; tags not listed are shown by name only.
SCALAR_HELP = {
    "train/total_loss": "total loss (contrastive + supervised + weight decay)",
    "train/contrast_loss": "NT-Xent contrastive loss",
    "train/contrast_acc": "contrastive accuracy: the positive pair ranked first",
    "train/contrast_entropy": "entropy of the contrastive softmax",
    "train/supervised_loss": "cross-entropy of the supervised head",
    "train/supervised_acc": "top-1 of the supervised head on training batches",
    "train/weight_decay": "weight-decay term",
    "learning_rate": "learning rate",
    "eval/label_top_1_accuracy": "in-Trainer top-1 on the eval split",
    "eval/label_top_5_accuracy": "in-Trainer top-5 on the eval split",
    "eval/num_examples": "in-Trainer eval examples",
}
PRETRAIN_SUPERVISED_HELP = (
    "online linear eval: top-1 of the stop-gradient linear head on training batches"
)
KNN_HELP = "weighted kNN top-1 of backbone features on the eval split"
# What pretraining has to beat, measured once before its first step.
FLOOR_HELP = {
    knn_lib.RANDOM_INIT_METRIC: "kNN floor: the randomly initialized backbone, before step 1",
    knn_lib.RAW_PIXELS_METRIC: "kNN floor: raw pixels (the evaluation view, flattened)",
}
BELOW_RAW_PIXELS = "Pretraining ended below the raw-pixel kNN floor on this data"


# ----------------------------------------------------------------------------- reading


def read_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Scalar series per tag from every TensorBoard event file in `log_dir`, sorted by step.

    TF2 `tf.summary.scalar` stores values as tensor protos, TF1 as `simple_value`; both are read.
    A step written twice (a resumed run) keeps the later value.
    """
    series: dict[str, dict[int, float]] = {}
    for path in sorted(tf.io.gfile.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                kind = value.WhichOneof("value")
                if kind == "simple_value":
                    number = float(value.simple_value)
                elif kind == "tensor":
                    array = tf.make_ndarray(value.tensor)
                    if array.size != 1 or not np.issubdtype(array.dtype, np.number):
                        continue
                    number = float(array.reshape(()))
                else:
                    continue
                series.setdefault(value.tag, {})[int(event.step)] = number
    return {tag: sorted(points.items()) for tag, points in sorted(series.items())}


@dataclass(frozen=True)
class SliceMetrics:
    top1: float | None
    top5: float | None
    count: float | None


def _metric_value(metrics: dict, name: str) -> float | None:
    for key, value in metrics.items():
        if key == name or key.endswith(name):
            return value.get("doubleValue")
    return None


def read_tfma_metrics(
    result: tfma.EvalResult,
) -> tuple[SliceMetrics | None, dict[int, SliceMetrics]]:
    """Overall and per-label (by class id) top-1/top-5/example count of the candidate model."""
    overall = None
    per_label: dict[int, SliceMetrics] = {}
    for slice_key, metrics_by_output in result.slicing_metrics:
        metrics = metrics_by_output.get("", {}).get("", {})
        values = SliceMetrics(
            _metric_value(metrics, TOP1),
            _metric_value(metrics, TOP5),
            _metric_value(metrics, "example_count"),
        )
        if not slice_key:
            overall = values
        elif len(slice_key) == 1 and slice_key[0][0] == "label":
            per_label[int(slice_key[0][1])] = values
    return overall, dict(sorted(per_label.items()))


def read_confusion_matrix(result: tfma.EvalResult, num_classes: int) -> np.ndarray | None:
    """Counts [actual class, predicted class] from TFMA's MultiClassConfusionMatrixPlot.

    Uses the overall slice at the lowest threshold (TFMA's default 0: the arg-max class is the
    prediction). TFMA leaves zero-valued fields out of the JSON, hence the defaults. An extra
    last column holds examples without a prediction (class id -1), if there are any.
    """
    for slice_key, plots_by_output in result.plots:
        if slice_key:
            continue
        plot = plots_by_output.get("", {}).get("", {}).get(CONFUSION_PLOT_KEY)
        if not plot or not plot.get("matrices"):
            return None
        matrix = min(plot["matrices"], key=lambda m: m.get("threshold", 0.0))
        entries = [
            (
                int(e.get("actualClassId", 0)),
                int(e.get("predictedClassId", 0)),
                float(e.get("numWeightedExamples", 0.0)),
            )
            for e in matrix.get("entries", [])
        ]
        size = max([num_classes - 1, *(max(a, p) for a, p, _ in entries)]) + 1
        no_prediction = any(p == NO_PREDICTION for _, p, _ in entries)
        counts = np.zeros((size, size + int(no_prediction)))
        for actual, predicted, weight in entries:
            if actual >= 0:
                counts[actual, size if predicted == NO_PREDICTION else predicted] += weight
        return counts
    return None


@dataclass(frozen=True)
class Threshold:
    metric: str
    kind: str
    bound: str


def read_thresholds(result: tfma.EvalResult) -> list[Threshold]:
    """The gates TFMA applied, from the eval config stored with its output.

    TFMA drops change thresholds when there is no baseline model, so this lists what was
    really checked rather than what was configured.
    """
    rows = []
    for spec in result.config.metrics_specs:
        for metric in spec.metrics:
            thresholds = [t.threshold for t in metric.per_slice_thresholds]
            if metric.HasField("threshold"):
                thresholds.append(metric.threshold)
            for t in thresholds:
                value = t.value_threshold
                if t.HasField("value_threshold") and value.HasField("lower_bound"):
                    bound = f">= {value.lower_bound.value:.4f}"
                    rows.append(Threshold(metric.class_name, "value", bound))
                if t.HasField("value_threshold") and value.HasField("upper_bound"):
                    bound = f"<= {value.upper_bound.value:.4f}"
                    rows.append(Threshold(metric.class_name, "value", bound))
                if t.HasField("change_threshold"):
                    change = t.change_threshold
                    higher = change.direction == tfma.MetricDirection.HIGHER_IS_BETTER
                    sign = ">=" if higher else "<="
                    for kind in ("absolute", "relative"):
                        if change.HasField(kind):
                            bound = f"{sign} {getattr(change, kind).value:+.4f}"
                            rows.append(Threshold(metric.class_name, f"{kind} change", bound))
    return rows


@dataclass(frozen=True)
class KnnResult:
    """Pretraining's last kNN top-1 and the two floors it is judged against (None: not run)."""

    final: float | None
    random_init: float | None
    raw_pixels: float | None


def read_knn(model_run_uri: str | None) -> KnnResult | None:
    """The kNN numbers in a Trainer's results.json; None without the file or without any of
    them (the monitor is off unless --knn_every_epochs is set)."""
    results = summary_lib.read_results(model_run_uri)
    knn = KnnResult(
        results.get(knn_lib.METRIC),
        results.get(knn_lib.RANDOM_INIT_METRIC),
        results.get(knn_lib.RAW_PIXELS_METRIC),
    )
    return None if knn == KnnResult(None, None, None) else knn


def read_label_names(summary: summary_lib.RunSummary, ingestion: dict) -> list[str]:
    """Class names by id: the Transform vocabulary (what the model was trained and served with),
    else the ingestion report's folder names, else nothing (ids are shown)."""
    if summary.transform_graph_uri:
        import tensorflow_transform as tft

        from transform.preprocessing import read_label_names as vocabulary_names

        names = vocabulary_names(tft.TFTransformOutput(summary.transform_graph_uri))
        if names:
            return names
    return list(ingestion.get("class_names", []))


def _load_proto(path: str, proto):
    with tf.io.gfile.GFile(path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def _split_dirs(uri: str) -> dict[str, str]:
    """{split name: folder} of an artifact laid out as `<uri>/Split-<name>/`."""
    names = (n.rstrip("/") for n in tf.io.gfile.listdir(uri))
    return {
        n[len("Split-") :]: os.path.join(uri, n) for n in sorted(names) if n.startswith("Split-")
    }


@dataclass
class SplitStats:
    num_examples: int
    features: list[tuple[str, str, str]]  # (name, type, summary)
    class_counts: dict[str, int] | None  # class name -> examples; None when not counted
    note: str = ""


def _feature_summary(feature: statistics_pb2.FeatureNameStatistics) -> str:
    kind = feature.WhichOneof("stats")
    if kind == "num_stats":
        s = feature.num_stats
        return (
            f"non-missing {s.common_stats.num_non_missing}, min {s.min:g}, max {s.max:g}, "
            f"mean {s.mean:.3g}"
        )
    if kind == "string_stats":
        s = feature.string_stats
        return (
            f"non-missing {s.common_stats.num_non_missing}, {s.unique} unique, "
            f"avg length {s.avg_length:.1f}"
        )
    if kind == "bytes_stats":
        s = feature.bytes_stats
        return f"non-missing {s.common_stats.num_non_missing}, avg {s.avg_num_bytes:.0f} bytes"
    return ""


def string_value_counts(feature: statistics_pb2.FeatureNameStatistics) -> dict[str, int] | None:
    """Count per value of a string feature from TFDV's rank histogram.

    None when the histogram does not cover every example (more distinct values than TFDV keeps
    buckets for): partial counts would read as a dataset with missing classes.
    """
    stats = feature.string_stats
    counts = {b.label: int(round(b.sample_count)) for b in stats.rank_histogram.buckets}
    if sum(counts.values()) != stats.common_stats.num_non_missing:
        return None
    return counts


def count_int_labels(split_dir: str, label_key: str = "label") -> dict[int, int]:
    """Examples per integer label over the GZIP tf.Example files of one ExampleGen split."""
    files = sorted(tf.io.gfile.glob(os.path.join(split_dir, "*")))
    spec = {label_key: tf.io.FixedLenFeature([], tf.int64)}
    dataset = (
        tf.data.TFRecordDataset(files, compression_type="GZIP")
        .batch(1024)
        .map(lambda records: tf.io.parse_example(records, spec)[label_key])
    )
    counts: dict[int, int] = {}
    for labels in dataset:
        values, _, numbers = tf.unique_with_counts(labels)
        for value, number in zip(values.numpy(), numbers.numpy(), strict=True):
            counts[int(value)] = counts.get(int(value), 0) + int(number)
    return dict(sorted(counts.items()))


def read_split_stats(
    statistics_uri: str, examples_uri: str | None, names: Sequence[str]
) -> dict[str, SplitStats]:
    """StatisticsGen output per split, with examples per class.

    Class counts come from the string label feature's histogram (`label_name` from the folder
    ExampleGen, or a string `label`); integer-only labels (TFDS records) are counted in one
    pass over the split's examples when the split is small enough.
    """
    out = {}
    for split, folder in _split_dirs(statistics_uri).items():
        stats = _load_proto(
            os.path.join(folder, "FeatureStats.pb"), statistics_pb2.DatasetFeatureStatisticsList()
        )
        if not stats.datasets:
            continue
        dataset = stats.datasets[0]
        by_name = {".".join(f.path.step) or f.name: f for f in dataset.features}
        features = [
            (name, statistics_pb2.FeatureNameStatistics.Type.Name(f.type), _feature_summary(f))
            for name, f in sorted(by_name.items())
        ]
        counts, note = None, ""
        strings = [
            by_name[k]
            for k in ("label_name", "label")
            if k in by_name and by_name[k].WhichOneof("stats") == "string_stats"
        ]
        if strings:
            counts = string_value_counts(strings[0])
            if counts is None:
                note = "more classes than the statistics' histogram holds; counts not shown"
        elif "label" in by_name and examples_uri:
            if dataset.num_examples <= MAX_EXAMPLES_TO_COUNT:
                by_id = count_int_labels(os.path.join(examples_uri, f"Split-{split}"))
                counts = {_class_name(names, i): n for i, n in by_id.items()}
            else:
                note = (
                    f"{dataset.num_examples} examples with integer labels: not counted per "
                    f"class (a counting pass is limited to {MAX_EXAMPLES_TO_COUNT})"
                )
        if counts:
            # The unlabeled pool's records carry label -1 and an empty label_name.
            counts = {(UNLABELED_ROW if k in ("", "-1") else k): n for k, n in counts.items()}
        out[split] = SplitStats(int(dataset.num_examples), features, counts, note)
    return out


UNLABELED_ROW = "(unlabeled)"


def read_anomalies(anomalies_uri: str) -> dict[str, list[tuple[str, str]]]:
    """ExampleValidator findings per split as (feature, description)."""
    out = {}
    for split, folder in _split_dirs(anomalies_uri).items():
        path = os.path.join(folder, "SchemaDiff.pb")
        found = []
        if tf.io.gfile.exists(path):
            anomalies = _load_proto(path, anomalies_pb2.Anomalies())
            for feature, info in sorted(anomalies.anomaly_info.items()):
                found.append((feature, info.description or info.short_description))
            if anomalies.HasField("dataset_anomaly_info"):
                info = anomalies.dataset_anomaly_info
                found.append(("(dataset)", info.description or info.short_description))
        out[split] = found
    return out


# ----------------------------------------------------------------------------- plots


def _save(fig: Figure, path: str) -> None:
    FigureCanvasAgg(fig)  # attaches an Agg canvas: no pyplot, no global backend switch
    fig.savefig(path, dpi=110)


def _panel(tag: str) -> str:
    """Which panel a scalar goes to; the tiny weight-decay term would flatten the loss panel."""
    if tag == "learning_rate":
        return "learning rate"
    if tag.endswith("loss"):
        return "loss"
    if "acc" in tag or tag in FLOOR_HELP:
        return "accuracy"
    return "other"


def plot_curves(stage: str, scalars: dict[str, list[tuple[int, float]]], path: str) -> bool:
    """One row of panels (losses, accuracies, learning rate, other); False if nothing to plot."""
    panels: dict[str, list[str]] = {}
    for tag, points in scalars.items():
        if points:
            panels.setdefault(_panel(tag), []).append(tag)
    order = [p for p in ("loss", "accuracy", "learning rate", "other") if p in panels]
    if not order:
        return False
    fig = Figure(figsize=(4.2 * len(order), 3.4), layout="constrained")
    for i, name in enumerate(order):
        ax = fig.add_subplot(1, len(order), i + 1)
        for tag in panels[name]:
            steps, values = zip(*scalars[tag], strict=True)
            if tag in FLOOR_HELP:  # one value at step 0: a level to compare the curves with
                ax.axhline(values[-1], linestyle="--", linewidth=1, label=tag)
                continue
            ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, ms=3, label=tag)
        ax.set_title(f"{stage}: {name}")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)
    return True


def plot_confusion(counts: np.ndarray, names: Sequence[str], path: str) -> None:
    """Heatmap of counts, actual classes as rows; names and numbers while they stay legible."""
    rows, cols = counts.shape
    side = min(14.0, max(4.5, 0.36 * cols + 2.2))
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(counts, cmap="Blues", aspect="auto")
    fig.colorbar(image, ax=ax, shrink=0.8, label="examples")
    if rows <= MAX_NAMED_CLASSES:
        labels = [_class_name(names, i) for i in range(rows)]
        ax.set_yticks(range(rows), labels, fontsize=8)
        columns = labels + ["(no prediction)"] * (cols - rows)
        ax.set_xticks(range(cols), columns, rotation=60, ha="right", fontsize=8)
    if rows <= MAX_ANNOTATED_CLASSES:
        peak = counts.max() or 1.0
        for r, c in zip(*np.nonzero(counts), strict=True):
            color = "white" if counts[r, c] > 0.6 * peak else "black"
            ax.text(c, r, f"{counts[r, c]:g}", ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("actual class")
    ax.set_title("Confusion matrix (eval split, TFMA)")
    _save(fig, path)


# ----------------------------------------------------------------------------- html

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2430;
 background:#f6f7f9}
main{max-width:1140px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px}
h2{font-size:19px;margin:32px 0 10px;border-bottom:1px solid #d9dde3;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}
.sub{color:#5b6472;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}
.card{background:#fff;border:1px solid #d9dde3;border-radius:8px;padding:10px 16px;min-width:130px}
.card .k{font-size:12px;color:#5b6472}
.card .v{font-size:22px;font-weight:600}
.ok{color:#0a7a35}
.bad{color:#b3261e}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:6px 0}
th,td{border:1px solid #d9dde3;padding:4px 9px;text-align:left}
th{background:#eef0f3}
td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;background:#fff;border:1px solid #d9dde3;border-radius:6px}
code{font-size:12px;word-break:break-all}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float | None) -> str:
    """The one format for accuracies on the page (as the runner's summary prints them)."""
    return "n/a" if value is None else f"{value:.4f}"


def _class_name(names: Sequence[str], class_id: int) -> str:
    return names[class_id] if 0 <= class_id < len(names) else str(class_id)


def _table(
    header: Sequence[str], rows: Iterable[Sequence[object]], numeric: Iterable[int] = ()
) -> str:
    numeric = set(numeric)
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _card(key: str, value: str, cls: str = "") -> str:
    return (
        f'<div class="card"><div class="k">{_e(key)}</div>'
        f'<div class="v {cls}">{_e(value)}</div></div>'
    )


def _img(file: str, alt: str) -> str:
    return f'<p><img src="{_e(file)}" alt="{_e(alt)}"></p>'


def _verdict(blessed: bool | None) -> tuple[str, str]:
    return {True: ("BLESSED", "ok"), False: ("NOT_BLESSED", "bad")}.get(
        blessed, ("not evaluated", "")
    )


def _header(summary: summary_lib.RunSummary) -> list[str]:
    verdict, cls = _verdict(summary.blessed)
    count = summary.example_count
    cards = [
        _card("top-1 accuracy", _fmt(summary.top1)),
        _card("top-5 accuracy", _fmt(summary.top5)),
        _card("eval examples", "n/a" if count is None else f"{count:.0f}"),
        _card("protocol", summary.protocol or "n/a"),
        _card("precision", ", ".join(sorted(set(summary.precision.values()))) or "n/a"),
        _card("blessing", verdict, cls),
        _card("pushed", "yes" if summary.pushed else "no"),
    ]
    if summary.baseline_top1 is not None:
        cards.insert(2, _card("baseline top-1", _fmt(summary.baseline_top1)))
    started = (
        f'<div class="sub">pretraining started from (--warm_start) '
        f"<code>{_e(summary.warm_start_from)}</code></div>"
        if summary.warm_start_from
        else ""
    )
    return [
        "<h1>SimCLR pipeline run report</h1>",
        f'<div class="sub">run <code>{_e(summary.run_id)}</code> · '
        f"{len(summary.components)} components executed</div>",
        started,
        f'<div class="cards">{"".join(cards)}</div>',
    ]


def _evaluation(result: tfma.EvalResult | None, names: Sequence[str], run_dir: str) -> list[str]:
    parts = ["<h2>Evaluation (TFMA, eval split)</h2>"]
    if result is None:
        return parts + ["<p>No Evaluator output in this run.</p>"]
    overall, per_label = read_tfma_metrics(result)
    if overall is not None:
        row = ["overall", f"{overall.count or 0:.0f}", _fmt(overall.top1), _fmt(overall.top5)]
        parts.append(_table(["slice", "examples", "top-1", "top-5"], [row], (1, 2, 3)))
    parts.append("<h3>Per class</h3>")
    rows = [
        [i, _class_name(names, i), f"{m.count or 0:.0f}", _fmt(m.top1), _fmt(m.top5)]
        for i, m in per_label.items()
    ]
    parts.append(_table(["id", "class", "examples", "top-1", "top-5"], rows, (0, 2, 3, 4)))
    counts = read_confusion_matrix(result, len(names))
    if counts is not None:
        plot_confusion(counts, names, os.path.join(run_dir, "confusion_matrix.png"))
        parts += ["<h3>Confusion matrix</h3>", _img("confusion_matrix.png", "confusion matrix")]
    return parts


def _blessing(
    summary: summary_lib.RunSummary, result: tfma.EvalResult | None, config: SimCLRConfig | None
) -> list[str]:
    verdict, cls = _verdict(summary.blessed)
    pushed = (
        f"pushed to <code>{_e(summary.pushed_destination)}</code>"
        if summary.pushed
        else "not pushed"
    )
    parts = [
        "<h2>Blessing and thresholds</h2>",
        f'<p>Verdict: <b class="{cls}">{_e(verdict)}</b>; model {pushed}.</p>',
    ]
    if result is not None:
        rows = [dataclasses.astuple(t) for t in read_thresholds(result)]
        parts.append("<h3>Thresholds TFMA applied (overall slice)</h3>")
        parts.append(_table(["metric", "kind", "bound"], rows) if rows else "<p>None.</p>")
    if config is not None:
        gates = config.eval
        rows = [
            [
                "--min_top1",
                gates.min_top1
                if gates.min_top1 >= 0
                else "-1: twice chance, capped at chance + 0.25 (applied value above)",
            ],
            ["--min_top5", f"{gates.min_top5} (0 = off)"],
            ["--max_top1_regression", f"{gates.max_top1_regression} (needs a blessed baseline)"],
        ]
        parts += ["<h3>Configured gates</h3>", _table(["flag", "value"], rows)]
    if summary.failures:
        items = "".join(f"<li>{_e(f)}</li>" for f in summary.failures)
        parts.append(f"<h3>Failed checks</h3><ul>{items}</ul>")
    elif summary.blessed is not None:
        parts.append("<p>All checks passed.</p>")
    return parts


def _role(stage: str) -> str | None:
    return registry.get(stage).role if stage in registry.names() else None


def _help(stage: str, tag: str) -> str:
    if tag in FLOOR_HELP:
        return FLOOR_HELP[tag]
    if "knn" in tag:
        return KNN_HELP
    if _role(stage) == registry.ENCODER and tag == "train/supervised_acc":
        return PRETRAIN_SUPERVISED_HELP
    return SCALAR_HELP.get(tag, "")


def _scalar_text(tag: str, value: float) -> str:
    """Losses and accuracies as the training log prints them (4 decimals); counts as integers."""
    if "acc" in tag or "loss" in tag:
        return f"{value:.4f}"
    return f"{value:.0f}" if value.is_integer() else f"{value:.4g}"


def knn_parts(knn: KnnResult | None) -> list[str]:
    """Pretraining's final kNN top-1 beside its floors, and what that difference means.

    A representation that classifies the eval split worse than its own pixels has not learned
    anything a nearest-neighbour rule can use; the page says so rather than leave it to be
    read off the numbers.
    """
    parts = ["<h2>What pretraining bought (weighted kNN top-1, eval split)</h2>"]
    if knn is None:
        return parts + [
            "<p>No kNN numbers: the monitor is off unless <code>--knn_every_epochs</code> is "
            "set.</p>"
        ]
    rows = [
        ["after pretraining (backbone features)", _fmt(knn.final)],
        ["floor: random-init backbone", _fmt(knn.random_init)],
        ["floor: raw pixels", _fmt(knn.raw_pixels)],
    ]
    parts.append(_table(["kNN top-1", "value"], rows, (1,)))
    if knn.final is not None and knn.raw_pixels is not None and knn.final < knn.raw_pixels:
        parts.append(
            f'<p class="bad"><b>{_e(BELOW_RAW_PIXELS)}</b>: its features classify the eval '
            f"split worse ({_fmt(knn.final)}) than the raw pixels do "
            f"({_fmt(knn.raw_pixels)}).</p>"
        )
    elif knn.final is not None:
        margins = [
            f"{knn.final - floor:+.4f} against {name}"
            for name, floor in (
                ("raw pixels", knn.raw_pixels),
                ("the random-init backbone", knn.random_init),
            )
            if floor is not None
        ]
        if margins:
            parts.append(f"<p>kNN top-1 after pretraining: {_e(', '.join(margins))}.</p>")
    return parts


def _knn(summary: summary_lib.RunSummary) -> list[str]:
    """The kNN monitor's section, for the run's encoder stage (pretraining), if it ran."""
    encoders = [s for s in summary.model_run_uris if _role(s) == registry.ENCODER]
    return knn_parts(read_knn(summary.model_run_uris[encoders[0]])) if encoders else []


def _comparison(summary: summary_lib.RunSummary, names: Sequence[str]) -> list[str]:
    """The candidate beside the supervised baseline: the second TFMA evaluation (same eval
    examples), per class, with the compute each used and the gain gate's verdict."""
    c = summary.comparison
    if c is None:
        return []
    candidate, baseline = summary.compared_stages()
    (c_steps, c_secs), (b_steps, b_secs) = summary.compute(candidate), summary.compute(baseline)
    ci = c.top1_gain_ci
    gain_text = f"{c.top1_gain:+.4f}"
    if ci:
        gain_text += f" (95% CI {ci[0]:+.4f} to {ci[1]:+.4f})"
    elif c.interval_note:
        gain_text += f" (no 95% CI: {c.interval_note})"
    parts = [
        "<h2>Did pretraining pay off? Candidate vs. supervised baseline</h2>",
        "<p>The baseline is the same network trained from random initialization on the same "
        f"labeled examples; both are evaluated by TFMA on the same {c.examples} eval "
        "examples.</p>",
        _table(
            ["", "candidate (SimCLR)", "supervised baseline", "difference"],
            [
                ["top-1", _fmt(c.candidate_top1), _fmt(c.baseline_top1), gain_text],
                ["top-5", _fmt(c.candidate_top5), _fmt(c.baseline_top5), f"{c.top5_gain:+.4f}"],
                ["optimizer steps", c_steps, b_steps, ""],
                ["training seconds", f"{c_secs:.0f}", f"{b_secs:.0f}", ""],
                ["stages", " + ".join(candidate), " + ".join(baseline), ""],
            ],
            (1, 2),
        ),
    ]
    if c.gate_passed is not None and c.min_gain is not None:
        cls = "" if c.gate_passed else ' class="bad"'
        verdict = "passed" if c.gate_passed else "failed"
        parts.append(f"<p{cls}><b>Gain gate {verdict}</b>: {_e(c.gate_message)}</p>")
    rows = [
        [
            names[k] if isinstance(k, int) and 0 <= k < len(names) else k,
            _fmt(c.candidate_top1_by_class.get(k)),
            _fmt(c.baseline_top1_by_class.get(k)),
        ]
        for k in sorted(c.candidate_top1_by_class)
    ]
    if rows:
        parts.append("<h3>Top-1 per class</h3>")
        parts.append(_table(["class", "candidate", "baseline"], rows, (1, 2)))
    return parts


def _curves(summary: summary_lib.RunSummary, run_dir: str) -> list[str]:
    parts = ["<h2>Training curves</h2>"]
    uris = summary.model_run_uris
    known = [s for s in registry.names() if s in uris]
    for stage in known + sorted(set(uris) - set(known)):
        uri = uris[stage]
        parts.append(f"<h3>{_e(stage)}</h3>")
        train = read_scalars(os.path.join(uri, "train"))
        png = f"curves_{stage}.png"
        if plot_curves(stage, train, os.path.join(run_dir, png)):
            parts.append(_img(png, f"{stage} curves"))
        scalars = {**train, **read_scalars(os.path.join(uri, "eval"))}
        rows = [
            [tag, _help(stage, tag), points[-1][0], _scalar_text(tag, points[-1][1])]
            for tag, points in scalars.items()
            if points
        ]
        parts.append(_table(["scalar", "meaning", "last step", "last value"], rows, (2, 3)))
        parts.append(f'<p class="sub">TensorBoard: <code>tensorboard --logdir {_e(uri)}</code></p>')
    return parts


def _data(summary: summary_lib.RunSummary, ingestion: dict, names: Sequence[str]) -> list[str]:
    parts = ["<h2>Data</h2>"]
    splits = ingestion.get("splits", {})
    readers = summary.split_readers
    if splits:
        rows = [
            [
                s,
                v.get("folder", ""),
                v.get("total_files"),
                v.get("written"),
                v.get("skipped"),
                v.get("labeled", ""),
                v.get("unlabeled", ""),
                ", ".join(readers.get(s, [])),
            ]
            for s, v in sorted(splits.items())
        ]
        parts.append("<h3>Ingestion (image folders)</h3>")
        header = ["split", "folder", "files", "written", "skipped", "labeled", "unlabeled"]
        parts.append(_table([*header, "read by"], rows, (2, 3, 4, 5, 6)))
        skipped = [
            [s, f.get("path", ""), f.get("reason", "")]
            for s, v in sorted(splits.items())
            for f in v.get("skipped_files", [])
        ]
        parts.append("<h3>Skipped files</h3>")
        parts.append(
            _table(["split", "file", "reason"], skipped) if skipped else "<p>None skipped.</p>"
        )
    elif readers:
        rows = [[s, ", ".join(r)] for s, r in sorted(readers.items())]
        parts.append("<h3>Which step read which split</h3>")
        parts.append(_table(["split", "read by"], rows))
    if summary.statistics_uri:
        stats = read_split_stats(summary.statistics_uri, summary.examples_uri, names)
        order = {n: i for i, n in enumerate(names)}
        classes = sorted(
            {c for s in stats.values() for c in s.class_counts or {}},
            key=lambda c: (order.get(c, len(order)), c),
        )
        rows = [
            [
                c,
                *(
                    "" if s.class_counts is None else s.class_counts.get(c, 0)
                    for s in stats.values()
                ),
            ]
            for c in classes
        ]
        rows.append(["total", *(s.num_examples for s in stats.values())])
        numeric = range(1, len(stats) + 1)
        parts.append("<h3>Examples per class (StatisticsGen)</h3>")
        parts.append(_table(["class", *stats], rows, numeric))
        parts += [f'<p class="sub">{_e(s)}: {_e(v.note)}</p>' for s, v in stats.items() if v.note]
        rows = [[s, *f] for s, v in stats.items() for f in v.features]
        parts.append("<h3>Features</h3>")
        parts.append(_table(["split", "feature", "type", "summary"], rows))
    if summary.anomalies_uri:
        found = read_anomalies(summary.anomalies_uri)
        rows = [[s, f, d] for s, items in sorted(found.items()) for f, d in items]
        parts.append("<h3>Schema anomalies (ExampleValidator)</h3>")
        parts.append(
            _table(["split", "feature", "anomaly"], rows) if rows else "<p>None found.</p>"
        )
    return parts


def _flatten(prefix: str, value: object) -> list[tuple[str, object]]:
    if isinstance(value, dict):
        return [kv for k, v in value.items() for kv in _flatten(f"{prefix}{k}.", v)]
    return [(prefix.rstrip("."), value)]


def _run_info(summary: summary_lib.RunSummary, config: SimCLRConfig | None) -> list[str]:
    seconds = [[name, f"{secs:.1f}"] for name, secs in summary.seconds.items()]
    artifacts = [
        ["TFMA output", summary.evaluation_uri],
        ["examples", summary.examples_uri],
        ["statistics", summary.statistics_uri],
        ["transform graph", summary.transform_graph_uri],
        *([f"model ({stage})", uri] for stage, uri in sorted(summary.model_uris.items())),
    ]
    parts = [
        "<h2>Components</h2>",
        _table(["component", "seconds"], seconds, (1,)),
        "<h3>Artifacts</h3>",
        _table(["artifact", "uri"], [row for row in artifacts if row[1]]),
    ]
    if config is not None:
        options = _flatten("", json.loads(config.to_json()))
        parts += ["<details><summary>Configuration</summary>", _table(["option", "value"], options)]
        parts.append("</details>")
    return parts


def _safe_dir_name(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", run_id).strip("-") or "run"


def write_report(metadata_path: str, out_dir: str, config: SimCLRConfig | None = None) -> str:
    """Writes `<out_dir>/<run id>/report.html` and its PNGs for the latest run recorded in
    `metadata_path`, copies the folder to `<out_dir>/latest/`, returns the report's path."""
    summary = summary_lib.latest_run(metadata_path)
    run_dir = os.path.join(out_dir, _safe_dir_name(summary.run_id))
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    ingestion = summary_lib.read_ingestion_report(summary.examples_uri)
    names = read_label_names(summary, ingestion)
    result = tfma.load_eval_result(summary.evaluation_uri) if summary.evaluation_uri else None
    parts = [
        *_header(summary),
        *_evaluation(result, names, run_dir),
        *_knn(summary),
        *_comparison(summary, names),
        *_blessing(summary, result, config),
        *_curves(summary, run_dir),
        *_data(summary, ingestion, names),
        *_run_info(summary, config),
    ]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>SimCLR run {_e(summary.run_id)}</title><style>{CSS}</style></head>\n"
        f"<body><main>\n{chr(10).join(parts)}\n</main></body></html>\n"
    )
    path = os.path.join(run_dir, REPORT_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    latest = os.path.join(out_dir, LATEST_DIR)
    shutil.rmtree(latest, ignore_errors=True)
    shutil.copytree(run_dir, latest)
    return path
