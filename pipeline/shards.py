"""Shard store: a stage's output directory of validated, atomically published shards on any ``pyarrow.fs`` URI.

Directory contract (DESIGN 3)::

    part-00000.parquet        a shard (or .tar for WebDataset, .arrow for Arrow IPC), published by rename
    part-00000.parquet.json   its sidecar: rows, size, sha256, stage, config_hash, input_hash, format, schema_version
    _config.json              stage, hashes, format and the resolved config of the run that writes here
    _errors.jsonl             one JSON object per failed record: {"stage", "record_id", "reason", ...}
    _manifest.json            every shard with rows, size and sha256 (written by ``finish``)
    _SUCCESS                  the stage is complete (written last by ``finish``)

A shard counts as done only when its sidecar matches its bytes, so a crash at any point leaves either a done
shard or one that ``missing_shards`` reports for recomputation. Nothing valid is replaced: rewriting a valid
shard with different bytes raises, and only ``prepare(overwrite=True)`` deletes outputs.

Tensor columns: a record value that is an ``(n, d)`` array becomes ``list<fixed_size_list<T, d>>``, an ``(n,)``
array ``list<T>``, and a list of such arrays one more ``list<...>`` level (per-turn teacher targets). bfloat16
(torch) is stored bit-exactly as uint16 bits, tagged ``tensor_dtype=bfloat16`` in the Arrow field metadata
(WebDataset: in the sample's JSON); readers return the uint16 array, ``bf16_to_torch`` reinterprets it.
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

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as paipc
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FORMATS = {"parquet": ".parquet", "webdataset": ".tar", "arrow": ".arrow"}
TAG = b"tensor_dtype"  # Arrow field metadata key: logical dtype of a tensor column
TEACHER_COLUMNS = ("topk_logprobs", "topk_ids", "tail_logmass")
_OURS = re.compile(r"^(part-\d+\.(parquet|tar|arrow)(\.json)?|_manifest\.json|_SUCCESS|_errors\.jsonl|_config\.json)"
                   r"(\.tmp-[0-9a-f]+)?$")


class IncompatibleOutput(ValueError):
    """An output directory holds results of a different configuration."""


class CorruptShard(ValueError):
    """A shard is missing, truncated or altered (its bytes do not match its sidecar)."""


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if hasattr(o, "__dataclass_fields__"):
        from dataclasses import asdict
        return asdict(o)
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"config value of type {type(o).__name__} is not JSON-serialisable: {o!r}")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                      default=_json_default)


def config_hash(obj: Any) -> str:
    """sha256 (hex) of the canonical JSON of ``obj`` (sorted keys, no whitespace)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def file_sha256(path: str) -> str:
    """sha256 of a local file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path, ``file://``, ``s3://``, ``gs://`` ... URI.
    Local files are memory-mapped on read, so Arrow IPC shards are read without copies."""
    if "://" not in uri:
        return pafs.LocalFileSystem(use_mmap=True), os.path.abspath(uri)
    fs, path = pafs.FileSystem.from_uri(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        fs = pafs.LocalFileSystem(use_mmap=True)
    return fs, path


# ---------------------------------------------------------------- tensor columns

def _as_numpy(x: Any) -> tuple[np.ndarray, str]:
    """A numpy array (bfloat16 as its uint16 bits) and its logical dtype name."""
    if isinstance(x, np.ndarray):
        return x, x.dtype.name
    if type(x).__module__.split(".")[0] == "torch":
        import torch
        x = x.detach().cpu().contiguous()
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(np.uint16), "bfloat16"
        return x.numpy(), str(x.dtype).removeprefix("torch.")
    raise TypeError(f"expected a numpy array or torch tensor, got {type(x).__name__}")


def _is_tensor(x: Any) -> bool:
    return isinstance(x, np.ndarray) or type(x).__module__.split(".")[0] == "torch"


def _depth(cells: list) -> int | None:
    """Python-list levels above the arrays in ``cells`` (0: cells are arrays), None when not a tensor column."""
    for c in cells:
        if _is_tensor(c):
            return 0
        if isinstance(c, (list, tuple)) and c:
            d = _depth(list(c))
            return None if d is None else d + 1
    return None


def nested_to_arrow(cells: list, depth: int | None = None) -> tuple[pa.Array, str]:
    """One Arrow cell per item of ``cells``; each item is an array ``(n_i, d)`` / ``(n_i,)`` or (``depth`` > 0)
    nested lists of them. Returns ``(array, logical dtype)``; type ``list^(depth)<list<fixed_size_list<T, d>>>``
    for 2-d arrays, ``list^(depth)<list<T>>`` for 1-d ones. Values are copied once into one contiguous buffer."""
    depth = _depth(cells) if depth is None else depth
    if depth is None:
        raise ValueError("no arrays found in the column (all cells empty?)")
    levels, items = [], list(cells)
    for _ in range(depth):
        lens = [len(c) for c in items]
        levels.append(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
        items = [x for c in items for x in c]
    arrays, logical = [], None
    for j, x in enumerate(items):
        a, name = _as_numpy(x)
        if logical is not None and (name != logical or a.ndim != arrays[0].ndim or a.shape[1:] != arrays[0].shape[1:]):
            raise ValueError(f"array {j} has dtype {name} shape {a.shape}, the first has {logical} "
                             f"shape {arrays[0].shape}: a column needs one dtype and one trailing dimension")
        if a.ndim not in (1, 2):
            raise ValueError(f"array {j} has shape {a.shape}: only (n,) and (n, d) arrays are supported")
        arrays.append(a)
        logical = name
    if not arrays:
        raise ValueError("the column holds only empty lists: its dtype and width are unknown")
    flat = pa.array(np.concatenate([a.reshape(-1) for a in arrays]))
    if arrays[0].ndim == 2:
        flat = pa.FixedSizeListArray.from_arrays(flat, arrays[0].shape[1])
    offsets = np.concatenate([[0], np.cumsum([a.shape[0] for a in arrays])]).astype(np.int32)
    out = pa.ListArray.from_arrays(pa.array(offsets), flat)
    for off in reversed(levels):
        out = pa.ListArray.from_arrays(pa.array(off), out)
    return out, logical


def arrow_to_nested(array: pa.Array | pa.ChunkedArray) -> list:
    """Inverse of ``nested_to_arrow``: per cell a numpy array ``(n_i, d)`` / ``(n_i,)`` (or nested lists of them).
    The arrays are views of the Arrow buffers (no copy; read-only when the buffers are a memory-mapped file)."""
    if isinstance(array, pa.ChunkedArray):
        return [x for chunk in array.chunks for x in arrow_to_nested(chunk)]
    if array.null_count:
        raise ValueError("tensor column has null cells")
    offs = array.offsets.to_numpy()
    child = array.values
    if pa.types.is_list(child.type):
        inner = arrow_to_nested(child)
        return [inner[offs[i]:offs[i + 1]] for i in range(len(array))]
    if pa.types.is_fixed_size_list(child.type):
        d = child.type.list_size
        flat = child.values.to_numpy(zero_copy_only=True)  # backs the whole child, ignoring child.offset
        mat = flat[child.offset * d:(child.offset + len(child)) * d].reshape(-1, d)
    else:
        mat = child.to_numpy(zero_copy_only=True)
    return [mat[offs[i]:offs[i + 1]] for i in range(len(array))]


def features_to_arrow(xs: list) -> pa.Array:
    """``xs``: per image an ``(n_i, d)`` float16 / bfloat16 array or tensor -> ``list<fixed_size_list<T, d>>``
    (bfloat16 as uint16 bits)."""
    array, _ = nested_to_arrow(xs, depth=0)
    if not pa.types.is_fixed_size_list(array.type.value_type):
        raise ValueError("features must be (n_tokens, d) arrays")
    return array


def arrow_to_features(array: pa.Array | pa.ChunkedArray) -> list[np.ndarray]:
    """``list<fixed_size_list<T, d>>`` -> per image an ``(n_i, d)`` numpy view (zero-copy)."""
    if not pa.types.is_fixed_size_list(array.type.value_type):
        raise ValueError(f"not a feature column: {array.type}")
    return arrow_to_nested(array)


def bf16_to_torch(bits: np.ndarray):
    """uint16 bits (as stored) -> a torch.bfloat16 tensor sharing the memory (copy first if you write to it)."""
    import warnings

    import torch
    with warnings.catch_warnings():  # read-only (memory-mapped) input: documented above
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)


def teacher_targets(logprobs: list, ids: list, tail_logmass: list) -> dict[str, list[np.ndarray]]:
    """Validated record fields for one dialogue, per turn t: ``topk_logprobs`` (T_t, k) float16, ``topk_ids``
    (T_t, k) int32, ``tail_logmass`` (T_t,) float32 = log(1 - sum of the top-k probabilities)."""
    if not len(logprobs) == len(ids) == len(tail_logmass):
        raise ValueError(f"turn counts differ: {len(logprobs)} logprobs, {len(ids)} ids, {len(tail_logmass)} tails")
    out: dict[str, list[np.ndarray]] = {c: [] for c in TEACHER_COLUMNS}
    for t, (lp, ix, tail) in enumerate(zip(logprobs, ids, tail_logmass)):
        lp, ix, tail = (np.asarray(_as_numpy(v)[0]) for v in (lp, ix, tail))
        if lp.ndim != 2 or ix.shape != lp.shape or tail.shape != lp.shape[:1]:
            raise ValueError(f"turn {t}: logprobs {lp.shape}, ids {ix.shape}, tail {tail.shape} must be "
                             "(T, k), (T, k), (T,)")
        if ix.size and (ix.min() < 0 or ix.max() >= 2**31):
            raise ValueError(f"turn {t}: token ids outside int32")
        out["topk_logprobs"].append(lp.astype(np.float16, copy=False))
        out["topk_ids"].append(ix.astype(np.int32, copy=False))
        out["tail_logmass"].append(tail.astype(np.float32, copy=False))
    return out


# ---------------------------------------------------------------- records <-> tables

def records_to_table(records: list[dict]) -> pa.Table:
    """Records (dicts with the same keys) -> a table; tensor values become tagged tensor columns."""
    if not records:
        return pa.table({})
    names = list(records[0])
    cols, fields = [], []
    for j, r in enumerate(records):
        if list(r) != names:
            raise ValueError(f"record {j} has keys {sorted(r)}, record 0 has {sorted(names)}")
    for name in names:
        cells = [r[name] for r in records]
        depth = _depth(cells)
        if depth is None:
            arr = pa.array(cells)
            fields.append(pa.field(name, arr.type))
        else:
            arr, logical = nested_to_arrow(cells, depth)
            fields.append(pa.field(name, arr.type, metadata={TAG: logical.encode()}))
        cols.append(arr)
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))


