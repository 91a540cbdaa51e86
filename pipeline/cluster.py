"""Joining Ray: an embedded local cluster by default, ``ray.address`` / ``RAY_ADDRESS`` for a real one."""

from __future__ import annotations

import logging
import os
import time

from pipeline.config import PipelineConfig

log = logging.getLogger("metacompress")


def init_ray(config: PipelineConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    from pipeline.env import verbose

    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    # Workers' output reaches the console only with --verbose (docs/design.md §8); errors still come back as
    # exceptions, and every worker's log stays in Ray's session directory.
    to_driver = verbose()
    level = logging.INFO if to_driver else logging.WARNING  # Ray's own start-up lines: the log file's business
    if address:
        ray.init(address=address, log_to_driver=to_driver, logging_level=level)
    else:
        # "local": always a new embedded cluster, never one that happens to run on this machine.
        ray.init(address="local", num_cpus=config.ray.num_cpus, include_dashboard=False, log_to_driver=to_driver,
                 logging_level=level)


def gpus_per_actor() -> float:
    """One GPU per model actor when the cluster has GPUs; the CPU otherwise."""
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def actor_gpus(config: PipelineConfig, stage: str) -> float:
    """GPUs per actor (or Ray Train worker) of ``stage``: ``resources.<stage>.num_gpus``, or when that is null one
    GPU if the cluster has one now, else the CPU. A stage that asks for GPUs never falls back to the CPU: while the
    cluster has fewer, it asks the autoscaler for them and waits ``gpu_wait_s``, then fails naming the stage."""
    import ray

    wanted = getattr(config.resources, stage)
    if wanted.num_gpus is None:
        return gpus_per_actor()
    if not wanted.num_gpus:
        return 0.0
    deadline = time.monotonic() + wanted.gpu_wait_s
    asked = False
    while (have := ray.cluster_resources().get("GPU", 0)) < wanted.num_gpus:
        if not asked:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[{"GPU": wanted.num_gpus}])
            log.info("%s: waiting up to %g s for a GPU node to join (the cluster has %g GPUs)", stage,
                     wanted.gpu_wait_s, have)
            asked = True
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{stage}: resources.{stage}.num_gpus = {wanted.num_gpus:g} but the cluster has "
                               f"{have:g} GPUs after waiting {wanted.gpu_wait_s:g} s (resources.{stage}.gpu_wait_s); "
                               "check the cluster's GPU node types and autoscaler (`ray status`), or set "
                               f"resources.{stage}.num_gpus: 0 to run this stage on CPUs")
        time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
    return float(wanted.num_gpus)


def device_for(num_gpus: float) -> str:
    return "cuda" if num_gpus else "cpu"
