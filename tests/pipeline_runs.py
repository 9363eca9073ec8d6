"""`local_runner.py` run the way a user runs it, shared by the end-to-end tests.

One scenario on one output folder with the default flags (caching on), built once per test
session:
  A. a run killed with SIGKILL (whole process group) once pretraining has written checkpoints;
  B. the same command again: it must resume pretraining and finish, bless and push;
  C. B with only the gate changed (--min_top1=1.01): Evaluator/Pusher run, Trainers cached;
  D. B with --temperature changed: pretraining runs again, from step 0;
  E. D with only reporting options changed: the Trainers run again but train no step.
The report test reads run B's report; the e2e tests assert on all of them.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import tensorflow as tf

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# A class folder name that becomes markup if the report does not escape it.
MARKUP_CLASS = "<u>ship&amp;"
BROKEN_FILE = "cat/zz_broken.jpg"
TRAIN_PER_CLASS, TEST_PER_CLASS = 8, 4
PRETRAIN_STEPS, CHECKPOINT_STEPS = 30, 5
TINY = [
    "--dataset=cifar10",
    "--resnet_depth=18",
    "--width_multiplier=0.125",
    "--proj_out_dim=16",
    "--train_batch_size=16",
    f"--train_steps={PRETRAIN_STEPS}",
    f"--checkpoint_steps={CHECKPOINT_STEPS}",
    "--log_every_steps=5",
    "--finetune_train_batch_size=16",
    "--finetune_train_steps=2",
    "--eval_batch_size=64",
    "--max_bad_fraction=0.05",
]


def make_subset(cifar: pathlib.Path, root: pathlib.Path) -> pathlib.Path:
    """8 train / 4 test images per class; the ship folder renamed to a markup-like name, plus
    one unreadable file that ingestion must skip and the report must list."""
    for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for class_dir in sorted((cifar / split).iterdir()):
            name = MARKUP_CLASS if class_dir.name == "ship" else class_dir.name
            target = root / split / name
            target.mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:count]:
                (target / image.name).symlink_to(image)
    (root / "train" / BROKEN_FILE).write_bytes(b"not an image")
    return root


def runner_env() -> dict[str, str]:
    return dict(os.environ, TF_USE_LEGACY_KERAS="1")


def run_pipeline(args: list[str], timeout: float = 1200) -> subprocess.CompletedProcess:
    """`python local_runner.py ARGS` from the repository root, as a user types it."""
    result = subprocess.run(
        [sys.executable, "local_runner.py", *args],
        cwd=REPO_ROOT,
        env=runner_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    print(result.stdout[-5000:])
    print(result.stderr[-5000:], file=sys.stderr)
    return result


def progress_steps(stdout: str, stage: str) -> list[int]:
    """The steps of a stage's progress lines (`<stage> step N/TOTAL ...`), in order."""
    return [int(s) for s in re.findall(rf"^{stage} step (\d+)/\d+ ", stdout, re.M)]


def checkpoints(stage_dir: pathlib.Path) -> list[int]:
    """Steps of the checkpoints listed in a stage's checkpoint directory."""
    state = tf.train.get_checkpoint_state(str(stage_dir))
    if state is None:
        return []
    return [int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths]


def stage_dirs(model_dir: pathlib.Path, stage: str) -> list[pathlib.Path]:
    return sorted((model_dir / "pipeline" / "checkpoints").glob(f"{stage}-*"))


@dataclass
class Scenario:
    data_dir: pathlib.Path
    model_dir: pathlib.Path
    args: list[str]
    killed_at: list[int]  # checkpoint steps on disk when run A was killed
    killed_files: dict[str, str]  # sha256 of the newest checkpoint's files at the kill
    killed_output: str
    resumed: subprocess.CompletedProcess
    pretrain_dir: pathlib.Path  # the checkpoint directory runs A and B trained in


def kill_mid_pretraining(args: list[str], model_dir: pathlib.Path, log: pathlib.Path) -> str:
    """Starts the runner in its own process group and SIGKILLs the group once pretraining has
    written two checkpoints (and before it ends); returns what it printed."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "local_runner.py", *args],
            cwd=REPO_ROOT,
            env=runner_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 900
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                dirs = stage_dirs(model_dir, "pretrain")
                if dirs and len(checkpoints(dirs[0])) >= 2:
                    break
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert proc.returncode == -signal.SIGKILL, text[-3000:]
    return text


def build_scenario(cifar_dir: pathlib.Path, root: pathlib.Path) -> Scenario:
    data = make_subset(cifar_dir, root / "data")
    out = root / "out"
    args = [*TINY, f"--data_dir={data}", f"--model_dir={out}", "--min_top1=0"]
    killed_output = kill_mid_pretraining(args, out, root / "killed.log")
    [stage_dir] = stage_dirs(out, "pretrain")
    killed_at = checkpoints(stage_dir)
    killed_files = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in stage_dir.glob(f"ckpt-{killed_at[-1]}.*")
    }
    resumed = run_pipeline(args)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return Scenario(data, out, args, killed_at, killed_files, killed_output, resumed, stage_dir)
