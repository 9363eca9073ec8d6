"""Console noise filter: known library noise disappears, every other line (errors and tracebacks
above all) reaches the console unchanged, in order, promptly, and even when the run dies."""

from __future__ import annotations

import os
import pathlib
import select
import signal
import subprocess
import sys
import threading
import time

import pytest

from pipeline.runner import console

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]

# Lines seen in real runs, one per pattern of console.NOISE_PATTERNS, first lines of records.
NOISE_SAMPLES = [
    "2026-12-02 02:13:06.715303: E external/local_xla/xla/stream_executor/cuda/cuda_dnn.cc:10575]"
    " Unable to register cuDNN factory: Attempting to register factory for plugin cuDNN when one"
    " has already been registered",
    "E0000 00:00:1733.1 123 computation_placer.cc:161] computation placer already registered."
    " Please check linkage and avoid linking the same target more than once.",
    "2026-12-02 02:19:56.733629: W tensorflow/compiler/tf2tensorrt/utils/py_utils.cc:38]"
    " TF-TRT Warning: Could not find TensorRT",
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "2026-12-02 02:19:55.465018: I tensorflow/core/util/port.cc:113] oneDNN custom operations"
    " are on. You may see slightly different numerical results due to floating-point round-off"
    " errors from different computation orders.",
    "2026-12-02 02:19:55.509503: I tensorflow/core/platform/cpu_feature_guard.cc:210] This"
    " TensorFlow binary is optimized to use available CPU instructions in performance-critical"
    " operations.",
    "WARNING:absl:ArtifactQuery.property_predicate is not supported.",
    "WARNING:absl:Examples artifact does not have payload_format custom property. Falling back to"
    " FORMAT_TF_EXAMPLE",
    "WARNING:tensorflow:SavedModel saved prior to TF 2.5 detected when loading Keras model."
    " Please ensure that you are saving the model with model.save()",
    "WARNING:tensorflow:Model's `__init__()` arguments contain non-serializable objects. Please"
    " implement a `get_config()` method in the subclassed Model for proper saving and loading.",
    "WARNING:absl:Fail to find plots for model name: baseline . Available model names are []",
    "WARNING:apache_beam.io.tfrecordio:Couldn't find python-snappy so the implementation of"
    " _TFRecordUtil._masked_crc32c is not as fast as it could be.",
    "WARNING:tensorflow:From /v/lib/python3.10/site-packages/tensorflow_model_analysis/writers/"
    "metrics_plots_and_validations_writer.py:112: tf_record_iterator (from"
    " tensorflow.python.lib.io.tf_record) is deprecated and will be removed in a future version.",
    "/v/lib/python3.10/site-packages/google/api_core/_python_version_support.py:246:"
    " FutureWarning: You are using a non-supported Python version (3.10.13).",
]
# Lines that look alike but matter: they must never match a pattern.
REAL_SAMPLES = [
    "WARNING:tensorflow:From /work/main/models/data.py:12: foo (from tensorflow.python.x) is"
    " deprecated and will be removed in a future version.",  # the project's own call
    "/work/main/models/train_loop.py:40: FutureWarning: the project's own warning",
    "/v/lib/python3.10/site-packages/keras/x.py:9: UserWarning: Your input ran out of data",
    "2026-12-02 02:19:55.465712: I external/local_tsl/tsl/cuda/cudart_stub.cc:32] Could not find"
    " cuda drivers on your machine, GPU will not be used.",
    "2026-12-02 02:20:00.1: F tensorflow/core/framework/tensor_shape.cc:45] Check failed: NDims()",
    "WARNING:absl:Fail to find metrics for model name: candidate . Available model names are []",
    "Traceback (most recent call last):",
    "error: pipeline failed: ImageDataError: Class folder /d/train/cat has no image files",
]


def _is_noise(line: str) -> bool:
    return any(p.line.search(line) for p in console.NOISE_PATTERNS)


def test_every_pattern_is_used_and_real_lines_are_not_noise() -> None:
    for pattern in console.NOISE_PATTERNS:
        assert any(pattern.line.search(s) for s in NOISE_SAMPLES), pattern.line.pattern
    for sample in NOISE_SAMPLES:
        assert _is_noise(sample), sample
    for sample in REAL_SAMPLES:
        assert not _is_noise(sample), sample


DEPRECATION = (
    b"WARNING:tensorflow:From /v/site-packages/tfma/w.py:112: tf_record_iterator (from"
    b" tensorflow.python.lib.io.tf_record) is deprecated and will be removed in a future"
    b" version.\nInstructions for updating:\nUse eager execution and: \n"
    b"`tf.data.TFRecordDataset(path)`\n"
)


