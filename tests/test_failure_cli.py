"""Every user error through the real CLI (docs/design.md §8): one line naming the file:line, key or record and the
fix, exit code 2, no traceback (``--debug`` shows it); and nothing starts before the whole config is checked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv: str) -> subprocess.CompletedProcess:
    """The CLI's entry point in this process (a new interpreter spends 8 s importing): exit code and output."""
    from pipeline.commands.cli import main

    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(argv), code, out.out, out.err)


def cli(capsys, *argv) -> tuple[int, str]:
    done = run_cli(capsys, *argv)
    return done.returncode, done.stderr


def one_line_error(code: int, err: str, *needles: str) -> str:
    # progress bars of the libraries (tqdm: "...it/s]") are not error lines
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "it/s]" not in ln]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def fake_model(path: Path, model_type: str = "llava", layers: int = 3, image_size: int = 96,
               patch_size: int = 8) -> Path:
    """A directory that passes the family check (config.json, a weights file, tokenizer files): enough for the
    checks that run before any model is loaded."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({
        "model_type": model_type, "vision_feature_layer": -2,
        "vision_config": {"num_hidden_layers": layers, "image_size": image_size, "patch_size": patch_size}}))
    (path / "model.safetensors").write_bytes(b"")
    (path / "tokenizer.json").write_text("{}")
    return path


def dialogues(path: Path, lines: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


GOOD = json.dumps({"dialogue_id": "a", "image": "a.png", "turns": [{"question": "q", "answers": ["x"]}],
                   "source": "mt_shapes"}).encode()


@pytest.fixture
def setup(tmp_path):
    """A config file in tmp_path whose model and data pass every check; tests break one thing each."""
    model = fake_model(tmp_path / "model")
    data = dialogues(tmp_path / "data" / "dialogues.jsonl", [GOOD])
    config = {"work_dir": str(tmp_path / "work"), "model": {"path": str(model)},
              "data": {"train": str(data), "test": str(data), "val": str(data)},
              "evaluate": {"methods": ["sample"], "rates": [0.5]}}

    def write(**changes) -> str:
        merged = json.loads(json.dumps(config))
        for dotted, value in changes.items():
            section, key = dotted.split("__")
            merged.setdefault(section, {})[key] = value
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(merged))
        return str(path)

    return tmp_path, write


def test_missing_and_malformed_config_files(capsys, tmp_path):
    one_line_error(*cli(capsys, "run", str(tmp_path / "nope.yaml")), "nope.yaml", "does not exist")
    bad = tmp_path / "bad.yaml"
    bad.write_text("work_dir: x\nmodel: [unclosed\n")
    one_line_error(*cli(capsys, "run", str(bad)), "bad.yaml", "not valid YAML", "line")
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    one_line_error(*cli(capsys, "run", str(listed)), "list.yaml", "expected a mapping")


def test_unknown_keys_bad_types_and_ranges_name_the_key(capsys, setup):
    tmp_path, write = setup
    path = write()
    cases = [
        (["--set", "train.lrr=1"], "unknown key train.lrr"),
        (["--set", "train.lr=fast"], "train.lr"),
        (["--set", "data.max_train_dialogues=-5"], "data.max_train_dialogues = -5"),
        (["--set", "data.max_eval_dialogues=0"], "data.max_eval_dialogues = 0"),
        (["--set", "evaluate.rates=[1.5]"], "evaluate.rates"),
        (["--set", "train.rates=[0]"], "train.rates"),
        (["--set", "train.rates=[]"], "train.rates is empty"),
        (["--set", "shards.max_error_fraction=2"], "shards.max_error_fraction"),
        (["--set", "model.path.x=1"], "--set model.path.x"),
        (["--set", "novalue"], "KEY=VALUE"),
    ]
    for extra, needle in cases:
        one_line_error(*cli(capsys, "run", path, *extra), needle)
    assert not (tmp_path / "work").exists()  # nothing started


def test_model_and_methods_are_checked_before_any_work(capsys, setup):
    tmp_path, write = setup
    one_line_error(*cli(capsys, "run", write(model__path=str(tmp_path / "missing"))), "model.path:", "does not exist")
    other = fake_model(tmp_path / "bert", model_type="bert")
    one_line_error(*cli(capsys, "run", write(model__path=str(other))), "model.path:", "'bert'", "not supported")
    one_line_error(*cli(capsys, "run", write(evaluate__methods=["sample", "magic"])),
                   "evaluate.methods", "'magic'", "known methods")
    # 3 vision layers, feature layer -2: ToMe runs 2 layers and can at most quarter the 144 tokens
    one_line_error(*cli(capsys, "run", write(evaluate__methods=["tome"], evaluate__rates=[0.9])),
                   "evaluate.methods: tome at evaluate.rates 0.9", "remove tome or that rate")
    assert not (tmp_path / "work").exists()  # no data generated, no Ray, no MLflow


def test_data_files_are_parsed_before_any_work(capsys, setup):
    tmp_path, write = setup
    one_line_error(*cli(capsys, "run", write(data__train=str(tmp_path / "none.jsonl"))), "data.train", "none.jsonl")
    bad = dialogues(tmp_path / "bad" / "dialogues.jsonl", [b"\xff\xfe not utf-8", b"{\"dialogue_id\": 1}"])
    line = one_line_error(*cli(capsys, "run", write(data__test=str(bad))), "data.test", "no valid dialogue",
                          "dialogues.jsonl:1", "UTF-8")
    assert "save the file as UTF-8" in line
    assert not (tmp_path / "work").exists()


def test_a_second_run_on_a_work_dir_refuses_naming_the_holder(capsys, setup):
    import os
    import socket

    from pipeline.lease import LEASE_NAME

    tmp_path, write = setup
    work = tmp_path / "work"
    work.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (work / LEASE_NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                   "process_start": None, "started": "2026-11-28T01:00:00",
                                                   "argv": ["metacompress", "run"]}))
        one_line_error(*cli(capsys, "run", write()), "in use by another run", f"pid {holder.pid}",
                       "2026-11-28T01:00:00")
    finally:
        holder.kill()
        holder.wait()
    assert os.getpid() != holder.pid


def test_data_commands_reject_bad_values_in_one_line(capsys, tmp_path):
    one_line_error(*cli(capsys, "data", "mt-shapes", "--out", str(tmp_path / "s"), "--dialogues", "4", "--turns",
                        "0"), "--turns", "must be >= 1")
    one_line_error(*cli(capsys, "reference", "build", "--family", "llava", "--out", str(tmp_path / "m"),
                        "--token-drop", "1.5"), "--token-drop", "[0, 1]")
    one_line_error(*cli(capsys, "data", "check", str(tmp_path / "missing.jsonl")), "missing.jsonl")
    assert not (tmp_path / "s").exists() and not (tmp_path / "m").exists()


def test_data_check_reports_every_bad_record_and_decodes_every_image(capsys, tmp_path):
    from PIL import Image

    folder = tmp_path / "set"
    folder.mkdir()
    import numpy as np

    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "good.png")  # noise: the PNG's data chunk is most of the file
    full = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(full[: len(full) // 2])
    (folder / "text.png").write_text("not an image")
    outside = tmp_path / "outside.png"
    Image.new("RGB", (16, 16), "blue").save(outside)

    def record(did, image):
        return json.dumps({"dialogue_id": did, "image": image, "turns": [{"question": "q", "answers": ["a"]}],
                           "source": "s"}).encode()

    path = dialogues(folder / "dialogues.jsonl", [
        record("ok", "good.png"), record("trunc", "truncated.png"), record("text", "text.png"),
        record("escape", "../outside.png"), record("abs", str(outside)), b"\xff bad bytes", b"{not json",
        json.dumps({"dialogue_id": "nokeys"}).encode(), record("ok", "good.png"), record("gone", "missing.png")])
    from pipeline.commands.cli import main

    code = main(["data", "check", str(path)])
    out, err = capsys.readouterr()
    line = one_line_error(code, err, "dialogues.jsonl", "bad record(s)")
    summary = json.loads(out)
    reasons = {e["dialogue_id"] or f"line {e['line']}": e["reason"] for e in summary["errors"]}
    assert summary["dialogues"] == 2 and summary["bad_records"] == 8, summary  # "ok" and "abs"
    assert "damaged image" in reasons["trunc"]
    assert "not an image file" in reasons["text"]
    assert "leaves the dataset's folder" in reasons["escape"]
    assert "not valid UTF-8" in reasons["line 6"] and "not valid JSON" in reasons["line 7"]
    assert "missing" in reasons["nokeys"] and "duplicate" in reasons["ok"]
    assert "file not found" in reasons["gone"]
    assert any("outside the file's folder" in w for w in summary["warnings"])  # absolute: allowed, reported
    assert "line 1" not in line


def test_errors_raised_inside_ray_and_os_errors_become_one_line():
    import errno

    from ray.exceptions import RayTaskError

    from pipeline.commands.cli import one_line, user_error
    from stages.common import StageFailed

    inner = ValueError("part-00003.parquet: sha256 differs from its sidecar; re-run the teacher stage")
    wrapped = RayTaskError("run_shard", "Traceback (most recent call last):\n  ...", inner)
    assert user_error(RuntimeError("outer")) is None
    try:
        try:
            raise wrapped
        except RayTaskError as e:
            raise RuntimeError("stage failed") from e
    except RuntimeError as outer:
        found = user_error(outer)
    assert "re-run the teacher stage" in one_line(found)
    failed = StageFailed("extract: 9 of 10 records failed (more than shards.max_error_fraction = 0.05)")
    assert user_error(failed) is failed
    full = OSError(errno.ENOSPC, "No space left on device", "/work/x/part-00000.parquet")
    assert one_line(user_error(full)) == ("no space left on the device writing /work/x/part-00000.parquet; free "
                                          "space or point work_dir at a larger disk")
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    assert "check the address" in one_line(user_error(refused))


def test_debug_shows_the_traceback_and_internal_errors_say_so(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    base = [sys.executable, "-m", "pipeline.commands.cli"]
    quiet = subprocess.run(base + ["run", str(tmp_path / "nope.yaml")], cwd=ROOT, env=env, capture_output=True,
                           text=True)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    loud = subprocess.run(base + ["--debug", "run", str(tmp_path / "nope.yaml")], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert loud.returncode == 2 and "Traceback" in loud.stderr and "does not exist" in loud.stderr.splitlines()[-1]


def test_an_internal_error_is_one_line_with_exit_1(capsys, monkeypatch):
    import argparse

    from pipeline.commands import cli as cli_module

    def broken(args):
        raise ZeroDivisionError("division by zero")

    class Parser(argparse.ArgumentParser):
        def parse_args(self, argv=None, namespace=None):
            return argparse.Namespace(command="data", func=broken)

    monkeypatch.setattr(cli_module, "build_parser", Parser)
    code, err = cli(capsys, "data", "check", "x.jsonl")
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "internal error: ZeroDivisionError: division by zero" in err and "--debug" in err


def test_a_chat_question_longer_than_the_context_is_refused_or_cut(capsys, tmp_path, monkeypatch):
    import io

    from tests.tiny_models import random_image, save_tiny

    model = save_tiny(tmp_path / "tiny", "llava", num_layers=2)  # context: 1024 positions
    image = tmp_path / "scene.png"
    random_image(40, 30, seed=1).save(image)
    long_question = "what " * 3000 + "?"
    argv = ["chat", "--model", str(model), "--method", "sample", "--rate", "0.5", "--image", str(image),
            "--max-new-tokens", "2", "--device", "cpu"]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"what ?\n{long_question}\n"))
    code, err = cli(capsys, *argv)
    one_line_error(code, err, "stdin line 2", "context 1024", "--long-prompt cut")
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{long_question}\n"))
    from pipeline.commands.cli import main

    assert main(argv + ["--long-prompt", "cut"]) == 0
    out, err = capsys.readouterr()
    assert "warning: stdin line 1" in err and "cut to its first" in err and "A1:" in out


def test_stages_read_past_bad_records_naming_file_and_line(tmp_path):
    """A stage's split reader: one undecodable line, bad JSON, a missing key and a path leaving the folder are four
    errors with FILE:LINE (for _errors.jsonl), the good records are kept."""
    from pipeline.config import config_from_dict
    from stages.common import load_split

    path = dialogues(tmp_path / "d" / "dialogues.jsonl", [
        GOOD, b"\xc3\x28 broken utf-8", b"{\"dialogue_id\": ", json.dumps({"dialogue_id": "m"}).encode(),
        GOOD.replace(b'"a.png"', b'"../../etc/passwd"').replace(b'"a"', b'"b"', 1),
        GOOD.replace(b'"a"', b'"c"', 1)])
    config = config_from_dict({"data": {"train": str(path)}})
    records, bad = load_split(config, "train", None)
    assert [r["dialogue_id"] for r in records] == ["a", "c"]
    assert [reason.split(": ", 1)[0] for _, reason in bad] == [f"{path}:{n}" for n in (2, 3, 4, 5)]
    assert "UTF-8" in bad[0][1] and "JSON" in bad[1][1] and "missing" in bad[2][1] and "leaves" in bad[3][1]


def test_library_chatter_stays_off_the_quiet_console(tmp_path):
    """MLflow's own console handler (INFO: database tables created) and DeepSpeed's CPU-accelerator warning."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_LOGGING_LEVEL", "DS_ACCELERATOR")}

    def console(defaults: bool, db: str) -> str:
        script = ("from pipeline.env import apply_defaults; apply_defaults()\n" if defaults else "") + (
            "import mlflow, deepspeed\n"
            f"mlflow.set_tracking_uri('sqlite:///{tmp_path / db}'); mlflow.search_experiments()\n")
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr

    quiet = console(True, "quiet.db")
    assert "INFO mlflow" not in quiet and "Setting accelerator to CPU" not in quiet, quiet
    loud = console(False, "loud.db")  # without the defaults both are printed: the check above can fail
    assert "INFO mlflow" in loud, loud
    if not os.path.exists("/dev/nvidiactl"):  # DeepSpeed warns only where it falls back to the CPU
        assert "Setting accelerator to CPU" in loud, loud
