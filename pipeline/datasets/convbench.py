"""ConvBench (shirlyliu64/ConvBench, arXiv 2403.20194): 577 native three-turn conversations about VisIT-Bench images,
scored by a pairwise judge (:mod:`pipeline.judge`).

The official files (docs/design.md §3.5):

* ``ConvBench.xlsx`` at the repository's HEAD: one sheet, ``multi_turn_benchmark``, 578 rows with exactly the columns
  ``ID``, ``image_id`` (a file name in ``visit_bench_images/``), ``The_first_turn_instruction``,
  ``The_second_turn_instruction``, ``The_third_turn_instruction``. No published version has per-turn human answers.
* The earlier version of the same file adds the column ``third_turn_demands`` (what the judge should check in the third
  turn), a ``category`` sheet (the capability names per level) and a ``reference`` sheet, row-aligned with the main
  one: ``instruction_category``, ``image_path``, ``instruction`` (the VisIT-Bench instruction), ``image_dense_caption``
  (the text the judge sees in place of the image) and ``reference`` (a reference answer to that instruction). In 48
  of its rows ``image_path`` is empty; those rows get no reference.

:func:`build_dialogues` reads the main sheet (instructions only) and, when the workbook has one or ``reference_file``
names one, the ``reference`` sheet, whose caption, reference answer and category go to the dialogue's ``meta``. Since
there are no per-turn answers, each turn carries one empty reference answer (the dialogue format needs one); the
judge scores the answers against the full-token model's (:func:`pipeline.judge.pairwise_scores`). Should a table have
the answer columns ``first_turn_answer``, ``second_turn_answer``, ``third_turn_answer`` (the official scorer reads
them), they become the turns' references. The same columns are accepted from ``.csv``, ``.json`` (a list of row
objects) or ``.jsonl``. Images are looked up at ``IMAGES/<image_id>`` and then at ``IMAGES/images/<image_id>``;
dialogues whose image is missing (row 131's is not in the official folder) are listed, not fatal.
"""

from __future__ import annotations

import csv
import json
import os
import re
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.datasets.common import BenchmarkFileError, write_benchmark
from pipeline.dialogues import Dialogue, Turn

SOURCE = "convbench"
ORDINALS = ("first", "second", "third")
TABLE_COLUMNS = ("ID", "image_id", *(f"The_{o}_turn_instruction" for o in ORDINALS))
QUESTION_COLUMNS = TABLE_COLUMNS[2:]
ANSWER_COLUMNS = tuple(f"{o}_turn_answer" for o in ORDINALS)  # in no published version; used when present
MAIN_SHEET = "multi_turn_benchmark"
REFERENCE_SHEET = "reference"
REFERENCE_COLUMNS = ("instruction_category", "image_path", "instruction", "image_dense_caption", "reference")
_XLSX_NS = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"
_REL_NS = "{http://schemas.openxmlformats.org/officeDocument/2006/relationships}"
_PKG_REL_NS = "{http://schemas.openxmlformats.org/package/2006/relationships}"


# ---------------------------------------------------------------------------------------------- reading the table
def _column_index(ref: str) -> int:
    letters = re.match(r"[A-Z]+", ref)
    if letters is None:
        raise ValueError(f"bad cell reference {ref!r}")
    index = 0
    for ch in letters.group(0):
        index = index * 26 + ord(ch) - ord("A") + 1
    return index - 1


def _sheets(z: zipfile.ZipFile) -> list[Any]:
    return list(ET.fromstring(z.read("xl/workbook.xml")).iter(f"{_XLSX_NS}sheet"))


def sheet_names(path: str | os.PathLike) -> list[str]:
    """The sheet names of an .xlsx workbook, in order."""
    try:
        with zipfile.ZipFile(path) as z:
            return [s.get("name", "") for s in _sheets(z)]
    except (zipfile.BadZipFile, KeyError, ET.ParseError) as e:
        raise BenchmarkFileError(f"{path}: not a readable .xlsx workbook ({e})") from None


def _sheet_part(z: zipfile.ZipFile, name: str | None) -> str:
    sheets = _sheets(z)
    if not sheets:
        raise ValueError("the workbook has no sheet")
    sheet = sheets[0] if name is None else next((s for s in sheets if s.get("name") == name), None)
    if sheet is None:
        raise KeyError(f"no sheet named {name!r} (sheets: {', '.join(s.get('name', '') for s in sheets)})")
    rel_id = sheet.get(f"{_REL_NS}id")
    rels = ET.fromstring(z.read("xl/_rels/workbook.xml.rels"))
    for rel in rels.iter(f"{_PKG_REL_NS}Relationship"):
        if rel.get("Id") == rel_id:
            target = rel.get("Target", "")
            return target.lstrip("/") if target.startswith("/") else f"xl/{target}"
    raise ValueError(f"sheet relation {rel_id!r} not found in xl/_rels/workbook.xml.rels")


