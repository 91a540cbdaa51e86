"""The oracle analysis: kept-token statistics on hand-made inputs, attention extraction against the models' own eager
attention weights, and ``metacompress analyze oracle`` end to end on a tiny LLaVA and tiny MT-Shapes dialogues."""

from __future__ import annotations

import argparse
import json

import pytest


def test_kept_tokens_rules():
    import torch

    from compress.analysis import kept_tokens

    # rows 0 and 2 share their argmax (token 1): argmax keeps {1, 3}; column masses are
    # [0.1, 1.5, 0.5, 0.8, 0.1] -> the 3 largest are tokens 1, 3, 2.
    p = torch.tensor([[0.0, 0.7, 0.1, 0.1, 0.1],
                      [0.1, 0.1, 0.0, 0.8, 0.0],
                      [0.0, 0.7, 0.4, -0.1, 0.0]])
    assert kept_tokens(p).tolist() == [False, True, False, True, False]
    assert kept_tokens(p, "mass").tolist() == [False, True, True, True, False]
    with pytest.raises(ValueError, match="keep rule"):
        kept_tokens(p, "columns")


def test_kept_statistics_hand_computed():
    import torch

    from compress.analysis import kept_statistics, rank_auc, top_mask

    # image 1: 10 tokens, top-20 % = tokens 9, 8 (scores 9, 8); kept {9, 0, 1}: 1 kept in top.
    s1 = torch.arange(10, dtype=torch.float32)
    k1 = torch.zeros(10, dtype=torch.bool)
    k1[[9, 0, 1]] = True
    # image 2: 5 tokens, ceil(0.2 * 5) = 1 top token: token 2 (ties with token 4 go to the earlier one); kept {2, 4}.
    s2 = torch.tensor([1.0, 0.0, 3.0, 2.0, 3.0])
    k2 = torch.tensor([False, False, True, False, True])
    assert top_mask(s2, 0.2).tolist() == [False, False, True, False, False]
    st = kept_statistics([s1, s2], [k1, k2], fraction=0.2)
    assert (st.tokens, st.kept, st.top, st.kept_in_top) == (15, 5, 3, 2)
    assert st.share_of_kept_in_top == pytest.approx(2 / 5)
    assert st.recall_of_top == pytest.approx(2 / 3)
    assert st.chance == pytest.approx(3 / 15)
    # AUC by hand: image 1, kept scores {9, 0, 1} vs dropped {2..8}: pairs won 7 + 0 + 0 of 21;
    # image 2, kept {3, 3} vs dropped {1, 0, 2}: every pair won -> 1.
    assert rank_auc(s1, k1) == pytest.approx(7 / 21)
    assert rank_auc(s2, k2) == pytest.approx(1.0)
    assert st.auc == pytest.approx((7 / 21 + 1.0) / 2)
    # relative scores: image 1 sums to 45 (x 10 / 45), image 2 to 9 (x 5 / 9)
    kept_rel = [9 * 10 / 45, 0.0, 1 * 10 / 45, 3 * 5 / 9, 3 * 5 / 9]
    assert st.mean_relative_score_kept == pytest.approx(sum(kept_rel) / 5, rel=1e-6)
    assert st.mean_relative_score_all == pytest.approx(1.0, rel=1e-6)
    assert rank_auc(s2, torch.ones(5, dtype=torch.bool)) is None


