"""The pipeline on an object store (docs/design.md §6.4, "Storage"): a real S3-compatible server (moto's
ThreadedMotoServer) on loopback holds the work_dir; the storage helpers, the lease (conditional create) and the
main job, killed during train and resumed, run against it."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "mc-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """-> a boto3 client of a fresh S3 server on 127.0.0.1 with bucket ``BUCKET``; the process's environment points
    pyarrow.fs, boto3 and MLflow at it for the module."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "METACOMPRESS_CACHE": str(tmp_path_factory.mktemp("cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def objects(client, prefix: str) -> dict[str, dict]:
    """key -> {ETag, LastModified, Size} of every object under ``prefix``."""
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for o in page.get("Contents", []):
            found[o["Key"]] = {"etag": o["ETag"], "modified": o["LastModified"], "size": o["Size"]}
    return found


@pytest.mark.parametrize("where", ["local", "s3"])
def test_storage_helpers(where, s3, tmp_path):
    from pipeline import storage

    root = str(tmp_path / "root") if where == "local" else f"s3://{BUCKET}/helpers"
    a, b = b"first file\n", bytes(range(256)) * 5
    storage.write_bytes(f"{root}/d/a.txt", a)
    storage.write_bytes(f"{root}/d/b.bin", b)
    storage.write_bytes(f"{root}/d/a.txt", a + b"again")  # replaced whole
    assert storage.read_bytes(f"{root}/d/a.txt") == a + b"again"
    assert storage.is_file(f"{root}/d/b.bin") and not storage.is_file(f"{root}/d/none")
    assert storage.listdir(f"{root}/d") == ["a.txt", "b.bin"]  # no temporary name left behind
    assert storage.files_sha256(f"{root}/d") == {"a.txt": hashlib.sha256(a + b"again").hexdigest(),
                                                 "b.bin": hashlib.sha256(b).hexdigest()}
    with pytest.raises(FileNotFoundError, match="none"):
        storage.read_bytes(f"{root}/d/none")
    with storage.staged_dir(f"{root}/d") as tmp:  # replaces the directory with what the block wrote
        Path(tmp, "c.txt").write_bytes(b"c")
    assert storage.listdir(f"{root}/d") == ["c.txt"]
    with storage.local_copy(f"{root}/d") as local:
        assert Path(local, "c.txt").read_bytes() == b"c"
    storage.delete(f"{root}/d")
    assert storage.listdir(f"{root}/d") == [] and storage.listdir(f"{root}/missing") == []
    assert storage.local_cache(root) == storage.local_cache(root + "/") != storage.local_cache(root + "x")


def test_lease_on_s3_is_a_conditional_create(s3, caplog):
    import socket as sock

    from pipeline.lease import LEASE_NAME, Lease, LeaseHeld

    work = f"s3://{BUCKET}/lease"
    first = Lease(work).acquire()
    with pytest.raises(LeaseHeld, match=f"pid {os.getpid()} on host {sock.gethostname()}"):
        Lease(work).acquire()  # this process is alive: its lease holds
    first.release()
    assert f"lease/{LEASE_NAME}" not in objects(s3, "lease/")
    # a holder on another host that still renews its lease is refused; one silent for longer than the TTL is not
    record = {"pid": 1, "host": "elsewhere", "started": "then", "argv": ["metacompress"]}
    s3.put_object(Bucket=BUCKET, Key=f"lease/{LEASE_NAME}", Body=json.dumps({**record, "heartbeat": time.time()}))
    with pytest.raises(LeaseHeld, match="host elsewhere"):
        Lease(work).acquire()
    s3.put_object(Bucket=BUCKET, Key=f"lease/{LEASE_NAME}", Body=json.dumps({**record, "heartbeat": 0}))
    with caplog.at_level("WARNING", logger="metacompress"):
        second = Lease(work).acquire()
    assert second.taken_over["host"] == "elsewhere" and "took over the lease" in caplog.text
    held = json.loads(s3.get_object(Bucket=BUCKET, Key=f"lease/{LEASE_NAME}")["Body"].read())
    assert held["pid"] == os.getpid()
    second.release()