def read_xlsx(path: str | os.PathLike, sheet: str | None = None) -> list[dict[str, str]]:
    """One sheet (by name; None: the first) of an .xlsx file as a list of {header: cell text}. Only the standard
    library is used: shared strings, inline strings, numbers and booleans are read. Formulas give their cached
    value."""
    try:
        with zipfile.ZipFile(path) as z:
            shared = []
            if "xl/sharedStrings.xml" in z.namelist():
                for si in ET.fromstring(z.read("xl/sharedStrings.xml")).iter(f"{_XLSX_NS}si"):
                    shared.append("".join(t.text or "" for t in si.iter(f"{_XLSX_NS}t")))
            sheet_xml = ET.fromstring(z.read(_sheet_part(z, sheet)))
    except (zipfile.BadZipFile, KeyError, ET.ParseError, ValueError) as e:
        raise BenchmarkFileError(f"{path}: not a readable .xlsx workbook ({e})") from None
    rows: list[dict[int, str]] = []
    for row in sheet_xml.iter(f"{_XLSX_NS}row"):
        cells: dict[int, str] = {}
        col = -1
        for c in row.iter(f"{_XLSX_NS}c"):
            col = _column_index(c.get("r")) if c.get("r") else col + 1
            kind, v = c.get("t"), c.find(f"{_XLSX_NS}v")
            if kind == "inlineStr":
                value = "".join(t.text or "" for t in c.iter(f"{_XLSX_NS}t"))
            elif v is None or v.text is None:
                value = ""
            elif kind == "s":
                value = shared[int(v.text)]
            elif kind == "b":
                value = "TRUE" if v.text == "1" else "FALSE"
            else:
                value = v.text
                if kind in (None, "n") and re.fullmatch(r"-?\d+\.0+", value):
                    value = value.split(".")[0]  # integer ids stored as floats
            cells[col] = value
        rows.append(cells)
    if not rows:
        return []
    header = {i: name.strip() for i, name in rows[0].items() if name.strip()}
    return [{name: r.get(i, "") for i, name in header.items()} for r in rows[1:] if any(v.strip() for v in r.values())]


