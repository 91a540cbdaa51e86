"""``metacompress bench efficiency``: the paper's Table 2 (time to first token, end-to-end time, memory, prefill
FLOPs) on real LVLM architectures with random weights (``infra.architectures``).

    metacompress bench efficiency --arch llava-1.5-7b --methods full,sample,metacompress,fastv --rates 0.9 \\
        --turns 3 --repeats 10 --warmup 2 --device cuda --out table2.md

Every method x rate runs the same multi-turn dialogue (LLaVA system prompt, GQA-style questions with the VQA
suffix, one random-pixel image of the architecture's size). EOS is ignored so every method decodes exactly
``--max-new-tokens`` tokens per turn. Dialogues are interleaved round-robin over the configurations (warm-up rounds
first, not recorded), so a slow phase of a shared machine hits every method alike. Figures per dialogue:

- TTFT: turn 1 time to first token = vision tower (with image preprocessing) + reducer + prefill (TurnStats.ttft_s);
  later-turn TTFT: the mean over turns 2..T (cached prefix, no vision tower).
- decode ms/token: decode time of all turns / decoding steps (a turn of k tokens takes k - 1 steps: the first token
  comes from the prefill).
- E2E: wall clock of the whole dialogue (image, every turn, tokenisation included).
- peak memory: CUDA peak allocated bytes over the dialogue (weights included); on CPU the process's peak RSS.
- prefill TFLOPs: analytic (compress.flops), turn 1; the FLOPs ratio is Base's over the method's.
- breakdown of turn-1 TTFT: image preprocessing (PIL, host), vision tower + projector, reducer, prefill.
- reducer: TurnStats.reduce_s of turn 1 (for vision-tower methods: the reduced tower + projector; FastV prunes
  inside the prefill and reports 0) and its share of TTFT.
Mean and spread (sample std, and the IQR with linear interpolation) are over the recorded repeats.

``--paths eager,fast``: every configuration also on the fast path (issue 22, ``compress.lvlm.accel``): static KV
cache with prompts padded to length buckets, CUDA graphs for prefill and decode (on a GPU), preprocessing and vision
tower on the device, fused reducers. Warm-up dialogues capture the graphs (``--warmup`` >= 1). Speed-ups are against
Base on the same path. ``--roofline``: probe the device (matrix product, copy, host-to-device copy) and give each
phase's lower bound max(FLOPs / peak, bytes / bandwidth) beside the measured time (``compress.lvlm.roofline``), the
roofline speed-up beside the measured one, and the issue's targets.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

QUESTIONS = [  # GQA-style; the adapter appends "Answer the question using a single word or phrase."
    "What is the color of the car on the left side of the picture?",
    "Is the man to the left or to the right of the bicycle?",
    "What kind of furniture is in front of the window?",
    "Are there both cups and plates in this image?",
    "Which material is the table made of?",
]
PATHS = ("eager", "fast")
PHASES = (("preprocessing", "preprocess_ms"), ("tower", None), ("reducer", "reduce_ms"), ("prefill", "prefill_ms"),
          ("decode", "decode_ms_per_token"), ("ttft", "ttft_ms"))
METRICS = ("ttft_ms", "later_ttft_ms", "decode_ms_per_token", "e2e_ms", "peak_memory_gb", "preprocess_ms",
           "vision_ms", "reduce_ms", "prefill_ms", "reduce_share")


def register(which) -> argparse.ArgumentParser:
    """Add ``efficiency`` to the ``bench`` sub-parsers object ``which``."""
    p = which.add_parser("efficiency", help="Table 2: TTFT, decode, end-to-end time, memory, prefill FLOPs per method",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="tiny", help="tiny, tiny-next, llava-1.5-7b, llava-1.5-13b, llava-next-7b")
    p.add_argument("--methods", default="full,sample,metacompress,fastv", help="comma-separated method names")
    p.add_argument("--rates", default="0.7,0.9", help="comma-separated reduction rates in (0, 1)")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5, help="recorded dialogues per method x rate")
    p.add_argument("--warmup", type=int, default=1, help="unrecorded dialogues per method x rate before")
    p.add_argument("--max-new-tokens", type=int, default=4, help="tokens decoded per turn (EOS ignored)")
    p.add_argument("--image-size", default=None, help="HxW of the random image (default: the architecture's)")
    p.add_argument("--compress-dim", type=int, default=256, help="MetaCompress key/query width (untrained module)")
    p.add_argument("--fastv-k", type=int, default=2, help="FastV ranks with layer K-1")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--decoder-layers", type=int, default=None,
                   help="smoke test only: a shallower decoder of the real width (FLOPs follow this depth)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                   help="attention kernel (the decoder driver passes 4-D additive masks, which FlashAttention-2 "
                        "does not take; SDPA picks its flash/efficient kernels itself)")
    p.add_argument("--paths", default="eager", help="comma-separated: eager (default), fast (see above)")
    p.add_argument("--roofline", action="store_true", help="probe the device and report each phase's roofline bound")
    p.add_argument("--out", default=None, help="write the report: FILE.json (everything) or FILE.md (tables)")
    p.set_defaults(func=run)
    return p


def _csv(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"{what} is empty; give a comma-separated list")
    return items


def run(args: argparse.Namespace) -> int:
    """Validate the arguments (before any model is built), run the benchmark, print and write the report."""
    from compress.lvlm.methods import available_methods
    from infra.architectures import get_architecture

    arch = get_architecture(args.arch)
    methods = _csv(args.methods, "--methods")
    unknown = [m for m in methods if m not in available_methods()]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; known: {', '.join(sorted(available_methods()))}")
    try:
        rates = [float(r) for r in _csv(args.rates, "--rates")]
    except ValueError as err:
        raise ValueError(f"--rates {args.rates!r}: {err}") from err
    paths = _csv(args.paths, "--paths")
    if any(p not in PATHS for p in paths):
        raise ValueError(f"--paths {args.paths!r}: choose from {', '.join(PATHS)}")
    if any(not 0.0 < r < 1.0 for r in rates):
        raise ValueError(f"--rates {rates}: every rate is the share of visual tokens removed, in (0, 1)")
    for flag, value, low in (("--turns", args.turns, 1), ("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0),
                             ("--max-new-tokens", args.max_new_tokens, 2),
                             ("--decoder-layers", args.decoder_layers, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} {value} must be at least {low}")
    image_size = arch.image_size
    if args.image_size:
        try:
            image_size = tuple(int(v) for v in args.image_size.lower().split("x"))
            assert len(image_size) == 2 and min(image_size) > 0
        except (ValueError, AssertionError):
            raise ValueError(f"--image-size {args.image_size!r}: expected HxW, e.g. 672x672") from None

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available; use --device cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    report = run_benchmark(arch.name, methods, rates, turns=args.turns, repeats=args.repeats, warmup=args.warmup,
                           max_new_tokens=args.max_new_tokens, image_size=image_size, device=device, dtype=dtype,
                           attn=args.attn, compress_dim=args.compress_dim, fastv_k=args.fastv_k,
                           decoder_layers=args.decoder_layers, command="metacompress " + " ".join(sys.argv[1:]),
                           paths=paths, roofline=args.roofline)
    text = markdown(report)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) if out.suffix == ".json" else text)
        print(f"report written to {out}", file=sys.stderr)
    return 0


def configurations(methods: list[str], rates: list[float]) -> list[tuple[str, float | None]]:
    """(method, rate) pairs: Base ("full", None) once first when asked for, then every other method at every rate."""
    out = [("full", None)] if "full" in methods else []
    return out + [(m, r) for r in rates for m in methods if m != "full"]


def run_benchmark(arch_name: str, methods: list[str], rates: list[float], *, turns: int, repeats: int, warmup: int,
                  max_new_tokens: int, image_size: tuple[int, int] | None = None, device: str = "cpu", dtype=None,
                  attn: str = "sdpa", compress_dim: int = 256, fastv_k: int = 2, seed: int = 0,
                  decoder_layers: int | None = None, command: str = "", paths: tuple | list = ("eager",),
                  roofline: bool = False) -> dict:
    """Build the architecture, run ``warmup`` + ``repeats`` dialogues per configuration and path, round-robin.
    Returns the report: settings, and per configuration the recorded samples (per-turn TurnStats included) and
    summaries; with ``roofline`` the device's peaks and each row's phase bounds."""
    import torch

    from compress.lvlm.methods import get_method
    from compress.metacompress import MetaCompress
    from infra.architectures import build_adapter, get_architecture, random_image

    arch = get_architecture(arch_name)
    adapter = build_adapter(arch.name, device=device, dtype=dtype, attn_implementation=attn, seed=seed,
                            decoder_layers=decoder_layers)
    adapter.stop_ids = set()  # random weights may emit EOS: every method must decode the same number of tokens
    hidden = adapter.text_config.hidden_size
    # The model's dtype on a GPU; fp32 on CPU, where bf16 kernels are emulated and would misrepresent the reducer.
    compressor_dtype = adapter.dtype if adapter.device.type == "cuda" else torch.float32
    compressor = MetaCompress(hidden, compress_dim=compress_dim).eval().requires_grad_(False).to(
        adapter.device, compressor_dtype)
    image = random_image(*(image_size or arch.image_size), seed=seed)
    questions = [QUESTIONS[t % len(QUESTIONS)] for t in range(turns)]
    configs = [(m, r, path) for path in paths for m, r in configurations(methods, rates)]
    bound = {c: get_method(c[0], compressor if c[0] == "metacompress" else None) for c in configs}
    samples: dict[tuple, list[dict]] = {c: [] for c in configs}
    fast = fast_options(adapter.device)
    with torch.no_grad():
        for round_index in range(warmup + repeats):
            shift = round_index % len(configs)  # rotate the order so no method always runs first
            for config in configs[shift:] + configs[:shift]:
                try:
                    sample = run_dialogue(adapter, bound[config], config[1], image, questions, max_new_tokens,
                                          fastv_k, fast if config[2] == "fast" else None)
                except (RuntimeError, ValueError, NotImplementedError) as err:
                    raise ValueError(f"method {config[0]} at rate {config[1]} ({config[2]} path) failed on "
                                     f"{arch.name}: {err}") from err
                if round_index >= warmup:
                    samples[config].append(sample)
    rows = [dict(summarize_row(method, rate, samples[(method, rate, path)]), kind=bound[(method, rate, path)].kind,
                 path=path) for method, rate, path in configs]
    for path in paths:
        add_ratios([r for r in rows if r["path"] == path])
    peaks = add_roofline(adapter, rows, bound, image) if roofline else None
    graphs = None
    if "fast" in paths:
        from compress.lvlm.accel import Accelerator

        g = Accelerator.get(adapter, **fast).graphs
        graphs = {"captured": len(g), "failed": {str(k): v for k, v in g.failed.items()}}
    return {"paths": list(paths), "peaks": peaks, "fast_options": fast if "fast" in paths else None,
            "graphs": graphs,
            "arch": arch.name, "description": arch.description, "family": arch.family, "command": command,
            "device": device_name(device), "dtype": str(adapter.dtype).replace("torch.", ""), "attention": attn,
            "torch": torch.__version__, "turns": turns, "repeats": repeats, "warmup": warmup,
            "max_new_tokens": max_new_tokens, "image_size": list(image_size or arch.image_size),
            "questions": questions, "fastv_k": fastv_k, "compress_dim": compress_dim,
            "compressor_dtype": str(compressor_dtype).replace("torch.", ""),
            "decoder_layers": adapter.text_config.num_hidden_layers,
            "decoder_layers_reduced": decoder_layers is not None,
            "visual_tokens_full": adapter.prepare(image).layout.num_tokens, "rows": rows}


def fast_options(device) -> dict:
    """The session options of the fast path: everything, CUDA graphs on a GPU only."""
    return dict(static_cache=True, cuda_graphs=device.type == "cuda", device_image=True, fused_reducer=True)


def run_dialogue(adapter, method, rate, image, questions: list[str], max_new_tokens: int, fastv_k: int,
                 fast: dict | None = None) -> dict:
    """One dialogue -> its per-dialogue figures and per-turn TurnStats (dicts). ``fast``: fast-path options."""
    from compress.lvlm.efficiency import clock, peak_memory_bytes, reset_peak_memory
    from compress.lvlm.session import ChatSession

    dev = adapter.device
    session = ChatSession(adapter, method, rate, max_new_tokens=max_new_tokens, fastv_k=fastv_k, **(fast or {}))
    preprocess: list[float] = []
    owner = session.batch.fast if fast and fast["device_image"] else adapter  # whose prepare the session calls
    prepare = owner.prepare

    def timed_prepare(img):  # image preprocessing (PIL, on the host) is part of vision_s: time it on its own
        t = clock(dev)
        out = prepare(img)
        preprocess.append(clock(dev) - t)
        return out

    owner.prepare = timed_prepare  # an instance attribute shadowing the method; removed below
    try:
        reset_peak_memory(dev)
        start = clock(dev)
        session.set_image(image)
        peak = peak_memory_bytes(dev)  # ask() resets the CUDA peak at each prefill: keep the vision tower's
        stats = [session.ask(q).stats for q in questions]
        e2e = clock(dev) - start
    finally:
        del owner.prepare
    first = stats[0]
    steps = sum(max(s.new_tokens - 1, 0) for s in stats)
    return {
        "ttft_ms": 1e3 * first.ttft_s,
        "later_ttft_ms": 1e3 * sum(s.ttft_s for s in stats[1:]) / (len(stats) - 1) if len(stats) > 1 else None,
        "decode_ms_per_token": 1e3 * sum(s.decode_s for s in stats) / steps if steps else None,
        "e2e_ms": 1e3 * e2e,
        "peak_memory_gb": max([peak] + [s.peak_memory_bytes for s in stats]) / 1e9,
        "preprocess_ms": 1e3 * sum(preprocess), "vision_ms": 1e3 * first.vision_s,
        "reduce_ms": 1e3 * first.reduce_s, "prefill_ms": 1e3 * first.prefill_s,
        "reduce_share": first.reduce_s / first.ttft_s,
        "turns": [s.to_dict() for s in stats],
    }


def spread(values: list[float]) -> dict:
    """mean, sample std (0 for one value), median, quartiles (linear interpolation) and IQR of ``values``."""
    xs = sorted(values)
    n = len(xs)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0

    def quantile(q: float) -> float:
        pos = q * (n - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, n - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    q1, med, q3 = quantile(0.25), quantile(0.5), quantile(0.75)
    return {"n": n, "mean": mean, "std": std, "median": med, "q1": q1, "q3": q3, "iqr": q3 - q1}


def summarize_row(method: str, rate: float | None, samples: list[dict]) -> dict:
    """Per-metric spreads over the samples; FLOPs, tokens and visual tokens are deterministic (turn 1 / dialogue)."""
    first = samples[0]["turns"]
    summary = {k: spread([s[k] for s in samples]) for k in METRICS if samples[0][k] is not None}
    return {"method": method, "rate": rate, "visual_tokens": first[0]["visual_tokens"],
            "prefill_tokens": first[0]["prefill_tokens"], "prefill_tflops": first[0]["prefill_flops"] / 1e12,
            "dialogue_prefill_tflops": sum(t["prefill_flops"] for t in first) / 1e12,
            "new_tokens": [t["new_tokens"] for t in first], "summary": summary, "samples": samples}


def add_ratios(rows: list[dict]) -> None:
    """Against Base (when measured): prefill-FLOPs ratio, TTFT and E2E speed-ups, speed-up / FLOPs ratio."""
    base = next((r for r in rows if r["method"] == "full"), None)
    for row in rows:
        if base is None:
            continue
        row["flops_ratio"] = base["prefill_tflops"] / row["prefill_tflops"]
        row["ttft_speedup"] = base["summary"]["ttft_ms"]["mean"] / row["summary"]["ttft_ms"]["mean"]
        row["e2e_speedup"] = base["summary"]["e2e_ms"]["mean"] / row["summary"]["e2e_ms"]["mean"]
        row["speedup_over_flops_ratio"] = row["ttft_speedup"] / row["flops_ratio"]


def add_roofline(adapter, rows: list[dict], bound: dict, image) -> dict:
    """Probe the device; per row, each phase's work, roofline bound and measured / bound (``row["roofline"]``), the
    roofline TTFT speed-up against Base, the TTFT against Sample's at the same rate, and fast against eager."""
    import torch

    from compress.lvlm import roofline as rl
    from compress.lvlm.session import is_prompt_dependent
    from compress.reduction import num_keep

    peaks = rl.probe(adapter.device, adapter.dtype)
    with torch.no_grad():
        prepared = adapter.prepare(image)
        encoded = adapter.features(prepared)
    tower = rl.tower_work(adapter, prepared.pixel_values)
    x = encoded.tokens
    for row in rows:
        method = bound[(row["method"], row["rate"], row["path"])]
        reducer = None
        if method.kind == "feature" and not is_prompt_dependent(method):
            m = num_keep(x.shape[0], row["rate"])
            weights = rl.param_bytes(method.fn) if isinstance(method.fn, torch.nn.Module) else 0
            reducer = (rl.count_flops(method.fn, x, m, encoded.layout),
                       rl.tensor_bytes(x) * (1 + m / x.shape[0]) + weights)
        turn = row["samples"][0]["turns"][0]
        fed = max(turn["new_tokens"] - 1, 0)
        written = turn["kv_cache_len"] - fed
        work = rl.phase_bounds(adapter, peaks, image_hw=(image.height, image.width),
                               pixel_values=prepared.pixel_values, tower=tower, reducer=reducer,
                               prefill_flops=turn["prefill_flops"], prefill_kv=written, decode_kv=written + fed / 2)
        mean = {k: v["mean"] for k, v in row["summary"].items()}
        row["roofline"] = {}
        for phase, key in PHASES:
            measured = mean["vision_ms"] - mean["preprocess_ms"] if phase == "tower" else mean.get(key)
            w = work[phase]
            row["roofline"][phase] = None if w is None or measured is None else dict(
                w, measured_ms=measured, ratio=measured / w["bound_ms"] if w["bound_ms"] else None)
    for row in rows:
        same = [r for r in rows if r["path"] == row["path"]]
        base = next((r for r in same if r["method"] == "full"), None)
        ttft = row["roofline"]["ttft"]
        if base is not None:
            row["roofline_speedup"] = base["roofline"]["ttft"]["bound_ms"] / ttft["bound_ms"]
            row["speedup_over_roofline"] = row["ttft_speedup"] / row["roofline_speedup"]
        sample = next((r for r in same if r["method"] == "sample" and r["rate"] == row["rate"]), None)
        if sample is not None:
            row["ttft_over_sample"] = ttft["measured_ms"] / sample["roofline"]["ttft"]["measured_ms"]
        eager = next((r for r in rows if r["path"] == "eager" and r["method"] == row["method"]
                      and r["rate"] == row["rate"]), None)
        if eager is not None and row["path"] != "eager":
            row["fast_speedup"] = eager["roofline"]["ttft"]["measured_ms"] / ttft["measured_ms"]
    return peaks.to_dict()


