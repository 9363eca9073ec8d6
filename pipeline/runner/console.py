"""Keeps known, harmless library chatter off the console of a run; everything else passes as is.

TensorFlow, XLA, TFX, TFMA and Beam print dozens of lines per run that a user can do nothing
about (plugin double registration, unsupported-feature notes, deprecations inside third-party
code). They bury the project's own lines and the warnings that matter. They come from C++
logging writing straight to file descriptor 2, from Python logging and from Python warnings, in
this process and in Beam worker processes, so the filter works on file descriptor 2 itself:
`install_noise_filter` points it at a pipe read by a small filter process, which forwards every
line that matches none of `NOISE_PATTERNS` to the original stderr.

A separate process rather than a thread: when the run dies abruptly (a C++ `LOG(FATAL)` abort,
a segfault, SIGKILL), the filter still forwards the last lines, since it reads until every
writer of the pipe is gone. It ignores SIGINT/SIGTERM for the same reason, so a Ctrl-C
traceback reaches the terminal; it exits by itself once the pipe has no writers left, and it
lives in the run's process group, so killing the group takes it down with the rest.

Set SIMCLR_CONSOLE_FILTER=0 to see everything.
"""

from __future__ import annotations

import atexit
import os
import re
import select
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

DISABLE_ENV = "SIMCLR_CONSOLE_FILTER"


@dataclass(frozen=True)
class NoisePattern:
    """A noise line (`line` searched anywhere in it) and the lines that belong to its record.

    A multi-line record's continuation lines must match `follow` in turn (the last entry repeats)
    for at most `max_follow` lines, arrive in the same burst of output as the first line, and
    not look like the start of a message of their own: a deprecation note disappears whole,
    while a real line written after it is not taken for part of it.
    """

    line: re.Pattern[str]
    follow: tuple[re.Pattern[str], ...] = ()
    max_follow: int = 0


_SITE_PACKAGES = r"\S*[/\\](?:site|dist)-packages[/\\]\S+"

# The one list of what the console drops; each entry says why it is noise.
NOISE_PATTERNS: tuple[NoisePattern, ...] = (
    # TF 2.16's CUDA plugins register their cuDNN/cuFFT/cuBLAS factories twice when XLA is
    # loaded; the second attempt logs an E-level line but the first registration works (on CPU
    # machines too, where nothing CUDA is used at all).
    NoisePattern(
        re.compile(
            r"Unable to register cu(?:DNN|FFT|BLAS) factory: Attempting to register factory for "
            r"plugin \w+ when one has already been registered"
        )
    ),
    # XLA's computation placer hits the same double registration; nothing is misconfigured.
    NoisePattern(re.compile(r"computation placer already registered")),
    # TensorRT is optional and this project never converts models with TF-TRT.
    NoisePattern(re.compile(r"TF-TRT Warning: Could not find TensorRT")),
    # Startup notice of absl's C++ logging about where early messages go; says nothing about
    # the run.
    NoisePattern(
        re.compile(r"All log messages before absl::InitializeLog\(\) is called are written to")
    ),
    # Informational notices that oneDNN kernels are on and that the wheel could use more CPU
    # instructions if rebuilt (the second one ends with a "To enable ..." line).
    NoisePattern(re.compile(r"oneDNN custom operations are on\.")),
    NoisePattern(
        re.compile(r"This TensorFlow binary is optimized to use available CPU instructions"),
        follow=(re.compile(r"^To enable the following instructions: "),),
        max_follow=1,
    ),
    # TFX's local resolver for the latest blessed model notes a query feature it does not need;
    # it prints once per resolver run (nine times in a normal run).
    NoisePattern(re.compile(r"ArtifactQuery\.property_predicate is not supported")),
    # TFX falls back to the tf.Example payload format, which is exactly what ExampleGen writes.
    NoisePattern(
        re.compile(
            r"Examples artifact does not have payload_format custom property\. "
            r"Falling back to FORMAT_TF_EXAMPLE"
        )
    ),
    # TFMA first tries to load the exported SavedModel as a Keras model and says so before
    # falling back to the SavedModel signatures, which are what it evaluates.
    NoisePattern(re.compile(r"SavedModel saved prior to TF 2\.5 detected when loading Keras")),
    # Keras cannot store a config for subclassed models; the exports are served through
    # explicit SavedModel signatures and never rebuilt from a Keras config.
    NoisePattern(re.compile(r"Model's `__init__\(\)` arguments contain non-serializable objects")),
    # Reading TFMA results of a first run, which has no baseline model to compare with.
    NoisePattern(
        re.compile(
            r"Fail to find (?:metrics|plots) for model name: baseline \. "
            r"Available model names are"
        )
    ),
    # Beam's pure-Python CRC for TFRecords is fast enough at this scale; installing
    # python-snappy is not required.
    NoisePattern(re.compile(r"Couldn't find python-snappy so the implementation of")),
    # TensorFlow deprecation notes for calls made inside installed packages (TFMA's
    # tf_record_iterator, "use tf.data.TFRecordDataset" ...): only their maintainers can act on
    # them. The note's "Instructions for updating:" lines go with it. Calls from this project
    # are not in site-packages, so their notes still show.
    NoisePattern(
        re.compile(
            rf"\bFrom {_SITE_PACKAGES}:\d+: .*\(from [\w.]+\).* is deprecated and will be removed"
        ),
        follow=(re.compile(r"^Instructions for updating:\s*$"), re.compile(r"\S")),
        max_follow=8,
    ),
    # Deprecation and future-change warnings raised inside installed packages (for example
    # google-api-core on Python 3.10); the indented source line printed under one goes with it.
    NoisePattern(
        re.compile(rf"^{_SITE_PACKAGES}:\d+: (?:Deprecation|PendingDeprecation|Future)Warning: "),
        follow=(re.compile(r"^\s"),),
        max_follow=1,
    ),
)