def _cli(work: str) -> list[str]:
    sets = {"work_dir": work, "data.mt_shapes.dialogues": 24, "data.mt_shapes.val": 4, "data.mt_shapes.test": 4,
            "data.mt_shapes.image_size": 32, "shards.dialogues_per_shard": 4, "teacher.top_k": 8,
            "teacher.max_new_tokens": 3, "train.rates": [0.7], "train.num_workers": 1, "train.zero_stage": 0,
            "train.batch_size": 4, "train.epochs": 8, "train.checkpoint_every": 2, "train.validate_every": 0, "train.patience": 0,
            "train.candidates": [], "train.heldout_dialogues": 4, "evaluate.methods": ["sample", "metacompress"],
            "evaluate.rates": [0.7], "evaluate.batch_size": 4, "evaluate.matrix_images": 1, "ray.num_cpus": 2}
    args = [sys.executable, "-m", "pipeline.commands.cli", "run", str(ROOT / "infra/configs/default.yaml")]
    for key, value in sets.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


def test_main_job_on_s3_killed_during_train_then_resumed(s3, tmp_path):
    work, prefix = f"s3://{BUCKET}/w", "w/"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen(_cli(work), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        deadline = time.monotonic() + 400
        while first.poll() is None and time.monotonic() < deadline:
            keys = objects(s3, prefix)
            if any(k.startswith(f"{prefix}train/ray/") and k.endswith("rank-0.json") for k in keys) and \
                    any(k.endswith("checkpoint_manager_snapshot.json") for k in keys):
                break  # train's first checkpoint is on the store and Ray Train has registered it
            time.sleep(0.2)
        os.killpg(first.pid, 9)  # the driver and everything it started
        first.wait()
    before = objects(s3, prefix)
    assert not any(k.endswith("train/rate-0.7/_SUCCESS") for k in before), \
        "the kill came after train finished:\n" + log.read_text()[-3000:]
    assert any(k.endswith("rank-0.json") for k in before), "no train checkpoint on the store:\n" + log.read_text()[-3000:]
    cached = {k: v for k, v in before.items() if k.startswith((f"{prefix}extract/", f"{prefix}teacher/"))
              and "/part-" in k}
    assert len(cached) >= 2 * 3 * 2  # shards + sidecars of extract and teacher for three splits

    second = subprocess.run(_cli(work), cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "took over the lease" in second.stdout + second.stderr  # the killed run's, on the same host
    after = objects(s3, prefix)
    # extract and teacher were reused: not one of their shards was written again
    assert {k: after[k] for k in cached} == cached
    # train resumed from the checkpoint: this attempt's first step is past 1
    curve = [json.loads(x) for x in s3.get_object(Bucket=BUCKET, Key=f"{prefix}train/rate-0.7/compressor/"
                                                  "train_log.jsonl")["Body"].read().decode().splitlines()]
    # the kill must land before the last of the 16 checkpoints (it waits for the first one)
    assert curve, "the killed run had checkpointed its last step: nothing left to resume\n" + log.read_text()[-3000:]
    assert curve[0]["step"] > 1 and curve[-1]["step"] == 8 * 4  # 8 epochs of 16 train dialogues, 4 a step
    marker = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{prefix}train/rate-0.7/_SUCCESS")["Body"].read())
    weights = s3.get_object(Bucket=BUCKET, Key=f"{prefix}train/rate-0.7/compressor/model.safetensors")["Body"].read()
    assert marker["files"]["model.safetensors"] == hashlib.sha256(weights).hexdigest()
    results = s3.get_object(Bucket=BUCKET, Key=f"{prefix}reports/test/results.md")["Body"].read().decode()
    assert "| MetaCompress |" in results and "| Sample |" in results
    assert f"{prefix}resolved_config.yaml" in after
    assert any(k.startswith(f"{prefix}mlartifacts/") and k.endswith("model.safetensors") for k in after)
    assert not any(k.endswith(".lease.json") for k in after)  # released at the end
