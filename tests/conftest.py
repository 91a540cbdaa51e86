# Light on purpose: heavy libraries are imported inside tests and fixtures, never here.
import os

from pipeline.env import apply_defaults

apply_defaults()
# Ray Train's controller polls its workers every 2 s, and every report waits for a poll: the tests' runs are a few
# seconds of steps, so the default made each Ray Train run about 8 s longer. Unset in the product (clusters keep
# Ray's defaults); the tests' local clusters and their subprocesses inherit these.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.3")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # one actor process less per run; no spot nodes here

import pytest


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray cluster on loopback, shared by the tests of a module (started once, ~8 s)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray


@pytest.fixture(scope="session")
def train_workspace(tmp_path_factory):
    """The train tests' tiny LLaVA and cached targets (tests/test_train.py), built once for every module using them."""
    from tests.test_train import make_workspace

    return make_workspace(tmp_path_factory.mktemp("train"))


@pytest.fixture(scope="session")
def zero2_run(train_workspace):
    """An uninterrupted ZeRO-2 run on ``train_workspace``: (config, report); resumed and ZeRO-3 runs compare with it."""
    from tests.test_train import run_zero2

    return run_zero2(train_workspace)
