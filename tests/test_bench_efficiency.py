"""`metacompress bench efficiency` at --arch tiny, end to end in-process: rows, FLOPs against a hand count, visual
token budgets, forced decode length, repeat counting, and the summaries recomputed from the recorded samples."""

from __future__ import annotations

import argparse
import json
import statistics

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

METHODS, RATES, TURNS, REPEATS, WARMUP, NEW_TOKENS = ["full", "sample", "metacompress", "fastv"], [0.7, 0.9], 2, 2, 1, 3


def parse(argv: list[str]):
    from pipeline.commands.bench_efficiency import register

    parser = argparse.ArgumentParser(prog="metacompress bench")
    register(parser.add_subparsers(dest="bench", required=True))
    return parser.parse_args(argv)


def hand_prefill_flops(cfg, layer_lengths) -> int:
    """Llama prefill FLOPs counted by hand for multi-head attention: q,k,v,o projections, scores + weighted sum,
    gate/up/down MLP per layer, and the LM head at the last position."""
    d, inter, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    total = sum(8 * q * d * d + 4 * q * kv * d + 6 * q * d * inter for q, kv in layer_lengths)
    return total + 2 * d * vocab


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One in-process run; counts the dialogues actually started (set_images calls)."""
    from compress.lvlm.session import BatchChatSession

    out = tmp_path_factory.mktemp("bench") / "eff.json"
    args = parse(["efficiency", "--arch", "tiny", "--methods", ",".join(METHODS), "--rates", "0.7,0.9",
                  "--turns", str(TURNS), "--repeats", str(REPEATS), "--warmup", str(WARMUP),
                  "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu", "--out", str(out)])
    calls = []
    original = BatchChatSession.set_images

    def counting(self, images):
        calls.append(1)
        return original(self, images)

    BatchChatSession.set_images = counting
    try:
        assert args.func(args) == 0
    finally:
        BatchChatSession.set_images = original
    return json.loads(out.read_text()), len(calls)


def test_every_row_and_dialogue_is_there(bench):
    report, dialogues = bench
    rows = {(r["method"], r["rate"]) for r in report["rows"]}
    expected = {("full", None)} | {(m, r) for m in METHODS[1:] for r in RATES}
    assert rows == expected and len(report["rows"]) == len(expected)
    assert dialogues == (REPEATS + WARMUP) * len(expected)  # warm-up dialogues run but are not recorded
    for row in report["rows"]:
        assert len(row["samples"]) == REPEATS
        for sample in row["samples"]:
            assert [t["turn"] for t in sample["turns"]] == list(range(1, TURNS + 1))
            assert all(t["new_tokens"] == NEW_TOKENS for t in sample["turns"])  # EOS ignored: forced length
            assert sample["vision_ms"] > 0 and sample["prefill_ms"] > 0
            assert 0 < sample["preprocess_ms"] <= sample["vision_ms"]  # preprocessing is inside vision_s


def test_visual_tokens_and_prefill_flops_match_a_hand_count(bench):
    from infra.architectures import build_adapter, build_config

    report, _ = bench
    cfg = build_config("tiny").text_config
    n = (64 // 4) ** 2  # tiny: 64x64 image, 4x4 patches
    text = len(build_adapter("tiny").segment_ids(report["questions"][:1])[0]) - 1  # minus the image placeholder
    layers, k = cfg.num_hidden_layers, report["fastv_k"]
    base = hand_prefill_flops(cfg, [(text + n, text + n)] * layers)
    rows = {(r["method"], r["rate"]): r for r in report["rows"]}
    assert report["visual_tokens_full"] == rows[("full", None)]["visual_tokens"] == n
    assert rows[("full", None)]["prefill_tflops"] * 1e12 == pytest.approx(base, rel=1e-12)
    for (method, rate), row in rows.items():
        if rate is None:
            continue
        m = max(1, round(n * (1 - rate)))
        assert row["visual_tokens"] == m, (method, rate)
        if method == "fastv":  # layers 0..K-1 see everything, pruning happens after layer K-1
            lengths = [(text + n, text + n)] * k + [(text + m, text + m)] * (layers - k)
        else:
            lengths = [(text + m, text + m)] * layers
        flops = hand_prefill_flops(cfg, lengths)
        assert row["prefill_tflops"] * 1e12 == pytest.approx(flops, rel=1e-12), (method, rate)
        assert row["flops_ratio"] == pytest.approx(base / flops, rel=1e-9)


def test_summaries_recomputed_from_the_samples(bench):
    report, _ = bench
    rows = {(r["method"], r["rate"]): r for r in report["rows"]}
    base = rows[("full", None)]
    for row in report["rows"]:
        samples = row["samples"]
        for s in samples:  # per-dialogue figures from the per-turn stats
            turns = s["turns"]
            assert s["ttft_ms"] == pytest.approx(1e3 * turns[0]["ttft_s"])
            assert s["later_ttft_ms"] == pytest.approx(1e3 * statistics.mean(t["ttft_s"] for t in turns[1:]))
            steps = sum(t["new_tokens"] - 1 for t in turns)
            assert s["decode_ms_per_token"] == pytest.approx(1e3 * sum(t["decode_s"] for t in turns) / steps)
            assert s["e2e_ms"] >= 1e3 * sum(t["total_s"] for t in turns)  # wall clock holds every turn
            assert s["reduce_share"] == pytest.approx(turns[0]["reduce_s"] / turns[0]["ttft_s"])
        for key, summary in row["summary"].items():
            values = [s[key] for s in samples]
            q = torch.quantile(torch.tensor(values, dtype=torch.float64), torch.tensor([0.25, 0.5, 0.75],
                                                                                        dtype=torch.float64))
            assert summary["n"] == REPEATS
            assert summary["mean"] == pytest.approx(statistics.mean(values), rel=1e-12)
            assert summary["std"] == pytest.approx(statistics.stdev(values), rel=1e-9)
            assert summary["median"] == pytest.approx(float(q[1]), rel=1e-9)
            assert summary["iqr"] == pytest.approx(float(q[2] - q[0]), rel=1e-9, abs=1e-12)
        speedup = statistics.mean(s["ttft_ms"] for s in base["samples"]) / statistics.mean(
            s["ttft_ms"] for s in samples)
        assert row["ttft_speedup"] == pytest.approx(speedup, rel=1e-9)
        assert row["speedup_over_flops_ratio"] == pytest.approx(speedup / row["flops_ratio"], rel=1e-9)
    assert base["ttft_speedup"] == base["flops_ratio"] == 1.0


def test_markdown_table_has_one_line_per_row(bench):
    from pipeline.commands.bench_efficiency import markdown

    report, _ = bench
    text = markdown(report)
    lines = [ln for ln in text.splitlines() if ln.startswith("| ") and "---" not in ln]
    assert len(lines) == 2 * (len(report["rows"]) + 1)  # Table 2 and the breakdown, each with its header
    for row in report["rows"]:
        name = "Base" if row["method"] == "full" else row["method"]
        rate = "-" if row["rate"] is None else str(row["rate"])
        hits = [ln for ln in lines if ln.startswith(f"| {name} | {rate} | {row['visual_tokens']} |")]
        assert len(hits) == 1 and f"{row['ttft_speedup']:.2f}" in hits[0]


def test_tiny_next_counts_newline_tokens():
    """The LLaVA-NeXT path: a 64x64 image gives 16 base tokens + a 16x16 crop grid with 16 newlines."""
    from pipeline.commands.bench_efficiency import run_benchmark

    report = run_benchmark("tiny-next", ["full", "sample"], [0.9], turns=1, repeats=1, warmup=0, max_new_tokens=2)
    full, sample = report["rows"]
    assert full["visual_tokens"] == report["visual_tokens_full"] == 8 * 8 + 16 * 17
    assert sample["visual_tokens"] == round(0.1 * (8 * 8 + 16 * 17))


@pytest.mark.parametrize("flag,value,needle", [("--rates", "0.7,1.2", "--rates"), ("--methods", "full,nope", "nope"),
                                               ("--arch", "llava-99b", "llava-99b"), ("--repeats", "0", "--repeats"),
                                               ("--image-size", "336", "--image-size")])
def test_bad_arguments_fail_before_any_model_is_built(flag, value, needle, monkeypatch):
    import infra.architectures as arch

    monkeypatch.setattr(arch, "build_adapter", lambda *a, **k: pytest.fail("model built before validation"))
    args = parse(["efficiency", flag, value])
    with pytest.raises(ValueError, match=needle):
        args.func(args)


def test_real_architectures_have_the_published_parameter_counts():
    """Built on the meta device (no memory): Llama-2-7B has 6,738,415,616 parameters with a 32000 vocabulary
    (llava-hf adds 64 rows to embeddings and head), CLIP ViT-L/14-336's vision model 303,507,456, and the 2-layer
    projector 1024*4096 + 4096 + 4096*4096 + 4096."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    from infra.architectures import build_config

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    for name, cls in (("llava-1.5-7b", LlavaForConditionalGeneration),
                      ("llava-next-7b", LlavaNextForConditionalGeneration)):
        with torch.device("meta"):
            model = cls(build_config(name))
        assert count(model.model.language_model) + count(model.lm_head) == 6_738_415_616 + 2 * 64 * 4096
        assert count(model.model.vision_tower) == 303_507_456
        assert count(model.model.multi_modal_projector) == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
        assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    assert model.config.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def test_fast_path_and_roofline_rows():
    """--paths eager,fast --roofline: every configuration on both paths with the same tokens and FLOPs; each phase
    has a positive bound and measured / bound; the speed-ups are per path; the markdown carries the tables."""
    from pipeline.commands.bench_efficiency import PHASES, markdown, run_benchmark

    report = run_benchmark("tiny", ["full", "sample", "metacompress", "fastv"], [0.9], turns=2, repeats=1, warmup=1,
                           max_new_tokens=2, paths=["eager", "fast"], roofline=True)
    rows = {(r["path"], r["method"], r["rate"]): r for r in report["rows"]}
    assert len(rows) == 8 and report["peaks"]["peak_flops"] > 0 and report["peaks"]["bandwidth"] > 0
    assert report["graphs"] == {"captured": 0, "failed": {}}  # CPU: no CUDA graphs
    for (path, method, rate), row in rows.items():
        eager = rows[("eager", method, rate)]
        assert row["visual_tokens"] == eager["visual_tokens"] and row["prefill_tflops"] == eager["prefill_tflops"]
        assert row["new_tokens"] == eager["new_tokens"]
        assert (row["roofline"]["reducer"] is None) == (method in ("full", "fastv"))
        for phase, _ in PHASES:
            cell = row["roofline"][phase]
            if cell is None:
                continue
            assert cell["bound_ms"] > 0 and cell["ratio"] == pytest.approx(cell["measured_ms"] / cell["bound_ms"])
        parts = [row["roofline"][p]["bound_ms"] for p in ("preprocessing", "tower", "reducer", "prefill")
                 if row["roofline"][p] is not None]
        assert row["roofline"]["ttft"]["bound_ms"] == pytest.approx(sum(parts))
        base = rows[(path, "full", None)]
        mean = row["summary"]["ttft_ms"]["mean"]
        assert row["ttft_speedup"] == pytest.approx(base["summary"]["ttft_ms"]["mean"] / mean)
        assert row["roofline_speedup"] == pytest.approx(base["roofline"]["ttft"]["bound_ms"]
                                                        / row["roofline"]["ttft"]["bound_ms"])
        if path == "fast":
            assert row["fast_speedup"] == pytest.approx(eager["summary"]["ttft_ms"]["mean"]
                                                        / row["summary"]["ttft_ms"]["mean"])
    # fewer tokens, fewer FLOPs and bytes: a smaller bound
    assert rows[("eager", "sample", 0.9)]["roofline_speedup"] > 1
    text = markdown(report)
    assert "Roofline on" in text and "| fast | metacompress | 0.9 |" in text and "sample (fast)" in text


def test_bad_paths_fail_before_any_model_is_built(monkeypatch):
    import infra.architectures as arch

    monkeypatch.setattr(arch, "build_adapter", lambda *a, **k: pytest.fail("model built before validation"))
    args = parse(["efficiency", "--paths", "eager,turbo"])
    with pytest.raises(ValueError, match="--paths"):
        args.func(args)
