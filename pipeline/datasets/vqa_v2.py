"""MT-VQA-v2: the official VQA-v2 files (questions + annotations JSON, COCO images) as three-turn dialogues.

Official schemas (visualqa.org, v2_OpenEnded_mscoco_val2014_questions.json / v2_mscoco_val2014_annotations.json):
``{"data_subtype": "val2014", "questions": [{"image_id": int, "question": str, "question_id": int}, ...]}`` and
``{"annotations": [{"question_id": int, "image_id": int, "question_type": str, "answer_type": str,
"multiple_choice_answer": str, "answers": [{"answer": str, "answer_confidence": str, "answer_id": int}, ...]}]}``.
Images: ``IMAGES/COCO_{data_subtype}_{image_id:012d}.jpg``.

Each image's questions are taken in question-id order and cut into groups of ``per_dialogue`` (3), and every group
becomes one dialogue. The 10 human answers are the references, scored with
:func:`pipeline.metrics.vqa_accuracy`.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.datasets.common import BenchmarkFileError, dialogues_by_image, load_json, require, write_benchmark
from pipeline.dialogues import Dialogue, Turn

SOURCE = "vqa_v2"


def build_dialogues(questions_file: str | os.PathLike, annotations_file: str | os.PathLike,
                    images_dir: str | os.PathLike, *, per_dialogue: int = 3, keep_partial: bool = False,
                    max_dialogues: int | None = None, stats: dict | None = None) -> list[Dialogue]:
    """Dialogues from the official files. Image paths are absolute. Existence of images is not checked here."""
    qdoc = load_json(questions_file, "the VQA-v2 questions file (v2_OpenEnded_mscoco_val2014_questions.json)")
    adoc = load_json(annotations_file, "the VQA-v2 annotations file (v2_mscoco_val2014_annotations.json)")
    questions = require(qdoc, "questions", list, f"{questions_file} (VQA-v2 questions file)")
    annotations = require(adoc, "annotations", list, f"{annotations_file} (VQA-v2 annotations file)")
    subtype = qdoc.get("data_subtype", "val2014")
    images_dir = Path(images_dir).resolve()

    by_qid = {}
    for i, ann in enumerate(annotations):
        where = f"{annotations_file}: annotations[{i}]"
        qid = require(ann, "question_id", int, where)
        answers = require(ann, "answers", list, where)
        if not answers:
            raise BenchmarkFileError(f"{where}: 'answers' is empty (question_id {qid})")
        texts = [require(a, "answer", str, f"{where}.answers[{j}]") for j, a in enumerate(answers)]
        by_qid[qid] = (texts, ann)

    items = []
    for i, q in enumerate(questions):
        where = f"{questions_file}: questions[{i}]"
        qid = require(q, "question_id", int, where)
        image_id = require(q, "image_id", int, where)
        text = require(q, "question", str, where)
        if qid not in by_qid:
            raise BenchmarkFileError(f"{where}: question_id {qid} has no entry in {annotations_file}; use the "
                                     "annotations file of the same split as the questions file")
        answers, ann = by_qid[qid]
        if ann.get("image_id", image_id) != image_id:
            raise BenchmarkFileError(f"{where}: question_id {qid} has image_id {image_id} here but "
                                     f"{ann['image_id']} in {annotations_file}")
        meta = {"question_id": qid, "question_type": ann.get("question_type"), "answer_type": ann.get("answer_type")}
        items.append((image_id, qid, Turn(text, tuple(answers), meta)))

    return dialogues_by_image(items, per_dialogue, keep_partial, max_dialogues, "vqa2",
                              lambda image_id: images_dir / f"COCO_{subtype}_{image_id:012d}.jpg", SOURCE, stats)


def build(questions_file: str | os.PathLike, annotations_file: str | os.PathLike, images_dir: str | os.PathLike,
          out_dir: str | os.PathLike, *, per_dialogue: int = 3, keep_partial: bool = False,
          max_dialogues: int | None = None, max_missing_fraction: float = 0.05) -> dict:
    """Write ``out_dir/dialogues.jsonl`` (and ``_errors.jsonl`` for dialogues whose image is missing). The summary
    counts the dialogues, the missing images and the questions dropped (an image's leftover questions, fewer than a
    dialogue, unless ``keep_partial``)."""
    stats: dict = {}
    dialogues = build_dialogues(questions_file, annotations_file, images_dir, per_dialogue=per_dialogue,
                                keep_partial=keep_partial, max_dialogues=max_dialogues, stats=stats)
    summary = write_benchmark(out_dir, dialogues, image_flag=f"--images {images_dir}",
                              max_missing_fraction=max_missing_fraction)
    return {**summary, **stats}
