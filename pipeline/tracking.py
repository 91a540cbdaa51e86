"""MLflow tracking (docs/design.md §6): one parent run per pipeline invocation, a nested run per stage, the compressor as a
registered model.

Store: ``tracking.uri`` when set (``http://head:5000`` on a cluster, or any MLflow URI); otherwise a SQLite file
``<work_dir>/mlflow.db`` with artifacts under ``<work_dir>/mlartifacts`` (a ``file://`` location given explicitly:
without one MLflow writes ``./mlruns`` into the current directory). Only the driver creates the store (concurrent
first use of a SQLite store races on its schema migration); workers log to an existing run by id.

The compressor is logged as a pyfunc "model from code" (``pipeline/mlflow_model.py``) whose artifact is the
``save_pretrained`` directory: loading it runs that file and reads safetensors, never unpickles.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from pathlib import Path
from typing import Iterator

from pipeline.config import PipelineConfig
from pipeline.hashing import file_sha256

CANDIDATE = "candidate"
WORK_DIR_TAG = "metacompress.work_dir"  # on pipeline and stage runs: which work_dir's lease they ran under
WEIGHTS_SHA_TAG = "weights_sha256"  # registry tag: sha256 of the version's model.safetensors (docs/design.md §8)
MODEL_FILE = Path(__file__).with_name("mlflow_model.py")


SERVER_SCHEMES = ("http://", "https://", "databricks")


def tracking_uri(config: PipelineConfig) -> str:
    """``tracking.uri``, else SQLite in the work_dir; a storage-URI work_dir cannot hold a SQLite file, so its
    database is local: ``pipeline.storage.local_cache(work_dir)/mlflow.db`` (docs/design.md §6.4)."""
    from pipeline import storage

    if config.tracking.uri:
        return config.tracking.uri
    if storage.is_remote(config.work_dir):
        return f"sqlite:///{storage.local_cache(config.work_dir)}/mlflow.db"
    return f"sqlite:///{Path(config.work_dir).resolve()}/mlflow.db"


def _ray_head(config: PipelineConfig) -> str | None:
    """The GCS address of the Ray cluster this process joined (``ray.address`` / ``RAY_ADDRESS``); None for the
    embedded local cluster, which may listen on any of this machine's addresses."""
    import os

    import ray

    if not ray.is_initialized() or not (config.ray.address or os.environ.get("RAY_ADDRESS")):
        return None
    return ray.get_runtime_context().gcs_address


def artifact_root(config: PipelineConfig) -> str | None:
    """``file://<work_dir>/mlartifacts`` unless the tracking server manages artifacts itself (http)."""
    if tracking_uri(config).startswith(SERVER_SCHEMES):
        return None
    if "://" in config.work_dir:  # an object store: MLflow writes its artifacts there itself (boto3 for s3://)
        return f"{config.work_dir.rstrip('/')}/mlartifacts"
    return (Path(config.work_dir).resolve() / "mlartifacts").as_uri()


def check_store_for_cluster(uri: str, head: str | None) -> None:
    """On a cluster of other machines (``head``: the Ray head's address or the submit URL's host) only a tracking
    server is accepted: a SQLite or file store on shared storage would be written by the driver and by training
    workers on other nodes at once. A cluster on this machine's loopback keeps the embedded store."""
    import ipaddress

    if uri.startswith(SERVER_SCHEMES) or not head:
        return
    host = head.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        local = False
    if not local:
        raise ValueError(f"tracking.uri = {uri}: a cluster ({host}) logs to one MLflow tracking server, not to a "
                         "SQLite or file store; start it on the head (infra/mlflow_server.sh) and set tracking.uri: "
                         "http://HEAD_IP:5000")