def roofline_markdown(report: dict) -> list[str]:
    """The roofline tables: per phase measured / bound, then TTFT against the roofline and the issue's targets."""
    pk = report["peaks"]
    spec = (f"; sheet: {pk['spec_flops'] / 1e12:.0f} TFLOP/s, {pk['spec_bandwidth'] / 1e12:.2f} TB/s"
            if pk.get("spec_flops") else "")
    lines = ["", f"Roofline on {pk['name']}: probed {pk['peak_flops'] / 1e12:.3g} TFLOP/s (matrix product), "
             f"{pk['bandwidth'] / 1e12:.2f} TB/s (device copy), {pk['h2d_bandwidth'] / 1e9:.1f} GB/s (host to device)"
             f"{spec}. Cells: measured ms / bound ms = ratio (bound = max(FLOPs / peak, bytes / bandwidth)).", "",
             "| path | method | rate | " + " | ".join(p for p, _ in PHASES) + " |", "|---" * (3 + len(PHASES)) + "|"]
    for r in report["rows"]:
        cells = []
        for phase, _ in PHASES:
            c = r["roofline"][phase]
            cells.append("-" if c is None else f"{c['measured_ms']:.2f} / {c['bound_ms']:.3f} = "
                         + ("-" if c["ratio"] is None else f"{c['ratio']:.1f}x"))
        lines.append(f"| {r['path']} | {'Base' if r['method'] == 'full' else r['method']} | "
                     f"{'-' if r['rate'] is None else r['rate']} | " + " | ".join(cells) + " |")
    lines += ["", "Targets: every phase within 2x of its bound; TTFT speed-up >= 0.8 x the roofline speed-up; reducer "
              "< 1 % of TTFT; MetaCompress TTFT within 5 % of Sample's.", "",
              "| path | method | rate | TTFT ms | TTFT speed-up | roofline speed-up | speed-up / roofline | "
              "worst phase / bound | reducer / TTFT | TTFT / Sample's | eager TTFT / this |", "|---" * 11 + "|"]

    def f(row, key, fmt):
        return "-" if row.get(key) is None else format(row[key], fmt)

    for r in report["rows"]:
        ratios = [c["ratio"] for c in r["roofline"].values() if c is not None and c["ratio"] is not None]
        lines.append(f"| {r['path']} | {'Base' if r['method'] == 'full' else r['method']} | "
                     f"{'-' if r['rate'] is None else r['rate']} | {r['summary']['ttft_ms']['mean']:.2f} | "
                     f"{f(r, 'ttft_speedup', '.2f')} | {f(r, 'roofline_speedup', '.2f')} | "
                     f"{f(r, 'speedup_over_roofline', '.2f')} | {max(ratios):.1f}x | "
                     f"{100 * r['summary']['reduce_share']['mean']:.2f} % | {f(r, 'ttft_over_sample', '.3f')} | "
                     f"{f(r, 'fast_speedup', '.2f')} |")
    return lines


