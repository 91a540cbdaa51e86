"""``metacompress chat`` on a tiny model saved to a directory."""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_models import random_image, save_tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("chat") / "tiny-llava", "llava", num_layers=3)


@pytest.fixture()
def image(tmp_path):
    path = tmp_path / "scene.png"
    random_image(40, 30, seed=1).save(path)
    return path


def parse(*argv):
    from pipeline.commands import chat as chat_cli

    parser = argparse.ArgumentParser(prog="metacompress")
    chat_cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["chat", *argv])


def test_chat_answers_every_question_in_process(model_dir, image):
    from compress.lvlm import load_adapter
    from compress.lvlm.session import ChatSession

    args = parse("--model", str(model_dir), "--method", "sample", "--rate", "0.75", "--image", str(image),
                 "--max-new-tokens", "3")
    out = io.StringIO()
    assert args.func(args, stdin=io.StringIO("what is the color ?\n\nwhich side ?\n"), stdout=out) == 0
    lines = out.getvalue().splitlines()
    assert [ln.split(":")[0] for ln in lines if not ln.startswith(" ")] == ["Q1", "A1", "Q2", "A2"]
    assert "visual tokens 16" in lines[2] and "ttft" in lines[2] and "GFLOPs" in lines[2]
    # the printed answers are the session's answers on the same directory
    session = ChatSession(load_adapter(model_dir), "sample", 0.75, max_new_tokens=3)
    session.set_image(image)
    assert lines[1] == f"A1: {session.ask('what is the color ?').answer}"
    assert lines[4] == f"A2: {session.ask('which side ?').answer}"


@pytest.mark.parametrize("argv,error,match", [
    (["--rate", "1.5"], ValueError, r"--rate 1.5 is outside \(0, 1\)"),
    (["--rate", "0"], ValueError, "outside"),
    (["--method", "magic", "--rate", "0.5"], ValueError, "unknown method 'magic'"),
    (["--method", "fastv"], ValueError, "needs --rate"),
    (["--image", "MISSING"], FileNotFoundError, "missing.png does not exist"),
    (["--image", "BROKEN"], ValueError, "broken.png cannot be read as an image"),
    (["--model", "UNSUPPORTED"], ValueError, "'bert' is not supported"),
])
def test_chat_errors_name_the_culprit(model_dir, image, tmp_path, argv, error, match):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    subst = {"MISSING": str(tmp_path / "missing.png"), "BROKEN": str(tmp_path / "broken.png"),
             "UNSUPPORTED": str(tmp_path / "bert")}
    base = {"--model": str(model_dir), "--image": str(image)}
    argv = [subst.get(a, a) for a in argv]
    for flag, value in base.items():
        if flag not in argv:
            argv += [flag, value]
    args = parse(*argv)
    with pytest.raises(error, match=match):
        args.func(args, stdin=io.StringIO("what ?\n"), stdout=io.StringIO())


def test_chat_command_as_a_process(model_dir, image):
    cmd = [sys.executable, "-m", "pipeline.commands.cli", "chat"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd + ["--model", str(model_dir), "--method", "fastv", "--rate", "0.5", "--image",
                                 str(image), "--max-new-tokens", "2", "--device", "cpu"],
                          input="what is the color ?\nhow many ?\n", capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = [ln for ln in proc.stdout.splitlines() if ln.startswith("A")]
    assert len(answers) == 2 and "visual tokens 32" in proc.stdout
