"""The cluster's MLflow server (infra/mlflow_server.sh, docs/design.md §6.4) on a real PostgreSQL database: a
PostgreSQL server started here on loopback, the MLflow server against it, a run logged and a compressor registered
through the server's URI, then read back through the server and straight from the database.

PostgreSQL is Debian's server (`apt-get install -y postgresql`, which `make test` does when it is missing) and psycopg2-binary (pinned in
requirements.txt); without them this test fails saying so, it is never skipped."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "s3cret-pw"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not found:
        pytest.fail("PostgreSQL's server is not installed (no /usr/lib/postgresql/*/bin/postgres): run "
                    "`apt-get install -y postgresql` (`make test` installs it)", pytrace=False)
    return Path(found[-1]).parent


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on 127.0.0.1 with database ``mlflow``, user ``mlflow`` (password auth) -> its URI.
    The server refuses to run as root: as root it runs as Debian's ``postgres`` user."""
    try:
        import psycopg2  # noqa: F401  (MLflow's SQLAlchemy driver for postgresql://)
    except ImportError:
        pytest.fail("psycopg2 is not installed: `pip install -r requirements.txt` (psycopg2-binary)", pytrace=False)
    bindir = _pg_bin()
    user = None
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root and there is no 'postgres' user to run PostgreSQL as: install Debian's "
                        "postgresql package (it creates the user)", pytrace=False)
    root = Path(tempfile.mkdtemp(prefix="metacompress-pg-"))  # not under pytest's 0700 tmp: the user must enter
    data = root / "data"
    (root / "pw").write_text(PASSWORD + "\n")
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
        os.chown(root / "pw", user.pw_uid, user.pw_gid)
    as_user = {"user": user.pw_uid, "group": user.pw_gid} if user is not None else {}
    subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "mlflow", "--pwfile", str(root / "pw"),
                    "--auth", "scram-sha-256", "-E", "UTF8"], check=True, capture_output=True, cwd=root, **as_user)
    port = _free_port()
    log = open(root / "postgres.log", "wb")
    server = subprocess.Popen([str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(root),
                               "-c", "listen_addresses=127.0.0.1"], stdout=log, stderr=subprocess.STDOUT, cwd=root,
                              **as_user)
    env = {**os.environ, "PGPASSWORD": PASSWORD}
    try:
        for _ in range(300):
            if server.poll() is not None:
                pytest.fail(f"PostgreSQL exited at start-up: {(root / 'postgres.log').read_text()[-2000:]}",
                            pytrace=False)
            ready = subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                                   capture_output=True)
            if ready.returncode == 0:
                break
            time.sleep(0.1)
        subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow"],
                       check=True, capture_output=True, env=env)
        yield f"postgresql://mlflow:{PASSWORD}@127.0.0.1:{port}/mlflow"
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def _script(*args: str, state: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_BIN": str(Path(sys.executable).parent / "mlflow")}
    return subprocess.run([str(ROOT / "infra" / "mlflow_server.sh"), *args, "--state-dir", str(state)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_mlflow_server_on_postgresql_logs_runs_and_registers_models(postgres, tmp_path):
    import mlflow
    import psycopg2
    import torch
    from mlflow.tracking import MlflowClient

    from compress.metacompress import MetaCompress
    from pipeline import tracking
    from pipeline.config import config_from_dict

    state, port = tmp_path / "mlflow", _free_port()
    started = _script("start", "--port", str(port), "--workers", "1", "--backend-store-uri", postgres,
                      "--artifacts-destination", str(tmp_path / "artifacts"), state=state)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        pid = (state / "mlflow.pid").read_text().strip()
        # the password stays out of what the script prints and of the server's argv (readable by every user)
        assert PASSWORD not in started.stdout + started.stderr and "mlflow:***@127.0.0.1" in started.stdout
        assert PASSWORD not in (state / "mlflow.log").read_text()
        assert PASSWORD not in Path(f"/proc/{pid}/cmdline").read_text()
        uri = (state / "tracking_uri").read_text().strip()
        assert uri == f"http://127.0.0.1:{port}"
        # idempotent: a second start reuses the running server
        again = _script("start", "--port", str(port), "--backend-store-uri", postgres, state=state)
        assert again.returncode == 0 and "already running" in again.stdout

        config = config_from_dict({"work_dir": str(tmp_path / "work"),
                                   "tracking": {"uri": uri, "registered_model": "pg-compressor"}})
        torch.manual_seed(0)
        MetaCompress(hidden_size=8, compress_dim=4).save_pretrained(tmp_path / "compressor")
        tracking.setup(config)
        with mlflow.start_run(run_name="pg-check") as run:
            mlflow.log_param("backend", "postgresql")
            mlflow.log_metric("loss", 0.25, step=3)
            version = tracking.log_compressor(tmp_path / "compressor", config)

        # through the server: the run, and the registered version behind its alias, weights unchanged
        client = MlflowClient(tracking_uri=uri)
        got = client.get_run(run.info.run_id)
        assert got.data.params["backend"] == "postgresql" and got.data.metrics["loss"] == 0.25
        alias = client.get_model_version_by_alias("pg-compressor", "candidate")
        assert alias.version == version.version == "1"
        loaded = tracking.load_compressor("models:/pg-compressor@candidate")
        expected = MetaCompress.from_pretrained(tmp_path / "compressor").state_dict()
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, expected[key]), key

        # and in the database itself: the server really wrote PostgreSQL
        with psycopg2.connect(postgres) as conn, conn.cursor() as cur:
            cur.execute("SELECT key, value FROM params WHERE run_uuid = %s", (run.info.run_id,))
            assert ("backend", "postgresql") in cur.fetchall()
            cur.execute("SELECT name, version FROM model_versions")
            assert ("pg-compressor", 1) in cur.fetchall()
            cur.execute("SELECT alias, version FROM registered_model_aliases WHERE name = 'pg-compressor'")
            assert cur.fetchall() == [("candidate", 1)]
    finally:
        stopped = _script("stop", state=state)
        assert stopped.returncode == 0, stopped.stderr
    assert _script("status", state=state).returncode == 1  # stopped


def test_a_non_database_backend_is_refused_in_one_line(tmp_path):
    out = _script("start", "--backend-store-uri", "file:///tmp/mlruns", state=tmp_path / "s")
    assert out.returncode == 2
    assert "is not a database URI" in out.stderr and "postgresql://USER:PASSWORD@HOST:PORT/DB" in out.stderr
