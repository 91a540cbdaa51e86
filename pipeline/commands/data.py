"""``metacompress data ...``: build the benchmarks as ``dialogues.jsonl`` files (docs/design.md §3).

    metacompress data mt-shapes --out DIR --dialogues N --seed S [--image-size 96] [--aspect 1|W:H|random]
    metacompress data mt-vqa-v2 --questions F --annotations F --images DIR --out DIR
    metacompress data mt-gqa --questions F --images DIR --out DIR
    metacompress data convbench --table ConvBench.xlsx --images DIR --out DIR
    metacompress data check FILE
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _refuse_overwrite(paths: list[Path], overwrite: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise ValueError(f"{existing[0]} already exists; choose another --out or pass --overwrite")


def _printed(fn: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], int]:
    """Print the command's summary as JSON. Bad input raises ValueError (BenchmarkFileError,
    DialogueFormatError) or FileNotFoundError naming the file, which the CLI reports in one line."""
    def run(args: argparse.Namespace) -> int:
        print(json.dumps(fn(args), indent=1))
        return 0
    return run


def _mt_shapes(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.datasets import mt_shapes

    out = Path(args.out)
    _refuse_overwrite([out / s / "dialogues.jsonl" for s in mt_shapes.SPLITS], args.overwrite)
    cfg = mt_shapes.MTShapesConfig(
        image_size=args.image_size, aspect=mt_shapes.parse_aspect(args.aspect),
        aspects=mt_shapes.parse_aspects(args.aspects) if args.aspects else mt_shapes.DEFAULT_ASPECTS,
        multiple=args.multiple, min_objects=args.min_objects, max_objects=args.max_objects)
    counts = mt_shapes.generate(out, args.dialogues, args.seed, cfg, val=args.val, test=args.test, turns=args.turns,
                                progress=not args.quiet)
    return {"out": str(out), "counts": counts}


def _mt_vqa_v2(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.datasets import vqa_v2

    _refuse_overwrite([Path(args.out) / "dialogues.jsonl"], args.overwrite)
    return vqa_v2.build(args.questions, args.annotations, args.images, args.out, per_dialogue=args.turns,
                        keep_partial=args.keep_partial, max_dialogues=args.max_dialogues,
                        max_missing_fraction=args.max_missing_fraction)


def _mt_gqa(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.datasets import gqa

    _refuse_overwrite([Path(args.out) / "dialogues.jsonl"], args.overwrite)
    return gqa.build(args.questions, args.images, args.out, per_dialogue=args.turns, keep_partial=args.keep_partial,
                     balanced_only=not args.include_unbalanced, max_dialogues=args.max_dialogues,
                     max_missing_fraction=args.max_missing_fraction)


def _convbench(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.datasets import convbench

    _refuse_overwrite([Path(args.out) / "dialogues.jsonl"], args.overwrite)
    return convbench.build(args.table, args.images, args.out, max_missing_fraction=args.max_missing_fraction)


def _check(args: argparse.Namespace) -> dict[str, Any]:
    from collections import Counter

    from pipeline.dialogues import load_dialogues

    dialogues = load_dialogues(args.file, check_images=not args.skip_images)
    return {"file": args.file, "dialogues": len(dialogues),
            "turns": dict(sorted(Counter(len(d.turns) for d in dialogues).items())),
            "sources": dict(Counter(d.source for d in dialogues))}


def _common_builder_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder for dialogues.jsonl")
    p.add_argument("--turns", type=int, default=3, help="questions per dialogue (default 3)")
    p.add_argument("--keep-partial", action="store_true", help="keep an image's last, shorter group of questions")
    p.add_argument("--max-dialogues", type=int, default=None, help="stop after this many dialogues (a subset)")
    p.add_argument("--max-missing-fraction", type=float, default=0.05,
                   help="fail if more dialogues than this have no image file (default 0.05)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dialogues.jsonl")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``data`` command and its sub-commands. Each sets ``func`` (called as ``args.func(args)``)."""
    data = subparsers.add_parser("data", help="build benchmark dialogues (MT-Shapes, MT-VQA-v2, MT-GQA, ConvBench)")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("mt-shapes", help="generate MT-Shapes train/val/test splits")
    p.add_argument("--out", required=True)
    p.add_argument("--dialogues", type=int, required=True,
                   help="total dialogues over all splits (default split: 80/10/10 %%)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val", type=int, default=None, help="validation dialogues (default 10 %% of --dialogues)")
    p.add_argument("--test", type=int, default=None, help="test dialogues (default 10 %% of --dialogues)")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--image-size", type=int, default=96, help="side of a square image in pixels (default 96)")
    p.add_argument("--aspect", default="1", help="width:height (e.g. 3:2 or 1.5), or 'random' (one per scene)")
    p.add_argument("--aspects", nargs="+", default=None,
                   help="choices for --aspect random (default 1:2 2:3 1:1 3:2 2:1)")
    p.add_argument("--multiple", type=int, default=8, help="round image sides to this (the patch size)")
    p.add_argument("--min-objects", type=int, default=3)
    p.add_argument("--max-objects", type=int, default=6)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_printed(_mt_shapes))

    p = sub.add_parser("mt-vqa-v2", help="VQA-v2 val questions + annotations + COCO images -> dialogues")
    p.add_argument("--questions", required=True, help="v2_OpenEnded_mscoco_val2014_questions.json")
    p.add_argument("--annotations", required=True, help="v2_mscoco_val2014_annotations.json")
    p.add_argument("--images", required=True, help="folder with COCO_val2014_%%012d.jpg")
    _common_builder_options(p)
    p.set_defaults(func=_printed(_mt_vqa_v2))

    p = sub.add_parser("mt-gqa", help="GQA testdev-balanced questions + images -> dialogues")
    p.add_argument("--questions", required=True, help="testdev_balanced_questions.json")
    p.add_argument("--images", required=True, help="folder with <imageId>.jpg")
    p.add_argument("--include-unbalanced", action="store_true", help="keep questions with isBalanced = false")
    _common_builder_options(p)
    p.set_defaults(func=_printed(_mt_gqa))

    p = sub.add_parser("convbench", help="ConvBench.xlsx (or .csv/.json/.jsonl export) + images -> dialogues")
    p.add_argument("--table", required=True, help="ConvBench.xlsx")
    p.add_argument("--images", required=True, help="the VisIT-Bench image folder (visit_bench_images)")
    p.add_argument("--out", required=True)
    p.add_argument("--max-missing-fraction", type=float, default=0.05)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_printed(_convbench))

    p = sub.add_parser("check", help="validate a dialogues.jsonl file")
    p.add_argument("file")
    p.add_argument("--skip-images", action="store_true", help="do not check that image files exist")
    p.set_defaults(func=_printed(_check))
    return data
