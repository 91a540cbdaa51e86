"""The reference recipe's ``qwen2_5_vl`` family on a tiny config: its processor expands the image placeholder to the
merged-token grid, its dialogue examples carry attention targets over exactly those tokens, a padded batch computes
what each dialogue computes alone, and the saved directory serves through the project's adapter with the logits of
the model's own forward on the processor's inputs (docs/design.md §7)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def _setup(tmp_path: Path, n: int = 2):
    from infra.reference.config import RecipeConfig
    from infra.reference.targets import dialogue_example
    from infra.reference.tokenizer import IMAGE, tokenizer_from_dialogues
    from infra.reference.training import build_model, build_processor
    from pipeline.datasets import mt_shapes
    from pipeline.dialogues import load_dialogues

    mt_shapes.generate_split(tmp_path, "train", n, seed=7, cfg=mt_shapes.MTShapesConfig(aspect=1.0), progress=False)
    dialogues = load_dialogues(tmp_path / "train" / "dialogues.jsonl")
    scenes = mt_shapes.load_scenes(tmp_path / "train" / "scenes.jsonl")
    cfg = RecipeConfig(family="qwen2_5_vl", vision_hidden=32, text_hidden=64, text_intermediate=128)
    tok = tokenizer_from_dialogues(dialogues)
    proc = build_processor(cfg, tok)
    torch.manual_seed(0)
    model = build_model(cfg, len(tok), tok.convert_tokens_to_ids(IMAGE), tok.pad_token_id, tok.bos_token_id,
                        tok.eos_token_id).eval()
    examples = [dialogue_example(d, proc, scenes[d.dialogue_id], cfg) for d in dialogues]
    return cfg, dialogues, proc, model, examples


def test_family_option_is_validated():
    from infra.reference.config import RecipeConfig

    with pytest.raises(ValueError, match="video_frames"):
        RecipeConfig(family="qwen2_5_vl", video_frames=0)
    with pytest.raises(ValueError, match="family must be one of"):
        RecipeConfig(family="qwen3_vl")


def test_examples_hold_the_merged_grid_and_batch_equals_single(tmp_path):
    from infra.reference.training import collate

    cfg, _, proc, model, examples = _setup(tmp_path)
    grid = (cfg.image_size // cfg.patch_size) ** 2  # 96 px, 8 px merged tokens: 12 x 12, as LLaVA's patches
    image_id = model.config.image_token_id
    for ex in examples:
        assert int((ex["input_ids"] == image_id).sum()) == grid == int(ex["mm_token_type_ids"].sum())
        assert ex["image_grid_thw"].tolist() == [1, 24, 24]  # 4 px ViT patches, merged 2 x 2
        assert ex["attn_target"].shape[-1] == 1 + grid
    batch = collate(examples, proc.tokenizer.pad_token_id)
    with torch.no_grad():
        both = model(**{k: v for k, v in batch.items() if not k.startswith("attn_")}).logits
        for b, ex in enumerate(examples):
            one = collate([ex], proc.tokenizer.pad_token_id)
            alone = model(**{k: v for k, v in one.items() if not k.startswith("attn_")}).logits[0]
            assert torch.allclose(both[b, : alone.shape[0]], alone, atol=1e-4)


def test_saved_reference_serves_through_the_adapter(tmp_path):
    from PIL import Image

    from compress.lvlm import load_adapter
    from compress.lvlm.session import ChatSession
    from infra.reference.chat import render_dialogue

    _, dialogues, proc, model, _ = _setup(tmp_path)
    out = tmp_path / "ref"
    model.save_pretrained(out)
    proc.save_pretrained(out)
    adapter = load_adapter(out)
    assert adapter.family == "qwen2_5_vl"
    d = dialogues[0]
    question = d.turns[0].question
    with Image.open(d.image) as im:
        image = im.convert("RGB")
    session = ChatSession(adapter, "full", max_new_tokens=1)
    session.set_image(image)
    first = session.ask(question).first_logits
    text = proc.apply_chat_template(render_dialogue([(question, None)]), add_generation_prompt=True)
    enc = proc(images=[image], text=[text])
    with torch.no_grad():  # transformers' own path on the recipe processor's inputs
        ref = model(**enc).logits[0, -1]
    assert torch.allclose(first.float(), ref, atol=1e-4), (first - ref).abs().max()