def _tensor_field(field: pa.Field) -> bool:
    t = field.type
    while pa.types.is_list(t):
        t = t.value_type
    return bool(field.metadata and TAG in field.metadata) or pa.types.is_fixed_size_list(t)


def table_to_records(table: pa.Table) -> list[dict]:
    """Inverse of ``records_to_table``; tensor columns come back as numpy views."""
    cols = {f.name: arrow_to_nested(table.column(f.name)) if _tensor_field(f) else table.column(f.name).to_pylist()
            for f in table.schema}
    return [{k: v[j] for k, v in cols.items()} for j in range(table.num_rows)]


def _logical_dtypes(table: pa.Table) -> dict[str, str]:
    return {f.name: f.metadata[TAG].decode() for f in table.schema if f.metadata and TAG in f.metadata}


# ---------------------------------------------------------------- formats: bytes <-> table

def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # fixed metadata: identical bytes on re-runs
    tar.addfile(info, io.BytesIO(data))


def _encode_tar(table: pa.Table, shard: int) -> bytes:
    """WebDataset tar: per record ``KEY.json`` (plain fields + ``__tensors__``) and ``KEY.safetensors``."""
    from safetensors.numpy import save
    dtypes = _logical_dtypes(table)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for j, rec in enumerate(table_to_records(table)):
            key = str(rec.pop("__key__", f"{shard:05d}_{j:06d}"))
            if "." in key or "/" in key or not key:
                raise ValueError(f"shard {shard} record {j}: WebDataset key {key!r} must be non-empty "
                                 "and contain no '.' or '/'")
            tensors, meta, plain = {}, {}, {}
            for name, v in rec.items():
                if isinstance(v, np.ndarray):
                    tensors[name] = np.ascontiguousarray(v)
                    meta[name] = {"dtype": dtypes.get(name, v.dtype.name), "count": None}
                elif isinstance(v, list) and v and all(isinstance(x, np.ndarray) for x in v):
                    tensors.update({f"{name}/{i}": np.ascontiguousarray(x) for i, x in enumerate(v)})
                    meta[name] = {"dtype": dtypes.get(name, v[0].dtype.name), "count": len(v)}
                else:
                    plain[name] = v
            sample = json.dumps({**plain, "__tensors__": meta}, separators=(",", ":"), default=_json_default)
            _tar_add(tar, f"{key}.json", sample.encode())  # record order kept: it is the column order on read
            if tensors:
                _tar_add(tar, f"{key}.safetensors", save(tensors))
    return buf.getvalue()