# A line that starts a new message of its own is never taken for the continuation of noise.
_RECORD_START = re.compile(
    r"^(?:Traceback \(most recent call last\)"
    r"|[A-Z]+:[\w.]*:"  # Python logging's default format, e.g. WARNING:absl:
    r"|[IWEF]\d{4} \d\d:\d\d:\d\d"  # absl format
    r"|\d{4}-\d\d-\d\d[ T]\d\d:\d\d"  # TF C++ format
    r"|\S+:\d+: \w+Warning: "  # Python warnings
    r"|(?:[Ee]rror|ERROR|[Ww]arning|WARNING|[Ff]atal|FATAL)\b"
    r"|\w*(?:Error|Exception|Interrupt)\b)"
)

# Idle time after which a line without its newline yet (a prompt, a progress bar) is shown.
_PARTIAL_LINE_DELAY_S = 0.2
_MAX_HELD_BYTES = 1 << 16
# How long the exiting run waits for the filter to forward its last lines; longer only when
# worker processes outlive the run with the pipe still open.
_EXIT_WAIT_S = 5.0

_installed = False


class LineFilter:
    """Splits a byte stream into lines and drops those of noise records; keeps bytes as given."""

    def __init__(self, patterns: tuple[NoisePattern, ...] = NOISE_PATTERNS) -> None:
        self._patterns = patterns
        self._held = b""  # start of a line whose newline has not arrived
        self._held_verdict: bool | None = None  # noise verdict already given to a shown head
        self._record: NoisePattern | None = None  # noise record whose continuation may follow
        self._followed = 0  # continuation lines of `_record` dropped so far

    @property
    def holding(self) -> bool:
        """Whether part of a line waits for its newline."""
        return bool(self._held)

    def feed(self, data: bytes) -> bytes:
        """The complete lines of `data` (after what was held) that are not noise."""
        lines = (self._held + data).split(b"\n")
        self._held = lines.pop()
        kept = [line + b"\n" for line in lines if not self._is_noise(line)]
        if not self._held:
            # The burst of output ended with a full line: a record cannot continue later.
            self._record = None
        elif len(self._held) > _MAX_HELD_BYTES:
            kept.append(self.release_held())
        return b"".join(kept)

    def release_held(self) -> bytes:
        """Decides on the held start of a line now (output went idle); the rest follows it."""
        head, self._held = self._held, b""
        if self._held_verdict is None:
            self._held_verdict = self._is_noise(head, complete=False)
        self._record = None
        return b"" if self._held_verdict else head

    def finish(self) -> bytes:
        """What is left when the stream ends (a last line without newline)."""
        tail, self._held = self._held, b""
        return b"" if not tail or self._is_noise(tail) else tail

    def _is_noise(self, line: bytes, complete: bool = True) -> bool:
        if self._held_verdict is not None:
            # The rest of a line whose start was already shown or dropped.
            verdict = self._held_verdict
            if complete:
                self._held_verdict = None
            return verdict
        text = line.decode("utf-8", errors="replace")
        record = self._record
        if (
            record is not None
            and self._followed < record.max_follow
            and not _RECORD_START.match(text)
            and record.follow[min(self._followed, len(record.follow) - 1)].search(text)
        ):
            self._followed += 1
            return True
        self._record = None
        for pattern in self._patterns:
            if pattern.line.search(text):
                self._record = pattern if pattern.follow else None
                self._followed = 0
                return True
        return False


