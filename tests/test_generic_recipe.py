"""The generic reference recipe on data without MT-Shapes scenes (issue 16, item 4): the generic token drop, the
skip notes, a model card that states what ran, and the blind chance level measured by the model itself."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import pytest


def _tiny_cfg(**kw):
    from infra.reference.config import RecipeConfig

    sizes = dict(image_size=48, patch_size=8, vision_hidden=16, vision_layers=1, vision_heads=2, text_hidden=32,
                 text_layers=1, text_heads=2, text_intermediate=64, stage1_steps=5, stage2_steps=3, stage2_batch=4,
                 warmup=1, log_every=1)
    return RecipeConfig(**(sizes | kw))


def _focus(tmp_path: Path, n: int = 8) -> Path:
    from pipeline.datasets import mt_focus

    mt_focus.generate_split(tmp_path, "train", n, 0, mt_focus.MTFocusConfig(image_size=48))
    return tmp_path / "train" / "dialogues.jsonl"


def test_pool_matrix_by_hand():
    import torch

    from infra.reference.token_drop import pool_matrix

    expected = torch.tensor([[.5, .5, 0, 0, 0], [0, 0, .5, .5, 0], [0, 0, 0, 0, 1.]])
    assert torch.equal(pool_matrix(5, 2), expected)
    assert pool_matrix(144, 10).shape == (15, 144) and torch.allclose(pool_matrix(144, 10).sum(1), torch.ones(15))


def test_random_keep_shares_span_ten_to_hundred_percent():
    from infra.reference.token_drop import random_keep

    rng = random.Random(0)
    shares = []
    for _ in range(500):
        keep = random_keep(144, rng).tolist()
        assert keep == sorted(set(keep)) and 0 <= keep[0] and keep[-1] < 144
        shares.append(len(keep) / 144)
    assert 0.09 <= min(shares) < 0.15 and 0.95 < max(shares) <= 1.0
    assert 0.5 < sum(shares) / len(shares) < 0.6  # uniform on [0.1, 1]: mean 0.55


def _example(n_image: int = 10):
    """A fake dialogue example: 2 text tokens, n image tokens (id 9), a question, an answer labelled."""
    import torch

    ids = torch.tensor([1, 2] + [9] * n_image + [3, 4, 5, 6])
    labels = torch.full_like(ids, -100)
    labels[-2:] = ids[-2:]
    return {"input_ids": ids, "labels": labels, "pixel_values": torch.zeros(3, 8, 8),
            "attn_pos": torch.tensor([3]), "attn_target": torch.zeros(1, 1, 2, n_image + 1)}


@pytest.mark.parametrize("mode", ["random", "pool"])
def test_generic_drop_removes_image_tokens_only(mode):
    from infra.reference.token_drop import generic_drop

    ex = _example()
    out = generic_drop(ex, random.Random(1), 9, mode)
    kept = out["kept"]
    k = kept.shape[0]
    assert out["input_ids"].tolist() == [1, 2] + [9] * k + [3, 4, 5, 6]
    assert out["labels"].tolist() == [-100] * (k + 4) + [5, 6]  # the answer keeps its labels, shifted with it
    assert not any(key.startswith("attn_") for key in out)  # targets of the old positions would point wrong
    if mode == "pool":  # runs of 2-10 averaged: each row a distribution over the 10 original tokens
        assert kept.is_floating_point() and kept.shape == (k, 10) and k <= 5
    else:
        assert not kept.is_floating_point() and 1 <= k <= 10


def test_drop_share_of_the_dialogues_and_modes():
    """``token_drop`` = 0.5 thins about half of the examples (seeded), 0 none; ``scene`` mode leaves examples
    without targets alone; ``auto`` uses the generic drop for them."""
    from infra.reference.config import RecipeConfig
    from infra.reference.training import _drop

    def changed(share, mode, with_targets=False):
        rng, n, cfg = random.Random(0), 0, RecipeConfig(token_drop=share, token_drop_mode=mode)
        for _ in range(400):
            ex = {k: v for k, v in _example().items() if with_targets or not k.startswith("attn_")}
            n += "kept" in _drop(ex, cfg, rng, 9)
        return n / 400

    assert changed(0.0, "auto") == 0.0
    assert 0.4 < changed(0.5, "auto") < 0.6
    assert changed(1.0, "mixed") == 1.0
    assert changed(1.0, "scene") == 0.0


def test_forward_kept_with_identity_matrix_equals_the_model(tmp_path):
    """A (n, n) identity mixing matrix, like the identity index list, reproduces the plain forward pass; a pooled
    matrix changes it."""
    import torch

    from infra.reference.targets import dialogue_example
    from infra.reference.token_drop import pool_matrix
    from infra.reference.tokenizer import tokenizer_from_dialogues
    from infra.reference.training import build_model, build_processor, collate, forward_kept
    from pipeline.dialogues import load_dialogues

    dialogues = load_dialogues(_focus(tmp_path, 2))
    cfg = _tiny_cfg()
    tok = tokenizer_from_dialogues(dialogues)
    proc = build_processor(cfg, tok)
    torch.manual_seed(0)
    model = build_model(cfg, len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id, tok.bos_token_id,
                        tok.eos_token_id).eval()
    inputs = collate([dialogue_example(d, proc) for d in dialogues], tok.pad_token_id)
    with torch.no_grad():
        expected = model(**inputs)
        got = forward_kept(model, inputs, [torch.eye(36)] * 2)
        pooled = forward_kept(model, inputs, [pool_matrix(36, 1) + 0.0, pool_matrix(36, 2).repeat_interleave(2, 0)])
    assert torch.allclose(got.logits, expected.logits, atol=1e-5)
    assert not torch.allclose(pooled.logits, expected.logits, atol=1e-3)


def test_token_drop_changes_training_on_data_without_scenes(tmp_path):
    """Issue 16: ``--token-drop 0.5`` gave exactly the losses of no drop on data without scenes. Now it changes
    them, and the same settings give the same losses (seeded)."""
    from infra.reference.recipe import build_reference

    data = _focus(tmp_path)

    def losses(drop, name):
        summary = build_reference("llava", tmp_path / name, data, cfg=_tiny_cfg(token_drop=drop), log=lambda s: None)
        return [r["loss"] for r in summary["stage2_curve"]]

    none, again, dropped = losses(0.0, "a"), losses(0.0, "b"), losses(1.0, "c")
    assert none == again and dropped != none


def test_skip_notes_and_a_truthful_card(tmp_path):
    """Without scenes the build logs one line for each part it skips or replaces, and the card says stage 1 and the
    attention supervision did not run, which token drop did, and measures chance with blank images."""
    from infra.reference.card import model_card
    from infra.reference.recipe import build_reference

    data = _focus(tmp_path)
    logged: list[str] = []
    summary = build_reference("llava", tmp_path / "m", data, data, cfg=_tiny_cfg(token_drop=0.5), log=logged.append,
                              eval_limit=2)
    notes = [line for line in logged if line.startswith(("skipped:", "replaced:"))]
    assert [n.split(":")[1].strip().split(" (")[0] for n in notes] == ["stage 1", "attention supervision",
                                                                       "the scene token drop needs MT-Shapes scenes"]
    assert summary["ran"] | {"notes": []} == {"stage1": False, "attention_supervision": False, "token_drop": "mixed",
                                              "scene_dialogues": 0, "notes": []}
    card = model_card(summary, "cmd")
    assert "Stage 1 (vision pretraining on dense labels): **did not run**" in card
    assert "**no attention supervision**" in card and "Generic token drop (mixed" in card
    assert "tower trained at 1 x the lr" in card and "tower frozen" not in card
    assert "two heads of the first layer" not in card and "dense per-patch labels (colour" not in card
    assert "chance (same model, blank images)" in card and "MT-Shapes" not in card.split("\n")[0]


def test_skip_notes_name_scene_token_drop_mode(tmp_path):
    from infra.reference.recipe import what_runs

    ran = what_runs(_tiny_cfg(token_drop=0.5, token_drop_mode="scene", stage1_steps=0, attention_weight=0.0), 0,
                    "x.jsonl")
    assert ran["token_drop"] == "none" and len(ran["notes"]) == 1 and "token drop" in ran["notes"][0]
    assert what_runs(_tiny_cfg(token_drop=0.5), 12, "x.jsonl")["notes"] == []  # with scenes nothing is skipped


def test_blind_chance_against_a_hand_computation(tmp_path):
    """The blind chance per type is the accuracy of the model's own greedy answers with a uniform grey image:
    computed here turn by turn, one dialogue at a time, then half the turns of one type and a quarter of another
    are given the blind answer as their reference, so the expected percentages are known by hand."""
    import torch
    from PIL import Image

    from infra.reference.chat import render_dialogue
    from infra.reference.evaluation import answer_of, evaluate
    from infra.reference.tokenizer import tokenizer_from_dialogues
    from infra.reference.training import build_model, build_processor
    from pipeline.dialogues import Dialogue, Turn, load_dialogues

    dialogues = load_dialogues(_focus(tmp_path, 8))
    cfg = _tiny_cfg()
    tok = tokenizer_from_dialogues(dialogues)
    proc = build_processor(cfg, tok)
    torch.manual_seed(3)
    model = build_model(cfg, len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id, tok.bos_token_id,
                        tok.eos_token_id).eval()
    single = [Dialogue(d.dialogue_id, d.image, d.turns[:1], d.source) for d in dialogues]
    blind = []
    for d in single:
        with Image.open(d.image) as im:
            grey = Image.new("RGB", im.size, (128, 128, 128))
        text = proc.apply_chat_template(render_dialogue([(d.turns[0].question, None)]), add_generation_prompt=True)
        enc = proc(images=[grey], text=[text], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        blind.append(answer_of(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)))
    assert all(blind)  # the tiny model answers with some word
    # dialogues 0-3 are type "a", 4-7 type "b"; the blind answer is the reference for 0, 1 and for 4.
    hits = [True, True, False, False, True, False, False, False]
    relabelled = [Dialogue(d.dialogue_id, d.image,
                           (Turn(d.turns[0].question, (b if hit else b + "x",), {"type": "a" if i < 4 else "b"}),),
                           d.source) for i, (d, b, hit) in enumerate(zip(single, blind, hits))]
    result = evaluate(model, proc, relabelled, batch_size=3, blank=True)
    assert result["by_type"] == pytest.approx({"a": 50.0, "b": 25.0})
    per_type: dict[str, list[bool]] = defaultdict(list)
    for i, hit in enumerate(hits):
        per_type["a" if i < 4 else "b"].append(hit)
    assert result["by_type"] == pytest.approx({k: 100.0 * sum(v) / len(v) for k, v in per_type.items()})
