"""Tensors as Arrow columns, and records as Arrow tables (the shard schema of docs/design.md §3).

A record value that is an ``(n, d)`` array becomes ``list<fixed_size_list<T, d>>``, an ``(n,)`` array ``list<T>``,
and a list of such arrays one more ``list<...>`` level (per-turn teacher targets). bfloat16 (torch) is stored
bit-exactly as uint16 bits, tagged ``tensor_dtype=bfloat16`` in the Arrow field metadata; readers return the uint16
array, ``bf16_to_torch`` reinterprets it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

TAG = b"tensor_dtype"  # Arrow field metadata key: logical dtype of a tensor column
TEACHER_COLUMNS = ("topk_logprobs", "topk_ids", "tail_logmass")


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


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) floats -> (int8 (n, d), float32 scale (n,)): symmetric per token, ``x ~ q * scale`` with
    ``scale = max |x_row| / 127``, so each value is off by at most ``scale / 2`` (docs/design.md §3)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"quantize_int8: expected an (n, d) array, got shape {x.shape}")
    scale = np.abs(x).max(axis=1) / 127.0 if x.size else np.zeros(x.shape[0], np.float32)
    safe = np.where(scale > 0, scale, 1.0)[:, None]
    q = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Inverse of ``quantize_int8``: float32 (n, d)."""
    return q.astype(np.float32) * np.asarray(scale, dtype=np.float32)[:, None]


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
    table = unpack_tensor_columns(table)
    cols = {f.name: arrow_to_nested(table.column(f.name)) if _tensor_field(f) else table.column(f.name).to_pylist()
            for f in table.schema}
    return [{k: v[j] for k, v in cols.items()} for j in range(table.num_rows)]


# ---------------------------------------------------------------- Parquet storage of 2-d tensor columns
# Parquet writes a definition and a repetition level for every value of a nested list, which doubles the bytes of a
# feature column and makes writing ~10x slower than the data (docs/design.md §3, measured by `bench scale`). A
# ``list<fixed_size_list<T, d>>`` column is therefore stored as ``large_binary``, one cell per record holding the
# row-major bytes of its (n, d) array, tagged with its width and Arrow value type; reading rebuilds the nested
# column over the same buffer (no copy).
WIDTH = b"tensor_width"
VALUE_TYPE = b"tensor_value_type"


def _packable(field: pa.Field) -> bool:
    t = field.type
    return (pa.types.is_list(t) and pa.types.is_fixed_size_list(t.value_type)
            and pa.types.is_primitive(t.value_type.value_type) and t.value_type.value_type.bit_width % 8 == 0)


def pack_tensor_columns(table: pa.Table) -> pa.Table:
    """Each ``list<fixed_size_list<T, d>>`` column -> ``large_binary`` (see above); other columns unchanged."""
    cols, fields = [], []
    for field, col in zip(table.schema, table.columns):
        if not _packable(field):
            cols.append(col)
            fields.append(field)
            continue
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        d, value_type = field.type.value_type.list_size, field.type.value_type.value_type
        width = value_type.bit_width // 8 * d
        offs = arr.offsets.to_numpy().astype(np.int64)
        flat = arr.values.values  # ignores the child's offset: slice by the absolute row offsets below
        base = (arr.values.offset + offs[0]) * d
        data = flat.slice(base, (offs[-1] - offs[0]) * d)
        size = value_type.bit_width // 8
        buf = data.buffers()[1].slice(data.offset * size, len(data) * size)
        packed = pa.Array.from_buffers(pa.large_binary(), len(arr),
                                       [None, pa.py_buffer((offs - offs[0]) * width), buf])
        meta = dict(field.metadata or {})
        meta.update({WIDTH: str(d).encode(), VALUE_TYPE: str(value_type).encode()})
        cols.append(packed)
        fields.append(pa.field(field.name, pa.large_binary(), metadata=meta))
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))


def unpack_tensor_columns(table: pa.Table) -> pa.Table:
    """Inverse of ``pack_tensor_columns`` (tables without packed columns come back unchanged)."""
    if not any(f.metadata and WIDTH in f.metadata for f in table.schema):
        return table
    cols, fields = [], []
    for field, col in zip(table.schema, table.columns):
        meta = dict(field.metadata or {})
        if WIDTH not in meta:
            cols.append(col)
            fields.append(field)
            continue
        d, value_type = int(meta.pop(WIDTH)), pa.type_for_alias(meta.pop(VALUE_TYPE).decode())
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        if arr.null_count:
            raise ValueError(f"tensor column {field.name!r} has null cells")
        item = value_type.bit_width // 8 * d
        offs = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset:arr.offset + len(arr) + 1]
        if np.any((offs - offs[0]) % item):
            raise ValueError(f"tensor column {field.name!r}: a cell's byte length is not a multiple of its row "
                             f"({d} x {value_type})")
        data = arr.buffers()[2].slice(int(offs[0]), int(offs[-1] - offs[0]))
        flat = pa.Array.from_buffers(value_type, len(data) // (value_type.bit_width // 8), [None, data])
        rows = pa.array(((offs - offs[0]) // item).astype(np.int32))
        nested = pa.ListArray.from_arrays(rows, pa.FixedSizeListArray.from_arrays(flat, d))
        cols.append(nested)
        fields.append(pa.field(field.name, nested.type, metadata=meta or None))
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))


def _logical_dtypes(table: pa.Table) -> dict[str, str]:
    return {f.name: f.metadata[TAG].decode() for f in table.schema if f.metadata and TAG in f.metadata}
