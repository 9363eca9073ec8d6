"""Test-wide setup: Keras 2 before TensorFlow, quiet logs, shared data paths."""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
CIFAR_DIR = REPO_ROOT.parent / "shared" / "data" / "cifar10"


@pytest.fixture(autouse=True)
def _float32_policy_after_each_test():
    """A test that runs a job in-process (a Trainer, a benchmark's main) leaves Keras' global
    precision policy as the job set it, bfloat16 on an AMX CPU; the next test starts from
    Keras' default, whichever CPU the suite lands on."""
    yield
    import tf_keras

    tf_keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="session")
def cifar_dir() -> pathlib.Path:
    if not CIFAR_DIR.is_dir():
        pytest.skip(f"CIFAR-10 class folders not found at {CIFAR_DIR}")
    return CIFAR_DIR


@pytest.fixture(scope="session")
def transformed(cifar_dir, tmp_path_factory):
    """One Transform output of a small CIFAR-10 subset, shared by the Trainer and bench tests."""
    from tests.models import fixtures

    return fixtures.build_transformed(cifar_dir, tmp_path_factory.mktemp("transformed"))


@pytest.fixture(scope="session")
def pipeline_scenario(cifar_dir, tmp_path_factory):
    """Runs A (killed mid-pretraining) and B (resumed) of tests/pipeline_runs.py, once."""
    from tests import pipeline_runs

    return pipeline_runs.build_scenario(cifar_dir, tmp_path_factory.mktemp("scenario"))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """With pytest-xdist (`--dist loadgroup`), the tests that share the session's pipeline
    scenario run on one worker, so it is built once (this must run before xdist's own hook,
    which reads the group marker to route the tests). The end-to-end tests go first: the long
    runs are spread over both workers early instead of ending the suite on one of them, the
    scenario's tests (the longest unit of work) first of all."""
    shared = set()
    for item in items:
        if "pipeline_scenario" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("pipeline_scenario"))
            shared.add(item)
    items.sort(key=lambda item: (item not in shared, item.get_closest_marker("e2e") is None))
