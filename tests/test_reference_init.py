"""``reference build --init DIR`` (docs/design.md §7): stage 2 continues a reference this recipe built. The child
starts from the parent's weights (loaded by transformers' own ``from_pretrained``) and sizes, keeps every parent
token's id, grows the vocabulary by the new data's words and the video placeholder, and records its parent (the
directory and the sha256 of its weights) in recipe_summary.json and the model card."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def tiny_cfg(**kw):
    from infra.reference.config import RecipeConfig

    sizes = dict(family="qwen2_5_vl", image_size=48, patch_size=8, vision_hidden=16, vision_layers=1, vision_heads=2,
                 text_hidden=32, text_layers=1, text_heads=2, text_intermediate=64, stage1_steps=0, stage2_steps=2,
                 stage2_batch=2, warmup=1, log_every=1)
    return RecipeConfig(**(sizes | kw))


def shapes_and_videos(tmp_path: Path, shapes: int = 2, videos: int = 2) -> tuple[Path, Path]:
    from pipeline.datasets import mt_shapes, mt_video

    mt_shapes.generate_split(tmp_path / "s", "train", shapes, seed=7, cfg=mt_shapes.MTShapesConfig(aspect=1.0),
                             progress=False)
    mt_video.generate_split(tmp_path / "v", "train", videos, seed=7)
    return tmp_path / "s" / "train" / "dialogues.jsonl", tmp_path / "v" / "train" / "dialogues.jsonl"


def test_init_continues_the_parent_and_records_it(tmp_path):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from infra.reference.card import model_card
    from infra.reference.recipe import build_reference

    shapes, videos = shapes_and_videos(tmp_path)
    build_reference("qwen2_5_vl", tmp_path / "A", shapes, cfg=tiny_cfg(), log=lambda s: None)
    # the child asks for other sizes and a stage 1: the parent's sizes win, and 0 steps keep its weights exactly
    child = build_reference("qwen2_5_vl", tmp_path / "B", [shapes, videos], cfg=tiny_cfg(text_hidden=64,
                            stage2_steps=0), log=lambda s: None, init=tmp_path / "A")
    sha = hashlib.sha256((tmp_path / "A" / "model.safetensors").read_bytes()).hexdigest()
    saved = json.loads((tmp_path / "B" / "recipe_summary.json").read_text())
    assert saved["parent"]["sha256"] == sha and saved["parent"]["dir"] == str((tmp_path / "A").resolve())
    assert saved["config"]["text_hidden"] == 32 and "stage1_curve" not in saved
    card = model_card(child, "metacompress reference build --init A")
    assert sha in card and str((tmp_path / "A").resolve()) in card and "fine-tuned from its parent" in card

    a = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "A", dtype=torch.float32)
    b = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "B", dtype=torch.float32)
    tok_a, tok_b = AutoTokenizer.from_pretrained(tmp_path / "A"), AutoTokenizer.from_pretrained(tmp_path / "B")
    vocab_a, vocab_b = tok_a.get_vocab(), tok_b.get_vocab()
    assert all(vocab_b[w] == i for w, i in vocab_a.items())  # every parent token keeps its id
    new = {w: i for w, i in vocab_b.items() if w not in vocab_a}
    assert {"frame", "appear"} <= set(new) and min(new.values()) == len(vocab_a) and "<video>" in vocab_a
    assert b.config.video_token_id == vocab_b["<video>"] and b.config.text_config.vocab_size == len(vocab_b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key, value in sa.items():
        other = sb[key][: value.shape[0]] if "embed_tokens" in key or "lm_head" in key else sb[key]
        assert torch.equal(value, other), key


def test_init_refuses_another_family_and_a_foreign_directory(tmp_path):
    from infra.reference.recipe import build_reference

    shapes, _ = shapes_and_videos(tmp_path, videos=1)
    build_reference("qwen2_5_vl", tmp_path / "A", shapes, cfg=tiny_cfg(stage2_steps=1), log=lambda s: None)
    with pytest.raises(ValueError, match="a qwen2_5_vl model, but --family llava"):
        build_reference("llava", tmp_path / "B", shapes, cfg=tiny_cfg(family="llava"), init=tmp_path / "A")
    (tmp_path / "A" / "recipe_summary.json").unlink()
    with pytest.raises(FileNotFoundError, match="no recipe_summary.json"):
        build_reference("qwen2_5_vl", tmp_path / "B", shapes, cfg=tiny_cfg(), init=tmp_path / "A")


def test_a_parent_without_video_token_gets_one_appended():
    """References built before video existed (no ``<video>``): the placeholder comes after every parent id and
    new word, and tokenises as one token inside the chat text."""
    from types import SimpleNamespace

    from infra.reference.tokenizer import build_vocab, extend_tokenizer, make_tokenizer

    parent = make_tokenizer(build_vocab(["what colour is it ?", "red"]))
    turn = SimpleNamespace(question="which way does it move ?", answers=("left",))
    tok, added = extend_tokenizer(parent, [SimpleNamespace(turns=[turn])], video=True)
    vocab = tok.get_vocab()
    assert added == 6 and sorted(vocab.values()) == list(range(len(parent) + 6))
    assert all(vocab[w] == i for w, i in parent.get_vocab().items())
    new = ["does", "left", "move", "way", "which", "<video>"]  # once each: alphabetical, then the placeholder
    assert [vocab[w] for w in new] == list(range(len(parent), len(parent) + 6))
    ids = tok("USER: <video>\nwhich way ?").input_ids
    assert tok.convert_ids_to_tokens(ids)[:4] == ["user", ":", "<video>", "which"]
