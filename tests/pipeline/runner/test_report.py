"""The run report: its readers against independent references, and a real small pipeline run
whose report is rendered by headless Chromium and must show that run's numbers."""

import collections
import glob
import html.parser
import json
import os
import pathlib
import re
import subprocess

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_analysis as tfma
from PIL import Image
from tensorflow_metadata.proto.v0 import statistics_pb2

from models import knn
from pipeline.runner import report
from tests.pipeline_runs import BROKEN_FILE, MARKUP_CLASS, TEST_PER_CLASS, TRAIN_PER_CLASS

CHROMIUM = "/usr/bin/chromium"


# ----------------------------------------------------------------------------- readers


def _write_events(path: pathlib.Path, events: list[tf.compat.v1.Event]) -> None:
    with tf.io.TFRecordWriter(str(path)) as writer:
        for event in events:
            writer.write(event.SerializeToString())


def test_read_scalars_reads_tf1_and_tf2_scalars_and_skips_the_rest(tmp_path):
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        for step, value in ((1, 0.5), (2, 0.25), (3, 0.125)):
            tf.summary.scalar("train/loss", value, step=step)
        tf.summary.histogram("weights", [1.0, 2.0, 3.0], step=1)
        tf.summary.text("note", "hello", step=1)
    writer.close()

    def simple(step: int, value: float) -> tf.compat.v1.Event:
        summary = tf.compat.v1.Summary(
            value=[tf.compat.v1.Summary.Value(tag="lr", simple_value=value)]
        )
        return tf.compat.v1.Event(step=step, summary=summary)

    _write_events(tmp_path / "events.out.tfevents.1.a", [simple(2, 0.1), simple(1, 0.2)])
    # A resumed run rewrites step 2: the later file wins.
    _write_events(tmp_path / "events.out.tfevents.2.b", [simple(2, 0.3)])

    scalars = report.read_scalars(str(tmp_path))

    assert set(scalars) == {"train/loss", "lr"}
    assert scalars["train/loss"] == [(1, 0.5), (2, 0.25), (3, 0.125)]
    assert [s for s, _ in scalars["lr"]] == [1, 2]
    np.testing.assert_allclose([v for _, v in scalars["lr"]], [0.2, 0.3], rtol=1e-6)


def _eval_result(plots: list) -> tfma.EvalResult:
    return tfma.EvalResult(
        slicing_metrics=[],
        plots=plots,
        attributions=None,
        config=None,
        data_location="",
        file_format="",
        model_location="",
    )


def test_confusion_matrix_matches_numpy_reference():
    rng = np.random.default_rng(0)
    actual = rng.integers(0, 4, size=200)
    predicted = np.where(rng.random(200) < 0.1, -1, rng.integers(0, 4, size=200))
    pairs = collections.Counter(zip(actual.tolist(), predicted.tolist(), strict=True))
    # TFMA's JSON leaves out zero-valued fields (class 0, threshold 0).
    entries = []
    for (a, p), n in sorted(pairs.items()):
        entry = {"numWeightedExamples": float(n)}
        if a:
            entry["actualClassId"] = a
        if p:
            entry["predictedClassId"] = p
        entries.append(entry)
    decoy = {"threshold": 0.5, "entries": [{"actualClassId": 1, "numWeightedExamples": 99.0}]}
    overall = {"": {"": {report.CONFUSION_PLOT_KEY: {"matrices": [decoy, {"entries": entries}]}}}}
    sliced = {"": {"": {report.CONFUSION_PLOT_KEY: {"matrices": [decoy]}}}}
    result = _eval_result([((("label", 1),), sliced), ((), overall)])

    counts = report.read_confusion_matrix(result, num_classes=5)

    expected = np.zeros((5, 6))
    np.add.at(expected, (actual, np.where(predicted < 0, 5, predicted)), 1)
    np.testing.assert_array_equal(counts, expected)


