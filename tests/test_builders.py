"""Benchmark builders on small fixtures in the official layouts, their errors, and the ConvBench judge."""

from __future__ import annotations

import argparse
import json
import re
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
from PIL import Image

from pipeline import judge as judge_lib
from pipeline.datasets import convbench, gqa, vqa_v2
from pipeline.datasets.common import BenchmarkFileError
from pipeline.dialogues import load_dialogues


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)


def _dump(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


# --------------------------------------------------------------------------------------------------------- VQA-v2
VQA_QIDS = {1: [13, 11, 12, 16, 14, 15, 17], 2: [21, 23, 22], 3: [31, 32]}


def _vqa_answers(qid: int) -> list[str]:
    return [f"ans{qid}"] * 6 + ["other"] * 4


@pytest.fixture()
def vqa_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    questions = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014",
                 "license": {}, "questions": [{"image_id": img, "question": f"Question {q}?", "question_id": q}
                                              for img, qids in VQA_QIDS.items() for q in qids]}
    annotations = {"info": {}, "data_type": "mscoco", "data_subtype": "val2014", "license": {}, "annotations": [
        {"question_id": q, "image_id": img, "question_type": "what is", "answer_type": "other",
         "multiple_choice_answer": f"ans{q}",
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                     for j, a in enumerate(_vqa_answers(q))]}
        for img, qids in VQA_QIDS.items() for q in qids]}
    images = tmp_path / "val2014"
    for img in VQA_QIDS:
        _image(images / f"COCO_val2014_{img:012d}.jpg")
    return (_dump(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", questions),
            _dump(tmp_path / "v2_mscoco_val2014_annotations.json", annotations), images)


def test_vqa_v2_groups_three_questions_per_image_in_id_order(vqa_files, tmp_path: Path) -> None:
    q, a, images = vqa_files
    summary = vqa_v2.build(q, a, images, tmp_path / "out")
    # image 1: 7 questions -> 2 dialogues + 1 left over; image 2: 3 -> 1; image 3: 2 -> 0 (2 left over)
    assert summary == {"dialogues": 3, "missing_images": 0, "missing": [], "questions": 12, "dropped_questions": 3}
    ds = load_dialogues(tmp_path / "out" / "dialogues.jsonl")
    assert [d.dialogue_id for d in ds] == ["vqa2-1-0", "vqa2-1-1", "vqa2-2-0"]
    assert [[t.meta["question_id"] for t in d.turns] for d in ds] == [[11, 12, 13], [14, 15, 16], [21, 22, 23]]
    assert ds[0].image == str(images.resolve() / "COCO_val2014_000000000001.jpg")
    assert ds[2].turns[1].question == "Question 22?" and list(ds[2].turns[1].answers) == _vqa_answers(22)
    assert all(d.source == "vqa_v2" for d in ds)
    partial = vqa_v2.build_dialogues(q, a, images, keep_partial=True)
    assert [[t.meta["question_id"] for t in d.turns] for d in partial] == \
        [[11, 12, 13], [14, 15, 16], [17], [21, 22, 23], [31, 32]]
    assert len(vqa_v2.build_dialogues(q, a, images, max_dialogues=2)) == 2


def test_vqa_v2_bad_files(vqa_files, tmp_path: Path) -> None:
    q, a, images = vqa_files
    with pytest.raises(BenchmarkFileError, match=r"missing key 'questions'"):
        vqa_v2.build_dialogues(a, a, images)  # the annotations file given as questions
    doc = json.loads(a.read_text())
    doc["annotations"] = [x for x in doc["annotations"] if x["question_id"] != 17]
    with pytest.raises(BenchmarkFileError, match=r"questions\[6\]: question_id 17 has no entry in .*annotations"):
        vqa_v2.build_dialogues(q, _dump(tmp_path / "a2.json", doc), images)
    doc = json.loads(a.read_text())
    doc["annotations"][2]["answers"][4] = "yes"
    with pytest.raises(BenchmarkFileError, match=r"annotations\[2\]\.answers\[4\]: expected an object"):
        vqa_v2.build_dialogues(q, _dump(tmp_path / "a3.json", doc), images)
    (tmp_path / "broken.json").write_text('{"questions": [')
    with pytest.raises(BenchmarkFileError, match=r"broken.json: not valid JSON"):
        vqa_v2.build_dialogues(tmp_path / "broken.json", a, images)
    with pytest.raises(BenchmarkFileError, match=r"file not found"):
        vqa_v2.build_dialogues(tmp_path / "nope.json", a, images)
    with pytest.raises(BenchmarkFileError, match=r"3 of 3 dialogues have no image file.*--images"):
        vqa_v2.build(q, a, tmp_path / "wrong_dir", tmp_path / "o1")
    assert not (tmp_path / "o1" / "dialogues.jsonl").exists()
    # Below the allowed fraction, dialogues without an image go to _errors.jsonl and the rest are written.
    (images / "COCO_val2014_000000000002.jpg").unlink()
    assert vqa_v2.build(q, a, images, tmp_path / "o2", max_missing_fraction=0.5) == \
        {"dialogues": 2, "missing_images": 1, "missing": ["vqa2-2-0"], "questions": 12, "dropped_questions": 3}
    errors = [json.loads(x) for x in (tmp_path / "o2" / "_errors.jsonl").read_text().splitlines()]
    assert [e["dialogue_id"] for e in errors] == ["vqa2-2-0"] and "image file not found" in errors[0]["reason"]


def test_data_cli_builders(vqa_files, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.commands import data as data_cli

    q, a, images = vqa_files
    parser = argparse.ArgumentParser()
    data_cli.register(parser.add_subparsers(dest="command"))
    argv = ["data", "mt-vqa-v2", "--questions", str(q), "--annotations", str(a), "--images", str(images),
            "--out", str(tmp_path / "cli")]
    args = parser.parse_args(argv)
    assert args.func(args) == 0 and json.loads(capsys.readouterr().out)["dialogues"] == 3
    with pytest.raises(ValueError, match="already exists"):
        args.func(args)
    args = parser.parse_args(argv[:2] + ["--questions", str(a)] + argv[4:] + ["--overwrite"])
    with pytest.raises(BenchmarkFileError, match=r"missing key 'questions'"):
        args.func(args)


# ------------------------------------------------------------------------------------------------------------ GQA
def test_gqa_numeric_question_order_and_balanced_only(tmp_path: Path) -> None:
    def q(image: str, text: str, answer: str, balanced: bool = True) -> dict:
        return {"imageId": image, "question": text, "answer": answer, "fullAnswer": f"It is {answer}.",
                "isBalanced": balanced, "types": {"structural": "query", "semantic": "attr", "detailed": "x"},
                "semantic": [], "semanticStr": "", "annotations": {}, "entailed": [], "equivalent": [], "groups": {}}
    doc = {"9": q("n1", "Q9?", "a9"), "10": q("n1", "Q10?", "a10"), "11": q("n1", "Q11?", "a11"),
           "8": q("n1", "Q8?", "a8"), "12": q("n1", "Q12?", "a12", balanced=False),
           "201": q("n2", "Q201?", "yes"), "200": q("n2", "Q200?", "no"), "202": q("n2", "Q202?", "left")}
    questions = _dump(tmp_path / "testdev_balanced_questions.json", doc)
    for img in ("n1", "n2"):
        _image(tmp_path / "images" / f"{img}.jpg")
    assert gqa.build(questions, tmp_path / "images", tmp_path / "out")["dialogues"] == 2
    ds = load_dialogues(tmp_path / "out" / "dialogues.jsonl")
    assert [d.dialogue_id for d in ds] == ["gqa-n1-0", "gqa-n2-0"]
    assert [t.question for t in ds[0].turns] == ["Q8?", "Q9?", "Q10?"]  # 8 < 9 < 10 numerically
    assert [t.answers for t in ds[1].turns] == [("no",), ("yes",), ("left",)]
    assert ds[0].turns[0].meta["full_answer"] == "It is a8."
    with_unbalanced = gqa.build_dialogues(questions, tmp_path / "images", balanced_only=False, keep_partial=True)
    assert [t.question for t in with_unbalanced[1].turns] == ["Q11?", "Q12?"]
    summary = gqa.build(questions, tmp_path / "images", tmp_path / "counted")
    assert summary["dropped_questions"] == 1 and summary["unbalanced_skipped"] == 1  # Q11 left over, Q12 unbalanced
    del doc["8"]["imageId"]
    with pytest.raises(BenchmarkFileError, match=r"question '8': missing key 'imageId'"):
        gqa.build_dialogues(_dump(tmp_path / "bad.json", doc), tmp_path / "images")
    with pytest.raises(BenchmarkFileError, match=r"expected an object keyed by question id"):
        gqa.build_dialogues(_dump(tmp_path / "list.json", [1, 2]), tmp_path / "images")

def test_small_groups_and_limits_name_the_flags(vqa_files, tmp_path: Path) -> None:
    """One balanced GQA question: the error names --keep-partial and --turns; --max-dialogues 0 / -1 are refused by
    the library and the command line; --keep-partial keeps the single question."""
    from pipeline.commands import data as data_cli

    doc = {"5": {"imageId": "n9", "question": "Q5?", "answer": "yes", "isBalanced": True}}
    questions = _dump(tmp_path / "one.json", doc)
    _image(tmp_path / "images" / "n9.jpg")
    with pytest.raises(BenchmarkFileError, match=r"no complete dialogue: 1 question.*--keep-partial.*--turns"):
        gqa.build(questions, tmp_path / "images", tmp_path / "o1")
    assert gqa.build(questions, tmp_path / "images", tmp_path / "o2", keep_partial=True)["dialogues"] == 1
    assert gqa.build(questions, tmp_path / "images", tmp_path / "o3", per_dialogue=1)["dropped_questions"] == 0
    q, a, images = vqa_files
    for bad in (0, -1):
        with pytest.raises(ValueError, match=rf"--max-dialogues must be >= 1, got {bad}"):
            vqa_v2.build_dialogues(q, a, images, max_dialogues=bad)
        with pytest.raises(ValueError, match=rf"--max-dialogues must be >= 1, got {bad}"):
            gqa.build_dialogues(questions, tmp_path / "images", max_dialogues=bad)
    parser = argparse.ArgumentParser()
    data_cli.register(parser.add_subparsers(dest="command"))
    for bad in ("0", "-1"):
        with pytest.raises(SystemExit):
            parser.parse_args(["data", "mt-gqa", "--questions", str(questions), "--images", "x", "--out", "y",
                               "--max-dialogues", bad])
    assert len(vqa_v2.build_dialogues(q, a, images, max_dialogues=1)) == 1


# ------------------------------------------------------------------------------------------------------ ConvBench
# The official layouts (shirlyliu64/ConvBench): ConvBench.xlsx at HEAD has one sheet with exactly these columns; the
# earlier version adds third_turn_demands and the sheets 'category' and 'reference'.
CB_HEAD_COLUMNS = ["ID", "image_id", "The_first_turn_instruction", "The_second_turn_instruction",
                   "The_third_turn_instruction"]
CB_OLD_COLUMNS = CB_HEAD_COLUMNS + ["third_turn_demands"]
CB_CATEGORY_COLUMNS = ["Perception(first_turn)", "Reasoning(second_turn)", "Planing(third_turn)"]
CB_REFERENCE_COLUMNS = ["instruction_category", "image_path", "instruction", "image_dense_caption", "reference"]


def _cb_row(i: int) -> list:
    return [i, f"{i}_tested_skill_x.png", f"Describe <{i}>.", f"Why {i}?", f"Write {i}."]


def _cb_reference(i: int) -> list:
    return ["Catchy Titles", f"{i}_tested_skill_x.png", f"Make a title {i}.", f"A caption {i} & more",
            f"Title {i}."]


def _write_xlsx(path: Path, sheets: dict[str, list[list]] | list[list]) -> None:
    """A minimal .xlsx as Excel writes it: shared strings, numeric cells, one inline string, named sheets."""
    if isinstance(sheets, list):
        sheets = {"Sheet1": sheets}
    shared: list[str] = []
    parts = []
    for rows in sheets.values():
        sheet_rows = []
        for r, row in enumerate(rows, start=1):
            cells = []
            for c, value in enumerate(row):
                ref = f"{chr(ord('A') + c)}{r}"
                if isinstance(value, (int, float)):
                    cells.append(f'<c r="{ref}"><v>{float(value)}</v></c>')
                elif r == 2 and c == 1:
                    cells.append(f'<c r="{ref}" t="inlineStr"><is><t>{escape(value)}</t></is></c>')
                elif value == "":
                    continue  # an empty cell is absent, as Excel writes it
                else:
                    shared.append(value)
                    cells.append(f'<c r="{ref}" t="s"><v>{len(shared) - 1}</v></c>')
            sheet_rows.append(f'<row r="{r}">{"".join(cells)}</row>')
        parts.append("".join(sheet_rows))
    main = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
    rel = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
    pkg = "http://schemas.openxmlformats.org/package/2006/relationships"
    names = list(sheets)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("[Content_Types].xml",
                   '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"/>')
        z.writestr("xl/workbook.xml", f'<workbook xmlns="{main}" xmlns:r="{rel}"><sheets>' + "".join(
            f'<sheet name="{escape(n)}" sheetId="{k + 1}" r:id="rId{k + 7}"/>' for k, n in enumerate(names))
            + "</sheets></workbook>")
        z.writestr("xl/_rels/workbook.xml.rels", f'<Relationships xmlns="{pkg}">' + "".join(
            f'<Relationship Id="rId{k + 7}" Type="{rel}/worksheet" Target="worksheets/sheet{k + 1}.xml"/>'
            for k in range(len(names))) + "</Relationships>")
        z.writestr("xl/sharedStrings.xml", f'<sst xmlns="{main}">' + "".join(
            f"<si><t>{escape(s)}</t></si>" for s in shared) + "</sst>")
        for k, rows_xml in enumerate(parts):
            z.writestr(f"xl/worksheets/sheet{k + 1}.xml",
                       f'<worksheet xmlns="{main}"><sheetData>{rows_xml}</sheetData></worksheet>')


def _cb_images(tmp_path: Path, ids: list[int]) -> Path:
    images = tmp_path / "visit_bench_images"
    for i in ids:
        _image(images / f"{i}_tested_skill_x.png")
    return images


def test_convbench_official_head_table(tmp_path: Path) -> None:
    """The HEAD layout: one sheet, five columns, no answers. Row 3's image is missing: listed, not fatal."""
    import csv

    rows = [_cb_row(i) for i in range(1, 41)]
    _write_xlsx(tmp_path / "ConvBench.xlsx", {"multi_turn_benchmark": [CB_HEAD_COLUMNS] + rows})
    images = _cb_images(tmp_path, [i for i in range(1, 41) if i not in (3, 7)])
    _image(images / "images" / "7_tested_skill_x.png")  # the official script's images/ sub-folder
    summary = convbench.build(tmp_path / "ConvBench.xlsx", images, tmp_path / "out")
    assert summary == {"dialogues": 39, "missing_images": 1, "missing": ["convbench-3"], "with_reference": 0,
                       "reference_rows_empty": 0}
    ds = load_dialogues(tmp_path / "out" / "dialogues.jsonl")
    assert ds[0].dialogue_id == "convbench-1" and ds[0].source == "convbench"
    assert [t.question for t in ds[1].turns] == ["Describe <2>.", "Why 2?", "Write 2."]
    assert [t.answers for t in ds[1].turns] == [("",)] * 3  # no published per-turn answers
    assert ds[1].meta == {"id": "2", "row": 2, "image_id": "2_tested_skill_x.png", "human_answers": False}
    assert ds[5].image.endswith("visit_bench_images/images/7_tested_skill_x.png")
    errors = [json.loads(x) for x in (tmp_path / "out" / "_errors.jsonl").read_text().splitlines()]
    assert [e["dialogue_id"] for e in errors] == ["convbench-3"]
    with open(tmp_path / "convbench.csv", "w", newline="") as f:
        csv.writer(f).writerows([CB_HEAD_COLUMNS] + rows)
    assert convbench.build_dialogues(tmp_path / "convbench.csv", images) == \
        convbench.build_dialogues(tmp_path / "ConvBench.xlsx", images)


def test_convbench_earlier_version_with_reference_sheet(tmp_path: Path) -> None:
    """The earlier layout: third_turn_demands, a category sheet and a row-aligned reference sheet whose rows may be
    empty (48 official rows are); also the HEAD table with --reference pointing at the earlier workbook."""
    rows = [_cb_row(i) + [f"be short {i}"] for i in (1, 2, 3)]
    refs = [_cb_reference(1), ["Catchy Titles", "", "", "", ""], _cb_reference(3)]
    old = tmp_path / "ConvBench_old.xlsx"
    _write_xlsx(old, {"multi_turn_benchmark": [CB_OLD_COLUMNS] + rows,
                      "category": [CB_CATEGORY_COLUMNS, ["OCR", "Flavor Reasoning", "Self-Consistency"]],
                      "reference": [CB_REFERENCE_COLUMNS] + refs})
    assert convbench.sheet_names(old) == ["multi_turn_benchmark", "category", "reference"]
    images = _cb_images(tmp_path, [1, 2, 3])
    summary = convbench.build(old, images, tmp_path / "out")
    assert summary["dialogues"] == 3 and summary["with_reference"] == 2 and summary["reference_rows_empty"] == 1
    ds = load_dialogues(tmp_path / "out" / "dialogues.jsonl")
    assert ds[0].meta["caption"] == "A caption 1 & more" and ds[0].meta["reference"] == "Title 1."
    assert ds[0].meta["category"] == "Catchy Titles" and ds[0].meta["visit_instruction"] == "Make a title 1."
    assert ds[0].meta["third_turn_demands"] == "be short 1"
    assert "caption" not in ds[1].meta and ds[1].meta["third_turn_demands"] == "be short 2"
    head = tmp_path / "ConvBench.xlsx"
    _write_xlsx(head, {"multi_turn_benchmark": [CB_HEAD_COLUMNS] + [r[:5] for r in rows]})
    with_ref = convbench.build_dialogues(head, images, reference_file=old)
    assert with_ref[2].meta["caption"] == "A caption 3 & more" and "third_turn_demands" not in with_ref[2].meta
    # a reference sheet of another version (row-misaligned, or of another length) is refused, naming the row
    _write_xlsx(tmp_path / "other.xlsx", {"reference": [CB_REFERENCE_COLUMNS, _cb_reference(2), _cb_reference(1),
                                                         _cb_reference(3)]})
    with pytest.raises(BenchmarkFileError, match=r"other.xlsx: sheet 'reference', row 2: image_path "
                                                 r"'2_tested_skill_x.png'.*row-aligned"):
        convbench.build_dialogues(head, images, reference_file=tmp_path / "other.xlsx")
    _write_xlsx(tmp_path / "short.xlsx", {"reference": [CB_REFERENCE_COLUMNS, _cb_reference(1)]})
    with pytest.raises(BenchmarkFileError, match=r"has 1 rows but .* has 3"):
        convbench.build_dialogues(head, images, reference_file=tmp_path / "short.xlsx")
    with pytest.raises(BenchmarkFileError, match=r"no sheet named 'reference'"):
        convbench.build_dialogues(head, images, reference_file=head)


def test_convbench_bad_tables(tmp_path: Path) -> None:
    _write_xlsx(tmp_path / "a.xlsx", {"multi_turn_benchmark": [CB_HEAD_COLUMNS[:-1], _cb_row(1)[:-1]]})
    with pytest.raises(BenchmarkFileError, match=r"a.xlsx: missing column\(s\) The_third_turn_instruction; expected "
                                                 r"the columns of the official ConvBench.xlsx \(ID, image_id, The_first"):
        convbench.build_dialogues(tmp_path / "a.xlsx", tmp_path)
    row = _cb_row(2)
    row[3] = " "
    _write_xlsx(tmp_path / "b.xlsx", [CB_HEAD_COLUMNS, _cb_row(1), row])
    with pytest.raises(BenchmarkFileError, match=r"b.xlsx: row 3: column 'The_second_turn_instruction' is empty"):
        convbench.build_dialogues(tmp_path / "b.xlsx", tmp_path)
    (tmp_path / "c.xlsx").write_text("not a zip")
    with pytest.raises(BenchmarkFileError, match=r"c.xlsx: not a readable .xlsx"):
        convbench.build_dialogues(tmp_path / "c.xlsx", tmp_path)
    with pytest.raises(BenchmarkFileError, match=r"unsupported extension '.txt'"):
        convbench.read_table(_dump(tmp_path / "d.txt", {}))
    _write_xlsx(tmp_path / "e.xlsx", [CB_HEAD_COLUMNS, _cb_row(1), _cb_row(1)])
    with pytest.raises(BenchmarkFileError, match=r"column 'ID' repeats \(convbench-1\)"):
        convbench.build_dialogues(tmp_path / "e.xlsx", tmp_path)


def test_convbench_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.commands import data as data_cli

    old = tmp_path / "old.xlsx"
    _write_xlsx(old, {"multi_turn_benchmark": [CB_OLD_COLUMNS, _cb_row(1) + ["x"]],
                      "category": [CB_CATEGORY_COLUMNS], "reference": [CB_REFERENCE_COLUMNS, _cb_reference(1)]})
    _write_xlsx(tmp_path / "ConvBench.xlsx", {"multi_turn_benchmark": [CB_HEAD_COLUMNS, _cb_row(1)]})
    parser = argparse.ArgumentParser()
    data_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "convbench", "--table", str(tmp_path / "ConvBench.xlsx"), "--reference",
                              str(old), "--images", str(_cb_images(tmp_path, [1])), "--out", str(tmp_path / "o")])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["with_reference"] == 1


