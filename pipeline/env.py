"""Environment defaults every entry point needs; applied once, before heavy imports, never overriding the user."""

from __future__ import annotations

import os

DEFAULTS = {
    # No model hub is reachable: loading is from local directories only.
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    # Ray on loopback (also fixes Ray Train's MASTER_ADDR), no token auth, no usage stats.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    # DeepSpeed: never JIT-build C++ ops at install or run time (we patch the shm op away at init).
    "DS_BUILD_OPS": "0",
    "DS_SKIP_CUDA_CHECK": "1",
}


def apply_defaults() -> None:
    joining = "RAY_ADDRESS" in os.environ
    for key, value in DEFAULTS.items():
        # A driver joining a real cluster keeps the node's own address; loopback is for the embedded cluster.
        if not (joining and key == "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
            os.environ.setdefault(key, value)
    # The DeepSpeed launcher does not set it and multi-process CPU runs get 10x slower without it.
    if "OMP_NUM_THREADS" not in os.environ and os.environ.get("WORLD_SIZE", "1") != "1":
        os.environ["OMP_NUM_THREADS"] = "1"


def disable_deepspeed_shm_build() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory comm op (60-90 s) at init; gloo does not need it."""
    import importlib

    # `import deepspeed.comm.torch` would resolve to the real torch package through a name clash.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
