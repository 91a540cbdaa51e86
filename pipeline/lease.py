"""One pipeline run per work_dir (docs/design.md §8): a lease file ``<work_dir>/.lease.json`` holding the holder's
pid, host, process start time and command line.

Taking it is an exclusive create (``O_CREAT | O_EXCL``: atomic on local and NFSv3+ file systems). A second run finds
it and refuses at once, naming the holder. A lease whose holder is gone (same host, and no process with that pid
and start time) is taken over with a warning. A holder on another host cannot be checked from here: the message
names the file to delete once that run is known to be dead. The lease is removed when the run ends.

On an ``s3://`` work_dir the lease is an object taken by a conditional create (PutObject with ``If-None-Match: *``,
through boto3); the holder rewrites its ``heartbeat`` every ``HEARTBEAT_S``. A lease whose holder is gone (same
host, dead pid) or whose heartbeat is older than ``LEASE_TTL_S`` (a pid on another host cannot be checked) is taken
over by a conditional replace (``If-Match`` on the stale lease's ETag), so of two runs taking it over one wins.
Other object stores have no conditional create in pyarrow.fs: there the run warns that it holds no lease.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("metacompress")

LEASE_NAME = ".lease.json"
LEASE_TTL_S = 600.0  # a remote holder whose heartbeat is older than this is taken to be dead
HEARTBEAT_S = 60.0


class LeaseHeld(ValueError):
    """The work_dir is in use by another live run."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat); None when unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[-1].split()[19]


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    now = _start_time(pid)
    return started is None or now is None or now == started  # another process reusing the pid is not the holder


class Lease:
    """``with Lease(work_dir):`` holds the work_dir for the block."""

    def __init__(self, work_dir: str | Path):
        self.remote = "://" in str(work_dir) and not str(work_dir).startswith("file://")
        self.path = f"{str(work_dir).rstrip('/')}/{LEASE_NAME}" if self.remote else Path(work_dir) / LEASE_NAME
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _start_time(os.getpid()),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[:8]}
        if self.remote:
            self.record["heartbeat"] = time.time()
        self.taken_over: dict | None = None
        self._store = _S3Lease(self.path) if self.remote and self.path.startswith("s3://") else None
        self._beat: threading.Event | None = None

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.record) + "\n")
        return True

    def holder(self) -> dict | None:
        if self.remote:
            return self._store.read()[0] if self._store is not None else None
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return {}  # half-written or damaged: treated as a dead holder's
        return data if isinstance(data, dict) else {}

    def acquire(self) -> "Lease":
        if self.remote:
            return self._acquire_remote()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                return self
            held = self.holder()
            if held is None:
                continue  # released between our two looks
            same_host = held.get("host") == self.record["host"]
            pid = held.get("pid")
            if held and (not same_host or not isinstance(pid, int) or _alive(pid, held.get("process_start"))):
                where = "" if same_host else f" on host {held.get('host')}"
                raise LeaseHeld(
                    f"{self.path.parent} is in use by another run: pid {pid}{where}, started {held.get('started')} "
                    f"({' '.join(map(str, held.get('argv', [])))}); wait for it to finish or use another work_dir"
                    + ("" if same_host else f" (if that run is dead, delete {self.path})"))
            # the holder is dead: take the lease over (rename is atomic; re-read to see who won a race)
            tmp = self.path.with_name(f"{LEASE_NAME}.{os.getpid()}")
            tmp.write_text(json.dumps(self.record) + "\n")
            os.replace(tmp, self.path)
            if self.holder() == self.record:
                self.taken_over = held
                log.warning("work_dir %s: took over the lease of pid %s (started %s), which is no longer running",
                            self.path.parent, held.get("pid"), held.get("started"))
                return self
        raise LeaseHeld(f"{self.path} keeps changing: another run is starting on {self.path.parent}; use another "
                        "work_dir or wait")

    def release(self) -> None:
        if self.remote:
            if self._beat is not None:
                self._beat.set()
            if self._store is not None:
                self._store.delete_own()
            return
        if self.holder() == self.record:
            self.path.unlink(missing_ok=True)

    def _acquire_remote(self) -> "Lease":
        if self._store is None:
            log.warning("work_dir %s: no lease (this object store has no conditional create here); make sure no "
                        "other run uses it", self.path.rsplit("/", 1)[0])
            return self
        for _ in range(3):
            if self._store.create(self.record):
                self._start_heartbeat()
                return self
            held, etag = self._store.read()
            if held is None:
                continue  # released between our two looks
            if not _remote_stale(held, self.record["host"]):
                raise LeaseHeld(
                    f"{self.path.rsplit('/', 1)[0]} is in use by another run: pid {held.get('pid')} on host "
                    f"{held.get('host')}, started {held.get('started')}, last heartbeat "
                    f"{time.time() - float(held.get('heartbeat', 0)):.0f} s ago; wait for it to finish or use another "
                    f"work_dir (a lease not renewed for {LEASE_TTL_S:.0f} s is taken over)")
            if self._store.replace(self.record, etag):
                self.taken_over = held
                log.warning("work_dir %s: took over the lease of pid %s on %s (started %s), which is no longer running",
                            self.path.rsplit("/", 1)[0], held.get("pid"), held.get("host"), held.get("started"))
                self._start_heartbeat()
                return self
        raise LeaseHeld(f"{self.path} keeps changing: another run is starting there; use another work_dir or wait")

    def _start_heartbeat(self) -> None:
        self._beat = stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_S):
                self.record["heartbeat"] = time.time()
                try:
                    renewed = self._store.renew(self.record)
                except Exception as err:  # noqa: BLE001 - a store hiccup: the next beat tries again within the TTL
                    log.warning("work_dir %s: could not renew the lease (%s)", self.path, err)
                    continue
                if not renewed:
                    log.warning("work_dir %s: the lease was taken over by another run", self.path)
                    return

        threading.Thread(target=beat, name="metacompress-lease", daemon=True).start()

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _remote_stale(held: dict, host: str) -> bool:
    """A remote lease's holder is gone: on this host with a dead pid, or silent for ``LEASE_TTL_S``."""
    pid = held.get("pid")
    if held.get("host") == host and isinstance(pid, int) and not _alive(pid, held.get("process_start")):
        return True
    try:
        return time.time() - float(held.get("heartbeat")) > LEASE_TTL_S
    except (TypeError, ValueError):
        return True  # damaged: as in the local case, a dead holder's


class _S3Lease:
    """The lease object on S3 (boto3; the endpoint from ``AWS_ENDPOINT_URL`` as for pyarrow.fs)."""

    def __init__(self, uri: str):
        import boto3

        self.bucket, _, self.key = uri[len("s3://"):].partition("/")
        self.client, self.etag = boto3.client("s3"), None

    def _put(self, record: dict, **condition) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.etag = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=json.dumps(record).encode(),
                                               **condition)["ETag"]
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise

    def create(self, record: dict) -> bool:
        return self._put(record, IfNoneMatch="*")

    def replace(self, record: dict, etag: str) -> bool:
        return self._put(record, IfMatch=etag)

    def renew(self, record: dict) -> bool:
        return self._put(record, IfMatch=self.etag)

    def read(self) -> tuple[dict | None, str | None]:
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None, None
        try:
            data = json.loads(got["Body"].read())
        except (ValueError, UnicodeDecodeError):
            data = {}
        return (data if isinstance(data, dict) else {}), got["ETag"]

    def delete_own(self) -> None:
        from botocore.exceptions import ClientError

        if self.etag is None:
            return
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except ClientError:
            pass  # taken over since: the lease is someone else's now