def _decode_sample(key: str, parts: dict[str, bytes]) -> dict:
    from safetensors.numpy import load
    rec = json.loads(parts[".json"])
    meta = rec.pop("__tensors__", {})
    tensors = load(parts[".safetensors"]) if ".safetensors" in parts else {}
    for name, m in meta.items():
        rec[name] = tensors[name] if m["count"] is None else [tensors[f"{name}/{i}"] for i in range(m["count"])]
    return {"__key__": key, **rec, "__tensors__": meta}


def _iter_tar(tar: tarfile.TarFile) -> Iterator[dict]:
    key, parts = None, {}
    for member in tar:
        if not member.isfile():
            continue
        k, _, ext = member.name.rsplit("/", 1)[-1].partition(".")  # WebDataset: key = name up to the first dot
        ext = "." + ext
        if key is not None and k != key:
            yield _decode_sample(key, parts)
            parts = {}
        key, parts[ext] = k, tar.extractfile(member).read()
    if key is not None:
        yield _decode_sample(key, parts)


def _tar_records_to_table(samples: list[dict]) -> pa.Table:
    table = records_to_table([{k: v for k, v in s.items() if k != "__tensors__"} for s in samples])
    if not samples:
        return table
    tags = {n: m["dtype"] for s in samples for n, m in s["__tensors__"].items()}
    schema = pa.schema([f.with_metadata({TAG: tags[f.name].encode()}) if f.name in tags else f for f in table.schema])
    return pa.Table.from_arrays(table.columns, schema=schema)


