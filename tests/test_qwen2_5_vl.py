"""The Qwen2.5-VL adapter (3-D rotary positions, dynamic resolution, 2 x 2 merger) against transformers' own forward
on a tiny random Qwen2.5-VL built from a config, with a word-level tokenizer and a ChatML template (no downloads)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_models import WORDS, random_image  # noqa: E402

from compress.reduction import Reduction  # noqa: E402

ATOL = 1e-4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "<|image_pad|>", "<|video_pad|>",
            "<|vision_start|>", "<|vision_end|>"]
VOCAB = SPECIALS + ["system", "user", "assistant", "You", "helpful", "?", "."] + [w for w in WORDS if w != "a"] + ["a"]
IMAGE_ID, EOS_ID = 4, 2
# Qwen2-VL / Qwen2.5-VL's ChatML template (default system prompt, vision markers around the image placeholder).
TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QUESTIONS = ["what is the color of the circle ?", "which side is the square on ?", "how many objects are there ?"]
SIZES = [(24, 40), (40, 24), (40, 56)]  # patch grids 6x10, 10x6, 10x14 -> merged 3x5, 5x3, 5x7


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:3] + SPECIALS[4:]})
    tok.chat_template = TEMPLATE
    assert tok.convert_tokens_to_ids("<|image_pad|>") == IMAGE_ID
    return tok


def tiny_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                    size={"shortest_edge": 8 * 8, "longest_edge": 64 * 64})


def tiny_qwen(num_layers: int = 3, seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=16, out_hidden_size=64,
                           fullatt_block_indexes=[1]),
        text_config=dict(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         initializer_range=0.2, bos_token_id=None, eos_token_id=EOS_ID, pad_token_id=0),
        image_token_id=IMAGE_ID, video_token_id=5, vision_start_token_id=6, vision_end_token_id=7)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def tiny_qwen2(num_layers: int = 3, seed: int = 0):
    """Qwen2-VL: the same LLM sizes, a plain ViT tower (embed_dim) whose merger outputs the LLM width."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = tiny_qwen(1).config.text_config.to_dict()
    text["num_hidden_layers"], text["layer_types"] = num_layers, None
    cfg = Qwen2VLConfig(vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2),
                        text_config=text, image_token_id=IMAGE_ID, video_token_id=5, vision_start_token_id=6,
                        vision_end_token_id=7)
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def qwen():
    from compress.lvlm.qwen2_5_vl import Qwen25VLAdapter

    return Qwen25VLAdapter(tiny_qwen(), tiny_tokenizer(), tiny_processor(), "<tiny-qwen2.5-vl>")


def grid_of(size: tuple[int, int]) -> tuple[int, int]:
    """Merged token grid (h', w') of an image of (height, width) that smart_resize leaves as is (multiples of 8)."""
    return size[0] // 8, size[1] // 8


def hand_offsets(h: int, w: int, keep: list[int] | None = None) -> list[tuple[int, int, int]]:
    cells = [(0, r, c) for r in range(h) for c in range(w)]
    return cells if keep is None else [cells[i] for i in keep]


def reference_positions(ids: list[int], offsets: list, span: int, visual_id: int = IMAGE_ID) -> torch.Tensor:
    """A plain loop: a text token at (p, p, p), p counting on; the image (or video: ``visual_id``) block starting at
    p = s puts visual token j at s + offsets[j] and the text after it at s + span. -> (3, 1, L)"""
    out, p, j = [], 0, 0
    for i in ids:
        if i == visual_id:
            out.append([p + o for o in offsets[j]])
            j += 1
            if j == len(offsets):
                p += span
        else:
            out.append([p, p, p])
            p += 1
    return torch.tensor(out).T[:, None]


