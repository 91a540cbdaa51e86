"""MT-Video-MME from the official Video-MME files (docs/design.md §3, video): the three multiple-choice questions about
one video as one three-turn dialogue, as the paper's video transfer does.

The official annotation file (``videomme/test-00000-of-00001.parquet``, 2,700 rows) has one row per question with the
columns ``video_id`` ("001"), ``duration`` (short / medium / long), ``domain``, ``sub_category``, ``url``,
``videoID`` (the YouTube id; the video file is ``<videoID>.mp4``), ``question_id`` ("001-1"), ``task_type``,
``question``, ``options`` (four strings "A. ...") and ``answer`` (the letter). A JSON list or JSON-lines export
with the same columns is read too. A turn asks the question followed by its options; the reference answer is the
letter, scored by exact match.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.datasets.common import BenchmarkFileError, dialogues_by_image, require, write_benchmark
from pipeline.dialogues import Turn

COLUMNS = ("video_id", "duration", "domain", "sub_category", "url", "videoID", "question_id", "task_type", "question",
           "options", "answer")
INSTRUCTION = "Answer with the option's letter from the given choices directly."


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The annotation rows of a parquet, JSON (a list) or JSON-lines file; a missing column names the file and it."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkFileError(f"{path}: file not found (expected Video-MME's videomme/test-00000-of-00001.parquet)")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise BenchmarkFileError(f"{path}: not a readable parquet file ({err}); expected Video-MME's "
                                     "test-00000-of-00001.parquet") from None
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise BenchmarkFileError(f"{path}: missing column '{missing[0]}' (Video-MME's columns: "
                                     f"{', '.join(COLUMNS)})")
        return table.to_pylist()
    text = path.read_text(encoding="utf-8")
    try:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
            else json.loads(text)
    except json.JSONDecodeError as e:
        raise BenchmarkFileError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); expected Video-MME's "
                                 "annotation rows") from None
    if not isinstance(rows, list):
        raise BenchmarkFileError(f"{path}: expected a list of question rows, got {type(rows).__name__}")
    return rows


def turn_of(row: dict[str, Any], where: str) -> Turn:
    """One question row -> a turn: the question, its options one per line, the letter instruction; answer the
    letter."""
    question = require(row, "question", str, where).strip()
    options = require(row, "options", list, where)
    if not options or not all(isinstance(o, str) for o in options):
        raise BenchmarkFileError(f"{where}: key 'options' should be a non-empty list of strings like 'A. ...'")
    answer = require(row, "answer", str, where).strip()
    letters = [o.strip()[:1] for o in options]
    if answer not in letters:
        raise BenchmarkFileError(f"{where}: answer {answer!r} is not one of the options' letters {letters}")
    text = "\n".join([question, *(o.strip() for o in options), INSTRUCTION])
    meta = {k: require(row, k, str, where) for k in ("question_id", "task_type")}
    return Turn(text, (answer,), meta)


def build(annotations: str | os.PathLike, videos: str | os.PathLike, out_dir: str | os.PathLike, *,
          max_dialogues: int | None = None, max_missing_fraction: float = 0.05) -> dict[str, Any]:
    """``out_dir/dialogues.jsonl``: one dialogue per video of its three questions in question-id order (``source``
    ``video_mme``). -> the summary of ``write_benchmark`` plus ``questions`` and ``dropped_questions``."""
    rows = read_rows(annotations)
    items, info = [], {}
    for i, row in enumerate(rows):
        where = f"{annotations} row {i}"
        video = require(row, "videoID", str, where)
        items.append((video, require(row, "question_id", str, where), turn_of(row, where)))
        info.setdefault(video, {k: require(row, k, str, where)
                                for k in ("video_id", "duration", "domain", "sub_category", "url")})
    stats: dict[str, int] = {}
    folder = Path(videos)
    dialogues = dialogues_by_image(items, 3, False, max_dialogues, "videomme", lambda v: folder / f"{v}.mp4",
                                   "video_mme", stats)
    dialogues = [replace(d, kind="video", meta={"videoID": d.meta["image_id"], **info[d.meta["image_id"]]})
                 for d in dialogues]
    summary = write_benchmark(out_dir, dialogues, image_flag="--videos", max_missing_fraction=max_missing_fraction)
    return {**summary, **stats}
