"""Per-stage resources: a stage that asks for GPUs never runs on a CPU; it waits for them, then fails naming itself."""

from __future__ import annotations

import pytest


def config_with(**resources):
    from pipeline.config import config_from_dict

    return config_from_dict({"resources": resources})


def test_resources_are_validated_naming_the_key():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"resources.teacher.num_gpus = -1"):
        config_with(teacher={"num_gpus": -1})
    with pytest.raises(ConfigError, match=r"unknown key resources.evaluate.gpus"):
        config_with(evaluate={"gpus": 1})
    assert config_with(train={"num_gpus": 1, "gpu_wait_s": 5}).resources.train.num_gpus == 1.0


def test_gpu_stage_on_a_cpu_cluster_waits_then_fails(ray_local):
    from pipeline.cluster import actor_gpus

    assert ray_local.cluster_resources().get("GPU", 0) == 0
    assert actor_gpus(config_with(), "extract") == 0.0  # null: the CPU when the cluster has no GPU
    assert actor_gpus(config_with(extract={"num_gpus": 0}), "extract") == 0.0
    with pytest.raises(TimeoutError, match=r"evaluate: resources.evaluate.num_gpus = 1 but the cluster has 0 GPUs "
                                           r"after waiting 0.5 s"):
        actor_gpus(config_with(evaluate={"num_gpus": 1, "gpu_wait_s": 0.5}), "evaluate")


def test_the_cluster_config_asks_every_stage_for_a_gpu():
    from pathlib import Path

    from pipeline.config import load_config

    config = load_config(Path(__file__).resolve().parent.parent / "infra" / "configs" / "cluster.yaml")
    for stage in ("extract", "teacher", "train", "evaluate", "tprl"):
        assert getattr(config.resources, stage).num_gpus == 1, stage


@pytest.mark.parametrize("uri,head,refused", [
    ("sqlite:////mnt/shared/work/mlflow.db", "10.0.1.23:6379", True),
    ("file:///mnt/shared/mlruns", "http://head.example.org:8265", True),
    ("sqlite:////tmp/w/mlflow.db", "127.0.0.1:6379", False),
    ("sqlite:////tmp/w/mlflow.db", "http://localhost:8265", False),
    ("sqlite:////tmp/w/mlflow.db", "[::1]:6379", False),
    ("sqlite:////tmp/w/mlflow.db", None, False),
    ("http://10.0.1.23:5000", "10.0.1.23:6379", False),
])
def test_a_cluster_of_other_machines_needs_a_tracking_server(uri, head, refused):
    from pipeline.tracking import check_store_for_cluster

    if refused:
        with pytest.raises(ValueError, match=r"tracking.uri = .*start it on the head \(infra/mlflow_server.sh\)"):
            check_store_for_cluster(uri, head)
    else:
        check_store_for_cluster(uri, head)


def test_submit_to_a_remote_cluster_refuses_the_embedded_store_before_uploading():
    from pathlib import Path

    from pipeline.commands.submit import plan_job

    config = Path(__file__).resolve().parent.parent / "infra" / "configs" / "default.yaml"
    with pytest.raises(ValueError, match="a cluster \\(10.0.1.23\\) logs to one MLflow tracking server"):
        plan_job(config, sets=["work_dir=/mnt/shared/w"], address="http://10.0.1.23:8265")
    plan = plan_job(config, sets=["work_dir=/mnt/shared/w", "tracking.uri=http://10.0.1.23:5000"],
                    address="http://10.0.1.23:8265")
    assert plan.metadata["tracking_uri"] == "http://10.0.1.23:5000"