def test_multi_line_records_go_whole_and_only_within_their_burst() -> None:
    line_filter = console.LineFilter()
    assert line_filter.feed(DEPRECATION) == b""
    # A new message right after the note in the same burst is not taken for its continuation.
    assert line_filter.feed(DEPRECATION[:-1] + b"\nTraceback (most recent call last):\n") == (
        b"Traceback (most recent call last):\n"
    )
    # Continuation lines arriving after the burst ended belong to something else.
    header, rest = DEPRECATION.split(b"\n", 1)
    assert line_filter.feed(header + b"\n") == b""
    assert line_filter.feed(rest) == rest
    # The same note for a call made by the project itself stays whole.
    own = DEPRECATION.replace(b"/v/site-packages/tfma/w.py", b"/work/main/models/data.py")
    assert line_filter.feed(own) == own
    # Without "Instructions for updating:" right after it, the next line is not swallowed.
    assert line_filter.feed(header + b"\nplain real line\n") == b"plain real line\n"
    # A Python warning's indented source line goes with it; the next unindented line does not.
    warning = b"/v/site-packages/lib.py:3: FutureWarning: soon\n  warnings.warn('soon')\n"
    assert line_filter.feed(warning + b"real after warning\n") == b"real after warning\n"


def test_continuation_is_bounded() -> None:
    header = DEPRECATION.split(b"\n", 1)[0]
    instructions = b"".join(b"step %d\n" % i for i in range(20))
    out = console.LineFilter().feed(header + b"\nInstructions for updating:\n" + instructions)
    # One "Instructions for updating:" line plus seven more dropped, the rest shown.
    assert out == b"".join(b"step %d\n" % i for i in range(7, 20))


def test_bytes_pass_unchanged_and_partial_lines_keep_their_verdict() -> None:
    line_filter = console.LineFilter()
    odd = b"caf\xe9 \xff\xfe progress 10%\rprogress 20%\r\n"
    assert line_filter.feed(odd) == odd
    # A prompt without newline is shown when output goes idle, and the rest of its line after it.
    assert line_filter.feed(b"Continue? [y/N] ") == b""
    assert line_filter.holding
    assert line_filter.release_held() == b"Continue? [y/N] "
    assert line_filter.feed(b"y\nnext\n") == b"y\nnext\n"
    # A noise line cut the same way, once its head gives it away, is dropped whole.
    noise = NOISE_SAMPLES[6].encode() + b" (resolver)"
    cut = noise.index(b" (resolver)")
    assert line_filter.feed(noise[:cut]) == b""
    assert line_filter.release_held() == b""
    assert line_filter.feed(noise[cut:] + b"\nkept\n") == b"kept\n"
    assert line_filter.feed(b"last words") == b""
    assert line_filter.finish() == b"last words"


def test_pump_shows_a_partial_line_promptly_and_drains_at_end() -> None:
    in_read, in_write = os.pipe()
    out_read, out_write = os.pipe()
    pumping = threading.Thread(target=console.pump, args=(in_read, out_write))
    pumping.start()
    try:
        os.write(in_write, b"Password: ")
        ready, _, _ = select.select([out_read], [], [], 5)
        assert ready, "a held partial line was not released while the writer stayed idle"
        assert os.read(out_read, 100) == b"Password: "
        os.write(in_write, b"\n" + NOISE_SAMPLES[6].encode() + b"\nbye")
    finally:
        os.close(in_write)
        pumping.join(10)
        os.close(in_read)
        os.close(out_write)
    assert not pumping.is_alive()
    with os.fdopen(out_read, "rb") as rest:
        assert rest.read() == b"\nbye"


NOISY_LIB = """\
import warnings


def old():
    warnings.warn("noisylib.old() will change", FutureWarning)
"""

SCRIPT = """\
import ctypes
import logging
import os
import sys
import warnings

sys.path[:0] = [{repo!r}, {lib!r}]
from pipeline.runner import console

print("installed", console.install_noise_filter(), flush=True)
libc = ctypes.CDLL(None)


def c_write(text):
    data = text.encode()
    libc.write(2, data, len(data))


os.write(2, {cuda!r}.encode() + b"\\n")
os.write(2, b"real 1: os.write\\n")
c_write({cpu!r} + "\\nTo enable the following instructions: AVX2 FMA, in other operations.\\n")
c_write("real 2: C-level write\\n")
logging.basicConfig()
logging.getLogger("absl").warning("ArtifactQuery.property_predicate is not supported.")
logging.warning("real 3: logging")
logging.getLogger("tensorflow").warning({deprecation!r})
logging.getLogger("tensorflow").warning({own_deprecation!r})
import noisylib

noisylib.old()
warnings.warn("real 4: a warning of the project", UserWarning)
sys.stderr.write("real 5: last line before the traceback\\n")
raise ValueError("real 6: the run failed")
"""

# Markers of every line the script writes as noise, continuation lines included.
NOISE_MARKERS = [
    "cuDNN factory",
    "This TensorFlow binary is optimized",
    "To enable the following instructions",
    "ArtifactQuery",
    "tfma/w.py",
    "noisy instructions",
    "noisylib",
]