# ---------------------------------------------------------------------------------------------------------- judge
@pytest.mark.parametrize(
    "text, winner",
    [
        ("A is vague. Overall, Response B is better.", "B"),
        ("Response A is better than I thought... Overall, Response B is better.", "B"),  # the overall line wins
        ("I think response a is better", "A"),
        ("Overall , Response A is better .", "A"),
        ("Response A is better. Response B is better.", None),
        ("Both are fine.", None),
    ],
)
def test_parse_verdict(text: str, winner: str | None) -> None:
    assert judge_lib.parse_verdict(text) == winner


class _Stub(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint on loopback: replies are taken from ``replies`` in order (the last repeats)."""

    requests: list[dict] = []
    replies: list[tuple[int, str]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server API)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        cls = type(self)
        cls.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": json.loads(body)})
        status, payload = cls.replies[min(len(cls.requests), len(cls.replies)) - 1]
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args) -> None:
        pass


def _content(text: str) -> str:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})


@pytest.fixture()
def stub_server():
    _Stub.requests, _Stub.replies = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", _Stub
    server.shutdown()
    server.server_close()


def test_openai_compatible_judge_retries_then_fails_clearly(stub_server, monkeypatch) -> None:
    url, stub = stub_server
    monkeypatch.setenv("JUDGE_TEST_KEY", "k-test")
    waits: list[float] = []
    judge = judge_lib.OpenAICompatibleJudge(url, "judge-model", api_key_env="JUDGE_TEST_KEY", retries=3,
                                            backoff_s=0.5, sleep=waits.append)
    stub.replies = [(503, '{"error": "busy"}'), (429, '{"error": "slow down"}'),
                    (200, _content("B misses the dog. Overall, Response A is better."))]
    messages = judge_lib.judge_messages(["What is shown?", "Why?"], ["A dog on a sofa.", "It sleeps."],
                                        ["A sofa.", "No idea."], turn=1, context="a dog lies on a red sofa")
    assert judge.complete(messages).endswith("Response A is better.")
    assert waits == [0.5, 1.0] and len(stub.requests) == 3  # two retries with doubling backoff
    req = stub.requests[-1]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer k-test"
    assert req["body"]["model"] == "judge-model" and req["body"]["temperature"] == 0.0
    user = req["body"]["messages"][-1]["content"]
    # the whole conversation of both assistants, in order, and the image description
    for text in ("What is shown?", "A dog on a sofa.", "It sleeps.", "No idea.", "a dog lies on a red sofa"):
        assert text in user
    assert user.index("Assistant A's Conversation") < user.index("It sleeps.") < \
        user.index("Assistant B's Conversation") < user.index("No idea.")
    assert "second turn responses" in user
    stub.requests, stub.replies, waits[:] = [], [(500, '{"error": "down"}')], []
    with pytest.raises(judge_lib.JudgeError, match=r"HTTP 500: .*down.*after 4 tries; check evaluate.judge.url"):
        judge.complete(messages)
    assert len(stub.requests) == 4 and waits == [0.5, 1.0, 2.0]
    stub.requests, stub.replies = [], [(401, '{"error": "bad key"}')]
    with pytest.raises(judge_lib.JudgeError, match=r"HTTP 401.*api_key_env"):
        judge.complete(messages)
    assert len(stub.requests) == 1  # not retried
    stub.replies = [(200, '{"choices": []}')]
    with pytest.raises(judge_lib.JudgeError, match=r"no choices\[0\]\.message\.content"):
        judge.complete(messages)


class _ScriptedJudge:
    """A judge model stand-in: prefers the longer answer of the judged turn (read back from the prompt)."""

    identity = "scripted"

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def complete(self, messages: list[dict]) -> str:
        user = messages[-1]["content"]
        self.prompts.append(user)
        turn = next((t for t, o in enumerate(judge_lib.ORDINALS) if f"compare the {o} turn" in user), None)
        if turn is None:  # the overall judgement: follows the first turn's judgement, which it is shown
            first = re.search(r"judgement of the first turn: Overall, Response ([AB])", user)
            return f"Overall, Response {first.group(1) if first else 'A'} is better."
        o = judge_lib.ORDINALS[turn]
        a = re.search(rf"The {o} turn response from Assistant A:\n(.*)\n", user).group(1)
        b = re.search(rf"The {o} turn response from Assistant B:\n(.*)\n", user).group(1)
        return f"Overall, Response {'A' if len(a) > len(b) else 'B'} is better."


def test_pairwise_scores_positions_ties_and_cache(tmp_path: Path) -> None:
    """Hand-computed scores with a position-blind judge; the official positions file decides A/B; identical answers
    make no call; a second run is answered from the cache."""
    import numpy as np

    ds = [judge_lib.JudgedDialogue(f"c{i}", ("q1", "q2", "q3"), f"image {i}", "be short", row=i + 1)
          for i in range(8)]
    answers = {d.dialogue_id: ["a much longer answer", "long answer" if i % 2 else "x", "same"]
               for i, d in enumerate(ds)}
    baseline = {d.dialogue_id: ["short", "medium one", "same"] for d in ds}
    np.save(tmp_path / "pairwise.npy", np.array([0, 1] * 4))
    positions = judge_lib.load_positions(tmp_path / "pairwise.npy")
    scripted = _ScriptedJudge()
    cached = judge_lib.CachedJudge(scripted, tmp_path / "cache.jsonl")
    scores = judge_lib.pairwise_scores(cached, ds, answers, baseline, positions=positions)
    # turn 1: the model's longer answer always wins; turn 2: "long answer" (11) beats "medium one" (10) on odd i
    # only; turn 3: identical -> 0.5 without a call. Overall: the first turn's verdict, the model's every time.
    assert {k: v for k, v in scores.items() if k != "per_dialogue"} == pytest.approx(
        {"S1": 100.0, "S2": 50.0, "S3": 50.0, "Avg": 200.0 / 3, "S0": 100.0})
    assert cached.calls == 8 * 3 and len(scripted.prompts) == 24  # 2 turns + overall per dialogue
    assert all("be short" in p for p in scripted.prompts if "compare the third turn" in p)
    a_first = [p for p in scripted.prompts if "compare the first turn" in p]
    assert ["Assistant A:\na much longer answer" in p for p in a_first] == [True, False] * 4  # positions 0 / 1
    again = judge_lib.CachedJudge(scripted, tmp_path / "cache.jsonl")
    assert judge_lib.pairwise_scores(again, ds, answers, baseline, positions=positions)["S1"] == 100.0
    assert again.calls == 0 and again.hits == 24 and len(scripted.prompts) == 24
    with pytest.raises(KeyError, match="c0"):
        judge_lib.pairwise_scores(cached, ds, {}, baseline)
    with pytest.raises(ValueError, match="row 9 has no entry"):
        judge_lib.pairwise_scores(cached, [judge_lib.JudgedDialogue("c9", ("q",), row=9)], {"c9": ["x"]},
                                  {"c9": ["y"]}, positions=positions)


def test_position_blind_judge_is_scored_at_chance_by_the_seeded_order() -> None:
    class AlwaysA:
        identity = "always-a"

        def complete(self, messages):
            return "Overall, Response A is better."

    ds = [judge_lib.JudgedDialogue(f"c{i}", ("q1", "q2")) for i in range(200)]
    answers = {d.dialogue_id: ["x", "y"] for d in ds}
    baseline = {d.dialogue_id: ["u", "v"] for d in ds}
    s = judge_lib.pairwise_scores(AlwaysA(), ds, answers, baseline, seed=3)
    assert 35 < s["S1"] < 65 and s["S1"] == s["S2"] == s["S0"]  # the model is A in about half the dialogues


def test_judge_command_against_loopback_endpoint(stub_server, tmp_path: Path, capsys) -> None:
    from pipeline.commands import judge as judge_cli
    from pipeline.dialogues import Dialogue, Turn, write_dialogues

    url, stub = stub_server
    stub.replies = [(200, _content("Overall, Response A is better."))]
    ds = [Dialogue(f"convbench-{i}", "x.png", tuple(Turn(f"q{t}", ("",)) for t in range(3)), "convbench",
                   {"row": i, "caption": f"cap {i}"}) for i in (1, 2)]
    write_dialogues(tmp_path / "dialogues.jsonl", ds)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"dialogue_id": d.dialogue_id, "answers": ["a", "b", "c"]})
                                              + "\n" for d in ds))
    (tmp_path / "full.jsonl").write_text(json.dumps([{"dialogue_id": d.dialogue_id, "answers": ["a", "B", "C"]}
                                                     for d in ds]))
    (tmp_path / "pos.json").write_text("[0, 1]")
    parser = argparse.ArgumentParser()
    judge_cli.register(parser.add_subparsers(dest="command"))
    argv = ["judge", "--dialogues", str(tmp_path / "dialogues.jsonl"), "--answers", str(tmp_path / "a.jsonl"),
            "--baseline", str(tmp_path / "full.jsonl"), "--url", url, "--model", "m", "--positions",
            str(tmp_path / "pos.json"), "--out", str(tmp_path / "scores.json")]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    # dialogue 1: model is A and A always wins -> 1; dialogue 2: model is B -> 0; turn 1 identical -> 0.5 each
    assert out["S1"] == 50.0 and out["S2"] == 50.0 and out["S3"] == 50.0 and out["S0"] == 50.0
    assert out["calls"] == 6 and len(stub.requests) == 6
    assert json.loads((tmp_path / "scores.json").read_text())["per_dialogue"]["convbench-1"]["turns"] == [0.5, 1, 1]
    args = parser.parse_args(argv)
    assert args.func(args) == 0 and json.loads(capsys.readouterr().out)["cached"] == 6 and len(stub.requests) == 6
    args = parser.parse_args(argv[:5] + ["--url", url, "--model", "m"])
    with pytest.raises(ValueError, match="no reference answers.*--baseline"):
        args.func(args)


def test_local_judge(tmp_path: Path) -> None:
    """A tiny random Llama, trained for a few steps to answer the judge's prompt with a verdict, then loaded by
    the judge from its directory."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    messages = judge_lib.judge_messages(["Which animal?"], ["a cat"], ["a dog"], turn=0, context="a dog in a park")
    prompt = judge_lib.plain_prompt(messages)  # the tokenizer has no chat template
    target = "The dog is right . Overall , Response B is better ."
    split = pre_tokenizers.Whitespace()
    words = sorted({w for w, _ in split.pre_tokenize_str(prompt + " " + target)})
    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "[EOS]"] + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = split
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=1, eos_token_id=2, bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    p_ids = tok(prompt)["input_ids"]
    t_ids = tok(target)["input_ids"] + [2]
    ids = torch.tensor([p_ids + t_ids])
    labels = torch.tensor([[-100] * len(p_ids) + t_ids])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(tmp_path / "judge")
    tok.save_pretrained(tmp_path / "judge")
    assert (tmp_path / "judge" / "model.safetensors").is_file()

    judge = judge_lib.make_judge(model_dir=str(tmp_path / "judge"), max_tokens=20, cache=tmp_path / "c.jsonl")
    text = judge.complete(messages)
    assert judge_lib.parse_verdict(text) == "B", text
    assert "Which" not in text  # only the generated continuation, not the prompt
    with pytest.raises(FileNotFoundError, match="judge model directory"):
        judge_lib.make_judge(model_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="exactly one judge"):
        judge_lib.make_judge(url="http://x/v1", model="m", model_dir=str(tmp_path / "judge"))
