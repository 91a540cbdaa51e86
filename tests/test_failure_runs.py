"""One run per work_dir, and what a killed run leaves behind (docs/design.md §8): the lease, its takeover from a
dead holder, MLflow runs left RUNNING closed by the next run."""

import json
import socket
import subprocess
import sys

import pytest


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lease_is_exclusive_and_released(tmp_path):
    from pipeline.lease import LEASE_NAME, Lease, LeaseHeld

    with Lease(tmp_path) as lease:
        held = json.loads((tmp_path / LEASE_NAME).read_text())
        assert held["pid"] == lease.record["pid"] and held["host"] == socket.gethostname()
        with pytest.raises(LeaseHeld, match=f"pid {held['pid']}"):
            Lease(tmp_path).acquire()
    assert not (tmp_path / LEASE_NAME).exists()
    Lease(tmp_path).acquire().release()


def test_a_live_holder_in_another_process_is_refused(tmp_path):
    from pipeline.lease import Lease, LeaseHeld

    code = f"import sys, time; from pipeline.lease import Lease; Lease({str(tmp_path)!r}).acquire(); print('held', " \
           "flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match=f"pid {holder.pid}.*wait for it to finish or use another work_dir"):
            Lease(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    taken = Lease(tmp_path).acquire()  # its holder is dead now (killed: no release)
    assert taken.taken_over["pid"] == holder.pid
    taken.release()


def test_a_dead_holders_lease_is_taken_over_with_a_message(tmp_path, caplog):
    from pipeline.lease import LEASE_NAME, Lease

    pid = dead_pid()
    (tmp_path / LEASE_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "process_start": "1",
                                                   "started": "then", "argv": []}))
    with caplog.at_level("WARNING", logger="metacompress"):
        lease = Lease(tmp_path).acquire()
    assert lease.taken_over["pid"] == pid and f"took over the lease of pid {pid}" in caplog.text
    assert json.loads((tmp_path / LEASE_NAME).read_text())["pid"] == lease.record["pid"]
    lease.release()


def test_a_holder_on_another_host_is_refused_with_the_file_to_delete(tmp_path):
    from pipeline.lease import LEASE_NAME, Lease, LeaseHeld

    (tmp_path / LEASE_NAME).write_text(json.dumps({"pid": 12, "host": "elsewhere", "started": "then", "argv": []}))
    with pytest.raises(LeaseHeld, match=f"host elsewhere.*delete {tmp_path / LEASE_NAME}"):
        Lease(tmp_path).acquire()


def test_runs_left_running_by_a_killed_driver_are_closed_by_the_next_run(tmp_path):
    """A driver killed inside its pipeline, stage and nested runs (os._exit: no cleanup) leaves them RUNNING; the
    next run on the work_dir marks them KILLED, and leaves runs of other work_dirs alone."""
    from mlflow.tracking import MlflowClient

    from pipeline import tracking
    from pipeline.config import config_from_dict

    config = config_from_dict({"work_dir": str(tmp_path / "work")})
    other = config_from_dict({"work_dir": str(tmp_path / "other"), "tracking": {"uri": tracking.tracking_uri(config)}})
    code = f"""
import os
from pipeline import tracking
from pipeline.config import config_from_dict
config = config_from_dict({json.dumps({"work_dir": config.work_dir})})
with tracking.pipeline_run(config):
    with tracking.stage_run(config, "train"):
        with tracking.nested_run("train/rate-0.9") as run:
            print(run.info.run_id, flush=True)
            os._exit(9)
"""
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr
    tracking.setup(other)
    with tracking.pipeline_run(other) as foreign:  # another work_dir's live run in the same store
        client = MlflowClient()
        experiment = client.get_experiment_by_name(config.tracking.experiment)
        running = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
        assert len(running) == 4
        closed = tracking.close_stale_runs(config)
        assert len(closed) == 3 and foreign.info.run_id not in closed
        assert killed.stdout.strip() in closed  # the nested run, found through its parent
        for run_id in closed:
            assert client.get_run(run_id).info.status == "KILLED"
        assert client.get_run(foreign.info.run_id).info.status == "RUNNING"
    assert tracking.close_stale_runs(config) == []
