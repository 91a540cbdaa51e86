"""The dialogues.jsonl contract: round trip, relative paths, and errors that name file, line and field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.dialogues import (
    BadRecord,
    Dialogue,
    DialogueFormatError,
    Turn,
    check_dialogue,
    iter_dialogues,
    load_dialogues,
    write_dialogues,
)


def _record(did: str = "d1", image: str = "img.png", **over) -> dict:
    rec = {"dialogue_id": did, "image": image, "source": "test",
           "turns": [{"question": "What color?", "answers": ["red"]},
                     {"question": "How many?", "answers": ["2", "two"]}]}
    rec.update(over)
    return rec


def _write_lines(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    (tmp_path / "img.png").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.png").write_bytes(b"y")
    return tmp_path


def test_load_resolves_relative_paths_and_round_trips(folder: Path) -> None:
    outside = folder.parent / f"{folder.name}_outside.png"
    outside.write_bytes(b"z")
    f = _write_lines(folder / "dialogues.jsonl", [
        _record("d1"), "", _record("d2", "sub/b.png", meta={"k": 1}), _record("d3", str(outside))])
    ds = load_dialogues(f)
    assert [d.dialogue_id for d in ds] == ["d1", "d2", "d3"]
    assert ds[0].image == str(folder / "img.png") and ds[1].image == str(folder / "sub" / "b.png")
    assert ds[0].turns[1] == Turn("How many?", ("2", "two")) and ds[1].meta == {"k": 1}
    # Written into another folder under the same root, images inside stay relative, others become absolute.
    out = folder / "copy" / "dialogues.jsonl"
    assert write_dialogues(out, ds) == 3
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[0]["image"] == str(folder / "img.png")  # not inside copy/ -> absolute
    write_dialogues(folder / "again.jsonl", ds)
    lines = [json.loads(x) for x in (folder / "again.jsonl").read_text().splitlines()]
    assert [x["image"] for x in lines] == ["img.png", "sub/b.png", str(outside)]
    assert lines[1]["meta"] == {"k": 1} and "meta" not in lines[0]
    assert load_dialogues(folder / "again.jsonl") == ds
    # The whole folder can move: relative paths follow it.
    moved = shutil.copytree(folder, folder.parent / f"{folder.name}_moved")
    assert load_dialogues(moved / "again.jsonl")[1].image == str(moved / "sub" / "b.png")


@pytest.mark.parametrize(
    "record, field, words",
    [
        (_record(image="missing.png"), "image", "file not found"),
        (_record(turns=[{"question": "  ", "answers": ["a"]}]), "turns[0].question", "empty"),
        (_record(turns=[{"question": "Q?", "answers": []}]), "turns[0].answers", "at least one reference answer"),
        (_record(turns=[{"question": "Q?", "answers": "red"}]), "turns[0].answers", "expected a list"),
        (_record(turns=[{"question": "Q?", "answers": ["a", 3]}]), "turns[0].answers[1]", "expected a string"),
        (_record(turns=[{"question": 5, "answers": ["a"]}]), "turns[0].question", "expected a string"),
        (_record(turns=[]), "turns", "at least one turn"),
        (_record(turns={"question": "Q?"}), "turns", "expected a list"),
        (_record(dialogue_id=7), "dialogue_id", 'write it as "7"'),
        (_record(turn=[]), "turn", "unknown key"),
        ({"dialogue_id": "d", "image": "img.png", "turns": []}, "source", "missing"),
        (_record(turns=[{"question": "Q?"}]), "turns[0].answers", "missing"),
    ],
)
def test_bad_records_name_file_line_and_field(folder: Path, record: dict, field: str, words: str) -> None:
    f = _write_lines(folder / "dialogues.jsonl", [_record("ok"), record])
    with pytest.raises(DialogueFormatError) as info:
        load_dialogues(f)
    message = str(info.value)
    assert message.startswith(f"{f}:2: field '{field}'") and words in message
    assert info.value.line == 2
    assert check_dialogue(record, folder) == info.value.reason
    assert check_dialogue(_record("ok"), folder) is None


def test_duplicate_ids_and_invalid_json(folder: Path) -> None:
    f = _write_lines(folder / "d.jsonl", [_record("a"), _record("b"), _record("a")])
    with pytest.raises(DialogueFormatError,
                       match=r"d.jsonl:3: field 'dialogue_id': duplicate 'a', first used on line 1"):
        load_dialogues(f)
    f = _write_lines(folder / "e.jsonl", [_record("a"), '{"dialogue_id": "b", '])
    with pytest.raises(DialogueFormatError, match=r"e.jsonl:2: not valid JSON"):
        load_dialogues(f)
    f = _write_lines(folder / "g.jsonl", ["[1, 2]"])
    with pytest.raises(DialogueFormatError, match=r"g.jsonl:1: expected a JSON object"):
        load_dialogues(f)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_dialogues(folder / "nope.jsonl")


def test_on_error_skips_bad_records_and_reports_them(folder: Path) -> None:
    f = _write_lines(folder / "d.jsonl", [
        _record("a"), _record("b", image="gone.png"), "not json", _record("a"), _record("c")])
    bad: list[BadRecord] = []
    ds = list(iter_dialogues(f, on_error=bad.append))
    assert [d.dialogue_id for d in ds] == ["a", "c"]
    assert [(b.line, b.dialogue_id) for b in bad] == [(2, "b"), (3, None), (4, "a")]
    assert "field 'image'" in bad[0].reason and bad[1].raw == "not json"
    assert bad[0].to_json()["file"] == str(f)
    # Without the image check, the record with a missing image is valid.
    assert len(list(iter_dialogues(f, check_images=False, on_error=lambda b: None))) == 3


def test_write_refuses_duplicates_and_leaves_no_partial_file(tmp_path: Path) -> None:
    d = Dialogue("x", str(tmp_path / "i.png"), (Turn("q", ("a",)),), "s")
    with pytest.raises(ValueError, match="duplicate dialogue_id 'x'"):
        write_dialogues(tmp_path / "out.jsonl", [d, d])
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl.tmp").exists()
