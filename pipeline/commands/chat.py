"""``metacompress chat``: chat about one image with a compressed LVLM; questions from stdin, one per line.

    metacompress chat --model DIR --method spatial --rate 0.75 --image cat.jpg < questions.txt

Prints each answer followed by the turn's figures (time to first token, decode time, peak memory, prefill FLOPs,
KV-cache length, visual tokens).
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("chat", help="multi-turn chat about an image with a compressed LVLM",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local Hugging Face checkpoint directory (LLaVA or LLaVA-NeXT)")
    p.add_argument("--method", default="full", help="reduction method (full, fastv, random, sample, spatial, "
                                                     "metacompress, tome, prumerge, prumerge_plus, visionzip)")
    p.add_argument("--rate", type=float, default=None, help="share of visual tokens removed, in (0, 1)")
    p.add_argument("--compressor", default=None, help="trained MetaCompress directory (for --method metacompress)")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--fastv-k", type=int, default=2, help="FastV ranks tokens with layer K-1's attention")
    p.add_argument("--no-vqa-suffix", action="store_true",
                   help="do not end questions with 'Answer the question using a single word or phrase.'")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, stdin=None, stdout=None) -> int:
    """Validate cheap things first (rate, method, image) so mistakes fail before the model loads."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if args.rate is not None and not 0.0 < args.rate < 1.0:
        raise ValueError(f"--rate {args.rate} is outside (0, 1): it is the share of visual tokens removed")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")

    from compress.lvlm.base import load_image
    from compress.lvlm.methods import available_methods, get_method

    if args.method not in available_methods():
        raise ValueError(f"unknown method {args.method!r} (--method); known: {', '.join(sorted(available_methods()))}")
    if args.method != "full" and args.rate is None:
        raise ValueError(f"--method {args.method} needs --rate in (0, 1)")
    image = load_image(args.image)  # a missing or unreadable image fails here, naming the file
    method = get_method(args.method, args.compressor)

    import torch

    from compress.lvlm import load_adapter
    from compress.lvlm.session import ChatSession

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    adapter = load_adapter(args.model, device=device, dtype=dtype)
    if method.kind == "feature" and isinstance(method.fn, torch.nn.Module):
        method.fn.to(device)
    session = ChatSession(adapter, method, args.rate, max_new_tokens=args.max_new_tokens,
                          vqa=not args.no_vqa_suffix, fastv_k=args.fastv_k)
    session.set_image(image)
    turn = 0
    for line in stdin:
        question = line.strip()
        if not question:
            continue
        turn += 1
        result = session.ask(question)
        print(f"Q{turn}: {question}", file=stdout)
        print(f"A{turn}: {result.answer}", file=stdout)
        print(f"    {result.stats.line()}", file=stdout, flush=True)
    if not turn:
        print("no questions on standard input (one question per line)", file=sys.stderr)
    return 0
