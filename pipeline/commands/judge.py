"""``metacompress judge``: ConvBench's pairwise scores of one model's answers against another's (docs/design.md §3.5).

    metacompress judge --dialogues data/convbench/dialogues.jsonl --answers compressed.jsonl --baseline full.jsonl \\
        --url http://127.0.0.1:8000/v1 --model Llama-3.1-8B-Instruct [--positions pairwise.npy] [--out scores.json]
    metacompress judge ... --model-dir path/to/local-judge

Answer files hold one object per line (or a JSON list): ``{"dialogue_id": .., "answers": [turn 1, turn 2, ..]}``, the
rows the evaluate stage writes. Without ``--baseline`` the dialogues' own reference answers are the other side (a
table with per-turn human answers). The evaluate stage runs the same judge itself when ``evaluate.judge`` is set.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def read_answers(path: str) -> dict[str, list[str]]:
    """dialogue_id -> answers per turn, from a JSON-lines file or a JSON list of objects."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: answers file not found")
    text = p.read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON lines or a JSON list ({e.msg} at line {e.lineno})") from None
    out = {}
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("dialogue_id"), str) or \
                not isinstance(r.get("answers"), list) or not all(isinstance(a, str) for a in r["answers"]):
            raise ValueError(f"{path}: record {i + 1}: expected {{\"dialogue_id\": str, \"answers\": [str, ...]}}")
        out[r["dialogue_id"]] = r["answers"]
    return out


def _run(args: argparse.Namespace) -> int:
    from pipeline.dialogues import load_dialogues
    from pipeline.judge import JudgedDialogue, load_positions, make_judge, pairwise_scores

    dialogues = load_dialogues(args.dialogues, check_images=False)
    answers = read_answers(args.answers)
    if args.baseline:
        baseline = read_answers(args.baseline)
    else:
        baseline = {d.dialogue_id: [t.answers[0] for t in d.turns] for d in dialogues}
        if any(not a for answers_ in baseline.values() for a in answers_):
            raise ValueError(f"{args.dialogues}: the dialogues have no reference answers (ConvBench publishes none); "
                             "pass --baseline with the full-token model's answers")
    judge = make_judge(url=args.url, model=args.model, model_dir=args.model_dir, api_key_env=args.api_key_env,
                       max_tokens=args.max_tokens, retries=args.retries, backoff_s=args.backoff,
                       cache=args.cache or Path(args.out or args.answers).with_suffix(".judge_cache.jsonl"))
    judged = [JudgedDialogue(d.dialogue_id, tuple(t.question for t in d.turns),
                             str((d.meta or {}).get("caption", "")), str((d.meta or {}).get("third_turn_demands", "")),
                             int(d.meta["row"]) if d.meta and "row" in d.meta else None)
              for d in dialogues if d.dialogue_id in answers or not args.only_answered]
    scores: dict[str, Any] = pairwise_scores(judge, judged, answers, baseline,
                                             positions=load_positions(args.positions) if args.positions else None,
                                             seed=args.seed)
    summary = {k: v for k, v in scores.items() if k != "per_dialogue"}
    summary.update(dialogues=len(judged), judge=judge.identity, calls=judge.calls, cached=judge.hits)
    if args.out:
        Path(args.out).write_text(json.dumps({**summary, "per_dialogue": scores["per_dialogue"]}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("judge", help="ConvBench pairwise judge: per-turn and overall scores of answers")
    p.add_argument("--dialogues", required=True, help="dialogues.jsonl (e.g. from `metacompress data convbench`)")
    p.add_argument("--answers", required=True, help="the evaluated model's answers (JSON lines: dialogue_id, answers)")
    p.add_argument("--baseline", default=None,
                   help="the other side's answers, e.g. the full-token model's (default: the references)")
    p.add_argument("--url", default=None, help="OpenAI-compatible API base, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None, help="the endpoint's model name")
    p.add_argument("--model-dir", default=None, help="a local transformers causal-LM directory instead of --url")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    p.add_argument("--positions", default=None, help="the official ConvBenchEval/pairwise.npy (A/B order per row)")
    p.add_argument("--seed", type=int, default=0, help="seed of the A/B order without --positions")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--retries", type=int, default=4)
    p.add_argument("--backoff", type=float, default=2.0, help="first retry wait in seconds (doubles each time)")
    p.add_argument("--cache", default=None, help="judgement cache (default: next to --out or --answers)")
    p.add_argument("--only-answered", action="store_true", help="judge only the dialogues present in --answers")
    p.add_argument("--out", default=None, help="write the scores with the per-dialogue results here (JSON)")
    p.set_defaults(func=_run)
    return p
