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
    if os.environ.get("METACOMPRESS_VERBOSE") != "1":  # quiet console (docs/design.md §8): no weight-loading bars
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        # MLflow's loggers have their own console handler (they bypass ours): no INFO lines such as "Creating
        # initial MLflow database tables".
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # "Downloading artifacts" bars
    if not os.path.exists("/dev/nvidiactl"):
        # Said up front, DeepSpeed's choice of the CPU accelerator is an INFO line, not a console warning.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # The DeepSpeed launcher does not set it and multi-process CPU runs get 10x slower without it.
    if "OMP_NUM_THREADS" not in os.environ and os.environ.get("WORLD_SIZE", "1") != "1":
        os.environ["OMP_NUM_THREADS"] = "1"


def disable_deepspeed_shm_build() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory comm op (60-90 s) at init; gloo does not need it."""
    import importlib

    # `import deepspeed.comm.torch` would resolve to the real torch package through a name clash.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


VERBOSE_ENV = "METACOMPRESS_VERBOSE"  # set by the CLI's --verbose


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


class _QuietConsole:
    """The console in quiet mode (docs/design.md §8): the project's own warnings and anyone's errors; the rest
    (library INFO, MLflow/DeepSpeed warnings) goes to the log file only."""

    def filter(self, record) -> bool:
        import logging

        if record.name == "metacompress.traceback":  # the CLI prints the error in one line itself
            return False
        if record.levelno >= logging.ERROR:
            return True
        return record.levelno >= logging.WARNING and record.name.split(".")[0] == "metacompress"


def configure_logging(log_dir: str | None = None) -> str | None:
    """Quiet console (or everything with ``--verbose``); everything at INFO and above, Python warnings included,
    in ``log_dir/run-<time>-<pid>.log`` when given. Returns the log file's path. Idempotent."""
    import logging
    import time
    from pathlib import Path

    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_metacompress", False)]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler()
    if verbose():
        console.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%H:%M:%S"))
        console.addFilter(lambda record: record.name != "metacompress.traceback")
    else:
        console.setLevel(logging.WARNING)
        console.addFilter(_QuietConsole())
        console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    console._metacompress = True
    root.addHandler(console)
    logging.captureWarnings(True)
    if log_dir is None:
        return None
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    path = Path(log_dir) / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    handler._metacompress = True
    root.addHandler(handler)
    return str(path)
