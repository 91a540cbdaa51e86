"""Reference LVLM recipe (infra/reference): tokenizer and chat template, dense labels, answer-only labels, and a
small version of the recipe that must learn (its accuracy rises well above the chance level of the answers)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest


def test_tokenizer_words_template_and_roundtrip(tmp_path):
    from transformers import AutoTokenizer

    from infra.reference.tokenizer import SPECIAL_TOKENS, build_vocab, make_tokenizer, split_words

    vocab = build_vocab(["What colour is the top left object?", "red", "Is it red?"])
    assert vocab[:5] == list(SPECIAL_TOKENS)
    # "?", "is" and "red" appear twice, so they come first among the data words; every word is present once.
    assert vocab[8:11] == ["?", "is", "red"] and len(vocab) == len(set(vocab))
    tok = make_tokenizer(vocab)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it red?"}]},
            {"role": "assistant", "content": "red"}, {"role": "user", "content": "What colour?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False).input_ids
    expected = ["<s>", "user", ":", "<image>"] + split_words("Is it red?") + ["assistant", ":", "red", "</s>",
                                                                              "user", ":"] \
        + split_words("What colour?") + ["assistant", ":"]
    assert tok.convert_ids_to_tokens(ids) == expected
    assert tok("Purple", add_special_tokens=False).input_ids == [tok.unk_token_id]
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False).input_ids == ids
    assert again.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == text


def test_answer_labels_keep_only_answers():
    import torch

    from infra.reference.chat import answer_labels
    from infra.reference.config import IGNORE
    from infra.reference.tokenizer import build_vocab, make_tokenizer

    tok = make_tokenizer(build_vocab(["a b ?", "yes", "no"]))
    text = "<s>USER: a b ?\nASSISTANT: yes</s>\nUSER: b ?\nASSISTANT: no</s>\n"
    ids = torch.tensor(tok(text, add_special_tokens=False).input_ids)
    labels = answer_labels(ids, tok)
    kept = [tok.convert_ids_to_tokens(int(i)) for i in labels[labels != IGNORE]]
    assert kept == ["yes", "</s>", "no", "</s>"]
    assert (labels[labels != IGNORE] == ids[labels != IGNORE]).all()


def test_patch_targets_match_generator_labels():
    """Through the LLaVA image processor with nearest resampling, the dense targets equal the generator's own
    per-patch labels (pipeline.datasets.mt_shapes.patch_labels), and regions follow the patch's position."""
    from PIL import Image

    from infra.reference.config import IGNORE, RecipeConfig
    from infra.reference.targets import label_image, patch_targets
    from infra.reference.tokenizer import build_vocab, make_tokenizer
    from infra.reference.training import build_processor
    from pipeline.datasets import mt_shapes

    cfg = RecipeConfig(family="llava", image_size=96, patch_size=8)
    proc = build_processor(cfg, make_tokenizer(build_vocab(["x"])))
    for i in range(3):
        scene = mt_shapes.sample_scene(np.random.default_rng(i), mt_shapes.MTShapesConfig(), f"s{i}")
        lab = proc.image_processor(images=[label_image(scene)], return_tensors="np", resample=Image.NEAREST,
                                   do_rescale=False, do_normalize=False)["pixel_values"]
        t = patch_targets(np.rint(np.asarray(lab)).astype(np.int64), scene, 8)
        ref = mt_shapes.patch_labels(scene, 12, 12)
        assert (t["color"].reshape(12, 12) == ref["color"]).all()
        for key in ("shape", "size"):  # learned on object patches only
            assert (t[key].reshape(12, 12) == np.where(ref["color"] > 0, ref[key], IGNORE)).all(), key
        assert t["anchor"].sum() == len(scene.objects)
        assert (t["row"].reshape(12, 12) == np.arange(12)[:, None] // 4).all()
        assert (t["col"].reshape(12, 12) == np.arange(12)[None, :] // 4).all()


def _colour_shape_data(root: Path, n: int, seed: int) -> Path:
    """One object per 48 px scene; two turns: its colour, then its shape. Scenes sit next to the dialogues so the
    recipe's stage 1 finds its dense labels."""
    from pipeline.datasets import mt_shapes

    cfg = mt_shapes.MTShapesConfig(image_size=48, min_objects=1, max_objects=1, noise=3.0)
    (root / "images").mkdir(parents=True)
    with open(root / "dialogues.jsonl", "w") as fd, open(root / "scenes.jsonl", "w") as fs:
        for i in range(n):
            scene = mt_shapes.sample_scene(np.random.default_rng([seed, i]), cfg, f"d{i}")
            mt_shapes.render_scene(scene).save(root / "images" / f"d{i}.png")
            fs.write(json.dumps(scene.to_json()) + "\n")
            o = scene.objects[0]
            fd.write(json.dumps({"dialogue_id": f"d{i}", "image": f"images/d{i}.png", "source": "test",
                                 "turns": [{"question": "What color is the object?", "answers": [o.color]},
                                           {"question": "What shape is the object?", "answers": [o.shape]}]})
                     + "\n")
    return root / "dialogues.jsonl"


def test_small_recipe_learns_above_chance(tmp_path):
    """A tiny LLaVA (48 px images, 36 visual tokens) trained by the two-stage recipe for a few hundred steps
    answers colour questions far above the majority-answer chance level, measured with the multi-turn evaluation
    (greedy generate, own answers in the history) on held-out scenes; the saved directory loads back with
    AutoProcessor / AutoModelForImageTextToText and scores within 5 points of the in-memory model."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from infra.reference.evaluation import evaluate
    from infra.reference.recipe import RecipeConfig, build_reference
    from pipeline.dialogues import load_dialogues

    torch.set_num_threads(2)
    train = _colour_shape_data(tmp_path / "train", 400, 0)
    test = _colour_shape_data(tmp_path / "test", 40, 1)
    cfg = RecipeConfig(image_size=48, patch_size=8, vision_hidden=32, vision_layers=2, vision_heads=2,
                       text_hidden=64, text_layers=2, text_heads=2, text_intermediate=128, stage1_steps=80,
                       stage1_batch=16, stage1_lr=3e-3, stage2_steps=250, stage2_batch=16, stage2_lr=3e-3,
                       warmup=20, log_every=25)
    out = tmp_path / "model"
    summary = build_reference("llava", out, train, test, cfg, log=print)
    test_dialogues = load_dialogues(test)
    answers = Counter(d.turns[0].answers[0] for d in test_dialogues)
    chance = 100.0 * max(answers.values()) / len(test_dialogues)
    acc = summary["test"]["Acc_1"]
    assert acc >= chance + 25.0, (acc, chance, summary["test"])

    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    # fp16 weights saved, float32 loaded: the reloaded model still answers (within a few dialogues of the same).
    reloaded = evaluate(model, processor, test_dialogues)
    assert abs(reloaded["Acc_1"] - acc) <= 5.0, (reloaded, summary["test"])


def _mt_shapes_examples(tmp_path: Path, n: int = 6, family: str = "llava"):
    from infra.reference.config import RecipeConfig
    from infra.reference.targets import dialogue_example
    from infra.reference.tokenizer import tokenizer_from_dialogues
    from infra.reference.training import build_processor
    from pipeline.datasets import mt_shapes
    from pipeline.dialogues import load_dialogues

    aspect = 1.0 if family == "llava" else None
    mt_shapes.generate_split(tmp_path, "train", n, seed=5, cfg=mt_shapes.MTShapesConfig(aspect=aspect),
                             progress=False)
    dialogues = load_dialogues(tmp_path / "train" / "dialogues.jsonl")
    scenes = mt_shapes.load_scenes(tmp_path / "train" / "scenes.jsonl")
    cfg = RecipeConfig(family=family)
    proc = build_processor(cfg, tokenizer_from_dialogues(dialogues))
    return [(d, scenes[d.dialogue_id], dialogue_example(d, proc, scenes[d.dialogue_id], cfg))
            for d in dialogues], proc


def test_attention_targets_point_at_the_objects_of_each_answer(tmp_path):
    """Each turn's target, per supervised head, is a distribution over [first token, 144 patches]: on patches near
    the objects its answer depends on (every such object gets one), entirely on the first token when there are none;
    a relation gives head 0 the first-named object and head 1 the other; a count puts 1 / (1 + n) on the sink and on
    one patch per object. The answer-predicting position is the ':' before the answer and the key words are that
    turn's question words (for a relation, head 1 gets the second object's colour and shape)."""
    from infra.reference.targets import KEY_WORDS

    examples, proc = _mt_shapes_examples(tmp_path)
    tok = proc.tokenizer
    kinds = set()
    for d, scene, ex in examples:
        ids = ex["input_ids"].tolist()
        for t, turn in enumerate(d.turns):
            kind = turn.meta["type"].split("_")[0]
            kinds.add(kind)
            named = [w for w in turn.question.lower().replace("?", " ").split() if w in KEY_WORDS]
            for h in range(2):
                target = ex["attn_target"][t, 0, h]
                assert abs(float(target.sum()) - 1.0) < 1e-6
                objects = [scene.objects[i] for i in turn.meta["objects"]]
                if kind == "rel":
                    objects = objects[h:h + 1]
                words = [tok.convert_ids_to_tokens(ids[i]) for i in ex["attn_question"][t, h].tolist() if i >= 0]
                assert words == (named[-2:] if kind == "rel" and h == 1 else named[:-2] if kind == "rel" else named)
                if kind == "count":
                    assert abs(float(target[0]) - 1 / (1 + len(objects))) < 1e-6
                    assert int((target[1:] > 0).sum()) == len(objects)
                elif not objects:
                    assert float(target[0]) == 1.0
                    continue
                else:
                    assert float(target[0]) == 0.0
                hit = (target[1:] > 0).nonzero().flatten().tolist()
                centres = [((p % 12) * 8 + 4, (p // 12) * 8 + 4) for p in hit]
                near = [[abs(x - o.cx) <= o.radius + 4 and abs(y - o.cy) <= o.radius + 4 for o in objects]
                        for x, y in centres]
                assert all(any(row) for row in near), (turn.question, centres)
                assert all(any(row[k] for row in near) for k in range(len(objects)))
            pos = int(ex["attn_pos"][t])
            assert tok.convert_ids_to_tokens(ids[pos - 1:pos + 2]) == ["assistant", ":", turn.answers[0]]
    assert {"count", "rel", "attr"} <= kinds


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_attention_loss_equals_a_plain_computation(tmp_path, family):
    """First layer: key words; each of the last V layers (V = 1 for LLaVA, 2 for LLaVA-NeXT: base then crops):
    its view's target over [first token, every image token], whatever the dialogue's own number of them."""
    import torch

    from infra.reference.training import attention_loss, collate

    examples, proc = _mt_shapes_examples(tmp_path, 3, family)
    batch = collate([ex for _, _, ex in examples], proc.tokenizer.pad_token_id)
    views = 1 if family == "llava" else 2
    assert batch["attn_target"].shape[2] == views
    g = torch.Generator().manual_seed(0)
    b, n = batch["input_ids"].shape
    attentions = tuple(torch.rand(b, 3, n, n, generator=g).softmax(-1) for _ in range(3))
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    expected = []
    for i in range(b):
        image = [j for j in range(n) if batch["input_ids"][i, j] == image_id]
        total, turns = 0.0, int((batch["attn_pos"][i] >= 0).sum())
        for t in range(turns):
            p = int(batch["attn_pos"][i, t])
            for h in range(2):
                for v in range(views):
                    layer = attentions[3 - views + v]
                    fetch = [layer[i, h, p, 0]] + [layer[i, h, p, j] for j in image]
                    total += -sum(float(w) * float(torch.log(a + 1e-6))
                                  for w, a in zip(batch["attn_target"][i, t, v, h], fetch))
                words = [w for w in batch["attn_question"][i, t, h].tolist() if w >= 0]
                total += -sum(float(torch.log(attentions[0][i, h, p, w] + 1e-6)) for w in words) / len(words)
        expected.append(total / turns)
    got = attention_loss(attentions, batch, image_id)
    assert abs(float(got) - sum(expected) / len(expected)) < 1e-4


def test_next_token_views_place_objects_in_base_and_crops(tmp_path):
    """LLaVA-NeXT: view 0 marks only base-grid tokens (6 x 6 over the whole image), view 1 only crop tokens (an
    h x w grid over the whole image, a newline closing each row, never marked); every marked token lies on its
    object, computed from the scene's geometry, and every object of a turn's answer is marked in both views."""
    from infra.reference.config import RecipeConfig
    from infra.reference.targets import token_views

    examples, proc = _mt_shapes_examples(tmp_path, 8, "llava_next")
    cfg = RecipeConfig(family="llava_next")
    shapes = set()
    for d, scene, ex in examples:
        (base, _), (crops, counted) = token_views(scene, proc, cfg)
        n = len(base)
        assert ex["attn_target"].shape == (len(d.turns), 2, 2, 1 + n)
        assert (base[36:] == -1).all() and (crops[:36] == -1).all()
        # the crop rows: n - 36 tokens = h rows of w tokens + a newline; aspect of h x w = the image's
        rows = [(h, (n - 36) // h - 1) for h in range(1, n - 35) if (n - 36) % h == 0]
        h, w = min(rows, key=lambda hw: abs(hw[1] / hw[0] - scene.width / scene.height))
        shapes.add((h, w))
        grid = crops[36:].reshape(h, w + 1)
        assert (grid[:, w] == -1).all()
        for view, (gh, gw, marks) in (("base", (6, 6, base[:36].reshape(6, 6))), ("crops", (h, w, grid[:, :w]))):
            for y, x in zip(*np.nonzero(marks >= 0)):
                o = scene.objects[marks[y, x]]
                cx, cy = (x + 0.5) * scene.width / gw, (y + 0.5) * scene.height / gh
                reach = o.radius + 0.75 * max(scene.width / gw, scene.height / gh)
                assert abs(cx - o.cx) <= reach and abs(cy - o.cy) <= reach, (view, scene.scene_id, o)
        assert sorted(set(crops[crops >= 0].tolist())) == list(range(len(scene.objects)))
        assert [crops[p] for p in counted] == list(range(len(scene.objects)))
    assert len(shapes) >= 2, "the fixture should hold several aspect ratios"


def test_dropped_image_tokens_keep_answers_and_targets_in_place(tmp_path):
    """Thinning an example's image tokens: the prompt is the original minus the dropped image tokens, the answer
    positions still sit on the ':' before each answer, the key words are the same words, and each target keeps its
    distribution over the kept tokens (it pointed at nothing else)."""
    import random

    import torch

    from infra.reference.targets import thin_tokens

    examples, proc = _mt_shapes_examples(tmp_path, 4)
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    rng = random.Random(0)
    for _, _, ex in examples:
        thin = thin_tokens(ex, rng, image_id)
        keep = thin["kept"].tolist()
        assert keep == sorted(set(keep)) and len(keep) < 144
        image = [i for i, t in enumerate(ex["input_ids"].tolist()) if t == image_id]
        dropped = {image[i] for i in range(144) if i not in keep}
        expect = [t for i, t in enumerate(ex["input_ids"].tolist()) if i not in dropped]
        assert thin["input_ids"].tolist() == expect
        assert thin["labels"][thin["labels"] != -100].tolist() == ex["labels"][ex["labels"] != -100].tolist()
        for t in range(len(ex["attn_pos"])):
            assert int(thin["input_ids"][thin["attn_pos"][t]]) == int(ex["input_ids"][ex["attn_pos"][t]])
            words = ex["attn_question"][t][ex["attn_question"][t] >= 0]
            thin_words = thin["attn_question"][t][thin["attn_question"][t] >= 0]
            assert thin["input_ids"][thin_words].tolist() == ex["input_ids"][words].tolist()
        full = ex["attn_target"][..., [0] + [k + 1 for k in keep]]
        assert torch.equal(thin["attn_target"], full) and torch.allclose(full.sum(-1), torch.ones(()))


def test_forward_with_every_token_kept_equals_the_model(tmp_path):
    import torch

    from infra.reference.config import RecipeConfig
    from infra.reference.training import build_model, collate, forward_kept

    examples, proc = _mt_shapes_examples(tmp_path, 2)
    tok = proc.tokenizer
    cfg = RecipeConfig(family="llava", vision_hidden=32, text_hidden=64, text_intermediate=128)
    torch.manual_seed(0)
    model = build_model(cfg, len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id, tok.bos_token_id,
                        tok.eos_token_id).eval()
    batch = collate([ex for _, _, ex in examples], tok.pad_token_id)
    inputs = {k: v for k, v in batch.items() if not k.startswith("attn_")}
    with torch.no_grad():
        expected = model(**inputs)
        got = forward_kept(model, inputs, [torch.arange(144)] * 2)
    assert torch.allclose(got.logits, expected.logits, atol=1e-5) and torch.allclose(got.loss, expected.loss)
