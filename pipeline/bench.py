"""`metacompress bench ...`: benchmarks whose figures go in the README (never timed assertions in tests)."""

from __future__ import annotations

import statistics
import time

# Visual sequences of the 7B models the paper reports on: LLaVA-1.5 (24x24 grid) and LLaVA-NeXT at 672x672
# (24x24 base + 48x47 unpadded crop grid whose 48 rows each end with a newline token: 2880 tokens).
SHAPES = {
    "llava-1.5-7b": {"hidden": 4096, "base": (24, 24), "crops": None},
    "llava-next-7b": {"hidden": 4096, "base": (24, 24), "crops": (48, 47)},
}


def visual_layout(base: tuple[int, int], crops: tuple[int, int] | None):
    from compress.layout import Layout, Segment

    if crops is None:
        return Layout.grid(*base)
    n_base = base[0] * base[1]
    rows, cols = crops
    segments = (Segment("base", *base, 0, base[1]), Segment("crops", rows, cols, n_base, cols + 1))
    newlines = tuple(n_base + r * (cols + 1) + cols for r in range(rows))
    return Layout(n_base + rows * (cols + 1), segments, newlines)


def time_call(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_reducer(args) -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from compress.baselines import FEATURE_REDUCERS
    from compress.flops import LLAMA_7B, llama_prefill_flops, metacompress_flops
    from compress.metacompress import MetaCompress
    from compress.reduction import num_keep

    torch.manual_seed(0)
    print(f"device: cpu, torch threads: {torch.get_num_threads()}, text tokens per prompt: {args.text_tokens}, "
          f"repeats: {args.repeats} (median)")
    header = (f"| shape | n | rate | m | method | reducer ms | reducer GFLOPs (counted / analytic) "
              f"| 7B prefill TFLOPs | reducer / prefill FLOPs |")
    print(header)
    print("|---" * 9 + "|")
    for shape_name, spec in SHAPES.items():
        layout = visual_layout(spec["base"], spec["crops"])
        n, d = layout.num_tokens, spec["hidden"]
        x = torch.randn(n, d)
        module = MetaCompress(d, compress_dim=args.compress_dim).eval()
        methods = {"metacompress": module, "sample": FEATURE_REDUCERS["sample"],
                   "spatial": FEATURE_REDUCERS["spatial"]}
        for rate in args.rates:
            m = num_keep(n, rate)
            prefill = llama_prefill_flops(LLAMA_7B, m + args.text_tokens)
            for name, reduce in methods.items():
                def call():
                    with torch.no_grad():
                        return reduce(x, m, layout)
                seconds = time_call(call, args.repeats)
                with FlopCounterMode(display=False) as counter:
                    call()
                counted = counter.get_total_flops()
                analytic = metacompress_flops(n, m, d, args.compress_dim) if name == "metacompress" else None
                analytic_text = f"{analytic / 1e9:.2f}" if analytic is not None else "-"
                print(f"| {shape_name} | {n} | {rate} | {m} | {name} | {seconds * 1e3:.1f} | "
                      f"{counted / 1e9:.2f} / {analytic_text} | {prefill / 1e12:.2f} | {100 * counted / prefill:.3f} % |")


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks (figures recorded in the README)")
    which = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    p = which.add_parser("reducer", help="reducer time and FLOPs against a 7B Llama prefill, at LLaVA-1.5/NeXT shapes")
    p.add_argument("--rates", type=float, nargs="+", default=[0.7, 0.9])
    p.add_argument("--text-tokens", type=int, default=64, help="prompt text tokens added to the visual ones")
    p.add_argument("--compress-dim", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.set_defaults(func=bench_reducer)