def _encode(table: pa.Table, fmt: str, shard: int) -> bytes:
    if fmt == "webdataset":
        return _encode_tar(table, shard)
    sink = pa.BufferOutputStream()
    if fmt == "parquet":
        # zstd: the teacher's int32 ids have mostly-zero high bytes. Dictionaries and statistics of float
        # tensors only add bytes (measured: 384 -> 256 B per answer token at k=64).
        pq.write_table(table, sink, compression="zstd", write_statistics=False, use_dictionary=False)
    else:  # arrow IPC, uncompressed so that memory-mapped reads are zero-copy
        with paipc.new_file(sink, table.schema) as w:
            w.write_table(table)
    return sink.getvalue().to_pybytes()


def _decode(buf: pa.Buffer, fmt: str) -> pa.Table:
    if fmt == "parquet":
        return pq.read_table(pa.BufferReader(buf))
    if fmt == "arrow":
        return paipc.open_file(buf).read_all()
    with tarfile.open(fileobj=io.BytesIO(buf.to_pybytes()), mode="r:") as tar:
        return _tar_records_to_table(list(_iter_tar(tar)))


def iter_webdataset(uris: Iterable[str], filesystem: pafs.FileSystem | None = None) -> Iterator[dict]:
    """Stream the records of WebDataset tar shards in order (validate first with ``StageOutput.missing_shards``).
    Each record: ``__key__``, the plain fields, tensors as numpy arrays (lists for per-turn fields)."""
    for uri in uris:
        fs, path = (filesystem, uri) if filesystem is not None else resolve_uri(uri)
        with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for rec in _iter_tar(tar):
                rec.pop("__tensors__")
                yield rec


