"""``metacompress reference build``: train a reference LVLM (issue 4, item 5; docs/design.md §7).

    metacompress reference build --family llava|llava_next|qwen2_5_vl --out DIR [--dialogues FILE ...]
                                 [--eval FILE ...] [--init DIR] [--steps N] [--device cpu|cuda] ...

``--dialogues`` and ``--eval`` repeat (``--dialogues A --dialogues B``): images and, for qwen2_5_vl, videos mixed.
``--init DIR`` continues stage 2 from a reference this command built (with ``--stage1-steps 0``).

Without ``--dialogues`` it trains on MT-Shapes: it generates the splits under ``DIR/mt_shapes`` (seeded) unless
they are there, and scores the test split at the end. The recipe itself is ``infra/reference/recipe.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.commands.argtypes import at_least_one


def _build(args: argparse.Namespace) -> int:
    from infra.reference.recipe import RecipeConfig, build_reference

    out = Path(args.out)
    if (out / "model.safetensors").exists() and not args.overwrite:
        raise ValueError(f"{out} already holds a model; choose another --out or pass --overwrite")
    if args.init and Path(args.init).resolve() == out.resolve():
        raise ValueError(f"--init {args.init} is also --out: the fine-tune would overwrite its parent; choose another "
                         "--out")
    dialogues, evaluation = args.dialogues, args.eval
    if dialogues is None:
        from pipeline.datasets import mt_shapes

        data = out / "mt_shapes"
        if not (data / "test" / "dialogues.jsonl").is_file():
            aspect = None if args.family == "llava_next" else 1.0  # LLaVA-NeXT gets several aspect ratios
            cfg = mt_shapes.MTShapesConfig(image_size=96, aspect=aspect)
            mt_shapes.generate(data, args.mt_shapes_dialogues, args.seed, cfg, val=500, test=500, progress=False)
        dialogues = data / "train" / "dialogues.jsonl"
        evaluation = evaluation or data / "test" / "dialogues.jsonl"
    cfg = RecipeConfig(family=args.family, seed=args.seed, stage2_steps=args.steps, stage1_steps=args.stage1_steps,
                       stage1_batch=args.stage1_batch,
                       stage2_batch=args.batch, stage2_lr=args.lr, max_train=args.max_train,
                       text_layers=args.text_layers,
                       attention_weight=args.attention_weight, token_drop=args.token_drop,
                       token_drop_mode=args.token_drop_mode, video_frames=args.video_frames, warmup=args.warmup,
                       vision_hidden=args.vision_hidden, log_every=args.log_every)
    if args.vision_lr_scale is not None:
        cfg.vision_lr_scale = args.vision_lr_scale
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch sees no CUDA device; use --device cpu")
    summary = build_reference(args.family, out, dialogues, evaluation, cfg, device=args.device,
                              threads=args.threads, eval_limit=args.eval_limit, eval_every=args.eval_every,
                              init=args.init)
    import shlex
    import sys

    from infra.reference.card import write_model_card

    command = "metacompress " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_model_card(summary, command, out)
    print(json.dumps({k: summary[k] for k in ("family", "parameters", "train_s") if k in summary}
                     | {"test": summary.get("test")}, indent=1))
    return 0


def _share(text: str) -> float:
    """A share in [0, 1] (docs/design.md §8: ranges are checked before any work)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1] (a share of the dialogues), got {value}")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser("reference", help="build the reference LVLMs (small LLaVA / LLaVA-NeXT)")
    sub = p.add_subparsers(dest="reference_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="train a small LLaVA or LLaVA-NeXT from scratch and save it as a HF directory")
    b.add_argument("--family", choices=["llava", "llava_next", "qwen2_5_vl"], required=True)
    b.add_argument("--out", required=True, help="output directory (config.json, model.safetensors, processor)")
    b.add_argument("--dialogues", action="append",
                   help="training dialogues.jsonl; repeat for several (images and, for qwen2_5_vl, videos mixed; "
                        "default: MT-Shapes generated under OUT/mt_shapes)")
    b.add_argument("--eval", action="append",
                   help="dialogues.jsonl scored at the end, per visual kind; repeatable (default with MT-Shapes: its "
                        "test split)")
    b.add_argument("--eval-limit", type=int, default=None, help="score only the first N dialogues of each --eval")
    b.add_argument("--init", help="continue stage 2 from this reference directory (same --family; its sizes and "
                                  "vocabulary, grown by the new words); use with --stage1-steps 0")
    b.add_argument("--vision-lr-scale", type=float, default=None,
                   help="the tower's lr in stage 2 as a multiple of --lr (default: 0 after stage 1 or with --init, "
                        "else 1)")
    b.add_argument("--warmup", type=at_least_one, default=100,
                   help="linear warm-up steps of each stage's lr before the cosine decay (a short --init fine-tune "
                        "wants a few)")
    b.add_argument("--video-frames", type=at_least_one, default=8,
                   help="frames sampled uniformly per video (qwen2_5_vl); give video_adapter the same num_frames")
    b.add_argument("--eval-every", type=int, default=0, help="score 200 evaluation dialogues every N steps")
    b.add_argument("--steps", type=at_least_one, default=2500, help="stage-2 (dialogue) training steps")
    b.add_argument("--stage1-steps", type=int, default=1200, help="stage-1 (dense vision labels) steps")
    b.add_argument("--batch", type=at_least_one, default=16)
    b.add_argument("--stage1-batch", type=at_least_one, default=32, help="stage-1 (dense vision labels) batch")
    b.add_argument("--lr", type=float, default=1e-3, help="stage-2 learning rate (see RecipeConfig.stage2_lr)")
    b.add_argument("--attention-weight", type=float, default=1.0,
                   help="weight of the attention supervision on MT-Shapes (where each answer should look); 0: off. "
                        "Skipped, with a note, on data without MT-Shapes scenes")
    b.add_argument("--token-drop", type=_share, default=0.0,
                   help="share of training dialogues whose visual tokens are thinned, so the model survives token "
                        "reduction: on MT-Shapes to a random 10-100 %% always keeping those the answers depend on, "
                        "elsewhere by the generic drop (see --token-drop-mode)")
    b.add_argument("--token-drop-mode", choices=["auto", "scene", "random", "pool", "mixed"], default="auto",
                   help="auto: the MT-Shapes drop where a dialogue has scene targets, else the generic one (random "
                        "or pooled removal of visual tokens, any data); scene: MT-Shapes only; random / pool / "
                        "mixed: the generic drop for every dialogue")
    b.add_argument("--text-layers", type=int, default=3)
    b.add_argument("--vision-hidden", type=int, default=64)
    b.add_argument("--max-train", type=int, default=None, help="use only the first N dialogues of each --dialogues")
    b.add_argument("--mt-shapes-dialogues", type=int, default=9000, help="MT-Shapes dialogues to generate")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    b.add_argument("--log-every", type=int, default=50)
    b.add_argument("--overwrite", action="store_true")
    b.set_defaults(func=_build)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="metacompress")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
