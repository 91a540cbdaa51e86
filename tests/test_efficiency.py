"""Per-turn efficiency figures: analytic FLOPs against torch's FLOP counter, timings, memory, cache length."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_models import random_image, tiny_adapter  # noqa: E402

LLAMA_7B = {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 11008, "vocab_size": 32000,
            "num_attention_heads": 32, "num_key_value_heads": 32}


@pytest.fixture(scope="module")
def llava():
    adapter = tiny_adapter("llava", seed=0)
    adapter.model.set_attn_implementation("eager")  # CPU SDPA kernels are invisible to the FLOP counter
    return adapter


def counted_prefill(adapter, method, rate, questions):
    """Run a session turn by turn; count the prefill FLOPs of each turn with FlopCounterMode by wrapping the
    decoder driver's first call in the turn (the prefill; decode steps are separate calls)."""
    from torch.utils.flop_counter import FlopCounterMode

    import compress.lvlm.session as session_mod

    counted: list[int] = []
    original = session_mod.decoder.forward

    def counting(*args, **kwargs):
        if len(counted) < turn[0] + 1:  # first call of the turn = the prefill
            with FlopCounterMode(display=False) as fc:
                out = original(*args, **kwargs)
                out = (out[0], out[1], adapter.lm_head(out[0][:, -1]))  # the LM head of the first token
            counted.append(fc.get_total_flops())
            return out[0], out[1]
        return original(*args, **kwargs)

    session = session_mod.ChatSession(adapter, method, rate, max_new_tokens=2)
    session.set_image(random_image(seed=3))
    turn = [0]
    results = []
    session_mod.decoder.forward = counting
    try:
        for t, q in enumerate(questions):
            turn[0] = t
            results.append(session.ask(q))
    finally:
        session_mod.decoder.forward = original
    return results, counted


@pytest.mark.parametrize("method,rate", [("full", None), ("fastv", 0.75)])
def test_analytic_prefill_flops_match_the_flop_counter(llava, method, rate):
    results, counted = counted_prefill(llava, method, rate, ["what is the color ?", "which side is it on ?"])
    for r, c in zip(results, counted):
        assert abs(r.stats.prefill_flops - c) <= 0.05 * c, (r.stats.prefill_flops, c)
    # the second turn attends to the cached first turn: more FLOPs per new token than a cold prefill
    from compress.flops import llama_prefill_flops

    second = results[1].stats
    cold = llama_prefill_flops(llava.text_config, second.prefill_tokens)
    assert second.prefill_flops > cold


def test_llama_7b_prefill_flops_by_hand():
    from compress.flops import llama_prefill_flops

    s, d, inter, layers, vocab = 640, 4096, 11008, 32, 32000
    per_layer = 4 * 2 * s * d * d + 2 * 2 * s * s * d + 3 * 2 * s * d * inter  # q,k,v,o; QK^T and AV; MLP
    assert llama_prefill_flops(LLAMA_7B, s) == layers * per_layer + 2 * d * vocab
    assert 8.5e12 < llama_prefill_flops(LLAMA_7B, s) < 9.0e12
    # a cached prefix adds only attention over it
    assert llama_prefill_flops(LLAMA_7B, 20, cached_len=600) - llama_prefill_flops(LLAMA_7B, 20) == \
        layers * 2 * 2 * 20 * 600 * d
    # grouped-query attention shrinks only the k/v projections
    gqa = dict(LLAMA_7B, num_key_value_heads=8)
    assert llama_prefill_flops(LLAMA_7B, s) - llama_prefill_flops(gqa, s) == layers * 2 * 2 * s * d * (d - d // 4)


def test_turn_figures_are_consistent(llava):
    from compress.lvlm.session import ChatSession

    session = ChatSession(llava, "full", max_new_tokens=3)
    session.set_image(random_image(seed=4))
    first, second = session.ask("what is the color ?"), session.ask("which side ?")
    for r in (first, second):
        s = r.stats
        assert s.ttft_s == pytest.approx(s.vision_s + s.reduce_s + s.prefill_s)
        assert s.total_s == pytest.approx(s.ttft_s + s.decode_s)
        assert s.peak_memory_bytes > 2**20 and s.prefill_s > 0
    assert first.stats.vision_s > 0 and second.stats.vision_s == 0.0  # the image is encoded once
    # cache: prompt + all generated tokens but the last (never fed); then the next prompt carries the answer
    fed1 = max(len(first.answer_ids) - 1, 0) if len(first.answer_ids) == 3 else len(first.answer_ids)
    assert first.stats.kv_cache_len == first.stats.prefill_tokens + fed1
    assert second.stats.prefill_tokens > len(first.answer_ids)
