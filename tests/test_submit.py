"""`metacompress submit` against a real `ray start --head` on loopback, and a real `mlflow server` (started by
infra/mlflow_server.sh) that the submitted job and a registered compressor log to. Both servers are stopped by
their fixtures whatever happens; ports are free ports.

The head is started with `ray start --block` in its own session and stopped by signalling that session, not by
`ray stop`: `ray stop` kills every Ray process of the user on the machine, other tests' clusters included."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.workspace import make_workspace

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1"}


def session_pids(sid: int) -> list[int]:
    """Processes of the session ``sid`` (the head's ``ray start`` and everything it started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


@pytest.fixture(scope="module")
def ray_head():
    """A real head node on loopback -> its dashboard (jobs API) URL."""
    from ray.job_submission import JobSubmissionClient

    temp = tempfile.mkdtemp(prefix="mcray", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    ports = {name: free_port() for name in ("port", "dashboard-port", "ray-client-server-port",
                                            "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "metrics-export-port", "runtime-env-agent-port")}
    command = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
               "--dashboard-host=127.0.0.1", "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp}",
               *(f"--{k}={v}" for k, v in ports.items())]
    log = open(Path(temp) / "ray_start.log", "w")
    head = subprocess.Popen(command, env=server_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, f"ray start exited: {(Path(temp) / 'ray_start.log').read_text()[-3000:]}"
            try:
                JobSubmissionClient(url).list_jobs()
                break
            except Exception:
                assert time.monotonic() < deadline, "the Ray dashboard did not answer within 120 s"
                time.sleep(1)
        yield url
    finally:
        # Like `ray stop`, but for this head only: SIGTERM to the processes of its session. `ray start --block`
        # itself gets SIGKILL first (on SIGTERM it would drain the node for up to 30 s); its children get SIGTERM,
        # and SIGKILL when they are still there 5 s later.
        head.kill()
        head.wait(timeout=10)
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            for pid in session_pids(head.pid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            end = time.monotonic() + wait
            while session_pids(head.pid) and time.monotonic() < end:
                time.sleep(0.2)
        assert not session_pids(head.pid), "processes of the Ray head survived SIGKILL"
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_launch(tmp_path_factory):
    """infra/mlflow_server.sh starting on a free loopback port, in the background (it overlaps Ray's start-up)
    -> (the starting script, its state dir); stopped at the end of the module."""
    state = tmp_path_factory.mktemp("mlflow-server")
    script = str(ROOT / "infra" / "mlflow_server.sh")
    env = {**server_env(), "MLFLOW_BIN": str(BIN / "mlflow")}
    starting = subprocess.Popen([script, "start", "--port", str(free_port()), "--state-dir", str(state),
                                 "--workers", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    try:
        yield starting, state
    finally:
        starting.wait(timeout=200)
        subprocess.run([script, "stop", "--state-dir", str(state)], env=env, capture_output=True, timeout=60)
        status = subprocess.run([script, "status", "--state-dir", str(state)], env=env, capture_output=True)
        assert status.returncode == 1, "the MLflow server still answers after stop"


@pytest.fixture(scope="module")
def mlflow_server(mlflow_launch):
    """-> (tracking URI, the server's artifacts directory) once /health answers."""
    starting, state = mlflow_launch
    output, _ = starting.communicate(timeout=200)
    assert starting.returncode == 0, output
    return (state / "tracking_uri").read_text().strip(), state / "artifacts"


def write_config(root: Path, name: str, **extra) -> Path:
    data = {"work_dir": str(root / "work"), "model": {"path": str(root / "model")},
            "data": {"train": str(root / "data/train/dialogues.jsonl"), "test": str(root / "data/test/dialogues.jsonl"),
                     "val": str(root / "data/test/dialogues.jsonl")},
            "shards": {"dialogues_per_shard": 10}, "extract": {"batch_size": 10},
            "teacher": {"top_k": 8, "max_new_tokens": 3}, **extra}
    path = root / name
    path.write_text(yaml.safe_dump(data))
    return path


def metacompress(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "pipeline.commands.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# --- the job's plan, without a cluster ---

def test_submission_id_follows_stages_and_config(tmp_path):
    from pipeline.commands.submit import plan_job

    config = write_config(tmp_path, "c.yaml")
    a = plan_job(config, "extract")
    assert plan_job(config, "extract").submission_id == a.submission_id  # resubmitting is recognised
    assert plan_job(config, "extract,teacher").submission_id != a.submission_id
    assert plan_job(config, "extract", ["teacher.top_k=4"]).submission_id != a.submission_id
    assert a.submission_id.startswith("metacompress-extract-")
    # the config lies outside the project: passed by absolute path; --set goes to the job too
    b = plan_job(config, "teacher,extract", ["teacher.top_k=4"], python="/opt/py/bin/python")
    assert b.entrypoint == (f"/opt/py/bin/python -m pipeline.commands.cli run {config} --stages extract,teacher "
                            "--set teacher.top_k=4")
    env = b.runtime_env["env_vars"]
    assert env["HF_HUB_OFFLINE"] == "1" and "RAY_AUTH_MODE" not in env  # the cluster decides its own auth mode
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in env


def test_config_inside_the_project_needs_shared_work_dir(tmp_path):
    from pipeline.commands.submit import plan_job
    from pipeline.config import ConfigError

    (tmp_path / "configs").mkdir()
    relative = tmp_path / "configs" / "rel.yaml"
    relative.write_text(yaml.safe_dump({"work_dir": "../work"}))
    with pytest.raises(ConfigError, match="work_dir .* inside the project"):
        plan_job(relative, root=tmp_path)
    plan = plan_job(relative, root=tmp_path, sets=["work_dir=/mnt/shared/work/x"])
    assert " run configs/rel.yaml " in plan.entrypoint  # shipped with the working dir: a relative path


def test_resubmission_decisions():
    from pipeline.commands.submit import attempts, decide

    def job(sid, status):
        return SimpleNamespace(submission_id=sid, status=SimpleNamespace(value=status))

    base = "metacompress-extract-0123456789ab"
    others = [job(None, "SUCCEEDED"), job(base + "x", "FAILED"), job(base + "-rx", "FAILED")]
    assert decide(attempts(others, base), base) == ("submit", base)
    history = [job(base + "-r2", "FAILED"), job(base, "FAILED"), *others]
    assert [j.submission_id for j in attempts(history, base)] == [base, base + "-r2"]
    assert decide(attempts(history, base), base) == ("submit", base + "-r3")
    assert decide(attempts([job(base, "RUNNING")], base), base) == ("attach", base)
    assert decide(attempts([job(base, "PENDING")], base), base, force=True) == ("attach", base)
    assert decide(attempts([job(base, "SUCCEEDED")], base), base) == ("done", base)
    assert decide(attempts([job(base, "SUCCEEDED")], base), base, force=True) == ("submit", base + "-r2")
    assert decide(attempts([job(base, "STOPPED")], base), base) == ("submit", base + "-r2")


def test_upload_is_the_sources_only(tmp_path):
    """The working dir as Ray packs it with our excludes alone (.gitignore ignored): sources, no venv or outputs."""
    from ray._private.runtime_env.packaging import create_package

    from pipeline.commands.submit import EXCLUDES

    package = tmp_path / "pkg.zip"
    create_package(str(ROOT), package, include_gitignore=False, excludes=EXCLUDES)
    names = zipfile.ZipFile(package).namelist()
    assert {"pipeline/commands/submit.py", "pipeline/commands/cli.py", "stages/extract.py", "compress/metacompress.py"} <= set(names)
    tops = {n.split("/")[0] for n in names}
    assert not tops & {".venv", ".git", "work", "mlruns", "data"}
    assert not [n for n in names if "__pycache__" in n or n.endswith(".db")]
    assert package.stat().st_size < 20 * 2**20


# --- real servers ---

# The online teacher (answers generated while training) spares the job the teacher stage's actors: time.
STAGES = "extract,train"
TINY_TRAIN = {"rates": [0.75], "compress_dim": 16, "optimizer": "adamw", "lr": 0.003, "grad_clip": 1.0,
              "epochs": 1, "batch_size": 10, "num_workers": 1, "zero_stage": 0, "checkpoint_every": 100,
              "online_teacher": True}


@pytest.mark.slow
def test_submit_round_trip_trains_and_registers_on_the_mlflow_server(tmp_path, mlflow_launch, ray_head,
                                                                     mlflow_server):
    """The job runs extract and train on the tiny workspace; it logs to the MLflow server, which then
    serves the registered compressor through its alias."""
    import mlflow
    import torch
    from ray.job_submission import JobSubmissionClient

    from compress.metacompress import MetaCompress
    from pipeline import tracking
    from pipeline.commands.submit import plan_job
    from pipeline.config import load_config
    from pipeline.dialogues import load_dialogues
    from pipeline.shards import StageOutput
    from stages import extract, train

    uri, artifacts = mlflow_server
    root = make_workspace(tmp_path)
    path = write_config(root, "job.yaml", train=TINY_TRAIN,
                        tracking={"uri": uri, "experiment": "submit-test", "registered_model": "mc-job"})
    done = metacompress("submit", str(path), "--address", ray_head, "--stages", STAGES, "--follow",
                        "--python", sys.executable)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    job_id = plan_job(path, STAGES).submission_id
    assert f"submitted {job_id}" in done.stdout and f"job {job_id} SUCCEEDED" in done.stdout

    # the stages' outputs: every dialogue of each split exactly once; a trained compressor
    config = load_config(path)
    for split, source in (("train", config.data.train), ("test", config.data.test)):
        out = StageOutput(**extract.output_args(config, split))
        assert out.is_complete(deep=True), split
        expected = sorted(d.dialogue_id for d in load_dialogues(source))
        shards = -(-len(expected) // config.shards.dialogues_per_shard)
        assert sorted(r["dialogue_id"] for i in range(shards) for r in out.read_records(i)) == expected
    trained = MetaCompress.from_pretrained(train.compressor_dir(config, 0.75))

    # the job logged to the server: one pipeline run; the stage runs nested under it
    client = mlflow.tracking.MlflowClient(tracking_uri=uri, registry_uri=uri)  # not a registry an earlier test set
    experiment = client.get_experiment_by_name("submit-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(parents) == 1 and parents[0].data.params["work_dir"] == config.work_dir
    assert {"extract/train", "extract/test", "train", "train/rate-0.75"} <= set(children)
    assert children["extract/train"].data.metrics["records"] == 20
    assert children["extract/test"].data.metrics["records"] == 10

    # ... and registered the compressor, which loads back from the server by alias with the trained weights
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    version = client.get_model_version_by_alias("mc-job", "candidate")
    assert version.tags["rate"] == "0.75"
    loaded = tracking.load_compressor("models:/mc-job@candidate")
    assert loaded.state_dict().keys() == trained.state_dict().keys()
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert any(artifacts.rglob("model.safetensors"))  # proxied into the server's --artifacts-destination

    # the same submission again is recognised: nothing new runs
    again = metacompress("submit", str(path), "--address", ray_head, "--stages", STAGES)
    assert again.returncode == 0 and "already SUCCEEDED" in again.stdout, again.stdout + again.stderr
    jobs = [j for j in JobSubmissionClient(ray_head).list_jobs() if (j.submission_id or "").startswith(job_id)]
    assert [j.submission_id for j in jobs] == [job_id]


@pytest.mark.slow
def test_failed_job_exits_non_zero_and_is_retried_under_a_new_id(tmp_path, ray_head, mlflow_server):
    from ray.job_submission import JobSubmissionClient

    from pipeline.commands.submit import plan_job

    uri, _ = mlflow_server
    path = write_config(tmp_path, "broken.yaml", tracking={"uri": uri, "experiment": "submit-broken"})
    # valid config, but its model and data do not exist on the "cluster": the job fails there, before any work
    done = metacompress("submit", str(path), "--address", ray_head, "--stages", "extract", "--follow",
                        "--python", sys.executable)
    job_id = plan_job(path, "extract").submission_id
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"job {job_id} FAILED" in done.stderr and "does not exist" in done.stdout + done.stderr
    again = metacompress("submit", str(path), "--address", ray_head, "--stages", "extract")
    assert again.returncode == 0 and f"submitted {job_id}-r2" in again.stdout, again.stdout + again.stderr
    client = JobSubmissionClient(ray_head)
    client.stop_job(f"{job_id}-r2")
    assert sorted(j.submission_id for j in client.list_jobs() if (j.submission_id or "").startswith(job_id)) == \
        [job_id, f"{job_id}-r2"]


@pytest.mark.slow
def test_compressor_registered_on_the_server_loads_back(tmp_path, mlflow_server):
    import mlflow
    import torch

    from compress.layout import Layout
    from compress.metacompress import MetaCompress
    from pipeline import tracking
    from pipeline.config import config_from_dict

    uri, artifacts = mlflow_server
    config = config_from_dict({"work_dir": str(tmp_path / "work"),
                               "tracking": {"uri": uri, "experiment": "registry-test", "registered_model": "mc-srv"}})
    torch.manual_seed(0)
    module = MetaCompress(24, compress_dim=8, kernel_size=3, reference_grid=(4, 4))
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))  # away from the seeded initialisation, as training would move it
    module.save_pretrained(tmp_path / "compressor")
    with tracking.stage_run(config, "train") as run:
        version = tracking.log_compressor(tmp_path / "compressor", config, tags={"rate": "0.75"})
    assert version.aliases == ["candidate"] and version.run_id == run.info.run_id

    mlflow.set_tracking_uri("file:///nonexistent")  # the URI alone must reach the server
    mlflow.set_registry_uri(uri)
    mlflow.set_tracking_uri(uri)
    loaded = tracking.load_compressor("models:/mc-srv@candidate")
    x = torch.randn(20, 24)
    layout = Layout.sequence(20)
    got, want = loaded(x, 5, layout), module(x, 5, layout)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.matrix, want.matrix)
    # the weights went through the server into its artifact store, not into a local ./mlruns
    assert [p for p in artifacts.rglob("model.safetensors")]
    assert not (tmp_path / "work" / "mlartifacts").exists()


def test_default_paths_point_into_the_project():
    """The commands sit two levels below the project root: the default config and the uploaded root are found."""
    from pipeline.commands.run import DEFAULT_CONFIG
    from pipeline.commands.submit import PROJECT_ROOT

    assert DEFAULT_CONFIG == ROOT / "infra" / "configs" / "default.yaml" and DEFAULT_CONFIG.is_file()
    assert PROJECT_ROOT == ROOT and (PROJECT_ROOT / "pyproject.toml").is_file()
