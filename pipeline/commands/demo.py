"""`metacompress demo`: the reducers on random LLaVA-1.5-shaped features, as a table (needs no model)."""

from __future__ import annotations


def run_demo(args) -> None:
    import torch

    from compress.baselines import FEATURE_REDUCERS
    from compress.layout import Layout
    from compress.metacompress import MetaCompress
    from compress.reduction import num_keep

    torch.manual_seed(args.seed)
    side, d = 24, args.hidden_size
    x = torch.randn(side * side, d)
    layout = Layout.grid(side, side)
    reducers = dict(FEATURE_REDUCERS, metacompress=MetaCompress(d, compress_dim=min(256, d)).eval())
    print(f"Reducing a {side}x{side} grid of random {d}-d features (LLaVA-1.5 shape, n = {side * side}).")
    print(f"{'method':<14}{'rate':>6}{'kept':>6}{'rel. error of mean token':>27}")
    for rate in args.rates:
        m = num_keep(x.shape[0], rate)
        for name, reduce in reducers.items():
            with torch.no_grad():
                out = reduce(x, m, layout).tokens
            err = (out.mean(0) - x.mean(0)).norm() / x.mean(0).norm()
            print(f"{name:<14}{rate:>6.2f}{out.shape[0]:>6}{err.item():>27.3f}")


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run every feature reducer on random features (no model needed)")
    p.add_argument("--rates", type=float, nargs="+", default=[0.7, 0.9])
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_demo)
