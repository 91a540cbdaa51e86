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
    p.add_argument("--long-prompt", choices=["refuse", "cut"], default="refuse",
                   help="a question that does not fit the model's context: refuse it (default) or cut it to fit, "
                        "with a warning")
    p.set_defaults(func=run)
    return p


PROMPT_OVERHEAD = 32  # chat-template tokens around a question (role markers, the VQA suffix), a safe bound


def fit_question(tokenizer, question: str, context: int, used: int, max_new_tokens: int, lineno: int,
                 mode: str) -> str:
    """``question`` if it fits the model's context after the ``used`` positions and the answer; else refused
    (ValueError naming the stdin line) or, with ``mode="cut"``, its first tokens that fit, with a warning
    (docs/design.md §8)."""
    if context <= 0:
        return question
    ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    room = context - used - max_new_tokens - PROMPT_OVERHEAD
    if len(ids) <= room:
        return question
    where = f"stdin line {lineno}: the question has {len(ids)} tokens, {max(room, 0)} fit"
    detail = (f"(context {context} = {used} already used by the image and earlier turns + {max_new_tokens} for the "
              f"answer + {PROMPT_OVERHEAD} for the template)")
    if mode != "cut" or room < 1:
        raise ValueError(f"{where} {detail}; shorten it, start a new chat, or pass --long-prompt cut")
    print(f"warning: {where}; cut to its first {room} tokens {detail}", file=sys.stderr)
    return tokenizer.decode(ids[:room])


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
    context = int(getattr(adapter.text_config, "max_position_embeddings", 0) or 0)
    used = int(session.image_tokens.shape[0])  # positions taken so far: the image, then every turn's prompt + answer
    turn = 0
    for lineno, line in enumerate(stdin, start=1):
        question = line.strip()
        if not question:
            continue
        turn += 1
        question = fit_question(adapter.tokenizer, question, context, used, args.max_new_tokens, lineno,
                                getattr(args, "long_prompt", "refuse"))
        result = session.ask(question)
        # turn 1's prefill holds the image; later ones only the new turn's text
        used = (used if turn > 1 else 0) + int(result.stats.prefill_tokens) + int(result.stats.new_tokens)
        print(f"Q{turn}: {question}", file=stdout)
        print(f"A{turn}: {result.answer}", file=stdout)
        print(f"    {result.stats.line()}", file=stdout, flush=True)
    if not turn:
        print("no questions on standard input (one question per line)", file=sys.stderr)
    return 0
