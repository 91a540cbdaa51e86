"""The dialogue dataset format (docs/design.md §3): ``dialogues.jsonl``, one object per line::

    {"dialogue_id": str, "image": "relative/or/absolute/path", "turns": [{"question": str, "answers": [str, ...]}, ...],
     "source": str}

A video dialogue (docs/design.md §3) gives ``"video": "path"`` instead of ``"image"`` (exactly one of the two),
validated alike; the :class:`Dialogue` then holds the video's path in ``image`` and ``kind == "video"``.

Relative image paths resolve against the folder of the jsonl file. Two optional additions carry benchmark details
without changing the contract: ``"meta": {...}`` on the dialogue and on each turn (question ids, question types,
a ConvBench caption). Any other key is an error, because a misspelt key (``"turn"``) would otherwise silently
drop data.

Two ways to read a file. :func:`load_dialogues` / :func:`iter_dialogues` raise :class:`DialogueFormatError` on the
first bad record; the error names the file, the line and the field. With ``on_error=`` a stage gets each bad
record as a :class:`BadRecord`, for example to write it to its ``_errors.jsonl``, and the iterator skips it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_KEYS = {"dialogue_id", "image", "turns", "source"}
_VISUAL_KEYS = ("image", "video")  # a record names exactly one visual input
_OPTIONAL_KEYS = {"meta"}
_TURN_KEYS = {"question", "answers"}


@dataclass(frozen=True)
class Turn:
    question: str
    answers: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Dialogue:
    """One image (or video) and its turns. ``image`` is the path as resolved on load (absolute when the file gave a
    relative one); ``kind``: "image", or "video" when ``image`` is a video file."""

    dialogue_id: str
    image: str
    turns: tuple[Turn, ...]
    source: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    kind: str = "image"

    @property
    def video(self) -> str | None:
        return self.image if self.kind == "video" else None

    @property
    def questions(self) -> list[str]:
        return [t.question for t in self.turns]


@dataclass(frozen=True)
class BadRecord:
    """A record that failed validation: where it is, which dialogue (if known), why, and the raw line."""

    path: str
    line: int
    dialogue_id: str | None
    reason: str
    raw: str

    def to_json(self) -> dict[str, Any]:
        return {"file": self.path, "line": self.line, "dialogue_id": self.dialogue_id, "reason": self.reason}


class DialogueFormatError(ValueError):
    """A bad dialogue file or record. ``str()`` reads ``FILE:LINE: field 'F': what is wrong``."""

    def __init__(self, path: str | os.PathLike, line: int, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        super().__init__(f"{path}:{line}: {reason}")


class _Invalid(Exception):
    pass


def _fail(field_name: str, problem: str) -> None:
    raise _Invalid(f"field '{field_name}': {problem}")


def _nonempty_str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        _fail(name, f"expected a string, got {type(value).__name__} {value!r:.60}")
    if not value.strip():
        _fail(name, "is empty; give a non-empty string")
    return value


def _meta(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        _fail(name, f"expected an object, got {type(value).__name__}")
    return value


def _parse(obj: Any, base_dir: Path | None, check_image: bool) -> Dialogue:
    if not isinstance(obj, dict):
        raise _Invalid(f"expected a JSON object per line, got {type(obj).__name__}")
    visual = [k for k in _VISUAL_KEYS if k in obj]
    if len(visual) == 2:
        _fail("video", "given together with 'image'; a dialogue has one image or one video")
    kind = visual[0] if visual else "image"
    if kind == "video":
        obj = {("image" if k == "video" else k): v for k, v in obj.items()}
    missing = sorted(_KEYS - obj.keys())
    if missing:
        _fail(missing[0], f"missing (required keys: {', '.join(sorted(_KEYS))})")
    unknown = sorted(obj.keys() - _KEYS - _OPTIONAL_KEYS)
    if unknown:
        _fail(unknown[0], "unknown key; put extra information under 'meta'")
    did = obj["dialogue_id"]
    if isinstance(did, int) and not isinstance(did, bool):
        _fail("dialogue_id", f"expected a string, got the number {did}; write it as \"{did}\"")
    did = _nonempty_str(did, "dialogue_id")
    source = _nonempty_str(obj["source"], "source")
    image = _nonempty_str(obj["image"], kind)
    if "\x00" in image:
        _fail(kind, "contains a NUL character")
    image_path = Path(image).expanduser()
    if not image_path.is_absolute() and base_dir is not None:
        image_path = base_dir / image_path
        # a relative path stays inside the dataset's folder (docs/design.md §8); write an absolute path on purpose
        if not os.path.normpath(image_path).startswith(os.path.normpath(base_dir) + os.sep):
            _fail(kind, f"relative path {image!r} leaves the dataset's folder {base_dir}; move the {kind} inside "
                  "it or give an absolute path")
    if check_image and not image_path.is_file():
        _fail(kind, f"file not found: {image_path} (relative paths resolve against the jsonl file's folder)")
    turns_raw = obj["turns"]
    if not isinstance(turns_raw, list):
        _fail("turns", f"expected a list of turns, got {type(turns_raw).__name__}")
    if not turns_raw:
        _fail("turns", "is empty; a dialogue needs at least one turn")
    turns = []
    for t, turn in enumerate(turns_raw):
        where = f"turns[{t}]"
        if not isinstance(turn, dict):
            _fail(where, f"expected an object with 'question' and 'answers', got {type(turn).__name__}")
        for key in sorted(_TURN_KEYS - turn.keys()):
            _fail(f"{where}.{key}", "missing")
        for key in sorted(turn.keys() - _TURN_KEYS - _OPTIONAL_KEYS):
            _fail(f"{where}.{key}", "unknown key; put extra information under 'meta'")
        question = _nonempty_str(turn["question"], f"{where}.question")
        answers = turn["answers"]
        if not isinstance(answers, list):
            _fail(f"{where}.answers", f"expected a list of strings, got {type(answers).__name__} {answers!r:.60}")
        if not answers:
            _fail(f"{where}.answers", "is empty; every turn needs at least one reference answer")
        for a, answer in enumerate(answers):
            if not isinstance(answer, str):
                _fail(f"{where}.answers[{a}]", f"expected a string, got {type(answer).__name__} {answer!r:.60}")
        turns.append(Turn(question, tuple(answers), _meta(turn.get("meta"), f"{where}.meta")))
    return Dialogue(did, str(image_path), tuple(turns), source, _meta(obj.get("meta"), "meta"), kind)


def parse_dialogue(obj: Any, base_dir: str | os.PathLike | None = None, *, check_image: bool = True) -> Dialogue:
    """Validate one decoded record and return it as a :class:`Dialogue`. Raises ``ValueError`` naming the field."""
    try:
        return _parse(obj, Path(base_dir) if base_dir is not None else None, check_image)
    except _Invalid as e:
        raise ValueError(str(e)) from None


def check_dialogue(obj: Any, base_dir: str | os.PathLike | None = None, *, check_image: bool = True) -> str | None:
    """The reason one decoded record is invalid (naming the field), or ``None`` when it is valid."""
    try:
        _parse(obj, Path(base_dir) if base_dir is not None else None, check_image)
    except _Invalid as e:
        return str(e)
    return None


def iter_dialogues(
    path: str | os.PathLike,
    *,
    check_images: bool = True,
    on_error: Callable[[BadRecord], None] | None = None,
) -> Iterator[Dialogue]:
    """Stream the dialogues of a jsonl file in file order. Blank lines are skipped.

    A bad record (invalid JSON, a bad field, a missing image when ``check_images``, a repeated ``dialogue_id``)
    raises :class:`DialogueFormatError` naming ``path:line`` and the field. With ``on_error`` it is passed there as
    a :class:`BadRecord` and skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dialogue file not found: {path} (expected a dialogues.jsonl file)")
    base_dir = path.resolve().parent
    seen: dict[str, int] = {}
    with open(path, "rb") as f:  # bytes: one undecodable line is one bad record, not a failed file
        for lineno, data in enumerate(f, start=1):
            raw = data.decode("utf-8", errors="replace")
            if not raw.strip():
                continue
            did = None
            try:
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise _Invalid(f"not valid UTF-8 (byte 0x{data[e.start]:02x} at column {e.start + 1}); save the "
                                   "file as UTF-8") from None
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise _Invalid(f"not valid JSON ({e.msg} at column {e.colno})") from None
                except RecursionError:
                    raise _Invalid("not valid JSON (nested too deeply)") from None
                if isinstance(obj, dict) and isinstance(obj.get("dialogue_id"), str):
                    did = obj["dialogue_id"]
                dialogue = _parse(obj, base_dir, check_images)
                if dialogue.dialogue_id in seen:
                    _fail("dialogue_id", f"duplicate {dialogue.dialogue_id!r}, first used on line "
                          f"{seen[dialogue.dialogue_id]}; dialogue ids must be unique in a file")
            except _Invalid as e:
                if on_error is None:
                    raise DialogueFormatError(path, lineno, str(e)) from None
                on_error(BadRecord(str(path), lineno, did, str(e), raw.rstrip("\n")))
                continue
            seen[dialogue.dialogue_id] = lineno
            yield dialogue


