"""``metacompress data ...``: build the benchmarks as ``dialogues.jsonl`` files (docs/design.md §3).

    metacompress data mt-shapes --out DIR --dialogues N --seed S [--image-size 96] [--aspect 1|W:H|random]
    metacompress data mt-focus --out DIR --dialogues N --seed S [--image-size 96] [--aspect 1|W:H|random]
    metacompress data mt-video --out DIR --dialogues N --seed S [--frames 8] [--fps 4]
    metacompress data video-mme --annotations FILE --videos DIR --out DIR
    metacompress data mt-vqa-v2 --questions F --annotations F --images DIR --out DIR
    metacompress data mt-gqa --questions F --images DIR --out DIR
    metacompress data convbench --table ConvBench.xlsx [--reference OLD_ConvBench.xlsx] --images DIR --out DIR
    metacompress data check FILE
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.commands.argtypes import at_least_one


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


def _mt_focus(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.datasets import mt_focus, mt_shapes

    out = Path(args.out)
    _refuse_overwrite([out / s / "dialogues.jsonl" for s in mt_shapes.SPLITS], args.overwrite)
    cfg = mt_focus.MTFocusConfig(
        image_size=args.image_size, aspect=mt_shapes.parse_aspect(args.aspect),
        aspects=mt_shapes.parse_aspects(args.aspects) if args.aspects else mt_shapes.DEFAULT_ASPECTS)
    counts = mt_focus.generate(out, args.dialogues, args.seed, cfg, val=args.val, test=args.test, turns=args.turns,
                               progress=not args.quiet)
    return {"out": str(out), "counts": counts}


def _mt_video(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.datasets import mt_shapes, mt_video

    out = Path(args.out)
    _refuse_overwrite([out / s / "dialogues.jsonl" for s in mt_shapes.SPLITS], args.overwrite)
    aspect = mt_shapes.parse_aspect(args.aspect)
    if aspect is None:
        raise ValueError("--aspect random is not supported by mt-video (one frame size per split); give N or W:H")
    cfg = mt_video.MTVideoConfig(image_size=args.image_size, aspect=aspect, frames=args.frames, fps=args.fps)
    counts = mt_video.generate(out, args.dialogues, args.seed, cfg, val=args.val, test=args.test, turns=args.turns,
                               progress=not args.quiet)
    return {"out": str(out), "counts": counts}


def _video_mme(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.datasets import video_mme

    _refuse_overwrite([Path(args.out) / "dialogues.jsonl"], args.overwrite)
    return video_mme.build(args.annotations, args.videos, args.out, max_dialogues=args.max_dialogues,
                           max_missing_fraction=args.max_missing_fraction)


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
    return convbench.build(args.table, args.images, args.out, reference_file=args.reference,
                           max_missing_fraction=args.max_missing_fraction)


def image_problem(path: str) -> str | None:
    """None when ``path`` is a readable image that decodes completely; else why not (docs/design.md §8)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()  # decodes every pixel: a truncated file fails here, not in a stage
    except FileNotFoundError:
        return f"file not found: {path}"
    except PermissionError:
        return f"not readable (permission denied): {path}"
    except UnidentifiedImageError:
        return f"not an image file: {path}"
    except (OSError, ValueError, SyntaxError) as e:  # truncated or damaged data
        return f"damaged image {path} ({e})"
    except Image.DecompressionBombError as e:
        return f"image too large {path} ({e})"
    return None


def video_problem(path: str) -> str | None:
    """None when ``path`` is a video whose frames decode; else why not."""
    from compress.lvlm.video import decode_video

    try:
        decode_video(path, num_frames=2)
    except (OSError, ValueError) as e:
        return str(e)
    return None


def check_file(file: str, decode_images: bool = True) -> dict[str, Any]:
    """Every problem of a dialogue file, one per record: bad bytes, JSON, fields, duplicate ids, relative paths
    leaving the folder, missing, unreadable, non-image or truncated image files. -> summary with ``errors``
    ({file, line, dialogue_id, reason}) and ``warnings`` (absolute image paths outside the file's folder)."""
    from collections import Counter

    from pipeline.dialogues import iter_dialogues

    errors: list[dict] = []
    warnings: list[str] = []
    dialogues = []
    folder = Path(file).resolve().parent
    for d in iter_dialogues(file, check_images=False, on_error=lambda e: errors.append(e.to_json())):
        dialogues.append(d)
    good = []
    for d in dialogues:
        problem = (video_problem if d.kind == "video" else image_problem)(d.image) if decode_images else None
        if problem:
            errors.append({"file": file, "line": None, "dialogue_id": d.dialogue_id,
                           "reason": f"field '{d.kind}': {problem}"})
            continue
        if not Path(d.image).resolve().is_relative_to(folder):
            warnings.append(f"{d.dialogue_id}: image {d.image} is outside the file's folder {folder}")
        good.append(d)
    return {"file": file, "dialogues": len(good), "bad_records": len(errors),
            "turns": dict(sorted(Counter(len(d.turns) for d in good).items())),
            "sources": dict(Counter(d.source for d in good)),
            "errors": errors[:100], "warnings": warnings[:20] + ([f"... {len(warnings) - 20} more"]
                                                                if len(warnings) > 20 else [])}


