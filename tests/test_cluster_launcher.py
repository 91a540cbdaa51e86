"""ray_cluster.yaml against the schema that ships with the installed Ray, Ray's own config preparation, and the
project's rules for it (auth mode, node addresses, pinned installation, the MLflow server on the head)."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "ray_cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_valid_against_rays_schema_and_config_checks(cluster, schema):
    jsonschema = pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(cluster, schema)
    prepared = prepare_config(copy.deepcopy(cluster))  # what `ray up` does: defaults merged, then validated
    validate_config(prepared)
    # the schema is strict enough to catch a typo: the same file with a misspelt key fails
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_worker"]["min_worker"] = broken["available_node_types"]["gpu_worker"].pop(
        "min_workers")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_node_types_head_and_gpu_workers(cluster):
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != cluster["head_node_type"]}
    assert workers and all(re.match(r"(g|p)\d", v["node_config"]["InstanceType"]) for v in workers.values())
    assert sum(v["min_workers"] for v in workers.values()) >= 1  # a GPU is there when a job starts
    assert all(v["min_workers"] <= v["max_workers"] for v in workers.values())
    assert sum(v["max_workers"] for v in workers.values()) <= cluster["max_workers"]


def ray_start_lines(cluster) -> list[str]:
    return [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in cluster[key]
            if "ray start" in c]


def test_every_node_starts_ray_with_the_clusters_auth_and_addressing(cluster):
    lines = ray_start_lines(cluster)
    assert len(lines) == 2
    for line in lines:
        # the job's driver and the clients must agree with the nodes (Ray 2.60 token auth would reject them), and
        # the project's single-machine default RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 refuses multi-node clusters
        assert re.search(r"export [^;]*RAY_AUTH_MODE=disabled", line)
        assert re.search(r"export [^;]*RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1", line)
        assert line.index("export") < line.index("ray start")
    head = next(c for c in cluster["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head  # no unauthenticated job API on the network
    port = re.search(r"--port=(\d+)", head).group(1)
    worker = next(c for c in cluster["worker_start_ray_commands"] if "ray start" in c)
    assert f"--address=$RAY_HEAD_IP:{port}" in worker


def test_commands_are_valid_shell(cluster):
    keys = ["initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands"]
    for key in keys:
        for command in cluster[key]:
            done = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
            assert done.returncode == 0, f"{key}: {command!r}: {done.stderr}"


def test_setup_installs_the_pinned_project(cluster):
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    setup = cluster["setup_commands"]
    remote = next(r for r, local in cluster["file_mounts"].items() if (ROOT / local).resolve() == ROOT)
    torch_at = next(i for i, c in enumerate(setup) if f"torch=={pins['torch']}" in c)
    reqs_at = next(i for i, c in enumerate(setup) if f"-r {remote}/requirements.txt" in c)
    assert torch_at < reqs_at  # torch first and pinned: otherwise pip may pick another build
    assert any(f"-e {remote}" in c for c in setup)
    # the docker image carries the pinned Ray and the project's Python
    ray_pin = next(v for k, v in pins.items() if k.startswith("ray"))
    assert f":{ray_pin}-py311" in cluster["docker"]["image"]
    # the checkout goes without the virtual environment and the work directories
    assert {".venv", "work", "mlruns"} <= set(cluster["rsync_exclude"])


def test_head_starts_the_mlflow_server_on_shared_storage(cluster):
    script = ROOT / "infra" / "mlflow_server.sh"
    assert script.is_file() and os.access(script, os.X_OK)
    remote = next(r for r, local in cluster["file_mounts"].items() if (ROOT / local).resolve() == ROOT)
    starts = [shlex.split(c) for c in cluster["head_setup_commands"] if "mlflow_server.sh" in c]
    assert len(starts) == 1
    argv = starts[0]
    assert argv[0] == f"{remote}/infra/mlflow_server.sh" and argv[1] == "start"
    options = dict(zip(argv[2::2], argv[3::2]))
    accepted = set(re.findall(r"^\s+(--[a-z-]+)\)", script.read_text(), re.M))
    assert set(options) <= accepted, f"options the script does not know: {set(options) - accepted}"
    assert options["--host"] == "0.0.0.0"  # the GPU workers log to it
    # artifacts on the storage every node mounts, and that mount exists before the server starts
    shared = re.search(r"mount -t nfs4 -o \S+ \S+ (/[^\s)]+)", " ".join(cluster["initialization_commands"])).group(1)
    assert options["--artifacts-destination"].startswith(shared + "/")
    assert any(f"{shared}:{shared}" in opt for opt in cluster["docker"]["run_options"])