def setup(config: PipelineConfig) -> str:
    """Point MLflow at the config's store and experiment (created when missing) -> experiment id."""
    import mlflow

    from pipeline.env import apply_defaults

    apply_defaults()
    uri = tracking_uri(config)
    check_store_for_cluster(uri, _ray_head(config))
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    name = config.tracking.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        root = artifact_root(config)
        experiment_id = mlflow.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def work_dir_key(config: PipelineConfig) -> str:
    return str(Path(config.work_dir).resolve()) if "://" not in config.work_dir else config.work_dir


def close_stale_runs(config: PipelineConfig) -> list[str]:
    """Mark KILLED the runs a killed driver left RUNNING on this work_dir (docs/design.md §8): pipeline and stage
    runs tagged with the work_dir, and every run nested under them. Call it while holding the work_dir's lease
    (pipeline/lease.py): then no other live run can own them. -> the ids closed."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(config)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return []  # no store yet: nothing can be stale
    setup(config)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    running = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'", max_results=5000)
    key, stale = work_dir_key(config), set()
    changed = True
    while changed:  # the tagged runs, then their children, grandchildren...
        changed = False
        for r in running:
            tags = r.data.tags
            if r.info.run_id not in stale and (tags.get(WORK_DIR_TAG) == key
                                               or tags.get("mlflow.parentRunId") in stale):
                stale.add(r.info.run_id)
                changed = True
    for run_id in sorted(stale):
        client.set_tag(run_id, "closed_by", "the next run on this work_dir (its driver was killed)")
        client.set_terminated(run_id, status="KILLED")
    return sorted(stale)


def flatten(data: dict, prefix: str = "") -> dict[str, str]:
    """Nested config dict -> {"train.lr": "0.001", ...} (MLflow params are flat strings, at most 6000 chars)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


@contextlib.contextmanager
def pipeline_run(config: PipelineConfig, name: str | None = None) -> Iterator:
    """The parent run of one pipeline invocation (params: the resolved config)."""
    import mlflow

    setup(config)
    with mlflow.start_run(run_name=name or time.strftime("pipeline-%Y%m%d-%H%M%S"),
                          tags={WORK_DIR_TAG: work_dir_key(config)}) as run:
        mlflow.log_params(flatten(config.to_dict()))
        mlflow.set_tag("work_dir", config.work_dir)
        yield run


@contextlib.contextmanager
def stage_run(config: PipelineConfig, stage: str, params: dict | None = None) -> Iterator:
    """A run for one stage, nested under the active run (the pipeline's) when there is one."""
    import mlflow

    setup(config)
    with mlflow.start_run(run_name=stage, nested=mlflow.active_run() is not None,
                          tags={WORK_DIR_TAG: work_dir_key(config)}) as run:
        mlflow.set_tag("stage", stage)
        if params:
            mlflow.log_params(params)
        yield run


@contextlib.contextmanager
def nested_run(name: str, params: dict | None = None) -> Iterator:
    """A child of the active run (e.g. one rate of the train stage); the store must be set up already."""
    import mlflow

    with mlflow.start_run(run_name=name, nested=mlflow.active_run() is not None) as run:
        if params:
            mlflow.log_params({k: str(v) for k, v in params.items()})
        yield run


def log_compressor(directory: str | Path, config: PipelineConfig, tags: dict | None = None):
    """Log a ``MetaCompress.save_pretrained`` directory as a code-based pyfunc model in the active run (or none),
    register it under ``tracking.registered_model`` and point the alias ``candidate`` at it -> ModelVersion."""
    from pipeline import storage

    with storage.local_copy(str(directory)) as local:  # any storage URI (docs/design.md §6.4)
        return _log_compressor(Path(local), config, tags)