def reference_logits(adapter, ids: list[int], tokens, positions: torch.Tensor) -> torch.Tensor:
    """transformers' own model over inputs_embeds (image rows written in) at the given 3-D positions: last logits."""
    ids_t = torch.tensor([ids])
    emb = adapter.model.get_input_embeddings()(ids_t).clone()
    emb[ids_t == IMAGE_ID] = tokens
    with torch.no_grad():
        return adapter.model(inputs_embeds=emb, position_ids=positions).logits[0, -1].float()


def every_other(x, num_keep, layout=None):
    order = torch.cat([torch.arange(0, x.shape[0], 2), torch.arange(1, x.shape[0], 2)])[:num_keep].sort().values
    return Reduction(tokens=x[order], keep_indices=order)


def test_unknown_model_type_is_refused_by_name(tmp_path):
    from compress.lvlm import model_family

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery_vl"}))
    with pytest.raises(ValueError) as err:
        model_family(tmp_path)
    assert "'mystery_vl' is not supported" in str(err.value) and "\n" not in str(err.value)
    assert "qwen2_5_vl" in str(err.value)


def test_prompt_holds_one_placeholder_between_the_vision_markers(qwen):
    segs = qwen.segment_ids(QUESTIONS)
    assert [s.count(IMAGE_ID) for s in segs] == [1, 0, 0]
    i = segs[0].index(IMAGE_ID)
    assert segs[0][i - 1: i + 2] == [6, IMAGE_ID, 7]
    assert segs[1][0] == EOS_ID  # each later segment opens with the previous answer's <|im_end|>
    assert qwen.answer_ids("red") == [VOCAB.index("red")]


@pytest.mark.parametrize("size", SIZES)
def test_no_reduction_equals_model_forward(size, qwen):
    from compress.lvlm.session import ChatSession, expand_image

    h, w = grid_of(size)
    session = ChatSession(qwen, "full", max_new_tokens=1)
    session.set_image(random_image(*size, seed=5))
    result = session.ask(QUESTIONS[0])
    assert session.image_tokens.shape[0] == h * w  # dynamic resolution, 2 x 2 merger
    ids = expand_image(qwen.segment_ids(QUESTIONS[:1])[0], IMAGE_ID, h * w)
    ids_t = torch.tensor([ids])
    with torch.no_grad():  # transformers' own path: pixel values in, its tower, merger and get_rope_index
        ref = qwen.full_forward_logits(ids_t, session.batch.encoded[0])[0, -1]
        rope, _ = qwen.model.model.get_rope_index(ids_t, (ids_t == IMAGE_ID).int(),
                                                  image_grid_thw=torch.tensor([[1, 2 * h, 2 * w]]))
    assert torch.allclose(result.first_logits, ref, atol=ATOL), (result.first_logits - ref).abs().max()
    assert torch.equal(rope, reference_positions(ids, hand_offsets(h, w), max(h, w)))  # the hand rule is the model's


@pytest.mark.parametrize("method,history", [("full", "model"), ("every_other", "model"), ("every_other", "reference")])
def test_cached_turns_equal_reprefilling_the_history(method, history, qwen):
    from compress.lvlm.methods import register_method
    from compress.lvlm.session import ChatSession, expand_image

    register_method("every_other", "feature", every_other)
    refs = ["red", "left", "two"]
    h, w = grid_of(SIZES[2])
    session = ChatSession(qwen, method, 0.5 if method != "full" else None, max_new_tokens=3, history=history)
    session.set_image(random_image(*SIZES[2], seed=6))
    tokens = session.image_tokens
    keep = None if method == "full" else list(range(0, h * w, 2))[: tokens.shape[0]]
    offsets = hand_offsets(h, w, keep)
    segments = qwen.segment_ids(QUESTIONS)
    segments[0] = expand_image(segments[0], IMAGE_ID, tokens.shape[0])
    prefix: list[int] = []
    for t, q in enumerate(QUESTIONS):
        result = session.ask(q, refs[t])
        prefix = prefix + segments[t]
        ref = reference_logits(qwen, prefix, tokens, reference_positions(prefix, offsets, max(h, w)))
        assert torch.allclose(result.first_logits, ref, atol=ATOL), (t, (result.first_logits - ref).abs().max())
        answer = []
        for _ in range(3):  # greedy by full re-prefills
            full = prefix + answer
            logits = reference_logits(qwen, full, tokens, reference_positions(full, offsets, max(h, w)))
            logits[IMAGE_ID] = float("-inf")
            if int(logits.argmax()) in qwen.stop_ids:
                break
            answer.append(int(logits.argmax()))
        assert result.answer_ids == answer
        prefix = prefix + (answer if history == "model" else qwen.answer_ids(refs[t]))


