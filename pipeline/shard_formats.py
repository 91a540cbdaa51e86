"""A shard's bytes in each storage format: Parquet, Arrow IPC, WebDataset tar (docs/design.md §3)."""

from __future__ import annotations

import io
import json
import tarfile
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.ipc as paipc
import pyarrow.parquet as pq

from pipeline.hashing import _json_default
from pipeline.tensor_columns import (TAG, _logical_dtypes, pack_tensor_columns, records_to_table, table_to_records,
                                     unpack_tensor_columns)


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
        pq.write_table(pack_tensor_columns(table), sink, compression="zstd", write_statistics=False,
                       use_dictionary=False)
    else:  # arrow IPC, uncompressed so that memory-mapped reads are zero-copy
        with paipc.new_file(sink, table.schema) as w:
            w.write_table(table)
    return sink.getvalue().to_pybytes()


def _decode(buf: pa.Buffer, fmt: str) -> pa.Table:
    if fmt == "parquet":  # shards written before tensor columns were packed read as they are
        return unpack_tensor_columns(pq.read_table(pa.BufferReader(buf)))
    if fmt == "arrow":
        return paipc.open_file(buf).read_all()
    with tarfile.open(fileobj=io.BytesIO(buf.to_pybytes()), mode="r:") as tar:
        return _tar_records_to_table(list(_iter_tar(tar)))
