"""The suite's scheduling: tests that share an expensive session fixture run on one worker."""

from __future__ import annotations

import subprocess
import sys

GROUPED = r"""
import os
import pytest

@pytest.fixture(scope="session")
def built():
    with open(os.path.join(os.path.dirname(__file__), "built.txt"), "a") as f:
        f.write(os.environ["PYTEST_XDIST_WORKER"] + "\n")

@pytest.mark.xdist_group("shared")
def test_one(built):
    pass

@pytest.mark.xdist_group("shared")
def test_two(built):
    pass

@pytest.mark.parametrize("i", range(8))
def test_other(i):
    pass
"""


def test_xdist_groups_keep_their_tests_on_one_worker(tmp_path):
    """`scripts/test.sh` runs pytest-xdist with `--dist loadgroup` so that the pipeline scenario
    and the pool run are built once. xdist groups by rewriting each test's node id, which a
    pytest that stores node ids elsewhere (pytest 9.2 with xdist 3.6 and 3.8) silently ignores:
    then every worker builds the shared runs again."""
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup"]
        + ["-p", "no:cacheprovider", "-rA", str(tmp_path / "test_grouped.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:]
    assert len((tmp_path / "built.txt").read_text().split()) == 1, result.stdout[-2000:]
    assert "test_grouped.py::test_one@shared" in result.stdout