def _check(args: argparse.Namespace) -> int:
    summary = check_file(args.file, decode_images=not args.skip_images)
    print(json.dumps(summary, indent=1))
    if summary["errors"]:
        first = summary["errors"][0]
        where = f"{first['file']}:{first['line']}" if first["line"] else f"{first['file']} ({first['dialogue_id']})"
        raise ValueError(f"{args.file}: {summary['bad_records']} bad record(s) (listed above); first: {where}: "
                         f"{first['reason']}")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value} (leave the flag out to keep every dialogue)")
    return value


def _common_builder_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder for dialogues.jsonl")
    p.add_argument("--turns", type=_positive, default=3, help="questions per dialogue (default 3)")
    p.add_argument("--keep-partial", action="store_true", help="keep an image's last, shorter group of questions")
    p.add_argument("--max-dialogues", type=_positive, default=None,
                   help="stop after this many dialogues (a subset; >= 1)")
    p.add_argument("--max-missing-fraction", type=float, default=0.05,
                   help="fail if more dialogues than this have no image file (default 0.05)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dialogues.jsonl")


def _generator_arguments(p) -> None:
    """The arguments the generated benchmarks share: where, how many, the splits, turns, image shape and output."""
    p.add_argument("--out", required=True)
    p.add_argument("--dialogues", type=at_least_one, required=True,
                   help="total dialogues over all splits (default split: 80/10/10 %%)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val", type=int, default=None, help="validation dialogues (default 10 %% of --dialogues)")
    p.add_argument("--test", type=int, default=None, help="test dialogues (default 10 %% of --dialogues)")
    p.add_argument("--turns", type=at_least_one, default=3)
    p.add_argument("--image-size", type=at_least_one, default=96, help="side of a square image in pixels (default 96)")
    p.add_argument("--aspect", default="1", help="width:height (e.g. 3:2 or 1.5), or 'random' (one per scene)")
    p.add_argument("--aspects", nargs="+", default=None,
                   help="choices for --aspect random (default 1:2 2:3 1:1 3:2 2:1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``data`` command and its sub-commands. Each sets ``func`` (called as ``args.func(args)``)."""
    data = subparsers.add_parser("data",
                                 help="build benchmark dialogues (MT-Shapes, MT-Focus, MT-Video, MT-VQA-v2, MT-GQA, "
                                      "ConvBench, MT-Video-MME)")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("mt-shapes", help="generate MT-Shapes train/val/test splits")
    _generator_arguments(p)
    p.add_argument("--multiple", type=int, default=8, help="round image sides to this (the patch size)")
    p.add_argument("--min-objects", type=int, default=3)
    p.add_argument("--max-objects", type=int, default=6)
    p.set_defaults(func=_printed(_mt_shapes))

    p = sub.add_parser("mt-focus", help="generate MT-Focus train/val/test splits (few objects, plain backgrounds, "
                                         "every turn about one object)")
    _generator_arguments(p)
    p.set_defaults(func=_printed(_mt_focus))

    p = sub.add_parser("mt-video", help="generate MT-Video train/val/test splits (moving, appearing and "
                                         "colour-changing MT-Shapes objects; questions about when and what)")
    _generator_arguments(p)
    p.add_argument("--frames", type=at_least_one, default=8, help="frames per video (4-64, default 8)")
    p.add_argument("--fps", type=at_least_one, default=4, help="frames per second of the written videos (default 4)")
    p.set_defaults(func=_printed(_mt_video))

    p = sub.add_parser("video-mme", help="Video-MME annotations (test-*.parquet / .json / .jsonl) + videos -> "
                                         "MT-Video-MME dialogues (a video's three questions as one dialogue)")
    p.add_argument("--annotations", required=True, help="the official annotation file (videomme/test-*.parquet)")
    p.add_argument("--videos", required=True, help="folder with <videoID>.mp4")
    p.add_argument("--out", required=True)
    p.add_argument("--max-dialogues", type=_positive, default=None, help="stop after this many dialogues (>= 1)")
    p.add_argument("--max-missing-fraction", type=float, default=0.05,
                   help="fail if more dialogues than this have no video file (default 0.05)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_printed(_video_mme))

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
    p.add_argument("--table", required=True, help="ConvBench.xlsx (sheet multi_turn_benchmark)")
    p.add_argument("--reference", default=None,
                   help="the earlier ConvBench.xlsx whose 'reference' sheet gives captions and reference answers "
                        "(default: the table's own reference sheet, if any)")
    p.add_argument("--images", required=True, help="the VisIT-Bench image folder (visit_bench_images)")
    p.add_argument("--out", required=True)
    p.add_argument("--max-missing-fraction", type=float, default=0.05)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_printed(_convbench))

    p = sub.add_parser("check", help="validate a dialogues.jsonl file")
    p.add_argument("file")
    p.add_argument("--skip-images", action="store_true", help="do not open and decode the image files")
    p.set_defaults(func=_check)
    return data
