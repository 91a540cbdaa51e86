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
