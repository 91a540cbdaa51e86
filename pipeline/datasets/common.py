"""Shared steps of the benchmark builders: read an official JSON file, group questions into dialogues, write the
dialogues, and record the ones whose image is missing."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pipeline.dialogues import Dialogue, Turn, write_dialogues

T = TypeVar("T")


class BenchmarkFileError(ValueError):
    """An official benchmark file that cannot be read or does not have the expected schema."""


def load_json(path: str | os.PathLike, what: str) -> Any:
    """Read a JSON file. A missing file or bad JSON raises :class:`BenchmarkFileError`, which names the file and
    says which official file was expected."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkFileError(f"{path}: file not found (expected {what})")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise BenchmarkFileError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); expected {what}") from None


def require(record: Any, key: str, types: type | tuple[type, ...], where: str) -> Any:
    """``record[key]``, checked to be of ``types``. Anything else raises :class:`BenchmarkFileError` naming ``where``
    and the key."""
    if not isinstance(record, dict):
        raise BenchmarkFileError(f"{where}: expected an object, got {type(record).__name__}")
    if key not in record:
        raise BenchmarkFileError(f"{where}: missing key '{key}'")
    value = record[key]
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):  # bool is an int
        names = " or ".join(t.__name__ for t in allowed)
        raise BenchmarkFileError(f"{where}: key '{key}' should be {names}, got {type(value).__name__} {value!r:.60}")
    return value


def id_order(qid: Any) -> tuple[int, int | str]:
    """Sort key for question ids: numbers (or digit strings) numerically, before any other string."""
    if isinstance(qid, int):
        return (0, qid)
    text = str(qid)
    return (0, int(text)) if text.isdigit() else (1, text)


def group_by_image(items: Iterable[tuple[Hashable, Any, T]], per_dialogue: int = 3,
                   keep_partial: bool = False) -> list[tuple[Hashable, int, list[T]]]:
    """Group ``(image_key, question_id, payload)`` into dialogues.

    Each image's questions are sorted by question id and cut into consecutive groups of ``per_dialogue``. An image's
    last, shorter group is dropped unless ``keep_partial``. Returns ``(image_key, chunk_index, payloads)``, sorted by
    the first question id of each group.
    """
    if per_dialogue < 1:
        raise ValueError(f"per_dialogue must be >= 1, got {per_dialogue}")
    by_image: dict[Hashable, list[tuple[Any, T]]] = defaultdict(list)
    for image_key, qid, payload in items:
        by_image[image_key].append((qid, payload))
    groups = []
    for image_key, qs in by_image.items():
        qs.sort(key=lambda q: id_order(q[0]))
        for k, start in enumerate(range(0, len(qs), per_dialogue)):
            chunk = qs[start:start + per_dialogue]
            if len(chunk) == per_dialogue or keep_partial:
                groups.append((id_order(chunk[0][0]), image_key, k, [p for _, p in chunk]))
    groups.sort(key=lambda g: g[0])
    return [(image_key, k, payloads) for _, image_key, k, payloads in groups]


def dialogues_by_image(items: Iterable[tuple[Hashable, Any, Turn]], per_dialogue: int, keep_partial: bool,
                       max_dialogues: int | None, id_prefix: str, image_path: Callable[[Hashable], Path],
                       source: str) -> list[Dialogue]:
    """``group_by_image`` turned into dialogues ``<id_prefix>-<image>-<chunk>``, at most ``max_dialogues``."""
    dialogues = []
    for image_id, k, turns in group_by_image(items, per_dialogue, keep_partial):
        dialogues.append(Dialogue(f"{id_prefix}-{image_id}-{k}", str(image_path(image_id)), tuple(turns), source,
                                  {"image_id": image_id}))
        if max_dialogues is not None and len(dialogues) >= max_dialogues:
            break
    return dialogues


def write_benchmark(out_dir: str | os.PathLike, dialogues: Sequence[Dialogue], *, image_flag: str,
                    max_missing_fraction: float = 0.05) -> dict[str, int]:
    """Write ``out_dir/dialogues.jsonl``. Dialogues whose image file is missing go to ``out_dir/_errors.jsonl``
    instead. If more than ``max_missing_fraction`` of them are missing, nothing is written and the error points at
    ``image_flag`` (the image folder is probably wrong)."""
    out_dir = Path(out_dir)
    if not dialogues:
        raise BenchmarkFileError("no dialogues to write: the input files produced no complete group of questions")
    ok, missing = [], []
    for d in dialogues:
        (ok if Path(d.image).is_file() else missing).append(d)
    if len(missing) > max_missing_fraction * len(dialogues):
        raise BenchmarkFileError(
            f"{len(missing)} of {len(dialogues)} dialogues have no image file (first: {missing[0].image}); check "
            f"{image_flag}, or allow more missing images with --max-missing-fraction")
    out_dir.mkdir(parents=True, exist_ok=True)
    n = write_dialogues(out_dir / "dialogues.jsonl", ok)
    errors = out_dir / "_errors.jsonl"
    if missing:
        with open(errors, "w", encoding="utf-8") as f:
            for d in missing:
                f.write(json.dumps({"dialogue_id": d.dialogue_id, "reason": f"image file not found: {d.image}"}) + "\n")
    elif errors.exists():
        errors.unlink()  # a stale list from an earlier run would describe the wrong output
    return {"dialogues": n, "missing_images": len(missing)}
