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


def file_sha256(path: str) -> str:
    """sha256 of a local file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
