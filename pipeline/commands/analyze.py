"""``metacompress analyze``: ``oracle`` (the per-image oracle analysis, pipeline.commands.analyze_oracle) and
``compressor`` (what a trained compressor does, pipeline.commands.analyze_compressor); docs/design.md §4.3."""

from __future__ import annotations

import argparse

from pipeline.commands.analyze_compressor import COMPRESSOR_DOC, run_compressor
from pipeline.commands.analyze_oracle import DEFAULT_METHODS, run_oracle


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("analyze", help="analyses of the paper (the per-image oracle)",
                              description="Analyses of the paper. 'analyze oracle': section 4, figures 1 and 5. "
                                          "'analyze compressor': what a trained MetaCompress does.")
    sub = p.add_subparsers(dest="analysis", metavar="ANALYSIS")
    o = sub.add_parser("oracle", help="fit the per-image oracle and compare it with the methods and attention",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    o.add_argument("--model", required=True, help="local LLaVA / LLaVA-NeXT checkpoint directory")
    o.add_argument("--dialogues", required=True, help="dialogues.jsonl (docs/design.md §3)")
    o.add_argument("--rate", type=float, required=True, help="share of visual tokens removed, in (0, 1)")
    o.add_argument("--n", type=int, default=8, help="number of dialogues (the first N of the file)")
    o.add_argument("--steps", type=int, default=500, help="SGD steps of the oracle (paper: 500)")
    o.add_argument("--lr", type=float, default=10.0, help="SGD learning rate of the oracle (paper: 10)")
    o.add_argument("--entropy-weight", type=float, default=1.0)
    o.add_argument("--init", choices=("random", "pool"), default="random",
                   help="oracle start: near-uniform rows (paper) or MetaCompress's pooling windows")
    o.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="oracle optimizer (paper: sgd)")
    o.add_argument("--topk", type=int, default=64, help="L_pred over the teacher's top-k ids plus the tail bucket "
                                                        "(docs/design.md §3); 0: KL over the full vocabulary")
    o.add_argument("--compressor", default=None, help="trained MetaCompress directory (adds the metacompress row)")
    o.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated baselines to compare")
    o.add_argument("--keep-rule", choices=("argmax", "mass"), default="argmax",
                   help="a token is kept when it is the argmax of some row of P, or among the m largest column masses")
    o.add_argument("--top-fraction", type=float, default=0.1, help="'top-attended' = each image's top share")
    o.add_argument("--cls-layer", type=int, default=-1, help="CLIP encoder layer of the [CLS] attention")
    o.add_argument("--fastv-k", type=int, default=2, help="FastV ranks with LLM layer K-1")
    o.add_argument("--max-new-tokens", type=int, default=16)
    o.add_argument("--no-vqa-suffix", action="store_true")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    o.add_argument("--out", default="analysis/oracle", help="output directory")
    o.set_defaults(func=run_oracle)
    c = sub.add_parser("compressor", help="what a trained MetaCompress does: P's rows, where its mass goes, KL per "
                                          "turn, distance to the per-image oracle, training curves",
                       description=COMPRESSOR_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--model", required=True, help="local LLaVA / LLaVA-NeXT checkpoint directory")
    c.add_argument("--compressor", required=True, help="trained MetaCompress directory")
    c.add_argument("--dialogues", required=True, help="dialogues.jsonl (docs/design.md §3)")
    c.add_argument("--rate", type=float, required=True, help="share of visual tokens removed, in (0, 1)")
    c.add_argument("--n", type=int, default=16, help="number of dialogues (the first N of the file)")
    c.add_argument("--oracle-steps", type=int, default=0,
                   help="fit the per-image oracle for this many SGD steps and measure P's distance to it (0: skip)")
    c.add_argument("--lr", type=float, default=10.0, help="SGD learning rate of the oracle (paper: 10)")
    c.add_argument("--topk", type=int, default=64, help="the oracle's L_pred over the teacher's top-k ids")
    c.add_argument("--methods", default="sample", help="comma-separated baselines to compare (KL and accuracy)")
    c.add_argument("--curves", default=None, help="training log (JSON lines of step metrics); default: "
                                                  "train_log.jsonl in the compressor directory when present")
    c.add_argument("--max-new-tokens", type=int, default=8)
    c.add_argument("--no-vqa-suffix", action="store_true")
    c.add_argument("--fastv-k", type=int, default=2)
    c.add_argument("--seed", type=int, default=0, help="seed of the freshly initialised compressor (the 'init' row)")
    c.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    c.add_argument("--out", default="analysis/compressor", help="output directory")
    c.set_defaults(func=run_compressor)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    return p
