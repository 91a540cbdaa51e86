"""FastV against plain reference computations with transformers' own eager model."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_models import IMAGE_TOKEN_ID, random_image, tiny_adapter  # noqa: E402

ATOL = 1e-4
K = 2  # the ranking layer is K-1 = 1 of the 3-layer tiny LLM
QUESTIONS = ["what is the color of the circle ?", "which side is the square on ?"]


@pytest.fixture(scope="module")
def llava():
    return tiny_adapter("llava", seed=0)


@pytest.fixture(scope="module")
def llava_next():
    return tiny_adapter("llava_next", seed=2)


def prompt_embeds(adapter, ids, tokens):
    ids_t = torch.tensor([ids])
    emb = adapter.model.get_input_embeddings()(ids_t).clone()
    emb[ids_t == IMAGE_TOKEN_ID] = tokens
    return emb


def reference_ranking(adapter, ids, tokens, rate, k=K):
    """Layer K-1 attention from a plain eager forward of the whole model: last prompt token's row, mean over heads,
    image columns, top m -> sorted indices into X_IMG."""
    from compress.reduction import num_keep

    adapter.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = adapter.model(inputs_embeds=prompt_embeds(adapter, ids, tokens), output_attentions=True)
    finally:
        adapter.model.set_attn_implementation("sdpa")
    row = out.attentions[k - 1][0].mean(0)[-1]
    image = (torch.tensor(ids) == IMAGE_TOKEN_ID).nonzero().squeeze(1)
    return row[image].topk(num_keep(len(image), rate)).indices.sort().values  # indices into X_IMG


def masked_reference_logits(adapter, ids, tokens, dropped, k=K):
    """The 'mask' variant of FastV: the full sequence at its own positions, but from layer K on no query may see a
    dropped image token. Equal to running layers >= K on the shortened sequence at the original positions."""
    length = len(ids)
    allowed = torch.ones(length, length).tril().bool()
    allowed[:, dropped] = False
    allowed |= torch.eye(length, dtype=torch.bool)  # a dropped query still sees itself (its output is unused)
    mask = torch.zeros(1, 1, length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)

    def hook(module, args, kwargs):
        kwargs["attention_mask"] = mask
        return args, kwargs

    layers = adapter.language_model.layers
    handles = [layers[i].register_forward_pre_hook(hook, with_kwargs=True) for i in range(k, len(layers))]
    try:
        with torch.no_grad():
            return adapter.model(inputs_embeds=prompt_embeds(adapter, ids, tokens)).logits[0, -1]
    finally:
        for h in handles:
            h.remove()


def test_keep_and_compact_pure_functions():
    from compress.baselines.fastv import compact, fastv_keep

    scores = torch.tensor([[0.9, 0.1, 0.5, 0.5, 0.2, 0.3], [0.0, 0.4, 0.4, 0.1, 0.9, 0.0]])
    image = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    keep = fastv_keep(scores, image, [2, 1])
    # row 0: text 0, 5 + the two best image tokens (tie 0.5/0.5 -> both); row 1: text 0, 1 + token 4
    assert keep.tolist() == [[True, False, True, True, False, True], [True, True, False, False, True, False]]
    index, valid = compact(keep)
    assert index.tolist() == [[0, 2, 3, 5], [0, 0, 1, 4]] and valid.tolist() == [[True] * 4, [False, True, True, True]]
    with pytest.raises(ValueError, match="cannot keep 5"):
        fastv_keep(scores, image, [5, 1])


@pytest.mark.parametrize("method,k", [("fastv", K), ("fastv_k1", 1)])
def test_fastv_keeps_the_top_ranked_tokens_and_matches_the_masked_model(llava, method, k):
    from compress.lvlm.session import ChatSession, expand_image

    rate = 0.75
    session = ChatSession(llava, method, rate, max_new_tokens=3, fastv_k=K)  # fastv_k1 ranks with layer 0 whatever
    session.set_image(random_image(seed=11))
    tokens = session.image_tokens
    segs = llava.segment_ids(QUESTIONS)
    segs[0] = expand_image(segs[0], IMAGE_TOKEN_ID, tokens.shape[0])
    first = session.ask(QUESTIONS[0])
    kept = session.fastv_kept
    assert torch.equal(kept, reference_ranking(llava, segs[0], tokens, rate, k))
    assert first.stats.visual_tokens == 16 and len(kept) == 16
    image = (torch.tensor(segs[0]) == IMAGE_TOKEN_ID).nonzero().squeeze(1)
    dropped = sorted(set(image.tolist()) - set(image[kept].tolist()))
    ref = masked_reference_logits(llava, segs[0], tokens, dropped, k)
    assert torch.allclose(first.first_logits, ref, atol=ATOL), (first.first_logits - ref).abs().max()
    # the pruned cache serves the next turn: same as the masked model over the whole history
    second = session.ask(QUESTIONS[1])
    ids = segs[0] + first.answer_ids + segs[1]
    ref2 = masked_reference_logits(llava, ids, tokens, dropped, k)
    assert torch.allclose(second.first_logits, ref2, atol=ATOL), (second.first_logits - ref2).abs().max()
    # cache lengths: layers < k hold every token once (layer k-1 not doubled), layers >= k the kept ones only
    prompt = len(segs[0]) + len(first.answer_ids) + len(segs[1])
    cache = session.batch.state.cache
    lengths = [layer.get_seq_length() for layer in cache.layers]
    assert lengths == [prompt] * k + [prompt - len(dropped)] * (len(lengths) - k)


def test_fastv_batched_equals_one_at_a_time(llava_next):
    from compress.lvlm.session import BatchChatSession, ChatSession

    images = [random_image(50, 20, seed=12), random_image(32, 32, seed=13)]  # different image-token counts
    dialogues = [QUESTIONS, ["how many objects are there ?", "is it red ?"]]
    batch = BatchChatSession(llava_next, "fastv", 0.5, max_new_tokens=3, fastv_k=K)
    batch.set_images(images)
    together = [batch.ask([d[t] for d in dialogues]) for t in range(2)]
    kept = batch.fastv_kept
    for b, (image, dialogue) in enumerate(zip(images, dialogues)):
        single = ChatSession(llava_next, "fastv", 0.5, max_new_tokens=3, fastv_k=K)
        single.set_image(image)
        for t, q in enumerate(dialogue):
            alone = single.ask(q)
            assert alone.answer_ids == together[t][b].answer_ids
            assert torch.allclose(alone.first_logits, together[t][b].first_logits, atol=ATOL)
        assert torch.equal(kept[b], single.fastv_kept)
    assert [len(k) for k in kept] == [together[0][b].stats.visual_tokens for b in range(2)]
    assert len(kept[0]) != len(kept[1])


def test_fastv_per_turn_recompression_reranks_with_the_new_question(llava):
    from compress.lvlm.session import ChatSession, expand_image

    session = ChatSession(llava, "fastv", 0.75, max_new_tokens=3, fastv_k=K, recompress="per_turn")
    session.set_image(random_image(seed=11))
    tokens = session.image_tokens
    segs = llava.segment_ids(QUESTIONS)
    segs[0] = expand_image(segs[0], IMAGE_TOKEN_ID, tokens.shape[0])
    first = session.ask(QUESTIONS[0])
    second = session.ask(QUESTIONS[1])
    ids = segs[0] + first.answer_ids + segs[1]  # the whole history, re-prefilled and re-ranked
    kept = session.fastv_kept
    assert torch.equal(kept, reference_ranking(llava, ids, tokens, 0.75))
    image = (torch.tensor(ids) == IMAGE_TOKEN_ID).nonzero().squeeze(1)
    dropped = sorted(set(image.tolist()) - set(image[kept].tolist()))
    ref = masked_reference_logits(llava, ids, tokens, dropped)
    assert torch.allclose(second.first_logits, ref, atol=ATOL), (second.first_logits - ref).abs().max()
    assert second.stats.prefill_tokens == len(ids)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_last_query_row_equals_the_eager_full_matrix(family, llava, llava_next):
    """FastV computes only the last query row of layer K-1; it equals row -1 of transformers' eager (B, H, L, L)
    weights on the same left-padded batch (docs/design.md §4.4.2)."""
    from compress.lvlm import decoder

    ad = llava if family == "llava" else llava_next
    lm = ad.language_model
    layer = lm.layers[K - 1].self_attn
    ids, mask = torch.randint(5, 40, (2, 12)), torch.ones(2, 12, dtype=torch.bool)
    mask[1, :3] = False  # a left-padded row
    embeds = ad.model.get_input_embeddings()(ids)
    captured = {}
    for name, ctx in (("eager", lambda km: decoder.eager_attention(layer)),
                      ("last", lambda km: decoder.last_query_attention(layer, km))):
        state = decoder.DecoderState.empty(lm, 2, ad.device)
        with torch.no_grad(), ctx(mask) as box:
            decoder.forward(lm, state, embeds, mask)
        captured[name] = box["weights"]
    full, last = captured["eager"], captured["last"]
    assert full.shape[2] == 12 and last.shape[2] == 1
    assert torch.allclose(last[:, :, 0], full[:, :, -1].float(), atol=1e-6)
    assert torch.allclose(last.sum(-1), torch.ones_like(last.sum(-1)), atol=1e-6)
    assert float(last[1, :, 0, :3].abs().max()) == 0.0  # padding gets no attention
