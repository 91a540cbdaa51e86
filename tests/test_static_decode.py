"""The fast path of the chat session (compress.lvlm.accel) against the eager one, on tiny models (CPU): static KV
cache, bucketed prompt lengths, device image path, fused reducers -> the same answers token for token, the same first
logits and the same per-turn figures. CUDA graphs: the same comparison on a GPU (skipped without one)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_models import random_image, tiny_adapter  # noqa: E402

QUESTIONS = ["what is the color of the circle ?", "which side is the square on ?", "how many are there ?"]
FAST = dict(static_cache=True, device_image=True, fused_reducer=True)
# Device resizing differs from PIL's by up to a level at a few pixels (image_ops): rows whose images are resized
# compare the decoder path alone.
DECODER = dict(static_cache=True, fused_reducer=True)


@pytest.fixture(scope="module")
def llava():
    return tiny_adapter("llava", seed=0)


@pytest.fixture(scope="module")
def llava_next():
    return tiny_adapter("llava_next", seed=2)


@pytest.fixture(scope="module")
def compressor(llava):
    from compress.metacompress import MetaCompress

    torch.manual_seed(5)
    module = MetaCompress(llava.text_config.hidden_size, compress_dim=16).eval()
    with torch.no_grad():  # a trained-looking module: position table and weights away from the pooling init
        module.position_table.normal_(0, 0.5)
        module.w_query.normal_(0, 0.5)
    return module


def dialogue(adapter, method, rate, images, options, compressor=None, history="model", turns=QUESTIONS, **kw):
    from compress.lvlm.session import BatchChatSession

    session = BatchChatSession(adapter, method, rate, compressor=compressor, max_new_tokens=5, history=history,
                               **options, **kw)
    session.set_images(images)
    refs = [["red", "left"], ["two blue", "right side"]][: len(images)]
    out = []
    for t, q in enumerate(turns):
        answers = [[ref[t % 2]] for ref in refs] if history == "reference" else None
        out.append(session.ask([q] * len(images), None if answers is None else [a[0] for a in answers]))
    return out, session


def assert_same(eager, fast, atol=1e-4):
    for turn_e, turn_f in zip(eager, fast):
        for e, f in zip(turn_e, turn_f):
            assert f.answer_ids == e.answer_ids
            torch.testing.assert_close(f.first_logits, e.first_logits, atol=atol, rtol=1e-4)
            for key in ("prefill_tokens", "prefill_flops", "kv_cache_len", "visual_tokens", "new_tokens"):
                assert getattr(f.stats, key) == getattr(e.stats, key), key


@pytest.mark.parametrize("method,rate", [("full", None), ("sample", 0.75), ("metacompress", 0.75), ("fastv", 0.75)])
def test_static_cache_equals_dynamic_token_for_token(llava, compressor, method, rate):
    images = [random_image(32, 32, seed=1)]
    eager, reference = dialogue(llava, method, rate, images, {}, compressor)
    fast, session = dialogue(llava, method, rate, images, FAST, compressor)
    assert type(session.state).__name__ == "StaticState"
    assert_same(eager, fast)
    if method == "fastv":  # the same image tokens kept
        assert [k.tolist() for k in session.fastv_kept] == [k.tolist() for k in reference.fastv_kept]


@pytest.mark.parametrize("method", ["full", "fastv"])
def test_static_batched_rows_with_different_lengths_and_reference_history(llava_next, method):
    images = [random_image(32, 32, seed=3), random_image(24, 40, seed=4)]  # different anyres token counts
    rate = None if method == "full" else 0.5
    eager, _ = dialogue(llava_next, method, rate, images, {}, history="reference")
    fast, _ = dialogue(llava_next, method, rate, images, DECODER, history="reference")
    assert_same(eager, fast)


def test_fastv_per_turn_recompression_on_the_static_cache(llava):
    images = [random_image(32, 32, seed=6)]
    eager, _ = dialogue(llava, "fastv", 0.5, images, {}, recompress="per_turn")
    fast, _ = dialogue(llava, "fastv", 0.5, images, FAST, recompress="per_turn")
    assert_same(eager, fast)


def test_small_windows_and_a_full_cache(llava):
    """Windows of 16 slots (many buckets, keys beyond the used slots masked); too small a cache is an error."""
    from compress.lvlm.session import BatchChatSession

    images = [random_image(32, 32, seed=7)]
    eager, _ = dialogue(llava, "sample", 0.5, images, {})
    session = BatchChatSession(llava, "sample", 0.5, max_new_tokens=5, static_cache=True, max_cache_len=512)
    session.fast.window_step = 16
    session.set_images(images)
    fast = [session.ask([q]) for q in QUESTIONS]
    assert_same(eager, fast)
    tight = BatchChatSession(llava, "full", max_new_tokens=5, static_cache=True, max_cache_len=48)
    tight.set_images(images)
    with pytest.raises(ValueError, match="max_cache_len"):
        tight.ask([QUESTIONS[0]])


def test_bucket_lengths():
    from compress.lvlm.static_cache import bucket

    assert [bucket(n) for n in (1, 2, 3, 33, 64, 65, 128, 129, 640, 641)] == [1, 2, 4, 64, 64, 128, 128, 192, 640, 704]


def test_fused_reducers_equal_the_modules(compressor):
    from compress.baselines.sample import sample_reduce
    from compress.layout import Layout
    from compress.lvlm.fused import fused_reducer

    x = torch.randn(64, compressor.w_key.shape[0])
    layout = Layout.grid(8, 8)
    from compress.metacompress import MetaCompress

    d = x.shape[1]
    modules = [compressor, MetaCompress(d, compress_dim=16, generator="normed").eval(),
               MetaCompress(d, compress_dim=16, locality=1.5).eval(),
               MetaCompress(d, compress_dim=16, generator="normed", locality=0.5).eval(),
               MetaCompress(d, compress_dim=16, spatial_prior=6.0).eval(),
               MetaCompress(d, compress_dim=16, generator="normed", spatial_prior=6.0).eval()]
    with torch.no_grad():  # a gate that has moved, so that the scores count
        for module in modules[-2:]:
            module.score_gate.fill_(0.5)
    for fn in (*modules, sample_reduce):
        fused = fused_reducer(fn, 64, 13, layout, x.device)
        torch.testing.assert_close(fused(x), fn(x, 13, layout).tokens, atol=1e-6, rtol=1e-5)
    assert fused_reducer(lambda x, m, lay: None, 64, 13, layout, x.device) is None


def test_a_session_and_the_benchmark_share_one_accelerator(llava):
    """The benchmark counts graphs on ``Accelerator.get(adapter, **options)``: it must be the session's one, whether
    or not a default (here ``max_cache_len``) is spelled out."""
    from compress.lvlm.accel import Accelerator
    from compress.lvlm.session import BatchChatSession

    session = BatchChatSession(llava, "full", static_cache=True, device_image=True)
    assert Accelerator.get(llava, static_cache=True, device_image=True) is session.fast
    assert Accelerator.get(llava, static_cache=True, device_image=True, max_cache_len=None) is session.fast
    assert Accelerator.get(llava, static_cache=True, device_image=False) is not session.fast


def test_cuda_graphs_need_a_gpu(llava):
    from compress.lvlm.session import BatchChatSession

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="CUDA"):
        BatchChatSession(llava, "full", static_cache=True, cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("method,rate", [("full", None), ("metacompress", 0.75), ("fastv", 0.75)])
def test_captured_equals_eager_on_gpu(method, rate):
    """On a GPU (fp32 tiny model): captured prefill/decode/tower/reducer give the eager path's answers; the second
    dialogue replays the graphs the first captured."""
    from compress.metacompress import MetaCompress

    adapter = tiny_adapter("llava", seed=0)
    adapter.model.to("cuda")
    module = MetaCompress(adapter.text_config.hidden_size, compress_dim=16).eval().to("cuda")
    images = [random_image(32, 32, seed=1)]
    eager, _ = dialogue(adapter, method, rate, images, {}, module)
    options = dict(FAST, cuda_graphs=True)
    for _ in range(2):
        fast, session = dialogue(adapter, method, rate, images, options, module)
        assert_same(eager, fast, atol=1e-3)
    assert len(session.fast.graphs) > 0
