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
                   keep_partial: bool = False,
                   stats: dict[str, int] | None = None) -> list[tuple[Hashable, int, list[T]]]:
    """Group ``(image_key, question_id, payload)`` into dialogues.

    Each image's questions are sorted by question id and cut into consecutive groups of ``per_dialogue``. An image's
    last, shorter group is dropped unless ``keep_partial``; ``stats`` (if given) receives ``questions`` (all of them)
    and ``dropped_questions`` (those in dropped groups). Returns ``(image_key, chunk_index, payloads)``, sorted by
    the first question id of each group.
    """
    if per_dialogue < 1:
        raise ValueError(f"per_dialogue must be >= 1, got {per_dialogue}")
    by_image: dict[Hashable, list[tuple[Any, T]]] = defaultdict(list)
    for image_key, qid, payload in items:
        by_image[image_key].append((qid, payload))
    groups = []
    dropped = 0
    for image_key, qs in by_image.items():
        qs.sort(key=lambda q: id_order(q[0]))
        for k, start in enumerate(range(0, len(qs), per_dialogue)):
            chunk = qs[start:start + per_dialogue]
            if len(chunk) == per_dialogue or keep_partial:
                groups.append((id_order(chunk[0][0]), image_key, k, [p for _, p in chunk]))
            else:
                dropped += len(chunk)
    if stats is not None:
        stats.update(questions=sum(len(qs) for qs in by_image.values()), dropped_questions=dropped)
    groups.sort(key=lambda g: g[0])
    return [(image_key, k, payloads) for _, image_key, k, payloads in groups]


def check_limits(per_dialogue: int, max_dialogues: int | None) -> None:
    """The builders' shared limits, with the flags to fix them: ``--turns`` >= 1, ``--max-dialogues`` >= 1 or
    left out."""
    if per_dialogue < 1:
        raise ValueError(f"--turns must be >= 1 (questions per dialogue), got {per_dialogue}")
    if max_dialogues is not None and max_dialogues < 1:
        raise ValueError(f"--max-dialogues must be >= 1, got {max_dialogues}; leave it out to keep every dialogue")


def dialogues_by_image(items: Iterable[tuple[Hashable, Any, Turn]], per_dialogue: int, keep_partial: bool,
                       max_dialogues: int | None, id_prefix: str, image_path: Callable[[Hashable], Path],
                       source: str, stats: dict[str, int] | None = None) -> list[Dialogue]:
    """``group_by_image`` turned into dialogues ``<id_prefix>-<image>-<chunk>``, at most ``max_dialogues``
    (``stats`` as in :func:`group_by_image`). No complete group raises an error naming ``--keep-partial`` and
    ``--turns``."""
    check_limits(per_dialogue, max_dialogues)
    counts: dict[str, int] = {}
    groups = group_by_image(items, per_dialogue, keep_partial, counts)
    if stats is not None:
        stats.update(counts)
    if not groups:
        raise BenchmarkFileError(
            f"no complete dialogue: {counts.get('questions', 0)} question(s), and no image has {per_dialogue}; pass "
            f"--keep-partial to keep shorter dialogues, or a smaller --turns")
    dialogues = []
    for image_id, k, turns in groups:
        dialogues.append(Dialogue(f"{id_prefix}-{image_id}-{k}", str(image_path(image_id)), tuple(turns), source,
                                  {"image_id": image_id}))
        if max_dialogues is not None and len(dialogues) >= max_dialogues:
            break
    return dialogues


def write_benchmark(out_dir: str | os.PathLike, dialogues: Sequence[Dialogue], *, image_flag: str,
                    max_missing_fraction: float = 0.05) -> dict[str, Any]:
    """Write ``out_dir/dialogues.jsonl``. Dialogues whose image file is missing go to ``out_dir/_errors.jsonl``
    instead, and their ids to the summary's ``missing``. If more than ``max_missing_fraction`` of them are missing,
    nothing is written and the error points at ``image_flag`` (the image folder is probably wrong)."""
    out_dir = Path(out_dir)
    if not dialogues:
        raise BenchmarkFileError("no dialogues to write: the input files produced no complete group of questions; "
                                 "pass --keep-partial to keep shorter dialogues, or a smaller --turns")
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
    return {"dialogues": n, "missing_images": len(missing), "missing": [d.dialogue_id for d in missing]}


# ----------------------------------------------------------------------------------- generation per benchmark
# How the model answers each benchmark (docs/design.md §3.5): short-answer VQA gets the adapter's "Answer the question
# using a single word or phrase." and the evaluate.max_new_tokens cap; free-form ConvBench gets no instruction and
# room for a paragraph. Keys: style ("short" | "free"), instruction (None: the style's own; "" none; else appended to
# each question), max_new_tokens (None: evaluate.max_new_tokens), stop (strings that end the answer), metric (None:
# by source, pipeline.metrics.SCORERS).
GENERATION_DEFAULTS: dict[str, dict[str, Any]] = {
    "convbench": {"style": "free", "instruction": None, "max_new_tokens": 512, "stop": [], "metric": None},
}
SHORT_ANSWER = {"style": "short", "instruction": None, "max_new_tokens": None, "stop": [], "metric": None}


def generation_for(source: str, overrides: Sequence[Any] = (), max_new_tokens: int = 16) -> dict[str, Any]:
    """The answer settings of ``source``: its default, with the non-None fields of the override whose ``source``
    matches (objects with the keys above as attributes, e.g. pipeline.config.GenerationSpec) applied on top."""
    out = dict(GENERATION_DEFAULTS.get(source, SHORT_ANSWER))
    for spec in overrides:
        if spec.source == source:
            out.update({k: getattr(spec, k) for k in out if getattr(spec, k, None) is not None})
    if out["max_new_tokens"] is None:
        out["max_new_tokens"] = max_new_tokens
    out["stop"] = list(out["stop"])
    return out


def cut_at_stop(answer: str, stop: Sequence[str]) -> str:
    """``answer`` up to the first occurrence of any ``stop`` string (stripped)."""
    cut = min((i for i in (answer.find(s) for s in stop if s) if i >= 0), default=len(answer))
    return answer[:cut].strip()
