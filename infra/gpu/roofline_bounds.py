"""Roofline bounds of Table 2's phases for a real architecture on a GPU given by its sheet figures, computed on any
machine (the model is built on the meta device: no memory, no GPU). The bench's ``--roofline`` measures the same
bounds with probed peaks; this gives them where no GPU is at hand.

    python infra/gpu/roofline_bounds.py --arch llava-1.5-7b --tflops 989 --tbs 3.35 --h2d-gbs 50
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
QUESTION = "What is the color of the car on the left side of the picture?"  # Table 2's first question (bench)


def main(argv: list[str] | None = None) -> int:
    import torch

    from compress.flops import llama_prefill_flops, metacompress_flops
    from compress.lvlm.roofline import DevicePeaks, phase_bounds, tower_work
    from compress.reduction import num_keep
    from infra.architectures import build_adapter, get_architecture

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="llava-1.5-7b")
    p.add_argument("--tflops", type=float, default=989.0, help="bf16 dense peak, TFLOP/s")
    p.add_argument("--tbs", type=float, default=3.35, help="memory bandwidth, TB/s")
    p.add_argument("--h2d-gbs", type=float, default=50.0, help="host-to-device bandwidth, GB/s")
    p.add_argument("--rates", default="0.7,0.9")
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--fastv-k", type=int, default=2)
    p.add_argument("--compress-dim", type=int, default=256)
    args = p.parse_args(argv)

    arch = get_architecture(args.arch)
    ad = build_adapter(arch.name, device="meta", dtype=torch.bfloat16)
    peaks = DevicePeaks(f"sheet: {args.tflops:g} TFLOP/s, {args.tbs:g} TB/s, {args.h2d_gbs:g} GB/s host link",
                        args.tflops * 1e12, args.tbs * 1e12, args.h2d_gbs * 1e9)
    h, w = arch.image_size
    if arch.family == "llava":
        pv = torch.empty(1, 3, 336, 336, device="meta", dtype=ad.dtype)
        n = ad.layout().num_tokens
    else:
        pv = torch.empty(1, 5, 3, 336, 336, device="meta", dtype=ad.dtype)
        n = ad.layout((h, w)).num_tokens
    tower = tower_work(ad, pv)
    cfg, d = ad.text_config, ad.text_config.hidden_size
    text = len(ad.segment_ids([QUESTION])[0]) - 1
    fed = args.max_new_tokens - 1
    layers = cfg.num_hidden_layers
    print(f"### {arch.name}: {n} visual tokens, {text} text tokens, {peaks.name}\n")
    print("| method | rate | preprocessing | tower | reducer | prefill | decode | TTFT |\n" + "|---" * 8 + "|")
    rows = [("full", None)] + [(m, float(r)) for r in args.rates.split(",") for m in ("sample", "metacompress",
                                                                                        "fastv")]
    for method, rate in rows:
        m = n if rate is None else num_keep(n, rate)
        if method == "fastv":
            lengths = [(text + n, text + n)] * args.fastv_k + [(text + m, text + m)] * (layers - args.fastv_k)
        else:
            lengths = [(text + m, text + m)] * layers
        kv = sum(q for q, _ in lengths) / layers
        reducer = None
        if method in ("sample", "metacompress"):
            flops = metacompress_flops(n, m, d, args.compress_dim) if method == "metacompress" else 0
            weights = (d * 2 * args.compress_dim + 576 * d) * 2 if method == "metacompress" else 0
            reducer = (flops, (n + m) * d * 2 + weights)
        b = phase_bounds(ad, peaks, image_hw=(h, w), pixel_values=pv, tower=tower, reducer=reducer,
                         prefill_flops=llama_prefill_flops(cfg, 0, layer_lengths=lengths), prefill_kv=kv,
                         decode_kv=kv + fed / 2)
        cells = " | ".join("-" if b[k] is None else f"{b[k]['bound_ms']:.3f}"
                           for k in ("preprocessing", "tower", "reducer", "prefill", "decode", "ttft"))
        print(f"| {'Base' if method == 'full' else method} | {'-' if rate is None else rate} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