def load_dialogues(path: str | os.PathLike, *, check_images: bool = True) -> list[Dialogue]:
    """All dialogues of a file, validated (see :func:`iter_dialogues`). Raises on the first bad record."""
    return list(iter_dialogues(path, check_images=check_images))


def dialogue_to_json(dialogue: Dialogue, base_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The jsonl record of a dialogue. The image path is written relative to ``base_dir`` when the image lies inside
    that folder, so an output folder can be moved as a whole. Otherwise the path is written absolute."""
    image = Path(dialogue.image)
    if base_dir is not None:
        base = Path(base_dir).resolve()
        resolved = image.resolve() if image.is_absolute() else (base / image).resolve()
        image = resolved.relative_to(base) if resolved.is_relative_to(base) else resolved
    record: dict[str, Any] = {
        "dialogue_id": dialogue.dialogue_id,
        dialogue.kind: image.as_posix(),
        "turns": [
            {"question": t.question, "answers": list(t.answers), **({"meta": t.meta} if t.meta else {})}
            for t in dialogue.turns
        ],
        "source": dialogue.source,
    }
    if dialogue.meta:
        record["meta"] = dialogue.meta
    return record


def write_dialogues(path: str | os.PathLike, dialogues: Iterable[Dialogue]) -> int:
    """Write dialogues to ``path`` as jsonl and return how many were written. The file is written under a temporary
    name and then renamed, so a crash never leaves half a file. Ids must be unique."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    seen: set[str] = set()
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for d in dialogues:
                if d.dialogue_id in seen:
                    raise ValueError(f"write_dialogues({path}): duplicate dialogue_id {d.dialogue_id!r}")
                seen.add(d.dialogue_id)
                f.write(json.dumps(dialogue_to_json(d, path.parent), ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n
