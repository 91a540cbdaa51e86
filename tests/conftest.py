# Light on purpose: heavy libraries are imported inside tests and fixtures, never here.
from pipeline.env import apply_defaults

apply_defaults()

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
