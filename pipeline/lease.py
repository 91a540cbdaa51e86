"""One pipeline run per work_dir (docs/design.md §8): a lease file ``<work_dir>/.lease.json`` holding the holder's
pid, host, process start time and command line.

Taking it is an exclusive create (``O_CREAT | O_EXCL``: atomic on local and NFSv3+ file systems). A second run finds
it and refuses at once, naming the holder. A lease whose holder is gone (same host, and no process with that pid
and start time) is taken over with a warning. A holder on another host cannot be checked from here: the message
names the file to delete once that run is known to be dead. The lease is removed when the run ends.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

log = logging.getLogger("metacompress")

LEASE_NAME = ".lease.json"


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
        self.path = Path(work_dir) / LEASE_NAME
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _start_time(os.getpid()),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[:8]}
        self.taken_over: dict | None = None

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.record) + "\n")
        return True

    def holder(self) -> dict | None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return {}  # half-written or damaged: treated as a dead holder's
        return data if isinstance(data, dict) else {}

    def acquire(self) -> "Lease":
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
        if self.holder() == self.record:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
