"""MT-GQA: the official GQA testdev-balanced questions (+ images) as three-turn dialogues.

Official schema (``testdev_balanced_questions.json``): an object keyed by question id (a digit string),
``{"<qid>": {"imageId": str, "question": str, "answer": str, "fullAnswer": str, "isBalanced": bool,
"types": {...}, "semantic": [...], ...}, ...}``. Images: ``IMAGES/<imageId>.jpg``.

Each image's questions are taken in question-id order (numeric) and cut into groups of ``per_dialogue`` (3). The
single ``answer`` is the reference, scored with :func:`pipeline.metrics.exact_match`. Questions marked
``isBalanced: false`` are left out, as the official evaluation counts only balanced ones.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.datasets.common import BenchmarkFileError, dialogues_by_image, load_json, require, write_benchmark
from pipeline.dialogues import Dialogue, Turn

SOURCE = "gqa"


def build_dialogues(questions_file: str | os.PathLike, images_dir: str | os.PathLike, *, per_dialogue: int = 3,
                    keep_partial: bool = False, balanced_only: bool = True,
                    max_dialogues: int | None = None, stats: dict | None = None) -> list[Dialogue]:
    """Dialogues from the official questions file. Image paths are absolute. Existence of images is not checked
    here."""
    doc = load_json(questions_file, "the GQA questions file (testdev_balanced_questions.json)")
    if not isinstance(doc, dict):
        raise BenchmarkFileError(f"{questions_file}: expected an object keyed by question id (GQA questions file), "
                                 f"got {type(doc).__name__}")
    images_dir = Path(images_dir).resolve()
    items = []
    unbalanced = 0
    for qid, q in doc.items():
        where = f"{questions_file}: question {qid!r}"
        image_id = require(q, "imageId", str, where)
        text = require(q, "question", str, where)
        answer = require(q, "answer", str, where)
        if balanced_only and not q.get("isBalanced", True):
            unbalanced += 1
            continue
        meta = {"question_id": qid, "full_answer": q.get("fullAnswer"),
                "structural": (q.get("types") or {}).get("structural"),
                "semantic": (q.get("types") or {}).get("semantic")}
        items.append((image_id, qid, Turn(text, (answer,), meta)))

    if stats is not None:
        stats["unbalanced_skipped"] = unbalanced
    return dialogues_by_image(items, per_dialogue, keep_partial, max_dialogues, "gqa",
                              lambda image_id: images_dir / f"{image_id}.jpg", SOURCE, stats)


def build(questions_file: str | os.PathLike, images_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
          per_dialogue: int = 3, keep_partial: bool = False, balanced_only: bool = True,
          max_dialogues: int | None = None, max_missing_fraction: float = 0.05) -> dict:
    """Write ``out_dir/dialogues.jsonl`` (and ``_errors.jsonl`` for dialogues whose image is missing). The summary
    counts the dialogues, the missing images and the questions dropped (an image's leftover questions, fewer than a
    dialogue, unless ``keep_partial``)."""
    stats: dict = {}
    dialogues = build_dialogues(questions_file, images_dir, per_dialogue=per_dialogue, keep_partial=keep_partial,
                                balanced_only=balanced_only, max_dialogues=max_dialogues, stats=stats)
    summary = write_benchmark(out_dir, dialogues, image_flag=f"--images {images_dir}",
                              max_missing_fraction=max_missing_fraction)
    return {**summary, **stats}
