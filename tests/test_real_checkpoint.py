"""Checkpoints as their authors ran them (docs/design.md §5): LLaVA-1.5's pad-to-square preprocessing against a plain
PIL reference."""

from __future__ import annotations

import json

import numpy as np
import torch

from compress.lvlm import load_adapter
from tests.tiny_models import random_image, save_tiny

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def reference_pad_to_square(image, side: int) -> torch.Tensor:
    """LLaVA-1.5's preprocessing written with PIL: paste the image centred on a square of the mean colour, resize
    to side x side (bicubic), scale to [0, 1], normalise with CLIP's mean/std -> (3, side, side)."""
    from PIL import Image

    w, h = image.size
    big = max(w, h)
    canvas = Image.new("RGB", (big, big), tuple(int(m * 255) for m in CLIP_MEAN))
    canvas.paste(image, ((big - w) // 2, (big - h) // 2))
    arr = np.asarray(canvas.resize((side, side), Image.BICUBIC), dtype=np.float32) / 255.0
    arr = (arr - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1)


def test_pad_to_square_when_the_checkpoint_asks_for_it(tmp_path):
    ckpt = save_tiny(tmp_path / "llava", "llava", num_layers=1)
    image = random_image(20, 44, seed=3)  # wide: padded above and below
    centre_crop = load_adapter(ckpt).preprocess(image)["pixel_values"][0]
    pre = ckpt / "preprocessor_config.json"
    cfg = json.loads(pre.read_text())
    pre.write_text(json.dumps({**cfg, "do_pad": True}))
    padded = load_adapter(ckpt).preprocess(image)["pixel_values"][0]
    ref = reference_pad_to_square(image, 32)
    assert padded.shape == ref.shape == (3, 32, 32)
    assert torch.allclose(padded, ref, atol=1e-5)
    assert not torch.allclose(centre_crop, ref, atol=1e-2)  # the checkpoint's plain processor crops instead


def test_pad_to_square_from_image_aspect_ratio_in_config(tmp_path):
    ckpt = save_tiny(tmp_path / "llava", "llava", num_layers=1)
    (ckpt / "preprocessor_config.json").unlink()
    cfg_path = ckpt / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "image_aspect_ratio": "pad"}))
    image = random_image(40, 24, seed=5)  # tall: padded left and right
    padded = load_adapter(ckpt).preprocess(image)["pixel_values"][0]
    assert torch.allclose(padded, reference_pad_to_square(image, 32), atol=1e-5)


def test_flash_attention_2_is_refused_by_name():
    import pytest

    from compress.lvlm.llava import LlavaAdapter
    from tests.tiny_models import tiny_image_processor, tiny_llava

    model, tok = tiny_llava(num_layers=1)
    model.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2' is not supported.*'sdpa'"):
        LlavaAdapter(model, tok, tiny_image_processor("llava"), "<tiny>")


def test_sdpa_runs_without_a_mask_where_none_is_needed_and_answers_like_eager():
    """One dialogue on SDPA: the first prefill and every decode step pass no mask tensor (SDPA's causal flag, free
    to pick its fused kernels); a later turn's prefill over the cache still gets one. Answers and first-token logits
    equal transformers' eager attention with dense masks on the same weights."""
    from compress.lvlm.llava import LlavaAdapter
    from compress.lvlm.session import ChatSession
    from tests.tiny_models import tiny_image_processor, tiny_llava

    image = random_image(32, 32, seed=1)
    runs = {}
    for impl in ("sdpa", "eager"):
        model, tok = tiny_llava(num_layers=2, seed=4)
        model.set_attn_implementation(impl)
        ad = LlavaAdapter(model, tok, tiny_image_processor("llava"), f"<tiny-{impl}>")
        masks: list = []
        hook = ad.language_model.layers[0].self_attn.register_forward_pre_hook(
            lambda mod, args, kw: masks.append((kw["hidden_states"].shape[1], kw["attention_mask"])), with_kwargs=True)
        session = ChatSession(ad, "full", max_new_tokens=4)
        session.set_image(image)
        turns = [session.ask(q) for q in ("what is the color ?", "how many ?")]
        hook.remove()
        runs[impl] = (turns, masks)
    (sdpa_turns, sdpa_masks), (eager_turns, eager_masks) = runs["sdpa"], runs["eager"]
    assert sdpa_masks[0][1] is None and sdpa_masks[0][0] > 1  # first prefill: causal flag, no tensor
    assert all(m is None for q, m in sdpa_masks if q == 1)  # decode steps
    assert any(m is not None for q, m in sdpa_masks[1:] if q > 1)  # turn 2's prefill over the cache
    assert eager_masks[0][1] is not None
    for a, b in zip(sdpa_turns, eager_turns):
        assert a.answer_ids == b.answer_ids
        assert torch.allclose(a.first_logits, b.first_logits, atol=1e-4)


