"""ConvBench (shirlyliu64/ConvBench, arXiv 2403.20194): 577 native three-turn conversations, and the pairwise
judge that scores them.

Assumed schema: the columns of the official ``ConvBench.xlsx``, as read by the official ``ConvBenchEval/
convbencheval.py``. ``ID``, ``image_id`` (a file name under the VisIT-Bench image folder),
``The_first_turn_instruction``, ``The_second_turn_instruction``, ``The_third_turn_instruction``,
``first_turn_answer``, ``second_turn_answer``, ``third_turn_answer`` (the human reference answers). Optional:
``instruction-conditioned-caption``, ``First_turn_instruction_category`` (and Second/Third), ``third_turn_demands``.
The same columns are accepted from a ``.csv``, a ``.json`` (a list of row objects) or a ``.jsonl`` export. Images
are looked up at ``IMAGES/<image_id>`` and then at ``IMAGES/images/<image_id>``, the layout the official script
uses.

Scoring: a judge compares two answers to the same question and says which is better. :func:`convbench_scores`
compares the model's answer with the human reference for each turn. Which one is shown as "A" is drawn at random
with a seed. It returns the per-turn win rates S1..S3 (in percent) and their mean. The official overall
conversation judgement S0 is not reproduced.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pipeline.datasets.common import BenchmarkFileError, write_benchmark
from pipeline.dialogues import Dialogue, Turn

SOURCE = "convbench"
ORDINALS = ("first", "second", "third")
QUESTION_COLUMNS = tuple(f"The_{o}_turn_instruction" for o in ORDINALS)
ANSWER_COLUMNS = tuple(f"{o}_turn_answer" for o in ORDINALS)
CATEGORY_COLUMNS = tuple(f"{o.capitalize()}_turn_instruction_category" for o in ORDINALS)
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


def _first_sheet(z: zipfile.ZipFile) -> str:
    workbook = ET.fromstring(z.read("xl/workbook.xml"))
    sheet = next(workbook.iter(f"{_XLSX_NS}sheet"), None)
    if sheet is None:
        raise ValueError("the workbook has no sheet")
    rel_id = sheet.get(f"{_REL_NS}id")
    rels = ET.fromstring(z.read("xl/_rels/workbook.xml.rels"))
    for rel in rels.iter(f"{_PKG_REL_NS}Relationship"):
        if rel.get("Id") == rel_id:
            target = rel.get("Target", "")
            return target.lstrip("/") if target.startswith("/") else f"xl/{target}"
    raise ValueError(f"sheet relation {rel_id!r} not found in xl/_rels/workbook.xml.rels")


def read_xlsx(path: str | os.PathLike) -> list[dict[str, str]]:
    """The first sheet of an .xlsx file as a list of {header: cell text}. Only the standard library is used:
    shared strings, inline strings, numbers and booleans are read. Formulas give their cached value."""
    try:
        with zipfile.ZipFile(path) as z:
            shared = []
            if "xl/sharedStrings.xml" in z.namelist():
                for si in ET.fromstring(z.read("xl/sharedStrings.xml")).iter(f"{_XLSX_NS}si"):
                    shared.append("".join(t.text or "" for t in si.iter(f"{_XLSX_NS}t")))
            sheet = ET.fromstring(z.read(_first_sheet(z)))
    except (zipfile.BadZipFile, KeyError, ET.ParseError, ValueError) as e:
        raise BenchmarkFileError(f"{path}: not a readable .xlsx workbook ({e})") from None
    rows: list[dict[int, str]] = []
    for row in sheet.iter(f"{_XLSX_NS}row"):
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


def read_table(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of the ConvBench table from .xlsx, .csv, .json (list of objects) or .jsonl."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkFileError(f"{path}: file not found (expected ConvBench.xlsx or a .csv/.json/.jsonl export)")
    suffix = path.suffix.lower()
    if suffix == ".xlsx":
        return read_xlsx(path)
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


def build_dialogues(table_file: str | os.PathLike, images_dir: str | os.PathLike) -> list[Dialogue]:
    """One three-turn dialogue per row. A row with an empty question or reference answer raises an error that names
    the row and the column."""
    rows = read_table(table_file)
    if not rows:
        raise BenchmarkFileError(f"{table_file}: no rows")
    required = ("image_id", *QUESTION_COLUMNS, *ANSWER_COLUMNS)
    absent = [c for c in required if c not in rows[0]]
    if absent:
        raise BenchmarkFileError(f"{table_file}: missing column(s) {', '.join(absent)}; expected the columns of the "
                                 f"official ConvBench.xlsx ({', '.join(required)})")
    images_dir = Path(images_dir).resolve()
    dialogues = []
    for i, row in enumerate(rows):
        where = f"{table_file}: row {i + 2}"  # row 1 is the header, as a spreadsheet numbers it
        for column in required:
            if not _cell(row, column):
                raise BenchmarkFileError(f"{where}: column '{column}' is empty")
        rid = _cell(row, "ID") or str(i + 1)
        image = images_dir / _cell(row, "image_id")
        if not image.is_file() and (images_dir / "images" / _cell(row, "image_id")).is_file():
            image = images_dir / "images" / _cell(row, "image_id")
        turns = tuple(
            Turn(_cell(row, q), (_cell(row, a),), {"category": _cell(row, c)} if _cell(row, c) else {})
            for q, a, c in zip(QUESTION_COLUMNS, ANSWER_COLUMNS, CATEGORY_COLUMNS))
        meta = {"id": rid, "row": i + 1, "caption": _cell(row, "instruction-conditioned-caption"),
                "third_turn_demands": _cell(row, "third_turn_demands")}
        dialogues.append(Dialogue(f"convbench-{rid}", str(image), turns, SOURCE, meta))
    ids = [d.dialogue_id for d in dialogues]
    if len(set(ids)) != len(ids):
        dup = next(x for x in ids if ids.count(x) > 1)
        raise BenchmarkFileError(f"{table_file}: column 'ID' repeats ({dup}); ids must be unique")
    return dialogues


def build(table_file: str | os.PathLike, images_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
          max_missing_fraction: float = 0.05) -> dict[str, int]:
    """Write ``out_dir/dialogues.jsonl`` (and ``_errors.jsonl`` for dialogues whose image is missing)."""
    return write_benchmark(out_dir, build_dialogues(table_file, images_dir), image_flag=f"--images {images_dir}",
                           max_missing_fraction=max_missing_fraction)


# ----------------------------------------------------------------------------------------------------- the judge
@dataclass(frozen=True)
class Verdict:
    winner: Literal["A", "B"] | None  # None: a tie, or the judgement could not be parsed
    text: str


class Judge(Protocol):
    def compare(self, question: str, answer_a: str, answer_b: str, *, context: str = "") -> Verdict:
        """Which of two answers to ``question`` is better. ``context`` describes the image for a text-only judge."""
        ...


JUDGE_SYSTEM = ("You are an impartial judge of answers to questions about an image. You cannot see the image; rely on "
                "the image description. Prefer the response that is correct, follows the instruction and is helpful. "
                "Do not let the order or the length of the responses influence you.")


def judge_messages(question: str, answer_a: str, answer_b: str, context: str = "") -> list[dict[str, str]]:
    """Chat messages asking for a pairwise judgement that ends with "Overall, Response X is better."."""
    user = (f"Image description: {context or '(none)'}\n\nQuestion: {question}\n\n"
            f"[Response A]\n{answer_a}\n[End of Response A]\n\n[Response B]\n{answer_b}\n[End of Response B]\n\n"
            "Compare the two responses step by step, then finish with exactly one line: "
            "\"Overall, Response A is better.\" or \"Overall, Response B is better.\"")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def plain_prompt(question: str, answer_a: str, answer_b: str, context: str = "") -> str:
    """The judge messages as one text, for models without a chat template."""
    messages = judge_messages(question, answer_a, answer_b, context)
    return "\n\n".join(m["content"] for m in messages) + "\n\nJudgement:"


_VERDICT = re.compile(r"response\s+([ab])\s+is\s+better")


def parse_verdict(text: str) -> Literal["A", "B"] | None:
    """The winner named by a judgement: the last "Overall, Response X is better" if present, else the only
    "Response X is better". Otherwise ``None``."""
    lowered = text.lower()
    overall = re.findall(r"overall\W+" + _VERDICT.pattern, lowered)
    if overall:
        return overall[-1].upper()  # type: ignore[return-value]
    named = set(_VERDICT.findall(lowered))
    return named.pop().upper() if len(named) == 1 else None  # type: ignore[return-value]


class OpenAICompatibleJudge:
    """A judge behind an OpenAI-compatible ``/chat/completions`` endpoint (vLLM, llama.cpp server, OpenAI, ...).

    ``url`` is the API base (``http://host:8000/v1``) or the full ``.../chat/completions`` address. The key comes from
    ``api_key`` or the ``OPENAI_API_KEY`` environment variable. It is optional for local servers."""

    def __init__(self, url: str, model: str, *, api_key: str | None = None, max_tokens: int = 512,
                 timeout: float = 120.0):
        self.url = url if url.rstrip("/").endswith("/chat/completions") else url.rstrip("/") + "/chat/completions"
        self.model, self.max_tokens, self.timeout = model, max_tokens, timeout
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")

    def complete(self, messages: list[dict[str, str]]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                           "temperature": 0.0}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = json.loads(response.read().decode())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300]
            raise RuntimeError(f"judge endpoint {self.url} answered HTTP {e.code}: {detail}") from None
        except urllib.error.URLError as e:
            raise RuntimeError(f"judge endpoint {self.url} unreachable ({e.reason}); check the --judge-url") from None
        except json.JSONDecodeError:
            raise RuntimeError(f"judge endpoint {self.url} did not return JSON") from None
        try:
            return str(payload["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise RuntimeError(f"judge endpoint {self.url} returned no choices[0].message.content: "
                               f"{json.dumps(payload)[:300]}") from None

    def compare(self, question: str, answer_a: str, answer_b: str, *, context: str = "") -> Verdict:
        text = self.complete(judge_messages(question, answer_a, answer_b, context))
        return Verdict(parse_verdict(text), text)


class LocalCausalLMJudge:
    """A judge run locally from a transformers causal-LM directory (safetensors, no remote code), greedy decoding.
    Uses the tokenizer's chat template when it has one; otherwise a plain-text prompt (:meth:`prompt`)."""

    def __init__(self, model_dir: str | os.PathLike, *, max_new_tokens: int = 256, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(model_dir).is_dir():
            raise FileNotFoundError(f"judge model directory not found: {model_dir}")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False).to(device).eval()
        self.max_new_tokens, self.device = max_new_tokens, device

    def prompt(self, question: str, answer_a: str, answer_b: str, context: str = "") -> str:
        messages = judge_messages(question, answer_a, answer_b, context)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return plain_prompt(question, answer_a, answer_b, context)

    def compare(self, question: str, answer_a: str, answer_b: str, *, context: str = "") -> Verdict:
        import torch

        encoded = self.tokenizer(self.prompt(question, answer_a, answer_b, context), return_tensors="pt")
        encoded = {k: v.to(self.device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(**encoded, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=pad)
        text = self.tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        return Verdict(parse_verdict(text), text)


def convbench_scores(judge: Judge, dialogues: Sequence[Dialogue], predictions: Mapping[str, Sequence[str]],
                     *, seed: int = 0) -> dict[str, float]:
    """Win rates of the model's answers against the human references, per turn, in percent.

    ``predictions[dialogue_id][t]`` is the model's answer to turn t. Each comparison shows the model's answer as A or
    B at random (seeded per dialogue), like the official ``pairwise.npy``. A tie or an unparsed judgement counts as
    a loss, as in the official scorer. Returns ``{"S1", "S2", "S3", "Avg"}``.
    """
    if not dialogues:
        raise ValueError("convbench_scores needs at least one dialogue")
    turns = max(len(d.turns) for d in dialogues)
    wins, counts = [0] * turns, [0] * turns
    for d in dialogues:
        if d.dialogue_id not in predictions:
            raise KeyError(f"no predictions for dialogue {d.dialogue_id!r}")
        answers = predictions[d.dialogue_id]
        if len(answers) != len(d.turns):
            raise ValueError(f"dialogue {d.dialogue_id!r} has {len(d.turns)} turns but {len(answers)} predictions")
        model_first = random.Random(f"{seed}:{d.dialogue_id}").random() < 0.5
        context = d.meta.get("caption", "") if d.meta else ""
        for t, (turn, answer) in enumerate(zip(d.turns, answers)):
            a, b = (answer, turn.answers[0]) if model_first else (turn.answers[0], answer)
            verdict = judge.compare(turn.question, a, b, context=context)
            wins[t] += verdict.winner == ("A" if model_first else "B")
            counts[t] += 1
    scores = {f"S{t + 1}": 100.0 * wins[t] / counts[t] for t in range(turns)}
    scores["Avg"] = sum(scores.values()) / turns
    return scores