def device_name(device: str) -> str:
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def _ms(summary: dict, key: str) -> str:
    s = summary.get(key)
    return "-" if s is None else f"{s['mean']:.1f} (± {s['std']:.1f})"


def markdown(report: dict) -> str:
    """Table 2 (TTFT, E2E, memory, TFLOPs) with the speed-ups beside the FLOPs ratio, then the TTFT breakdown."""
    mem = "peak GB" if "CPU" not in report["device"] else "peak RSS GB"
    depth = (f" (smoke test: decoder cut to {report['decoder_layers']} layers)" if report["decoder_layers_reduced"]
             else "")
    lines = [f"### {report['arch']}: {report['description']}{depth}", "",
             f"device: {report['device']}; {report['dtype']}, attention {report['attention']}; "
             f"torch {report['torch']}; paths {', '.join(report.get('paths', ['eager']))}; "
             f"{report['turns']} turns x {report['max_new_tokens']} tokens, image {report['image_size'][0]}x"
             f"{report['image_size'][1]}, {report['repeats']} repeats after {report['warmup']} warm-up "
             f"(mean ± std); command: `{report['command']}`", "",
             f"| method | rate | visual tokens | TTFT ms | later-turn TTFT ms | decode ms/token | E2E ms/dialogue "
             f"| {mem} | prefill TFLOPs | FLOPs ratio | TTFT speed-up | speed-up / FLOPs ratio |",
             "|---" * 12 + "|"]
    for r in report["rows"]:
        s = r["summary"]
        ratio = (f"{r['flops_ratio']:.2f} | {r['ttft_speedup']:.2f} | {r['speedup_over_flops_ratio']:.2f}"
                 if "flops_ratio" in r else "- | - | -")
        name = ("Base" if r["method"] == "full" else r["method"]) + _path(r)
        lines.append(f"| {name} | {'-' if r['rate'] is None else r['rate']} | {r['visual_tokens']} | "
                     f"{_ms(s, 'ttft_ms')} | {_ms(s, 'later_ttft_ms')} | {_ms(s, 'decode_ms_per_token')} | "
                     f"{_ms(s, 'e2e_ms')} | {s['peak_memory_gb']['mean']:.2f} | {r['prefill_tflops']:.4g} | {ratio} |")
    lines += ["", "Turn-1 TTFT breakdown (mean ms; reducer share of TTFT; * vision-tower methods: the reducer "
              "column is the reduced tower + projector):", "",
              "| method | rate | preprocessing | vision tower | reducer | prefill | reducer / TTFT |", "|---" * 7 + "|"]
    for r in report["rows"]:
        s = r["summary"]
        star = "*" if r.get("kind") == "vision" else ""
        lines.append(f"| {('Base' if r['method'] == 'full' else r['method'] + star) + _path(r)} | "
                     f"{'-' if r['rate'] is None else r['rate']} "
                     f"| {s['preprocess_ms']['mean']:.2f} "
                     f"| {max(s['vision_ms']['mean'] - s['preprocess_ms']['mean'], 0):.2f} "
                     f"| {s['reduce_ms']['mean']:.2f} | {s['prefill_ms']['mean']:.2f} "
                     f"| {100 * s['reduce_share']['mean']:.2f} % |")
    if report.get("graphs"):
        g = report["graphs"]
        lines += ["", f"Fast path: {report['fast_options']}; {g['captured']} CUDA graphs captured, "
                  f"{len(g['failed'])} captures failed (run eagerly): {g['failed'] or 'none'}"]
    if report.get("peaks"):
        lines += roofline_markdown(report)
    return "\n".join(lines) + "\n"


def _path(row: dict) -> str:
    return "" if row.get("path", "eager") == "eager" else f" ({row['path']})"