def test_llava_hf_layout_loads_with_vicuna_v1_and_answers_through_metacompress_chat(tmp_path):
    """A tiny LLaVA-1.5 in the llava-hf file layout (SentencePiece tokenizer, LlavaProcessor files, the hub's chat
    template) through the code a user runs: ``load_adapter`` picks vicuna_v1 over the shipped template, and
    ``metacompress chat`` prints the answers of a session on the same directory."""
    import argparse
    import io

    from compress.lvlm.session import ChatSession
    from pipeline.commands import chat as chat_cli
    from tests.tiny_models import save_llava_hf

    ckpt = save_llava_hf(tmp_path / "llava-1.5-tiny-hf")
    for name in ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
                 "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.json", "model.safetensors"):
        assert (ckpt / name).is_file(), name
    ad = load_adapter(ckpt)
    assert ad.conversation == "vicuna_v1" and ad.stop_ids == {2}
    seg = ad.segment_ids(["What is red?", "Is there a dog?"])
    assert seg[1][0] == 2 and seg[0][0] == 1 and seg[0].count(ad.image_token_id) == 1

    image = tmp_path / "scene.png"
    random_image(30, 40, seed=2).save(image)
    parser = argparse.ArgumentParser(prog="metacompress")
    chat_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["chat", "--model", str(ckpt), "--method", "sample", "--rate", "0.75", "--image",
                              str(image), "--max-new-tokens", "3"])
    out = io.StringIO()
    assert args.func(args, stdin=io.StringIO("What is red?\n\nIs there a dog?\n"), stdout=out) == 0
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("A")]
    session = ChatSession(ad, "sample", 0.75, max_new_tokens=3)
    session.set_image(image)
    assert lines == [f"A1: {session.ask('What is red?').answer}", f"A2: {session.ask('Is there a dog?').answer}"]


def test_llava_hf_layout_through_the_extract_and_teacher_stages(tmp_path, ray_local):
    """The same llava-hf directory as the pipeline's model: extract caches the vision tower's output, the teacher
    stage's targets are the vicuna_v1 prompt's and each answer that stopped ends with ``</s>`` (docs/design.md §5)."""
    import numpy as np

    from pipeline.datasets.mt_shapes import MTShapesConfig, generate
    from pipeline.dialogues import load_dialogues
    from pipeline.shards import StageOutput
    from stages import extract, teacher
    from tests.tiny_models import save_llava_hf
    from tests.workspace import make_config

    generate(tmp_path / "data", total=14, seed=0, cfg=MTShapesConfig(image_size=32), val=0, test=10)
    save_llava_hf(tmp_path / "model")
    config = make_config(tmp_path, per_shard=4)
    assert extract.run(config, "train", progress=False).records == 4
    assert teacher.run(config, "train", progress=False).records == 4
    adapter = load_adapter(config.model.path)
    dialogue = load_dialogues(config.data.train)[0]
    features = StageOutput(**extract.output_args(config, "train")).read_records(0)[0]
    np.testing.assert_array_equal(features["features"], adapter.encode(dialogue.image).tokens.half().numpy())
    row = StageOutput(**teacher.output_args(config, "train")).read_records(0)[0]
    for ids, text in zip(row["answer_ids"], row["answers"]):
        ids = [int(i) for i in ids]
        assert 2 not in ids[:-1]  # the stop token only ever ends an answer
        assert len(ids) <= config.teacher.max_new_tokens + (ids[-1:] == [2])
        assert text == adapter.decode(ids)
