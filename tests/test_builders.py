"""Benchmark builders on small fixtures in the official schemas, their errors, and the ConvBench judges."""

from __future__ import annotations

import argparse
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
from PIL import Image

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
    assert summary == {"dialogues": 3, "missing_images": 0}
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
        {"dialogues": 2, "missing_images": 1}
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
    del doc["8"]["imageId"]
    with pytest.raises(BenchmarkFileError, match=r"question '8': missing key 'imageId'"):
        gqa.build_dialogues(_dump(tmp_path / "bad.json", doc), tmp_path / "images")
    with pytest.raises(BenchmarkFileError, match=r"expected an object keyed by question id"):
        gqa.build_dialogues(_dump(tmp_path / "list.json", [1, 2]), tmp_path / "images")


# ------------------------------------------------------------------------------------------------------ ConvBench
CB_COLUMNS = ["ID", "image_id", "instruction-conditioned-caption", "The_first_turn_instruction",
              "The_second_turn_instruction", "The_third_turn_instruction", "First_turn_instruction_category",
              "Second_turn_instruction_category", "Third_turn_instruction_category", "first_turn_answer",
              "second_turn_answer", "third_turn_answer", "third_turn_demands"]


def _cb_row(i: int) -> list:
    return [i, f"{i}_tested_skill_x.png", f"A caption {i} & more", f"Describe <{i}>.", f"Why {i}?", f"Write {i}.",
            "perception", "reasoning", "creation", f"It shows {i}.", f"Because {i}.", f"Poem {i}.", "be short"]


def _write_xlsx(path: Path, rows: list[list]) -> None:
    """A minimal .xlsx as Excel writes it: shared strings, numeric cells, and one inline string."""
    shared: list[str] = []
    sheet_rows = []
    for r, row in enumerate(rows, start=1):
        cells = []
        for c, value in enumerate(row):
            ref = f"{chr(ord('A') + c)}{r}"
            if isinstance(value, (int, float)):
                cells.append(f'<c r="{ref}"><v>{float(value)}</v></c>')
            elif r == 2 and c == 1:
                cells.append(f'<c r="{ref}" t="inlineStr"><is><t>{escape(value)}</t></is></c>')
            else:
                shared.append(value)
                cells.append(f'<c r="{ref}" t="s"><v>{len(shared) - 1}</v></c>')
        sheet_rows.append(f'<row r="{r}">{"".join(cells)}</row>')
    main = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
    rel = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
    pkg = "http://schemas.openxmlformats.org/package/2006/relationships"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("[Content_Types].xml",
                   '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"/>')
        z.writestr("xl/workbook.xml", f'<workbook xmlns="{main}" xmlns:r="{rel}"><sheets>'
                                      f'<sheet name="Sheet1" sheetId="1" r:id="rId7"/></sheets></workbook>')
        z.writestr("xl/_rels/workbook.xml.rels",
                   f'<Relationships xmlns="{pkg}"><Relationship Id="rId7" Type="{rel}/worksheet" '
                   f'Target="worksheets/data.xml"/></Relationships>')
        z.writestr("xl/sharedStrings.xml", f'<sst xmlns="{main}">' + "".join(
            f"<si><t>{escape(s)}</t></si>" for s in shared) + "</sst>")
        z.writestr("xl/worksheets/data.xml", f'<worksheet xmlns="{main}"><sheetData>{"".join(sheet_rows)}'
                                             f'</sheetData></worksheet>')


def test_convbench_from_xlsx_and_csv(tmp_path: Path) -> None:
    import csv

    rows = [_cb_row(1), _cb_row(2), _cb_row(3)]
    _write_xlsx(tmp_path / "ConvBench.xlsx", [CB_COLUMNS] + rows)
    images = tmp_path / "visit_bench_images"
    _image(images / "1_tested_skill_x.png")
    _image(images / "2_tested_skill_x.png")
    _image(images / "images" / "3_tested_skill_x.png")  # the official script's images/ sub-folder
    assert convbench.build(tmp_path / "ConvBench.xlsx", images, tmp_path / "out")["dialogues"] == 3
    ds = load_dialogues(tmp_path / "out" / "dialogues.jsonl")
    assert [d.dialogue_id for d in ds] == ["convbench-1", "convbench-2", "convbench-3"]
    assert [t.question for t in ds[1].turns] == ["Describe <2>.", "Why 2?", "Write 2."]
    assert [t.answers for t in ds[1].turns] == [("It shows 2.",), ("Because 2.",), ("Poem 2.",)]
    assert [t.meta["category"] for t in ds[0].turns] == ["perception", "reasoning", "creation"]
    assert ds[0].meta["caption"] == "A caption 1 & more" and ds[0].meta["third_turn_demands"] == "be short"
    assert ds[2].image.endswith("visit_bench_images/images/3_tested_skill_x.png")
    with open(tmp_path / "convbench.csv", "w", newline="") as f:
        csv.writer(f).writerows([CB_COLUMNS] + rows)
    from_csv = convbench.build_dialogues(tmp_path / "convbench.csv", images)
    assert from_csv == convbench.build_dialogues(tmp_path / "ConvBench.xlsx", images)