def test_confusion_matrix_absent_without_the_plot():
    result = _eval_result([((), {"": {"": {}}})])
    assert report.read_confusion_matrix(result, num_classes=3) is None


def _string_feature(counts: dict[str, int], non_missing: int):
    feature = statistics_pb2.FeatureNameStatistics(type=statistics_pb2.FeatureNameStatistics.STRING)
    feature.string_stats.common_stats.num_non_missing = non_missing
    for name, count in counts.items():
        feature.string_stats.rank_histogram.buckets.add(label=name, sample_count=count)
    return feature


def test_string_value_counts_only_when_the_histogram_covers_every_example():
    counts = {"cat": 5, "dog": 3, "<b>": 1}
    assert report.string_value_counts(_string_feature(counts, 9)) == counts
    assert report.string_value_counts(_string_feature(counts, 10)) is None


def test_count_int_labels_matches_counter(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 7, size=2500)
    options = tf.io.TFRecordOptions(compression_type="GZIP")
    for shard, part in enumerate(np.array_split(labels, 2)):
        with tf.io.TFRecordWriter(str(tmp_path / f"data-{shard}.gz"), options) as writer:
            for label in part:
                feature = {"label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))}
                example = tf.train.Example(features=tf.train.Features(feature=feature))
                writer.write(example.SerializeToString())

    assert report.count_int_labels(str(tmp_path)) == dict(
        sorted(collections.Counter(labels.tolist()).items())
    )


def _pretrain_run_dir(tmp_path: pathlib.Path, results: dict | None) -> str:
    """A pretrain model_run folder whose results.json holds `results` (none if None)."""
    run_dir = tmp_path / "model_run"
    run_dir.mkdir()
    if results is not None:
        (run_dir / "results.json").write_text(json.dumps(results))
    return str(run_dir)


@pytest.mark.parametrize(
    ("final", "raw", "below"),
    [(0.8011, 0.9139, True), (0.9139, 0.9139, False), (0.9612, 0.9139, False), (0.2, None, False)],
)
def test_knn_section_says_so_iff_pretraining_ended_below_raw_pixels(tmp_path, final, raw, below):
    results = {"stage": "pretrain", knn.METRIC: final, knn.RANDOM_INIT_METRIC: 0.4222}
    if raw is not None:
        results[knn.RAW_PIXELS_METRIC] = raw
    found = report.read_knn(_pretrain_run_dir(tmp_path, {**results, "seconds": {"total": 1.0}}))
    assert found == report.KnnResult(final, 0.4222, raw)

    page = _Page()
    page.feed("".join(report.knn_parts(found)))
    text = "".join(page.text)
    assert page.table(["kNN top-1", "value"]) == [
        ["after pretraining (backbone features)", f"{final:.4f}"],
        ["floor: random-init backbone", "0.4222"],
        ["floor: raw pixels", "n/a" if raw is None else f"{raw:.4f}"],
    ]
    assert (report.BELOW_RAW_PIXELS in text) is below
    if below:
        assert f"worse ({final:.4f}) than the raw pixels do ({raw:.4f})" in text
    else:
        margin = "" if raw is None else f"{final - raw:+.4f} against raw pixels, "
        assert f"{margin}{final - 0.4222:+.4f} against the random-init backbone" in text


def test_header_names_the_model_a_warm_started_pretraining_began_from():
    from pipeline.runner.summary import RunSummary

    uri = "/out/pipeline/pretrain_trainer/model/7/Format-Serving"
    page = _Page()
    page.feed("".join(report._header(RunSummary(run_id="r", warm_start_from=uri))))
    assert f"pretraining started from (--warm_start) {uri}" in " ".join("".join(page.text).split())
    assert "--warm_start" not in "".join(report._header(RunSummary(run_id="r")))


def test_knn_section_without_the_monitor(tmp_path):
    assert report.read_knn(_pretrain_run_dir(tmp_path, None)) is None
    assert report.read_knn(str(tmp_path / "model_run")) is None
    (tmp_path / "model_run" / "results.json").write_text(json.dumps({"stage": "pretrain"}))
    assert report.read_knn(str(tmp_path / "model_run")) is None
    text = "".join(report.knn_parts(None))
    assert "--knn_every_epochs" in text and report.BELOW_RAW_PIXELS not in text


def test_comparison_section_shows_both_models_per_class_and_the_gate(compared_summary):
    from pipeline.runner.summary import RunSummary

    summary = compared_summary()
    page = _Page()
    page.feed("".join(report._comparison(summary, ["cat", "<dog>"])))
    assert page.table(["", "candidate (SimCLR)", "supervised baseline", "difference"]) == [
        ["top-1", "0.5500", "0.6000", "-0.0500 (95% CI -0.1200 to +0.0200)"],
        ["top-5", "0.9000", "0.9200", "-0.0200"],
        ["optimizer steps", "40", "40", ""],
        ["training seconds", "24", "15", ""],
        ["stages", "pretrain + finetune", "baseline", ""],
    ]
    assert page.table(["class", "candidate", "baseline"]) == [
        ["cat", "0.5000", "0.7000"],
        ["<dog>", "0.6000", "0.5000"],
    ]
    text = " ".join("".join(page.text).split())
    assert "Gain gate failed: candidate top-1 0.5500 is 0.0500 below the baseline's 0.6000" in text
    assert report._comparison(RunSummary(run_id="r"), []) == []


# ----------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def run(pipeline_scenario):
    """The scenario's resumed run (tests/pipeline_runs.py); yields (model_dir, data_dir, stdout)."""
    return (
        pipeline_scenario.model_dir,
        pipeline_scenario.data_dir,
        pipeline_scenario.resumed.stdout,
    )


def _report_path(stdout: str) -> pathlib.Path:
    lines = [line for line in stdout.splitlines() if line.startswith("report: ")]
    assert len(lines) == 1, stdout[-2000:]
    return pathlib.Path(lines[0].removeprefix("report: "))


class _Page(html.parser.HTMLParser):
    """Tables (rows of cell texts), card key/value pairs, image sources and all text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[list[list[str]]] = []
        self.cards: dict[str, str] = {}
        self.images: list[str] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None
        self._card_part: str | None = None
        self._card_key = ""

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "div" and ("k" in classes or "v" in classes):
            self._card_part = "k" if "k" in classes else "v"

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "div":
            self._card_part = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)
        if self._card_part == "k":
            self._card_key = data.strip()
        elif self._card_part == "v":
            self.cards[self._card_key] = data.strip()

    def table(self, header: list[str]) -> list[list[str]]:
        """Body rows of the first table whose header starts with `header`."""
        for rows in self.tables:
            if rows and rows[0][: len(header)] == header:
                return rows[1:]
        raise AssertionError(f"no table with header {header}")


def _chromium(profile: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def _last_logged(stdout: str, stage: str) -> dict[str, str]:
    """The metrics of the stage's last progress line, as the training loop printed them."""
    lines = [line for line in stdout.splitlines() if line.startswith(f"{stage} step ")]
    assert lines, stdout[-2000:]
    pairs = re.findall(r"\| (\w+) (-?[\d.]+)(?= \|)", lines[-1])
    return {f"train/{name}": value for name, value in pairs if name != "lr"}


def test_runner_writes_report_with_valid_pngs(run):
    out, _, stdout = run
    path = _report_path(stdout)
    assert path.parent.parent == out / "report" and path.name == "report.html"
    # `latest` is the newest run's report (later runs of the scenario may have followed B).
    latest = out / "report" / "latest" / "report.html"
    reports = [p for p in (out / "report").glob("*/report.html") if p != latest]
    assert path in reports
    newest = max(reports, key=lambda p: p.stat().st_mtime_ns)
    assert latest.read_text() == newest.read_text()
    page = _Page()
    page.feed(path.read_text())
    assert sorted(page.images) == [
        "confusion_matrix.png",
        "curves_finetune.png",
        "curves_pretrain.png",
    ]
    for name in page.images:
        file = path.parent / name
        assert file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert file.stat().st_size > 10_000
        with Image.open(file) as image:
            image.verify()
        with Image.open(file) as image:
            assert min(image.size) >= 300
            assert np.asarray(image.convert("L")).std() > 5  # not a blank canvas


@pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"{CHROMIUM} not installed (Debian: apt-get install -y chromium)",
)
def test_browser_shows_the_runs_numbers(run, tmp_path):
    out, data, stdout = run
    path = _report_path(stdout)
    dom = _chromium(tmp_path / "profile", "--dump-dom", path.as_uri()).stdout
    page = _Page()
    page.feed(dom)

    # TFMA's own numbers, formatted as the page promises (4 decimals).
    [evaluation] = re.findall(r"^TFMA output: (.+)$", stdout, re.M)
    result = tfma.load_eval_result(evaluation)
    metrics = {key: by_output[""][""] for key, by_output in result.slicing_metrics}

    def value(key, name: str) -> str:
        [v] = [m["doubleValue"] for k, m in metrics[key].items() if k.endswith(name)]
        return f"{v:.4f}"

    top1, top5 = value((), "sparse_categorical_accuracy"), value((), "top_k_categorical_accuracy")
    assert page.cards["top-1 accuracy"] == top1
    assert page.cards["top-5 accuracy"] == top5
    assert page.table(["slice", "examples", "top-1", "top-5"]) == [["overall", "40", top1, top5]]

    # Class ids follow the sorted folder names; the per-class rows carry TFMA's label slices.
    names = sorted(p.name for p in (data / "train").iterdir())
    assert MARKUP_CLASS in names
    expected = [
        [
            str(i),
            name,
            str(TEST_PER_CLASS),
            value((("label", i),), "sparse_categorical_accuracy"),
            value((("label", i),), "top_k_categorical_accuracy"),
        ]
        for i, name in enumerate(names)
    ]
    assert page.table(["id", "class", "examples", "top-1", "top-5"]) == expected

    # The odd class name is shown as text, never parsed as markup.
    assert "<u>" not in dom and "&lt;u&gt;ship&amp;amp;" in dom

    # Blessing: the Evaluator blessed (floor 0, no baseline), the model was pushed.
    assert glob.glob(str(out / "pipeline" / "Evaluator" / "blessing" / "*" / "BLESSED"))
    assert page.cards["blessing"] == "BLESSED" and page.cards["pushed"] == "yes"
    assert ["SparseCategoricalAccuracy", "value", ">= 0.0000"] in page.table(
        ["metric", "kind", "bound"]
    )

    # Data: per-class counts of the subset, the skipped file.
    per_class = page.table(["class", "test", "train"])
    assert per_class[:-1] == [[n, str(TEST_PER_CLASS), str(TRAIN_PER_CLASS)] for n in names]
    assert per_class[-1] == ["total", str(10 * TEST_PER_CLASS), str(10 * TRAIN_PER_CLASS)]
    [skipped] = page.table(["split", "file", "reason"])
    assert skipped[:2] == ["train", BROKEN_FILE]

    # Curves: the last values the training loop printed for each stage.
    for stage in ("pretrain", "finetune"):
        logged = _last_logged(stdout, stage)
        tables = [rows for rows in page.tables if rows and rows[0][0] == "scalar"]
        shown = {row[0]: row[3] for row in tables[0 if stage == "pretrain" else 1][1:]}
        assert logged and {k: shown[k] for k in logged} == logged
    assert "online linear eval" in "".join(page.text)

    # Screenshot: the page renders to a non-blank image.
    shot = tmp_path / "report.png"
    _chromium(
        tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1200,3000", path.as_uri()
    )
    with Image.open(shot) as image:
        assert image.size == (1200, 3000)
        assert np.asarray(image.convert("L")).std() > 10