def read_table(path: str | os.PathLike, sheet: str | None = None) -> list[dict[str, Any]]:
    """Rows of a ConvBench table from .xlsx (``sheet``: its name; None: the first), .csv, .json (list of objects) or
    .jsonl."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkFileError(f"{path}: file not found (expected ConvBench.xlsx or a .csv/.json/.jsonl export)")
    suffix = path.suffix.lower()
    if suffix == ".xlsx":
        return read_xlsx(path, sheet)
    if suffix == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            return list(csv.DictReader(f))
    if suffix in (".json", ".jsonl"):
        try:
            with open(path, encoding="utf-8") as f:
                rows = ([json.loads(line) for line in f if line.strip()] if suffix == ".jsonl" else json.load(f))
        except json.JSONDecodeError as e:
            raise BenchmarkFileError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise BenchmarkFileError(f"{path}: expected a list of row objects with the ConvBench columns")
        return rows
    raise BenchmarkFileError(f"{path}: unsupported extension {suffix!r}; use .xlsx, .csv, .json or .jsonl")


def _cell(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        return ""
    return str(value).strip()


def _references(table_file: Path, reference_file: str | os.PathLike | None) -> tuple[list[dict] | None, str]:
    """The ``reference`` sheet's rows (from the table's workbook, else from ``reference_file``) and where they came
    from; (None, "") when there is none."""
    source: Path | None = None
    if reference_file is not None:
        source = Path(reference_file)
    elif table_file.suffix.lower() == ".xlsx" and REFERENCE_SHEET in sheet_names(table_file):
        source = table_file
    if source is None:
        return None, ""
    if not source.is_file():
        raise BenchmarkFileError(f"{source}: file not found (expected the earlier ConvBench.xlsx with a "
                                 f"'{REFERENCE_SHEET}' sheet, or that sheet as .csv/.json/.jsonl)")
    if source.suffix.lower() == ".xlsx" and REFERENCE_SHEET not in sheet_names(source):
        raise BenchmarkFileError(f"{source}: no sheet named '{REFERENCE_SHEET}' (sheets: "
                                 f"{', '.join(sheet_names(source))}); the earlier ConvBench.xlsx has one")
    rows = read_table(source, REFERENCE_SHEET if source.suffix.lower() == ".xlsx" else None)
    absent = [c for c in REFERENCE_COLUMNS if rows and c not in rows[0]]
    if absent or not rows:
        raise BenchmarkFileError(f"{source}: sheet '{REFERENCE_SHEET}' lacks column(s) "
                                 f"{', '.join(absent) or '(no rows)'}; expected the official columns "
                                 f"{', '.join(REFERENCE_COLUMNS)}")
    return rows, f"{source}: sheet '{REFERENCE_SHEET}'"


def build_dialogues(table_file: str | os.PathLike, images_dir: str | os.PathLike, *,
                    reference_file: str | os.PathLike | None = None,
                    stats: dict[str, Any] | None = None) -> list[Dialogue]:
    """One three-turn dialogue per row of the main sheet. A missing column or an empty instruction raises an error
    that names the file, the row and the column. ``stats`` (if given) receives ``with_reference`` (rows that got a
    reference-sheet row) and ``reference_rows_empty``."""
    table_file = Path(table_file)
    rows = read_table(table_file, MAIN_SHEET if table_file.suffix.lower() == ".xlsx"
                      and MAIN_SHEET in sheet_names(table_file) else None)
    if not rows:
        raise BenchmarkFileError(f"{table_file}: no rows")
    absent = [c for c in TABLE_COLUMNS if c not in rows[0]]
    if absent:
        raise BenchmarkFileError(f"{table_file}: missing column(s) {', '.join(absent)}; expected the columns of the "
                                 f"official ConvBench.xlsx ({', '.join(TABLE_COLUMNS)})")
    with_answers = all(c in rows[0] for c in ANSWER_COLUMNS)
    references, ref_where = _references(table_file, reference_file)
    if references is not None and len(references) != len(rows):
        raise BenchmarkFileError(f"{ref_where} has {len(references)} rows but {table_file} has {len(rows)}; the two "
                                 "sheets are row-aligned, so use the reference sheet of the same ConvBench version")
    images_dir = Path(images_dir).resolve()
    dialogues, with_reference, empty_references = [], 0, 0
    for i, row in enumerate(rows):
        where = f"{table_file}: row {i + 2}"  # row 1 is the header, as a spreadsheet numbers it
        for column in ("image_id", *QUESTION_COLUMNS, *(ANSWER_COLUMNS if with_answers else ())):
            if not _cell(row, column):
                raise BenchmarkFileError(f"{where}: column '{column}' is empty")
        rid = _cell(row, "ID") or str(i + 1)
        image_id = _cell(row, "image_id")
        image = images_dir / image_id
        if not image.is_file() and (images_dir / "images" / image_id).is_file():
            image = images_dir / "images" / image_id
        answers = [(_cell(row, a),) if with_answers else ("",) for a in ANSWER_COLUMNS]
        turns = tuple(Turn(_cell(row, q), a) for q, a in zip(QUESTION_COLUMNS, answers))
        meta: dict[str, Any] = {"id": rid, "row": i + 1, "image_id": image_id,
                                "human_answers": with_answers}
        if _cell(row, "third_turn_demands"):
            meta["third_turn_demands"] = _cell(row, "third_turn_demands")
        if _cell(row, "instruction-conditioned-caption"):
            meta["caption"] = _cell(row, "instruction-conditioned-caption")
        if references is not None:
            ref = references[i]
            if not _cell(ref, "image_path"):
                empty_references += 1
            elif _cell(ref, "image_path") != image_id:
                raise BenchmarkFileError(f"{ref_where}, row {i + 2}: image_path {_cell(ref, 'image_path')!r} but "
                                         f"{table_file} row {i + 2} has image_id {image_id!r}; the sheets must be "
                                         "row-aligned (use the reference sheet of the same ConvBench version)")
            else:
                with_reference += 1
                meta.update(caption=meta.get("caption") or _cell(ref, "image_dense_caption"),
                            reference=_cell(ref, "reference"), visit_instruction=_cell(ref, "instruction"),
                            category=_cell(ref, "instruction_category"))
        dialogues.append(Dialogue(f"convbench-{rid}", str(image), turns, SOURCE, meta))
    ids = [d.dialogue_id for d in dialogues]
    if len(set(ids)) != len(ids):
        dup = next(x for x in ids if ids.count(x) > 1)
        raise BenchmarkFileError(f"{table_file}: column 'ID' repeats ({dup}); ids must be unique")
    if stats is not None:
        stats.update(with_reference=with_reference, reference_rows_empty=empty_references)
    return dialogues


def build(table_file: str | os.PathLike, images_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
          reference_file: str | os.PathLike | None = None, max_missing_fraction: float = 0.05) -> dict[str, Any]:
    """Write ``out_dir/dialogues.jsonl`` (and ``_errors.jsonl`` listing the dialogues whose image is missing).
    Returns the counts, with the missing dialogues' ids."""
    stats: dict[str, Any] = {}
    dialogues = build_dialogues(table_file, images_dir, reference_file=reference_file, stats=stats)
    summary = write_benchmark(out_dir, dialogues, image_flag=f"--images {images_dir}",
                              max_missing_fraction=max_missing_fraction)
    return {**summary, **stats}