def test_convbench_bad_tables(tmp_path: Path) -> None:
    _write_xlsx(tmp_path / "a.xlsx", [CB_COLUMNS[:-4] + CB_COLUMNS[-3:], _cb_row(1)[:-4] + _cb_row(1)[-3:]])
    with pytest.raises(BenchmarkFileError, match=r"a.xlsx: missing column\(s\) first_turn_answer"):
        convbench.build_dialogues(tmp_path / "a.xlsx", tmp_path)
    row = _cb_row(2)
    row[4] = " "
    _write_xlsx(tmp_path / "b.xlsx", [CB_COLUMNS, _cb_row(1), row])
    with pytest.raises(BenchmarkFileError, match=r"b.xlsx: row 3: column 'The_second_turn_instruction' is empty"):
        convbench.build_dialogues(tmp_path / "b.xlsx", tmp_path)
    (tmp_path / "c.xlsx").write_text("not a zip")
    with pytest.raises(BenchmarkFileError, match=r"c.xlsx: not a readable .xlsx"):
        convbench.build_dialogues(tmp_path / "c.xlsx", tmp_path)
    with pytest.raises(BenchmarkFileError, match=r"unsupported extension '.txt'"):
        convbench.read_table(_dump(tmp_path / "d.txt", {}))


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
    assert convbench.parse_verdict(text) == winner


class _Stub(BaseHTTPRequestHandler):
    requests: list[dict] = []
    reply: tuple[int, str] = (200, "")

    def do_POST(self) -> None:  # noqa: N802 (http.server API)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                    "body": json.loads(body)})
        status, payload = type(self).reply
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def stub_server():
    _Stub.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", _Stub
    server.shutdown()
    server.server_close()


def test_openai_compatible_judge_against_loopback_stub(stub_server) -> None:
    url, stub = stub_server
    content = "B misses the dog. Overall, Response A is better."
    stub.reply = (200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}))
    judge = convbench.OpenAICompatibleJudge(url, "judge-model", api_key="k-test")
    verdict = judge.compare("What is shown?", "A dog on a sofa.", "A sofa.", context="a dog lies on a red sofa")
    assert verdict.winner == "A" and verdict.text.endswith("Response A is better.")
    (req,) = stub.requests
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer k-test"
    assert req["body"]["model"] == "judge-model" and req["body"]["temperature"] == 0.0
    user = req["body"]["messages"][-1]["content"]
    assert "What is shown?" in user and "A dog on a sofa." in user and "a dog lies on a red sofa" in user
    assert user.index("[Response A]") < user.index("A dog on a sofa.") < user.index("[Response B]")
    stub.reply = (500, '{"error": "overloaded"}')
    with pytest.raises(RuntimeError, match=r"answered HTTP 500: .*overloaded"):
        judge.compare("q", "a", "b")
    stub.reply = (200, '{"choices": []}')
    with pytest.raises(RuntimeError, match=r"no choices\[0\]\.message\.content"):
        judge.compare("q", "a", "b")


def test_convbench_scores_with_a_position_blind_judge() -> None:
    from pipeline.dialogues import Dialogue, Turn

    class LongerWins:
        def compare(self, question, answer_a, answer_b, *, context=""):
            return convbench.Verdict("A" if len(answer_a) > len(answer_b) else "B", "")

    class AlwaysA:
        def compare(self, question, answer_a, answer_b, *, context=""):
            return convbench.Verdict("A", "")

    refs = ("ref one", "ref two", "ref three")
    ds = [Dialogue(f"c{i}", "x.png", tuple(Turn(f"q{t}", (refs[t],)) for t in range(3)), "convbench")
          for i in range(40)]
    # The model's answer is longer than the reference in turn 1 always, in turn 2 for half the dialogues, never in 3.
    preds = {d.dialogue_id: ["a much longer answer", "a long answer here" if i % 2 else "x", "y"]
             for i, d in enumerate(ds)}
    assert convbench.convbench_scores(LongerWins(), ds, preds) == pytest.approx(
        {"S1": 100.0, "S2": 50.0, "S3": 0.0, "Avg": 50.0})
    blind = convbench.convbench_scores(AlwaysA(), ds, preds)
    assert 20 < blind["S1"] < 80 and blind["S1"] == blind["S2"] == blind["S3"]  # positions are mixed per dialogue
    with pytest.raises(KeyError, match="c0"):
        convbench.convbench_scores(AlwaysA(), ds, {})


def test_local_causal_lm_judge(tmp_path: Path) -> None:
    """A tiny random Llama, trained for a few steps to answer the judge's prompt with a verdict, then loaded by
    the judge from its directory."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    prompt = convbench.plain_prompt("Which animal?", "a cat", "a dog", context="a dog in a park")  # no chat template
    target = "The dog is right . Overall , Response B is better ."
    split = pre_tokenizers.Whitespace()
    words = sorted({w for w, _ in split.pre_tokenize_str(prompt + " " + target)})
    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "[EOS]"] + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = split
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
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

    judge = convbench.LocalCausalLMJudge(tmp_path / "judge", max_new_tokens=20)
    verdict = judge.compare("Which animal?", "a cat", "a dog", context="a dog in a park")
    assert verdict.winner == "B", verdict.text
    assert "Which" not in verdict.text  # only the generated continuation, not the prompt
    with pytest.raises(FileNotFoundError, match="judge model directory"):
        convbench.LocalCausalLMJudge(tmp_path / "missing")
