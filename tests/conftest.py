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