def _write_all(fd: int, data: bytes) -> bool:
    """Writes `data` to `fd`; False once the destination is gone (closed terminal, pipe)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except OSError:
            return False
    return True


def pump(in_fd: int, out_fd: int, patterns: tuple[NoisePattern, ...] = NOISE_PATTERNS) -> None:
    """Forwards the non-noise lines of `in_fd` to `out_fd` until every writer has closed it.

    Keeps reading even when `out_fd` fails, so writers never block on a full pipe.
    """
    line_filter = LineFilter(patterns)
    out_ok = True

    def emit(data: bytes) -> None:
        nonlocal out_ok
        if data and out_ok:
            out_ok = _write_all(out_fd, data)

    while True:
        if line_filter.holding:
            ready, _, _ = select.select([in_fd], [], [], _PARTIAL_LINE_DELAY_S)
            if not ready:
                emit(line_filter.release_held())
                continue
        data = os.read(in_fd, 1 << 16)
        if not data:
            emit(line_filter.finish())
            return
        emit(line_filter.feed(data))


def _filter_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off")


def install_noise_filter() -> bool:
    """Routes file descriptor 2 of this process and its future children through the filter.

    Call it first thing, before TensorFlow is imported, so that its C++ startup lines are
    filtered too. Returns whether the filter is now active (not when disabled through
    SIMCLR_CONSOLE_FILTER=0, already installed, or without a usable stderr).
    """
    global _installed
    if _installed or _filter_disabled() or not sys.executable:
        return False
    try:
        os.fstat(2)
    except OSError:
        return False
    if sys.stderr is not None:
        sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    original_fd = os.dup(2)
    in_main_thread = threading.current_thread() is threading.main_thread()
    # Ignored signals stay ignored across exec, so the filter cannot be interrupted by a Ctrl-C
    # even before its own start-up code runs.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main_thread else None
    try:
        process = subprocess.Popen(
            # -I: isolated, no script folder on sys.path (this package's modules would shadow
            # the standard library's) and no PYTHON* variables.
            [sys.executable, "-I", os.path.abspath(__file__)],
            stdin=read_fd,
            stdout=original_fd,
            stderr=original_fd,
            close_fds=True,
        )
    except OSError:
        os.close(read_fd)
        os.close(write_fd)
        os.close(original_fd)
        return False
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    os.close(read_fd)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    atexit.register(_restore_stderr, process, original_fd)
    _installed = True
    return True


def _restore_stderr(process: subprocess.Popen[bytes], original_fd: int) -> None:
    """At exit: hands fd 2 back and waits until the filter has forwarded the last lines."""
    global _installed
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    # Replacing fd 2 drops this process's end of the pipe; the filter sees end of input once
    # children that inherited it are gone too.
    os.dup2(original_fd, 2)
    os.close(original_fd)
    _installed = False
    try:
        process.wait(timeout=_EXIT_WAIT_S)
    except subprocess.TimeoutExpired:
        pass  # Worker processes still hold the pipe; the filter keeps forwarding their lines.


def _filter_process_main() -> None:
    for name in ("SIGINT", "SIGTERM"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    pump(0, 1)


if __name__ == "__main__":
    _filter_process_main()
