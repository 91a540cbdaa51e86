"""Token drop for the reference Qwen2.5-VL (docs/design.md §5, §7): a thinned prompt gets explicit 3-D positions.
With every visual token kept, the loss is the model's own forward's; with a strict subset, each kept token sits at
the position transformers' ``get_rope_index`` gives it in the full prompt, and so does every text token (the text
after the image continues after the full grid)."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_reference_init import shapes_and_videos, tiny_cfg  # noqa: E402


def tiny_qwen(tmp_path, shapes: int = 2, videos: int = 1):
    """(model, processor, examples): a tiny reference Qwen2.5-VL from config and the dialogue examples of
    ``shapes`` MT-Shapes and ``videos`` MT-Video dialogues (96 px, laid out at 48 px: 6 x 6 merged tokens a step)."""
    from infra.reference.targets import dialogue_example
    from infra.reference.tokenizer import IMAGE, VIDEO, tokenizer_from_dialogues
    from infra.reference.training import build_model, build_processor
    from pipeline.dialogues import load_dialogues

    s, v = shapes_and_videos(tmp_path, shapes, max(videos, 1))
    dialogues = load_dialogues(s) + load_dialogues(v)[:videos]
    cfg = tiny_cfg()
    tok = tokenizer_from_dialogues(dialogues, video=True)
    proc = build_processor(cfg, tok)
    torch.manual_seed(0)
    model = build_model(cfg, len(tok), tok.convert_tokens_to_ids(IMAGE), tok.pad_token_id, tok.bos_token_id,
                        tok.eos_token_id, tok.convert_tokens_to_ids(VIDEO)).eval()
    return model, proc, [dialogue_example(d, proc) for d in dialogues]


def visual_count(model, ex) -> int:
    ids = ex["input_ids"]
    return int(((ids == model.config.image_token_id) | (ids == model.config.video_token_id)).sum())


def test_keeping_every_token_is_the_model_forward(tmp_path):
    from infra.reference.training import collate, forward_kept

    model, proc, examples = tiny_qwen(tmp_path)
    assert [visual_count(model, e) for e in examples] == [36, 36, 4 * 36]  # 8 frames: 4 temporal steps
    batch = collate(examples, proc.tokenizer.pad_token_id)
    with torch.no_grad():
        expected = model(**batch)
        every = [torch.arange(visual_count(model, e)) for e in examples]
        kept = forward_kept(model, batch, every)
        mixed = forward_kept(model, batch, [torch.eye(len(k)) for k in every])  # the identity as a mixing matrix
    real = batch["attention_mask"].bool()
    assert abs(float(kept.loss) - float(expected.loss)) < 1e-5
    assert abs(float(mixed.loss) - float(expected.loss)) < 1e-5
    assert torch.allclose(kept.logits[real], expected.logits[real], atol=1e-4)


def test_kept_tokens_sit_where_the_full_grid_puts_them(tmp_path):
    from infra.reference.qwen_positions import full_positions, kept_positions, thinned_position_ids
    from infra.reference.token_drop import generic_drop
    from infra.reference.training import collate

    model, proc, examples = tiny_qwen(tmp_path)
    visual_ids = (model.config.image_token_id, model.config.video_token_id)
    rng = random.Random(3)
    thinned = []
    for e in examples:
        vid = visual_ids[1] if "video_grid_thw" in e else visual_ids[0]
        t = generic_drop(e, rng, vid, "random")
        while not 0 < len(t["kept"]) < visual_count(model, e):
            t = generic_drop(e, rng, vid, "random")
        thinned.append(t)
    full, thin = collate(examples, 0), collate(thinned, 0)
    # the reference: transformers' own positions of the whole prompt
    expected, _ = model.model.get_rope_index(full["input_ids"], full["mm_token_type_ids"], full["image_grid_thw"],
                                             full["video_grid_thw"], full["second_per_grid_ts"],
                                             full["attention_mask"])
    grids = {"image": iter(thin["image_grid_thw"]), "video": iter(zip(thin["video_grid_thw"],
                                                                        thin["second_per_grid_ts"]))}
    positions = []
    for t in thinned:
        grid, seconds = next(grids["video"]) if "video_grid_thw" in t else (next(grids["image"]), None)
        positions.append(kept_positions(full_positions(model, grid, seconds), t["kept"]))
    got = thinned_position_ids(thin["input_ids"], thin["attention_mask"], visual_ids, positions)
    assert got.shape == (3, *thin["input_ids"].shape)
    for b, t in enumerate(thinned):
        is_visual = (full["input_ids"][b] == visual_ids[0]) | (full["input_ids"][b] == visual_ids[1])
        real = full["attention_mask"][b].bool()
        visual_full = is_visual.nonzero().flatten()[t["kept"]]
        text_full = (real & ~is_visual).nonzero().flatten()
        is_visual_thin = (thin["input_ids"][b] == visual_ids[0]) | (thin["input_ids"][b] == visual_ids[1])
        real_thin = thin["attention_mask"][b].bool()
        assert torch.equal(got[:, b, is_visual_thin], expected[:, b, visual_full])
        assert torch.equal(got[:, b, real_thin & ~is_visual_thin], expected[:, b, text_full])
    video = [b for b, t in enumerate(thinned) if "video_grid_thw" in t][0]
    steps = expected[0, video][full["input_ids"][video] == visual_ids[1]]
    assert len(set(steps.tolist())) == 4  # the video's four temporal steps sit at four rotary times


def test_a_step_with_token_drop_trains(tmp_path):
    """The recipe accepts token drop for Qwen now: a few steps with every dialogue thinned run, loss finite."""
    from infra.reference.training import train_dialogues

    from pipeline.dialogues import load_dialogues

    model, proc, _ = tiny_qwen(tmp_path)
    dialogues = load_dialogues(tmp_path / "s" / "train" / "dialogues.jsonl") + \
        load_dialogues(tmp_path / "v" / "train" / "dialogues.jsonl")
    curve = train_dialogues(model, proc, dialogues, tiny_cfg(token_drop=1.0, token_drop_mode="mixed",
                                                             stage2_steps=3, stage2_batch=3), log=lambda s: None)
    assert len(curve) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in curve)
