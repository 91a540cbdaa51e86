"""Joining Ray: an embedded local cluster by default, ``ray.address`` / ``RAY_ADDRESS`` for a real one."""

from __future__ import annotations

import os

from pipeline.config import PipelineConfig


def init_ray(config: PipelineConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # "local": always a new embedded cluster, never one that happens to run on this machine.
        ray.init(address="local", num_cpus=config.ray.num_cpus, include_dashboard=False, log_to_driver=True)


def gpus_per_actor() -> float:
    """One GPU per model actor when the cluster has GPUs; the CPU otherwise."""
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def device_for(num_gpus: float) -> str:
    return "cuda" if num_gpus else "cpu"
