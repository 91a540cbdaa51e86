"""Shard store: a stage's output directory of validated, atomically published shards on any ``pyarrow.fs`` URI.

Directory contract (docs/design.md §3)::

    part-00000.parquet        a shard (or .tar for WebDataset, .arrow for Arrow IPC), published by rename
    part-00000.parquet.json   its sidecar: rows, size, sha256, stage, config_hash, input_hash, format, schema_version
    _config.json              stage, hashes, format and the resolved config of the run that writes here
    _errors.jsonl             one JSON object per failed record: {"stage", "record_id", "reason", ...}
    _manifest.json            every shard with rows, size and sha256 (written by ``finish``)
    _SUCCESS                  the stage is complete (written last by ``finish``)

A shard counts as done when its sidecar matches this run and its size; the shard is published before its sidecar,
so a crash at any point leaves either a done shard or one that ``missing_shards`` reports for recomputation. That
check reads no shard bytes, so a re-run costs O(number of shards) whatever the cache size (docs/design.md §3); the
content (sha256) is checked by every consumer as it reads a shard, and in full with ``verify`` (``metacompress run
--verify``). Nothing valid is replaced: rewriting a valid shard with different bytes raises, and only
``prepare(overwrite=True)`` deletes outputs.

Tensor columns and formats: ``pipeline.tensor_columns`` and ``pipeline.shard_formats``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as paipc
import pyarrow.parquet as pq

from pipeline.hashing import canonical_json
from pipeline.shard_formats import _decode, _encode, _iter_tar
from pipeline.storage import resolve
from pipeline.tensor_columns import records_to_table, table_to_records

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FORMATS = {"parquet": ".parquet", "webdataset": ".tar", "arrow": ".arrow"}
_OURS = re.compile(r"^(part-\d+\.(parquet|tar|arrow)(\.json)?|_manifest\.json|_SUCCESS|_errors\.jsonl|_config\.json)"
                   r"(\.tmp-[0-9a-f]+)?$")


class IncompatibleOutput(ValueError):
    """An output directory holds results of a different configuration."""


class CorruptShard(ValueError):
    """A shard is missing, truncated or altered (its bytes do not match its sidecar)."""


def iter_webdataset(uris: Iterable[str], filesystem: pafs.FileSystem | None = None) -> Iterator[dict]:
    """Stream the records of WebDataset tar shards in order (validate first with ``StageOutput.missing_shards``).
    Each record: ``__key__``, the plain fields, tensors as numpy arrays (lists for per-turn fields)."""
    for uri in uris:
        fs, path = (filesystem, uri) if filesystem is not None else resolve(uri)
        with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for rec in _iter_tar(tar):
                rec.pop("__tensors__")
                yield rec


# ---------------------------------------------------------------- the stage output directory

class StageOutput:
    """One stage's output directory. The driver calls ``prepare`` (refuse or, explicitly, clear old outputs),
    workers ``write_shard`` for each index in ``missing_shards(n)``, the driver ``finish(n)``."""

    def __init__(self, uri: str, stage: str, config_hash: str, input_hash: str, fmt: str = "parquet",
                 filesystem: pafs.FileSystem | None = None, verify: bool = False):
        if fmt not in FORMATS:
            raise ValueError(f"unknown shard format {fmt!r} for stage {stage}; choose one of {sorted(FORMATS)}")
        self.uri, self.stage, self.config_hash, self.input_hash, self.fmt = uri, stage, config_hash, input_hash, fmt
        self.verify = verify  # default of missing_shards / finish: also hash every shard's bytes
        self.fs, self.root = (filesystem, uri.rstrip("/")) if filesystem is not None else resolve(uri)
        self._config_checked = False

    # names
    def shard_name(self, i: int) -> str:
        return f"part-{i:05d}{FORMATS[self.fmt]}"

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def shard_uri(self, i: int) -> str:
        return f"{self.uri.rstrip('/')}/{self.shard_name(i)}"

    def _identity(self) -> dict:
        return {"stage": self.stage, "config_hash": self.config_hash, "input_hash": self.input_hash,
                "format": self.fmt, "schema_version": SCHEMA_VERSION}

    # small file helpers
    def _exists(self, name: str) -> bool:
        return self.fs.get_file_info(self._path(name)).type == pafs.FileType.File

    def _read_json(self, name: str) -> dict | None:
        try:
            with self.fs.open_input_stream(self._path(name)) as f:
                return json.loads(f.read())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def _publish(self, tmp: str, final: str) -> None:
        """Rename into place (atomic on local and POSIX filesystems); object stores without move: copy + delete."""
        try:
            self.fs.move(tmp, final)
        except NotImplementedError:
            self.fs.copy_file(tmp, final)
            self.fs.delete_file(tmp)

    def _write_atomic(self, name: str, data: bytes) -> None:
        final = self._path(name)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:12]}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self._publish(tmp, final)

    def _listing(self) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(info.base_name for info in infos)

    # compatibility
    def _mismatch(self, found: dict, where: str) -> IncompatibleOutput | None:
        exp = self._identity()
        diff = {k: (found.get(k), v) for k, v in exp.items() if found.get(k) != v}
        if not diff:
            return None
        found_s = ", ".join(f"{k}={f!r}" for k, (f, _) in diff.items())
        exp_s = ", ".join(f"{k}={e!r}" for k, (_, e) in diff.items())
        return IncompatibleOutput(
            f"{self.uri}: {where} was made with {found_s}, but this run expects {exp_s}; "
            "use a new output directory or pass overwrite=True to delete the old outputs")

    def check_compatible(self) -> None:
        """Raise ``IncompatibleOutput`` when anything here was written with another stage/config/input hash."""
        for name in self._listing():
            if name == "_config.json" or (name.startswith("part-") and name.endswith(".json")):
                found = self._read_json(name)
                if found is not None and (err := self._mismatch(found, name)):
                    raise err

    def prepare(self, config: Any = None, overwrite: bool = False) -> list[str]:
        """Check (or with ``overwrite`` delete) existing outputs, then save ``_config.json``. Returns deleted names."""
        removed = []
        if overwrite:
            for name in self._listing():
                if _OURS.match(name):
                    self.fs.delete_file(self._path(name))
                    removed.append(name)
            if removed:
                log.warning("%s: overwrite requested, deleted %d old output files", self.uri, len(removed))
        else:
            self.check_compatible()
        self.fs.create_dir(self.root, recursive=True)
        self._write_atomic("_config.json", (canonical_json({**self._identity(), "config": config}) + "\n").encode())
        self._config_checked = True
        return removed

    def _ensure_config(self) -> None:
        if self._config_checked:
            return
        found = self._read_json("_config.json")
        if found is None:
            self.prepare()
        elif err := self._mismatch(found, "_config.json"):
            raise err
        self._config_checked = True

    # shards
    def _check(self, i: int, verify: bool = True) -> tuple[str | None, pa.Buffer | None]:
        """(None, bytes) when shard ``i`` matches its sidecar, else (reason, None). Without ``verify`` only the
        sidecar and the file's size are checked and no shard byte is read: (None, None) when they match."""
        name = self.shard_name(i)
        side = self._read_json(name + ".json")
        if side is None:
            return f"{name}: no readable sidecar", None
        if err := self._mismatch(side, name + ".json"):
            return str(err), None
        if not verify:
            info = self.fs.get_file_info(self._path(name))
            if info.type != pafs.FileType.File:
                return f"{name}: missing", None
            if info.size != side.get("size"):
                return f"{name}: {info.size} bytes, its sidecar says {side.get('size')} (truncated or altered)", None
            return None, None
        try:
            with self.fs.open_input_file(self._path(name)) as f:
                buf = f.read_buffer()
        except FileNotFoundError:
            return f"{name}: missing", None
        if buf.size != side.get("size") or hashlib.sha256(memoryview(buf)).hexdigest() != side.get("sha256"):
            return f"{name}: size or sha256 differs from its sidecar (truncated or altered)", None
        try:
            rows = self._rows(buf)
        except Exception as e:  # noqa: BLE001 - any parse failure means the shard is unusable
            return f"{name}: unreadable ({e})", None
        if rows != side.get("rows"):
            return f"{name}: {rows} rows, sidecar says {side.get('rows')}", None
        return None, buf

    def _rows(self, buf: pa.Buffer) -> int:
        if self.fmt == "webdataset":
            with tarfile.open(fileobj=io.BytesIO(buf.to_pybytes()), mode="r:") as tar:
                return sum(m.name.endswith(".json") for m in tar.getmembers())
        if self.fmt == "parquet":
            return pq.ParquetFile(pa.BufferReader(buf)).metadata.num_rows
        reader = paipc.open_file(buf)
        return sum(reader.get_batch(b).num_rows for b in range(reader.num_record_batches))

    def is_valid(self, i: int, verify: bool = True) -> bool:
        return self._check(i, verify)[0] is None

    def missing_shards(self, n: int, verify: bool | None = None) -> list[int]:
        """Indices in ``range(n)`` whose shard is missing, has no matching sidecar, or differs from it in size
        (``verify``, default ``self.verify``: or in sha256, reading every shard)."""
        verify = self.verify if verify is None else verify
        if not verify and (finished := self._missing_from_manifest(n)) is not None:
            return finished
        with ThreadPoolExecutor(max_workers=min(8, max(1, n))) as pool:
            ok = list(pool.map(lambda i: self.is_valid(i, verify), range(n)))
        return [i for i in range(n) if not ok[i]]

    def _missing_from_manifest(self, n: int) -> list[int] | None:
        """For a finished stage of ``n`` shards: the shards whose file or sidecar is gone or whose size differs from
        the manifest, from one directory listing (a re-run's cost does not grow with shard sizes; writing a shard
        removes ``_SUCCESS``, so a finished stage's sidecars are the manifest's). None when not finished."""
        manifest = self.manifest()
        if manifest is None or manifest.get("num_shards") != n or not self.is_complete():
            return None
        sizes = {info.base_name: info.size for info in
                 self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))}
        return [i for i, s in enumerate(manifest["shards"])
                if sizes.get(s["shard"]) != s["size"] or s["shard"] + ".json" not in sizes]

    def write_shard(self, i: int, data: pa.Table | list[dict]) -> dict:
        """Publish shard ``i`` (shard first, then its sidecar; each via a temporary name). Returns the sidecar.
        Rewriting an existing valid shard is a no-op when the bytes are identical and an error otherwise."""
        self._ensure_config()
        table = data if isinstance(data, pa.Table) else records_to_table(data)
        blob = _encode(table, self.fmt, i)
        side = {**self._identity(), "shard": self.shard_name(i), "index": i, "rows": table.num_rows,
                "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
        if self._exists(self.shard_name(i) + ".json") and self.is_valid(i):
            if self._read_json(self.shard_name(i) + ".json")["sha256"] == side["sha256"]:
                return side
            raise FileExistsError(f"{self.shard_uri(i)} is valid and holds different bytes; refusing to replace it "
                                  "(use prepare(overwrite=True) or a new output directory)")
        if self._exists("_SUCCESS"):  # the stage is being repaired: no longer complete until finish()
            self.fs.delete_file(self._path("_SUCCESS"))
        self._write_atomic(self.shard_name(i), blob)
        self._write_atomic(self.shard_name(i) + ".json", (canonical_json(side) + "\n").encode())
        return side

    def read_shard(self, i: int, validate: bool = True) -> pa.Table:
        """Shard ``i`` as a table (Arrow IPC on a local disk: zero-copy views of the memory-mapped file)."""
        if validate:
            reason, buf = self._check(i)
            if reason:
                raise CorruptShard(f"{self.uri}: {reason}; re-run the stage with --verify "
                                   "(shards.verify: true) to recompute it")
        else:
            with self.fs.open_input_file(self._path(self.shard_name(i))) as f:
                buf = f.read_buffer()
        return _decode(buf, self.fmt)

    def read_records(self, i: int, validate: bool = True) -> list[dict]:
        return table_to_records(self.read_shard(i, validate))

    # completion
    def finish(self, n: int, verify: bool | None = None) -> dict:
        """Write ``_manifest.json`` then ``_SUCCESS``; raises when any of the ``n`` shards is missing
        (``missing_shards(n, verify)``). The manifest is built from the sidecars: no shard byte is read."""
        if missing := self.missing_shards(n, verify):
            raise CorruptShard(f"{self.uri}: cannot finish stage {self.stage}, shards {missing} are missing or "
                               "corrupt; re-run the stage to compute them")
        if (done := self.manifest()) is not None and done.get("num_shards") == n and self.is_complete():
            return done  # finished, and no shard written since (writing one removes _SUCCESS)
        shards = [self._read_json(self.shard_name(i) + ".json") for i in range(n)]
        manifest = {**self._identity(), "num_shards": n, "rows": sum(s["rows"] for s in shards),
                    "shards": [{k: s[k] for k in ("shard", "rows", "size", "sha256")} for s in shards]}
        self._write_atomic("_manifest.json", (canonical_json(manifest) + "\n").encode())
        self._write_atomic("_SUCCESS", (canonical_json(self._identity()) + "\n").encode())
        return manifest

    def manifest(self) -> dict | None:
        return self._read_json("_manifest.json")

    def is_complete(self, deep: bool = False) -> bool:
        """``_SUCCESS`` and the manifest match this run (``deep``: and every listed shard's bytes match its sha256)."""
        success, manifest = self._read_json("_SUCCESS"), self.manifest()
        if success is None or manifest is None or self._mismatch(success, "_SUCCESS") or \
                self._mismatch(manifest, "_manifest.json"):
            return False
        return not deep or not self.missing_shards(manifest["num_shards"], verify=True)

    # errors
    def record_error(self, record_id: str, reason: str, **extra: Any) -> None:
        """Append one line to ``_errors.jsonl`` (a single O_APPEND write on local disks, safe across processes)."""
        entry = {"stage": self.stage, "record_id": record_id, "reason": reason, **extra}
        line = (canonical_json(entry) + "\n").encode()
        path = self._path("_errors.jsonl")
        if isinstance(self.fs, pafs.LocalFileSystem):
            os.makedirs(self.root, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        else:  # object stores cannot append atomically: read-modify-write by the (single) caller
            self.fs.create_dir(self.root, recursive=True)
            old = b""
            if self._exists("_errors.jsonl"):
                with self.fs.open_input_stream(path) as f:
                    old = f.read()
            self._write_atomic("_errors.jsonl", old + line)

    def errors(self) -> list[dict]:
        """Recorded failures, the last one per (stage, record_id) (a re-run records a failing record again)."""
        if not self._exists("_errors.jsonl"):
            return []
        with self.fs.open_input_stream(self._path("_errors.jsonl")) as f:
            lines = f.read().decode().splitlines()
        last = {}
        for ln in lines:
            if ln.strip():
                e = json.loads(ln)
                last[(e.get("stage"), e.get("record_id"))] = e
        return list(last.values())


def read_completed(uri: str, filesystem: pafs.FileSystem | None = None) -> dict:
    """The manifest of a finished stage output (its ``config_hash`` is the next stage's ``input_hash``)."""
    fs, root = (filesystem, uri.rstrip("/")) if filesystem is not None else resolve(uri)
    try:
        with fs.open_input_stream(f"{root}/_SUCCESS") as f:
            success = json.loads(f.read())
        with fs.open_input_stream(f"{root}/_manifest.json") as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no _SUCCESS/_manifest.json, the stage that writes it has not finished; "
                                "run that stage first") from None
    if success.get("config_hash") != manifest.get("config_hash"):
        raise CorruptShard(f"{uri}: _SUCCESS and _manifest.json disagree on the config hash; re-run that stage")
    return manifest


def bytes_per_answer_token(out: StageOutput, n: int, column: str = "tail_logmass") -> float:
    """Stored shard bytes (as written, all columns) per answer token of the teacher output's ``n`` shards; the
    token count is the number of leaf values of ``column`` (one tail log-mass per answer token)."""
    size = tokens = 0
    for i in range(n):
        side = out._read_json(out.shard_name(i) + ".json")
        col = out.read_shard(i).column(column).combine_chunks()
        while pa.types.is_list(col.type):
            col = col.flatten()
        size, tokens = size + side["size"], tokens + len(col)
    if tokens == 0:
        raise ValueError(f"{out.uri}: no answer tokens in column {column!r}")
    return size / tokens