# ---------------------------------------------------------------- the stage output directory

class StageOutput:
    """One stage's output directory. The driver calls ``prepare`` (refuse or, explicitly, clear old outputs),
    workers ``write_shard`` for each index in ``missing_shards(n)``, the driver ``finish(n)``."""

    def __init__(self, uri: str, stage: str, config_hash: str, input_hash: str, fmt: str = "parquet",
                 filesystem: pafs.FileSystem | None = None):
        if fmt not in FORMATS:
            raise ValueError(f"unknown shard format {fmt!r} for stage {stage}; choose one of {sorted(FORMATS)}")
        self.uri, self.stage, self.config_hash, self.input_hash, self.fmt = uri, stage, config_hash, input_hash, fmt
        self.fs, self.root = (filesystem, uri.rstrip("/")) if filesystem is not None else resolve_uri(uri)
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
    def _check(self, i: int) -> tuple[str | None, pa.Buffer | None]:
        """(None, bytes) when shard ``i`` matches its sidecar, else (reason, None)."""
        name = self.shard_name(i)
        side = self._read_json(name + ".json")
        if side is None:
            return f"{name}: no readable sidecar", None
        if err := self._mismatch(side, name + ".json"):
            return str(err), None
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

    def is_valid(self, i: int) -> bool:
        return self._check(i)[0] is None

    def missing_shards(self, n: int) -> list[int]:
        """Indices in ``range(n)`` whose shard is missing, corrupt, or has no matching sidecar."""
        with ThreadPoolExecutor(max_workers=min(8, max(1, n))) as pool:
            ok = list(pool.map(self.is_valid, range(n)))
        return [i for i in range(n) if not ok[i]]

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
                raise CorruptShard(f"{self.uri}: {reason}; re-run the stage to recompute it")
        else:
            with self.fs.open_input_file(self._path(self.shard_name(i))) as f:
                buf = f.read_buffer()
        return _decode(buf, self.fmt)

    def read_records(self, i: int, validate: bool = True) -> list[dict]:
        return table_to_records(self.read_shard(i, validate))

    # completion
    def finish(self, n: int) -> dict:
        """Write ``_manifest.json`` then ``_SUCCESS``; raises when any of the ``n`` shards is not valid."""
        if missing := self.missing_shards(n):
            raise CorruptShard(f"{self.uri}: cannot finish stage {self.stage}, shards {missing} are missing or "
                               "corrupt; re-run the stage to compute them")
        shards = [self._read_json(self.shard_name(i) + ".json") for i in range(n)]
        manifest = {**self._identity(), "num_shards": n, "rows": sum(s["rows"] for s in shards),
                    "shards": [{k: s[k] for k in ("shard", "rows", "size", "sha256")} for s in shards]}
        self._write_atomic("_manifest.json", (canonical_json(manifest) + "\n").encode())
        self._write_atomic("_SUCCESS", (canonical_json(self._identity()) + "\n").encode())
        return manifest

    def manifest(self) -> dict | None:
        return self._read_json("_manifest.json")

    def is_complete(self, deep: bool = False) -> bool:
        """``_SUCCESS`` and the manifest match this run (``deep``: and every listed shard validates)."""
        success, manifest = self._read_json("_SUCCESS"), self.manifest()
        if success is None or manifest is None or self._mismatch(success, "_SUCCESS") or \
                self._mismatch(manifest, "_manifest.json"):
            return False
        return not deep or not self.missing_shards(manifest["num_shards"])

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
    fs, root = (filesystem, uri.rstrip("/")) if filesystem is not None else resolve_uri(uri)
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