def test_batched_equals_one_at_a_time(qwen):
    from compress.lvlm.methods import register_method
    from compress.lvlm.session import BatchChatSession, ChatSession

    register_method("every_other", "feature", every_other)
    images = [random_image(*SIZES[0], seed=7), random_image(*SIZES[2], seed=8)]  # 15 and 35 visual tokens
    dialogues = [QUESTIONS, ["what shape is on the left ?", "is it big ?", "which color ?"]]
    batch = BatchChatSession(qwen, "every_other", 0.6, max_new_tokens=3)
    batch.set_images(images)
    together = [batch.ask([d[t] for d in dialogues]) for t in range(3)]
    for b, (image, dialogue) in enumerate(zip(images, dialogues)):
        single = ChatSession(qwen, "every_other", 0.6, max_new_tokens=3)
        single.set_image(image)
        for t, q in enumerate(dialogue):
            alone = single.ask(q)
            assert alone.answer_ids == together[t][b].answer_ids
            assert torch.allclose(alone.first_logits, together[t][b].first_logits, atol=ATOL)


def test_reduced_tokens_carry_the_positions_of_the_rule(qwen):
    """Every_other keeps (t, h, w); MetaCompress's token i sits at input floor((i + 0.5) n / m); Spatial's window
    average at its window's mean cell. Checked on the positions the session hands the rotary embedding."""
    from compress.lvlm.methods import get_method, register_method
    from compress.lvlm.session import ChatSession, expand_image
    from compress.metacompress import MetaCompress

    register_method("every_other", "feature", every_other)
    h, w = grid_of(SIZES[0])  # 3 x 5 = 15 tokens
    n = h * w
    torch.manual_seed(0)
    compressor = MetaCompress(64, 16, 3, (4, 4)).eval()
    cells = hand_offsets(h, w)
    spatial_cells = [(0, 1, 0), (0, 1, 2), (0, 1, 4)]  # 3 tokens: one band of all 3 rows, columns [0,1) [1,3) [3,5)
    expected = {
        ("every_other", 0.6): [cells[i] for i in range(0, n, 2)][:6],
        ("metacompress", 0.6): [cells[int((i + 0.5) * n / 6)] for i in range(6)],
        ("spatial", 0.8): spatial_cells,
    }
    for (name, rate), offsets in expected.items():
        method = get_method(name, compressor if name == "metacompress" else None)
        session = ChatSession(qwen, method, rate, max_new_tokens=1)
        session.set_image(random_image(*SIZES[0], seed=9))
        seen = []
        handle = qwen.language_model.rotary_emb.register_forward_hook(
            lambda mod, args, kwargs, out: seen.append(kwargs["position_ids"].clone()), with_kwargs=True)
        try:
            session.ask(QUESTIONS[0])
        finally:
            handle.remove()
        ids = expand_image(qwen.segment_ids(QUESTIONS[:1])[0], IMAGE_ID, len(offsets))
        assert session.image_tokens.shape[0] == len(offsets), name
        assert torch.equal(seen[0], reference_positions(ids, offsets, max(h, w))), name


