"""LVLM adapters and the compressed chat session, against transformers' own forward on tiny random models."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_models import IMAGE_TOKEN_ID, random_image, save_tiny, tiny_adapter  # noqa: E402

from compress.reduction import Reduction  # noqa: E402

ATOL = 1e-4  # float32 logits; different kernels/padding give ~1e-6 differences
QUESTIONS = ["what is the color of the circle ?", "which side is the square on ?", "how many objects are there ?"]


@pytest.fixture(scope="module")
def llava():
    return tiny_adapter("llava", seed=0)


@pytest.fixture(scope="module")
def llava_next():
    return tiny_adapter("llava_next", seed=1)


def every_other(x, num_keep, layout=None):
    """A trivial selection reducer for the tests: the first num_keep tokens at even positions, then odd."""
    order = torch.cat([torch.arange(0, x.shape[0], 2), torch.arange(1, x.shape[0], 2)])[:num_keep].sort().values
    return Reduction(tokens=x[order], keep_indices=order)


def reference_logits(adapter, ids: list[int], image_tokens) -> torch.Tensor:
    """Plain transformers path: embeddings with the image rows written in, one full forward, last logits (V,)."""
    ids_t = torch.tensor([ids])
    emb = adapter.model.get_input_embeddings()(ids_t).clone()
    emb[ids_t == IMAGE_TOKEN_ID] = image_tokens
    return adapter.model(inputs_embeds=emb).logits[0, -1].float()


def reference_greedy(adapter, ids: list[int], image_tokens, max_new: int) -> list[int]:
    """Greedy decoding by full re-prefills (no cache), image token suppressed, stopping at EOS."""
    out = []
    for _ in range(max_new):
        logits = reference_logits(adapter, ids + out, image_tokens)
        logits[IMAGE_TOKEN_ID] = float("-inf")
        tok = int(logits.argmax())
        if tok in adapter.stop_ids:
            break
        out.append(tok)
    return out


def test_layouts_match_the_packed_features(llava, llava_next):
    enc = llava.encode(random_image(40, 30, seed=3))
    assert enc.tokens.shape == (64, 64) and enc.layout.num_tokens == 64
    counts = set()
    for size in [(16, 16), (20, 50), (50, 20), (32, 32)]:
        enc = llava_next.encode(random_image(*size, seed=4))
        enc.layout.validate()
        counts.add(enc.tokens.shape[0])
        # transformers appends the learned image_newline after each crop row: the layout must point at them
        newline = llava_next.model.model.image_newline
        assert torch.equal(enc.tokens[list(enc.layout.newlines)], newline.expand(len(enc.layout.newlines), -1))
        others = [i for i in range(enc.layout.num_tokens) if i not in set(enc.layout.newlines)]
        assert not (enc.tokens[others] == newline).all(-1).any()
    assert len(counts) >= 3  # variable token counts per image


def test_prompt_segments_follow_the_template(llava):
    segs = llava.segment_ids(QUESTIONS)
    assert [s.count(IMAGE_TOKEN_ID) for s in segs] == [1, 0, 0]  # the image only in the first user turn
    texts = llava.segment_texts([llava.format_question(q) for q in QUESTIONS])
    assert texts[0].startswith("USER: <image>\n") and texts[0].endswith("ASSISTANT:")
    assert all(t.count("Answer the question using a single word or phrase.") == 1 for t in texts)
    assert texts[1].startswith("</s>USER: which side")
    assert llava.format_question("how many ?", vqa=False) == "how many ?"


def test_no_single_word_instruction_for_a_tokenizer_that_cannot_spell_it(llava):
    """A word-level tokenizer that maps most of the instruction to <unk> (the reference models) gets the bare
    question: the model never saw the instruction."""
    import copy

    from infra.reference.tokenizer import make_tokenizer

    other = copy.copy(llava)
    other.__init__(llava.model, make_tokenizer(["<pad>", "<s>", "</s>", "<unk>", "<image>", "how", "many", "?"]),
                   llava.image_processor, llava.model_dir, llava.chat_template)
    assert other.vqa_suffix is None and other.format_question("how many ?") == "how many ?"
    assert llava.vqa_suffix is not None


@pytest.mark.parametrize("family,size", [("llava", (32, 32)), ("llava_next", (20, 50)), ("llava_next", (32, 32))])
def test_no_reduction_equals_model_forward(family, size, llava, llava_next):
    from compress.lvlm.session import ChatSession, expand_image

    adapter = llava if family == "llava" else llava_next
    image = random_image(*size, seed=5)
    session = ChatSession(adapter, "full", max_new_tokens=1)
    session.set_image(image)
    result = session.ask(QUESTIONS[0])
    n = session.image_tokens.shape[0]
    ids = expand_image(adapter.segment_ids(QUESTIONS[:1])[0], IMAGE_TOKEN_ID, n)
    with torch.no_grad():  # transformers' own path: pixel_values in, its vision tower, merge and mask
        ref = adapter.full_forward_logits(torch.tensor([ids]), session.batch.encoded[0])[0, -1]
    assert torch.allclose(result.first_logits, ref, atol=ATOL), (result.first_logits - ref).abs().max()
    assert result.stats.prefill_tokens == len(ids) and result.stats.visual_tokens == n


@pytest.mark.parametrize("method,history", [("full", "model"), ("every_other", "model"), ("every_other", "reference")])
def test_cached_turns_equal_reprefilling_the_history(method, history, llava):
    from compress.lvlm.methods import register_method
    from compress.lvlm.session import ChatSession, expand_image

    register_method("every_other", "feature", every_other)
    refs = ["red", "left", "two"]
    session = ChatSession(llava, method, 0.5 if method != "full" else None, max_new_tokens=3, history=history)
    session.set_image(random_image(seed=6))
    tokens = session.image_tokens
    segments = llava.segment_ids(QUESTIONS)
    segments[0] = expand_image(segments[0], IMAGE_TOKEN_ID, tokens.shape[0])
    prefix: list[int] = []
    for t, q in enumerate(QUESTIONS):
        result = session.ask(q, refs[t])
        prefix = prefix + segments[t]
        with torch.no_grad():
            ref = reference_logits(llava, prefix, tokens)
            answer = reference_greedy(llava, prefix, tokens, 3)
        assert torch.allclose(result.first_logits, ref, atol=ATOL), (t, (result.first_logits - ref).abs().max())
        assert result.answer_ids == answer
        prefix = prefix + (answer if history == "model" else llava.answer_ids(refs[t]))
        assert result.history_ids == prefix[len(prefix) - len(result.history_ids):]


def test_batched_equals_one_at_a_time_with_a_reducer(llava_next):
    from compress.lvlm.methods import register_method
    from compress.lvlm.session import BatchChatSession, ChatSession

    register_method("every_other", "feature", every_other)
    images = [random_image(20, 50, seed=7), random_image(32, 32, seed=8)]  # 52 and 88 visual tokens
    dialogues = [QUESTIONS, ["what shape is on the left ?", "is it big ?", "which color ?"]]
    batch = BatchChatSession(llava_next, "every_other", 0.6, max_new_tokens=3)
    batch.set_images(images)
    together = [batch.ask([d[t] for d in dialogues]) for t in range(3)]
    for b, (image, dialogue) in enumerate(zip(images, dialogues)):
        single = ChatSession(llava_next, "every_other", 0.6, max_new_tokens=3)
        single.set_image(image)
        for t, q in enumerate(dialogue):
            alone = single.ask(q)
            assert alone.answer_ids == together[t][b].answer_ids
            assert torch.allclose(alone.first_logits, together[t][b].first_logits, atol=ATOL)
            assert alone.stats.prefill_flops == together[t][b].stats.prefill_flops


def test_teacher_forced_logits_match_the_session_and_carry_gradients(llava):
    from compress.lvlm.session import ChatSession, answer_logits, answer_logits_batch

    session = ChatSession(llava, "full", max_new_tokens=3)
    session.set_image(random_image(seed=9))
    results = [session.ask(q) for q in QUESTIONS]
    answers = [r.answer_ids for r in results]
    x = session.image_tokens.clone().requires_grad_(True)
    out = answer_logits(llava, x, QUESTIONS, answers)
    assert out.logits.shape == (sum(map(len, answers)), llava.text_config.vocab_size)
    assert out.target_ids.tolist() == sum(answers, [])
    # the logits at the first answer token of each turn are the session's first-token logits
    for t, r in enumerate(results):
        if r.answer_ids:
            first = int((out.turn_index == t).nonzero()[0])
            assert torch.allclose(out.logits[first].float(), r.first_logits, atol=ATOL)
    # the answers are the greedy argmax under teacher forcing (image placeholder excluded)
    logits = out.logits.detach().clone()
    logits[:, IMAGE_TOKEN_ID] = float("-inf")
    assert logits.argmax(-1).tolist() == out.target_ids.tolist()
    torch.nn.functional.cross_entropy(out.logits, out.target_ids).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # batched (left-padded, different image-token counts) equals one at a time
    y = session.image_tokens[:40]
    both = answer_logits_batch(llava, [session.image_tokens, y], [QUESTIONS, QUESTIONS[:2]],
                               [answers, ["red", "left side"]])
    alone = answer_logits(llava, y, QUESTIONS[:2], ["red", "left side"])
    assert torch.allclose(both[0].logits, out.logits.detach(), atol=ATOL)
    assert torch.allclose(both[1].logits, alone.logits, atol=ATOL)
    assert both[1].target_ids.tolist() == llava.answer_ids("red") + llava.answer_ids("left side")


def first_patches(vision_tower, pixel_values, num_keep, feature_layer=-2, select_strategy="default"):
    """A trivial vision-tower reducer for the tests: the first num_keep patch features (no [CLS])."""
    hidden = vision_tower(pixel_values, output_hidden_states=True).hidden_states[feature_layer]
    return hidden[:, 1:1 + num_keep]


def test_vision_reducers_get_the_tower_and_the_projector(llava):
    from compress.lvlm.methods import register_method
    from compress.lvlm.session import ChatSession

    register_method("first_patches", "vision", first_patches)
    image = random_image(seed=10)
    session = ChatSession(llava, "first_patches", 0.75, max_new_tokens=2)
    session.set_image(image)
    result = session.ask(QUESTIONS[0])
    with torch.no_grad():  # the projector acts per token, so these are the first 16 rows of transformers' X_IMG
        full = llava.model.model.get_image_features(pixel_values=llava.preprocess(image)["pixel_values"])
    assert torch.allclose(session.image_tokens, full.pooler_output[0][:16], atol=1e-5)
    assert result.stats.visual_tokens == 16 and result.stats.reduce_s > 0 and result.stats.vision_s > 0


def test_adaptive_prumerge_keeps_the_count_its_iqr_rule_chooses(llava):
    from compress.baselines.prumerge import prumerge
    from compress.lvlm.session import ChatSession

    image = random_image(seed=11)
    session = ChatSession(llava, "prumerge_adaptive", 0.5, max_new_tokens=1)  # the rate is ignored
    session.set_image(image)
    result = session.ask(QUESTIONS[0])
    with torch.no_grad():
        direct = prumerge(llava.model.model.vision_tower, llava.preprocess(image)["pixel_values"], None)
    assert result.stats.visual_tokens == int(direct.counts[0]) == session.image_tokens.shape[0]


def test_load_adapter_round_trip_and_errors(tmp_path):
    from compress.lvlm import load_adapter

    model_dir = save_tiny(tmp_path / "llava", "llava", num_layers=2)
    adapter = load_adapter(model_dir)
    assert adapter.family == "llava" and adapter.encode(random_image(seed=1)).tokens.shape == (64, 64)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_adapter(tmp_path / "empty")
    other = tmp_path / "qwen"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))  # qwen2_vl is supported (issue 21)
    with pytest.raises(ValueError, match=r"qwen.*'qwen3_vl' is not supported"):
        load_adapter(other)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_adapter(model_dir)


def test_session_rejects_bad_input(llava):
    from compress.lvlm.session import ChatSession

    with pytest.raises(ValueError, match="unknown method 'nope'"):
        ChatSession(llava, "nope", 0.5)
    for rate in (0.0, 1.0, None):
        with pytest.raises(ValueError, match="rate must be in"):
            ChatSession(llava, "fastv", rate)
    with pytest.raises(ValueError, match="history"):
        ChatSession(llava, "full", history="oracle")
    session = ChatSession(llava, "full", history="reference")
    session.set_image(random_image(seed=2))
    with pytest.raises(ValueError, match="reference answer"):
        session.ask("what ?")
    with pytest.raises(ValueError, match="empty question"):
        session.ask("  ", "red")