def test_cls_attention_equals_eager_reference():
    import torch

    from compress.analysis import clip_cls_attention
    from tests.tiny_models import tiny_llava

    model, _ = tiny_llava(num_layers=1)
    tower = model.model.vision_tower
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ours = {layer: clip_cls_attention(tower, pixels, layer) for layer in (-1, 0)}  # the default (sdpa) kernel
    full = clip_cls_attention(tower, pixels, -1, include_cls=True)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        ref = tower(pixel_values=pixels, output_attentions=True).attentions  # per layer (B, H, N + 1, N + 1)
    assert ours[-1].shape == (2, 64)
    torch.testing.assert_close(ours[-1], ref[-1][:, :, 0, 1:].mean(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours[0], ref[0][:, :, 0, 1:].mean(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(full, ref[-1][:, :, 0].mean(1), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(ours[-1], ours[0])  # the layer argument selects a different layer


def test_prompt_attention_equals_model_attentions():
    import torch

    from compress.analysis import prompt_attention
    from compress.lvlm.session import expand_image
    from tests.tiny_models import random_image, tiny_adapter

    adapter = tiny_adapter("llava", num_layers=2)
    x = adapter.encode(random_image(32, 32, seed=1)).tokens
    question = "what color is the circle ?"
    pa = prompt_attention(adapter, x, question, [0, 1])
    # reference: the model's own forward with eager attention everywhere, weights from output_attentions
    ids = expand_image(adapter.segment_ids([question])[0], adapter.image_token_id, x.shape[0])
    ids_t = torch.tensor([ids])
    adapter.model.set_attn_implementation("eager")
    with torch.no_grad():
        att = adapter.model(inputs_embeds=adapter.embed(ids_t, [x]), output_attentions=True).attentions
    img = [i for i, t in enumerate(ids) if t == adapter.image_token_id]
    text_after = list(range(img[-1] + 1, len(ids)))
    assert len(img) == 64 and text_after
    ref_prompt = att[0][0].mean(0)[text_after][:, img].mean(0)  # mean over heads, then over the text queries
    ref_last = att[1][0, :, -1, img].mean(0)
    torch.testing.assert_close(pa.prompt_scores([0]), ref_prompt, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pa.last_token_scores(1), ref_last, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pa.prompt_scores(), (ref_prompt + att[1][0].mean(0)[text_after][:, img].mean(0)) / 2,
                               atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from pipeline.datasets.mt_shapes import MTShapesConfig, generate
    from tests.tiny_models import save_tiny

    root = tmp_path_factory.mktemp("oracle")
    model = save_tiny(root / "llava", "llava")
    generate(root / "data", 2, seed=3, cfg=MTShapesConfig(image_size=32), val=0, test=0, progress=False)
    return model, root / "data" / "train" / "dialogues.jsonl", root


def _parse(argv):
    from pipeline.commands import analyze

    parser = argparse.ArgumentParser()
    analyze.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_analyze_oracle_end_to_end(tiny_setup):
    import torch

    from compress.analysis import kept_statistics

    model, dialogues, root = tiny_setup
    out = root / "out"
    args = _parse(["analyze", "oracle", "--model", str(model), "--dialogues", str(dialogues), "--rate", "0.75",
                   "--n", "2", "--steps", "3", "--methods", "random,fastv,prumerge_plus", "--max-new-tokens", "3",
                   "--topk", "8", "--out", str(out)])
    assert args.func(args) == 0
    for name in ("oracle_analysis.json", "oracle_analysis.md", "oracle_tokens.jsonl", "attention_cls.png",
                 "attention_fastv.png", "attention_prompt.png", "oracle_loss.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "oracle_analysis.json").read_text())
    records = [json.loads(line) for line in (out / "oracle_tokens.jsonl").read_text().splitlines()]
    done = [r for r in records if "skipped" not in r]
    assert summary["dialogues"] == len(done) >= 1
    assert set(summary["methods"]) == {"full", "oracle", "random", "fastv", "prumerge_plus"}
    # the full-token model against itself, under the same teacher history: KL 0
    assert summary["methods"]["full"]["KL_avg"] == pytest.approx(0.0, abs=1e-5)
    assert summary["methods"]["oracle"]["visual_tokens"] == 16 and summary["methods"]["full"]["visual_tokens"] == 64
    for r in done:
        assert len(r["oracle_losses"]) == 3 and r["num_keep"] == 16
        assert 1 <= sum(r["kept"]) <= 16 and len(r["kept"]) == r["num_tokens"] == 64
        assert set(r["scores"]) == {"cls", "fastv", "prompt"}
    # the reported statistics are those of the stored scores and kept masks
    for kind, stats in summary["attention"].items():
        ref = kept_statistics([torch.tensor(r["scores"][kind]) for r in done],
                              [torch.tensor(r["kept"]) for r in done], 0.1)
        assert stats["kept_in_top"] == ref.kept_in_top and stats["share_of_kept_in_top"] == pytest.approx(
            ref.share_of_kept_in_top)
    md = (out / "oracle_analysis.md").read_text()
    assert "Oracle (per-image P)" in md and "PruMerge+" in md and "[CLS]" in md


def test_analyze_oracle_bad_input(tiny_setup):
    model, dialogues, root = tiny_setup
    base = ["analyze", "oracle", "--model", str(model), "--dialogues", str(dialogues), "--out", str(root / "bad")]
    with pytest.raises(ValueError, match="--rate"):
        args = _parse(base + ["--rate", "1.5"])
        args.func(args)
    with pytest.raises(ValueError, match="not a baseline"):
        args = _parse(base + ["--rate", "0.5", "--methods", "random,bogus"])
        args.func(args)


def test_analyze_oracle_llava_next(tiny_setup):
    """LLaVA-NeXT: no [CLS] attention (FastV importance instead, as figure 5), PruMerge refused by name."""
    from tests.tiny_models import save_tiny

    _, dialogues, root = tiny_setup
    model = save_tiny(root / "next", "llava_next")
    out = root / "out_next"
    args = _parse(["analyze", "oracle", "--model", str(model), "--dialogues", str(dialogues), "--rate", "0.5",
                   "--n", "1", "--steps", "2", "--methods", "sample,prumerge", "--max-new-tokens", "2", "--topk", "0",
                   "--out", str(out)])
    assert args.func(args) == 0
    summary = json.loads((out / "oracle_analysis.json").read_text())
    assert summary["family"] == "llava_next" and summary["not_run"] == {"prumerge": "LLaVA-1.5 only"}
    assert summary["dialogues"] == 1  # the tiny model answers (deterministic weights and data)
    assert set(summary["attention"]) == {"fastv", "prompt"}
    assert set(summary["methods"]) == {"full", "oracle", "sample"}
    record = json.loads((out / "oracle_tokens.jsonl").read_text().splitlines()[0])
    # NeXT's X_IMG holds the base grid, the unpadded crops and their newlines: every one is scored
    assert len(record["scores"]["fastv"]) == len(record["kept"]) == record["num_tokens"] > 16
    assert not (out / "attention_cls.png").exists()


def test_oracle_tokens_sit_at_metacompress_positions_on_qwen(tiny_setup):
    """Qwen2.5-VL (3-D rotary): the oracle's L_pred scores P X at the positions of MetaCompress's rule, input token
    floor((i + 0.5) n / m), computed here by hand, and its fitted reducer hands the session the same positions
    (not the P-weighted means of a plain linear reducer). Then the command end to end on a tiny Qwen."""
    import torch

    from compress.lvlm import load_adapter
    from compress.lvlm.base import VisualPositions, reduced_positions
    from compress.lvlm.session import answer_logits
    from compress.reduction import Reduction
    from pipeline.commands.analyze_oracle import FittedP, _kl, _pred_loss
    from pipeline.dialogues import load_dialogues
    from tests.test_qwen2_5_vl import tiny_processor, tiny_qwen, tiny_tokenizer

    _, dialogues, root = tiny_setup
    model = root / "qwen"
    for part in (tiny_qwen(), tiny_tokenizer(), tiny_processor()):
        part.save_pretrained(str(model))
    adapter = load_adapter(model)
    dialogue = load_dialogues(dialogues)[0]
    encoded = adapter.encode(dialogue.image)
    n, m = encoded.tokens.shape[0], 5
    answers = [adapter.tokenizer("red", add_special_tokens=False).input_ids] * len(dialogue.questions)
    full = adapter.visual_positions(encoded)
    centres = VisualPositions(full.offsets[[int((i + 0.5) * n / m) for i in range(m)]], full.span)
    p = torch.softmax(torch.randn(m, n, generator=torch.Generator().manual_seed(0)) * 3, -1)
    tokens = p @ encoded.tokens
    with torch.no_grad():
        teacher = answer_logits(adapter, encoded.tokens, dialogue.questions, answers, image_positions=full).logits
        expected = _kl(teacher, answer_logits(adapter, tokens, dialogue.questions, answers,
                                              image_positions=centres).logits).mean()
        got = _pred_loss(adapter, dialogue.questions, answers, encoded, m, 0, True)(tokens, p)
    torch.testing.assert_close(got, expected)
    session_positions = reduced_positions(full, Reduction(tokens, p), FittedP(Reduction(tokens, p)))
    assert torch.equal(session_positions.offsets, centres.offsets)
    weighted = reduced_positions(full, Reduction(tokens, p), lambda *a: None)  # the rule for other linear tokens
    assert not torch.equal(weighted.offsets, centres.offsets)  # so the checks above can fail

    out = root / "out_qwen"
    args = _parse(["analyze", "oracle", "--model", str(model), "--dialogues", str(dialogues), "--rate", "0.5",
                   "--n", "1", "--steps", "2", "--methods", "sample,fastv,prumerge", "--max-new-tokens", "2",
                   "--topk", "0", "--out", str(out)])
    assert args.func(args) == 0
    summary = json.loads((out / "oracle_analysis.json").read_text())
    assert summary["family"] == "qwen2_5_vl" and summary["not_run"] == {"prumerge": "LLaVA-1.5 only"}
    assert set(summary["methods"]) == {"full", "oracle", "sample", "fastv"} and set(summary["attention"]) == {
        "fastv", "prompt"}