def test_fastv_prunes_inside_the_decoder_at_the_original_3d_positions(qwen):
    """FastV's first turn and the next (on the pruned cache) equal transformers' model at the full 3-D positions
    with the dropped visual tokens masked from layer K on."""
    from compress.lvlm.session import ChatSession, expand_image

    k = 2
    h, w = grid_of(SIZES[2])
    session = ChatSession(qwen, "fastv", 0.75, max_new_tokens=3, fastv_k=k)
    session.set_image(random_image(*SIZES[2], seed=11))
    tokens = session.image_tokens
    segs = qwen.segment_ids(QUESTIONS[:2])
    segs[0] = expand_image(segs[0], IMAGE_ID, tokens.shape[0])
    first = session.ask(QUESTIONS[0])
    kept = session.fastv_kept
    assert len(kept) == round(h * w * 0.25) and first.stats.visual_tokens == len(kept)
    image = (torch.tensor(segs[0]) == IMAGE_ID).nonzero().squeeze(1)
    dropped = sorted(set(image.tolist()) - set(image[kept].tolist()))

    def masked(ids):
        length = len(ids)
        allowed = torch.ones(length, length).tril().bool()
        allowed[:, dropped] = False
        allowed |= torch.eye(length, dtype=torch.bool)
        mask = torch.zeros(1, 1, length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)

        def hook(module, args, kwargs):
            kwargs["attention_mask"] = mask
            return args, kwargs

        layers = qwen.language_model.layers
        handles = [layers[i].register_forward_pre_hook(hook, with_kwargs=True) for i in range(k, len(layers))]
        try:
            return reference_logits(qwen, ids, tokens, reference_positions(ids, hand_offsets(h, w), max(h, w)))
        finally:
            for handle in handles:
                handle.remove()

    assert torch.allclose(first.first_logits, masked(segs[0]), atol=ATOL)
    second = session.ask(QUESTIONS[1])
    assert torch.allclose(second.first_logits, masked(segs[0] + first.answer_ids + segs[1]), atol=ATOL)


@pytest.mark.parametrize("name,needs", [("visionzip", r"\[CLS\]"), ("prumerge_plus", r"\[CLS\]"),
                                        ("tome", "CLIP vision tower")])
def test_clip_tower_baselines_are_refused_by_name(name, needs, qwen):
    from compress.lvlm.session import ChatSession

    with pytest.raises(ValueError, match=f"method '{name}' needs .*{needs}.*qwen2_5_vl.*methods that apply: .*fastv"):
        ChatSession(qwen, name, 0.5)
    with pytest.raises(ValueError, match="3-D rotary"):
        ChatSession(qwen, "sample", 0.5, fused_reducer=True)


def test_teacher_forced_logits_match_the_session(qwen):
    from compress.lvlm.session import ChatSession, answer_logits

    session = ChatSession(qwen, "full", max_new_tokens=3)
    session.set_image(random_image(*SIZES[1], seed=12))
    results = [session.ask(q) for q in QUESTIONS]
    answers = [r.answer_ids for r in results]
    with pytest.raises(ValueError, match="image_positions"):
        answer_logits(qwen, session.image_tokens, QUESTIONS, answers)
    positions = session.batch.image_positions[0]
    out = answer_logits(qwen, session.image_tokens, QUESTIONS, answers, image_positions=positions)
    for t, r in enumerate(results):
        if r.answer_ids:
            first = int((out.turn_index == t).nonzero()[0])
            assert torch.allclose(out.logits[first].float(), r.first_logits, atol=ATOL)
    # what a stage passes: positions from the layout (and the reducer's Reduction) alone, equal to the session's
    layout = session.batch.encoded[0].layout
    assert torch.equal(qwen.positions_after(layout).offsets, positions.offsets)
    kept = every_other(session.image_tokens, 7)
    h, w = grid_of(SIZES[1])
    expected = [list(c) for c in hand_offsets(h, w, list(range(0, 14, 2)))]
    assert qwen.positions_after(layout, kept).offsets.tolist() == expected and kept.tokens.shape[0] == 7