def _run_script(tmp_path: pathlib.Path, source: str, disable: bool = False) -> tuple[str, str]:
    lib = tmp_path / "site-packages"
    lib.mkdir(exist_ok=True)
    (lib / "noisylib.py").write_text(NOISY_LIB)
    script = tmp_path / "script.py"
    script.write_text(source.format(repo=str(REPO_ROOT), lib=str(lib), **_SCRIPT_VALUES))
    env = {**os.environ, console.DISABLE_ENV: "0" if disable else "1"}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60
    )
    # At exit the run hands stderr back and the filter ends at once; a run that kept its end
    # of the pipe would wait out the filter for the full exit timeout.
    assert time.monotonic() - started < console._EXIT_WAIT_S
    assert result.returncode == 1, result.stderr
    return result.stdout, result.stderr


_SCRIPT_VALUES = {
    "cuda": NOISE_SAMPLES[0],
    "cpu": NOISE_SAMPLES[5],
    "deprecation": DEPRECATION.decode().split("\n", 1)[0].split(":", 2)[2]
    + "\nInstructions for updating:\nUse noisy instructions.",
    "own_deprecation": "From /work/main/models/data.py:3: foo (from tensorflow.x) is deprecated "
    "and will be removed in a future version.\nInstructions for updating:\nUse bar.",
}


def test_installed_filter_drops_noise_from_every_source_and_keeps_the_rest(
    tmp_path: pathlib.Path,
) -> None:
    out, filtered = _run_script(tmp_path, SCRIPT)
    assert out == "installed True\n"
    raw_out, raw = _run_script(tmp_path, SCRIPT, disable=True)
    assert raw_out == "installed False\n"

    raw_lines = raw.splitlines()
    for marker in NOISE_MARKERS:
        assert any(marker in line for line in raw_lines), f"script wrote no {marker!r} line"
    # The project's deprecation note has "Instructions for updating:" too: only the noise
    # record's one goes, so drop it by position in the expected output.
    noisy_instructions = raw_lines.index("Use noisy instructions.") - 1
    assert raw_lines[noisy_instructions] == "Instructions for updating:"
    expected = [
        line
        for i, line in enumerate(raw_lines)
        if i != noisy_instructions and not any(marker in line for marker in NOISE_MARKERS)
    ]
    # Exactly the unfiltered output without the noise: same lines, same order, none lost.
    assert filtered.splitlines() == expected
    for real in ("real 1", "real 2", "real 3", "real 4", "real 5", "Use bar."):
        assert any(real in line for line in expected)
    assert expected[-2:] == [
        '    raise ValueError("real 6: the run failed")',
        "ValueError: real 6: the run failed",
    ]
    assert "Traceback (most recent call last):" in expected


ABORT_SCRIPT = """\
import ctypes
import os
import sys

sys.path.insert(0, {repo!r})
from pipeline.runner import console

console.install_noise_filter()
os.write(2, b"real: written just before the abort\\n")
data = b"F0000 00:00:1.0 1 check.cc:1] Check failed: x > 0\\n"
ctypes.CDLL(None).write(2, data, len(data))
os.abort()
"""


def test_last_lines_reach_the_console_when_the_process_aborts(tmp_path: pathlib.Path) -> None:
    script = tmp_path / "abort.py"
    script.write_text(ABORT_SCRIPT.format(repo=str(REPO_ROOT)))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == -signal.SIGABRT
    assert result.stderr.splitlines() == [
        "real: written just before the abort",
        "F0000 00:00:1.0 1 check.cc:1] Check failed: x > 0",
    ]


WAIT_SCRIPT = """\
import signal
import subprocess
import sys
import time

# As in a terminal: a test runner started in the background may hand down SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)

sys.path.insert(0, {repo!r})
from pipeline.runner import console

console.install_noise_filter()
# A worker that inherits the filtered stderr, like Beam's.
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print("ready", flush=True)
time.sleep(60)
"""


def _start_waiting_run(tmp_path: pathlib.Path) -> subprocess.Popen[str]:
    script = tmp_path / "wait.py"
    script.write_text(WAIT_SCRIPT.format(repo=str(REPO_ROOT)))
    process = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout.readline() == "ready\n"
    return process


def test_ctrl_c_traceback_reaches_the_console(tmp_path: pathlib.Path) -> None:
    process = _start_waiting_run(tmp_path)
    try:
        os.killpg(process.pid, signal.SIGINT)  # what a Ctrl-C in the terminal does
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert err.rstrip().endswith("KeyboardInterrupt"), err
    assert "Traceback (most recent call last):" in err


def test_sigkill_of_the_process_group_does_not_hang(tmp_path: pathlib.Path) -> None:
    process = _start_waiting_run(tmp_path)
    os.killpg(process.pid, signal.SIGKILL)
    try:
        process.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("stderr stayed open after the whole process group was killed")
    assert process.returncode == -signal.SIGKILL