def _log_compressor(directory: Path, config: PipelineConfig, tags: dict | None):
    import mlflow
    import numpy as np
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    from compress.metacompress import MetaCompress

    module = MetaCompress.from_pretrained(directory)  # validates the directory before anything is logged
    setup(config)
    d = module.config["hidden_size"]
    example = np.zeros((4, d), dtype=np.float32)
    signature = infer_signature(example, np.zeros((2, d), dtype=np.float32),
                                params={"rate": 0.0, "num_keep": 0, "layout": ""})
    info = mlflow.pyfunc.log_model(
        name="compressor", python_model=str(MODEL_FILE), artifacts={"compressor": str(directory)},
        signature=signature, pip_requirements=["torch", "safetensors", "numpy"])  # no slow inference run
    name = config.tracking.registered_model
    # the registry keeps the weights' sha256; load_compressor checks it (docs/design.md §8)
    tags = {**(tags or {}), WEIGHTS_SHA_TAG: file_sha256(str(directory / "model.safetensors"))}
    # MLflow prints "Successfully registered model ..." straight to stderr, past the logging setup: into the log file
    with contextlib.redirect_stderr(io.StringIO()) as said:
        version = mlflow.register_model(info.model_uri, name, tags=tags)
    if said.getvalue().strip():
        logging.getLogger("metacompress").info("mlflow: %s", said.getvalue().strip())
    client = MlflowClient()
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    return client.get_model_version(name, version.version)


def load_compressor(ref: str | Path, map_location: str = "cpu"):
    """A MetaCompress from a ``save_pretrained`` directory, a downloaded MLflow model directory, or an MLflow URI
    (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/...``): only safetensors are read.

    For URIs the tracking/registry URI must be set (``setup(config)``, ``MLFLOW_TRACKING_URI``)."""
    import tempfile

    ref = str(ref)
    if "://" not in ref and not ref.startswith("models:/"):
        return _read_compressor(_find_weights(Path(ref), ref), map_location)
    import mlflow

    expected = registered_sha256(ref)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=tmp))
        found = _find_weights(local, ref)
        if expected is not None and file_sha256(str(found / "model.safetensors")) != expected:
            raise ValueError(f"{ref}: model.safetensors differs from the sha256 the registry recorded for this version "
                             f"({expected[:12]}...): the stored weights were changed or damaged; they are not used. "
                             "Register the compressor again from its work_dir (metacompress run --stages train)")
        return _read_compressor(found, map_location)


def _read_compressor(directory: Path, map_location: str):
    """``MetaCompress.from_pretrained``, with a damaged file (truncated safetensors, bad config.json) reported as a
    ValueError naming the directory (docs/design.md §8)."""
    from compress.metacompress import MetaCompress

    try:
        return MetaCompress.from_pretrained(directory, map_location)
    except (ValueError, OSError):
        raise
    except Exception as e:  # safetensors' own error type for a truncated or malformed file
        raise ValueError(f"{directory}: cannot read the compressor ({type(e).__name__}: {e}); the file is damaged: "
                         "train it again or load another version") from e


def registered_sha256(ref: str) -> str | None:
    """The weights' sha256 tag of the registry version behind ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``
    (None for other URIs or versions registered without it)."""
    if not ref.startswith("models:/"):
        return None
    from mlflow.tracking import MlflowClient

    body = ref[len("models:/"):].strip("/")
    client = MlflowClient()
    if "@" in body:
        name, alias = body.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    elif "/" in body:
        name, number = body.rsplit("/", 1)
        if not number.isdigit():
            return None
        version = client.get_model_version(name, number)
    else:
        return None
    return (version.tags or {}).get(WEIGHTS_SHA_TAG)


def _find_weights(root: Path, ref: str) -> Path:
    from compress.metacompress import CONFIG_NAME, WEIGHTS_NAME

    if (root / CONFIG_NAME).is_file() and (root / WEIGHTS_NAME).is_file():
        return root
    found = sorted(p.parent for p in root.rglob(WEIGHTS_NAME) if (p.parent / CONFIG_NAME).is_file())
    if len(found) != 1:
        raise FileNotFoundError(f"{ref}: expected one MetaCompress directory ({CONFIG_NAME} + {WEIGHTS_NAME}) "
                                f"under {root}, found {len(found)}; pass a save_pretrained directory or a model "
                                "logged by pipeline.tracking.log_compressor")
    return found[0]
