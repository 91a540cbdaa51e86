"""Content hashes that key the cached outputs: the canonical JSON of a config, the sha256 of a file."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np


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


def stream_sha256(f) -> str:
    """sha256 of a binary stream's remaining bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    """sha256 of a local file (``pipeline.storage.file_sha256``: of a file on any storage URI)."""
    with open(path, "rb") as f:
        return stream_sha256(f)


def files_sha256(directory: str, names: list[str] | None = None) -> dict[str, str]:
    """{name: sha256} of the regular files directly in ``directory`` (or of ``names``), for a manifest or _SUCCESS."""
    from pathlib import Path

    root = Path(directory)
    names = sorted(p.name for p in root.iterdir() if p.is_file()) if names is None else list(names)
    return {name: file_sha256(str(root / name)) for name in names}


def check_files(directory: str, recorded: dict[str, str]) -> str | None:
    """None when every file of ``recorded`` ({name: sha256}) is in ``directory`` with that sha256; else the reason
    for the first that is not, naming the file (docs/design.md §8: the integrity chain)."""
    from pathlib import Path

    if not recorded:
        return f"{directory}: no sha256 recorded for its files (written by an older version)"
    for name, digest in sorted(recorded.items()):
        path = Path(directory) / name
        if not path.is_file():
            return f"{path} is missing"
        if file_sha256(str(path)) != digest:
            return f"{path} changed after it was written (its sha256 differs from the one recorded)"
    return None