def test_load_adapter_round_trip(tmp_path, qwen):
    from compress.lvlm import load_adapter
    from compress.lvlm.qwen2_5_vl import Qwen25VLAdapter

    qwen.model.save_pretrained(str(tmp_path))
    qwen.tokenizer.save_pretrained(str(tmp_path))
    qwen.image_processor.save_pretrained(str(tmp_path))
    loaded = load_adapter(tmp_path)
    assert isinstance(loaded, Qwen25VLAdapter) and loaded.conversation == "template"
    image = random_image(*SIZES[0], seed=13)
    a, b = qwen.encode(image), loaded.encode(image)
    assert a.layout == b.layout and torch.allclose(a.tokens, b.tokens, atol=1e-6)


def test_qwen2_vl_full_and_reduced_turns_equal_the_model():
    """Qwen2-VL through the same adapter: no reduction equals its own forward; a reduced second turn on the cache
    equals re-prefilling at the rule's positions."""
    from compress.lvlm.methods import register_method
    from compress.lvlm.qwen2_5_vl import Qwen2VLAdapter
    from compress.lvlm.session import ChatSession, expand_image

    adapter = Qwen2VLAdapter(tiny_qwen2(), tiny_tokenizer(), tiny_processor(), "<tiny-qwen2-vl>")
    h, w = grid_of(SIZES[1])
    session = ChatSession(adapter, "full", max_new_tokens=1)
    session.set_image(random_image(*SIZES[1], seed=14))
    ids = expand_image(adapter.segment_ids(QUESTIONS[:1])[0], IMAGE_ID, h * w)
    first = session.ask(QUESTIONS[0])
    with torch.no_grad():
        ref = adapter.full_forward_logits(torch.tensor([ids]), session.batch.encoded[0])[0, -1]
    assert torch.allclose(first.first_logits, ref, atol=ATOL)

    register_method("every_other", "feature", every_other)
    session = ChatSession(adapter, "every_other", 0.5, max_new_tokens=2)
    session.set_image(random_image(*SIZES[1], seed=14))
    segs = adapter.segment_ids(QUESTIONS[:2])
    segs[0] = expand_image(segs[0], IMAGE_ID, session.image_tokens.shape[0])
    answer = session.ask(QUESTIONS[0]).answer_ids
    second = session.ask(QUESTIONS[1])
    full = segs[0] + answer + segs[1]
    offsets = hand_offsets(h, w, list(range(0, h * w, 2)))
    ref = reference_logits(adapter, full, session.image_tokens, reference_positions(full, offsets, max(h, w)))
    assert torch.allclose(second.first_logits, ref, atol=ATOL)


@pytest.mark.parametrize("model_type", ["qwen3_vl", "internlmxcomposer2"])
def test_known_unservable_families_are_refused_with_the_reason(model_type, tmp_path):
    from compress.lvlm import model_family

    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(ValueError, match=f"model_type '{model_type}' is not supported: (its|it runs)"):
        model_family(tmp_path)


def test_reference_architecture_has_the_published_7b_shapes():
    """Qwen2.5-VL-7B-Instruct's config.json values, by hand; the tokenizer puts the placeholder at Qwen's id."""
    from infra.architectures import build_config, build_qwen_tokenizer

    cfg = build_config("qwen2.5-vl-7b")
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
            t.num_key_value_heads, t.vocab_size) == (3584, 18944, 28, 28, 4, 152064)
    assert t.rope_parameters["mrope_section"] == [16, 24, 24] and t.rope_parameters["rope_theta"] == 1e6
    assert (v.depth, v.hidden_size, v.patch_size, v.spatial_merge_size, v.out_hidden_size, v.window_size) == \
        (32, 1280, 14, 2, 3584, 112)
    assert (cfg.image_token_id, t.eos_token_id) == (151655, 151645)
    tok = build_qwen_tokenizer(512)
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655 - 152064 + 512
