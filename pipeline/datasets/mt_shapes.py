"""MT-Shapes: synthetic multi-turn VQA about simple shapes, the project's own benchmark (docs/design.md §7).

A scene is a textured background split into a 3 x 3 grid of regions (rows top/middle/bottom, columns
left/center/right). Each occupied region holds exactly one object with a shape, a colour and a size. Each dialogue
has three turns, each from a different category (attribute, existence, count, relation). The first turn is always
about one or two regions, and later turns avoid the regions already asked about. So a compressor that keeps only
what the first question needs loses what the later questions need. Objects are small (about 1-2 patches of 8 px at
the default 96 px), so keeping 10 % of the tokens at random usually misses them.

Answers are single words from a small vocabulary (:data:`ANSWER_VOCAB`). Every scene is fully described by a
:class:`Scene` (written to ``scenes.jsonl``), and the image is rendered from that description alone. The
generator is deterministic: dialogue i of a split depends only on ``(seed, split, i)``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipeline.dialogues import Dialogue, Turn, write_dialogues

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225),
    "yellow": (240, 210, 30), "purple": (150, 60, 200), "orange": (245, 135, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SIZES: tuple[str, ...] = ("small", "large")
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLS: tuple[str, ...] = ("left", "center", "right")
LINES: tuple[str, ...] = tuple(f"{r} row" for r in ROWS) + tuple(f"{c} column" for c in COLS)
RADIUS = {"small": 5.5, "large": 9.5}  # pixels at a 96 x 96 image; scaled with sqrt(image area)
SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_ASPECTS: tuple[float, ...] = (0.5, 2 / 3, 1.0, 1.5, 2.0)
MAX_COUNT = 9
ANSWER_VOCAB: tuple[str, ...] = (
    tuple(COLORS) + SHAPES + SIZES + ("yes", "no", "left", "right", "above", "below")
    + tuple(str(i) for i in range(MAX_COUNT + 1))
)
CATEGORIES = ("attribute", "existence", "count", "relation")


@dataclass(frozen=True)
class ShapeObject:
    """One object. ``cx, cy, radius`` are pixels. ``row, col`` give its region. The whole object lies inside it."""

    shape: str
    color: str
    size: str
    row: int
    col: int
    cx: float
    cy: float
    radius: float

    @property
    def cell(self) -> int:
        return 3 * self.row + self.col

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    scene_id: str
    width: int
    height: int
    objects: tuple[ShapeObject, ...]
    background: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"scene_id": self.scene_id, "width": self.width, "height": self.height,
                "objects": [asdict(o) for o in self.objects], "background": self.background}

    @staticmethod
    def from_json(obj: dict[str, Any]) -> Scene:
        return Scene(obj["scene_id"], int(obj["width"]), int(obj["height"]),
                     tuple(ShapeObject(**o) for o in obj["objects"]), dict(obj.get("background", {})))


@dataclass(frozen=True)
class MTShapesConfig:
    """``image_size``: side of a square image; other aspect ratios keep about the same area. ``aspect``: width /
    height, or ``None`` for a random one per scene from ``aspects``. Sides are rounded to multiples of ``multiple``
    (the patch size)."""

    image_size: int = 96
    aspect: float | None = 1.0
    aspects: tuple[float, ...] = DEFAULT_ASPECTS
    multiple: int = 8
    min_objects: int = 3
    max_objects: int = 6
    noise: float = 6.0

    def __post_init__(self) -> None:
        if self.image_size < 24:
            raise ValueError(f"image_size must be >= 24 pixels, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= 8:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 8 (one region stays empty), got "
                             f"{self.min_objects}..{self.max_objects}")
        for a in ([self.aspect] if self.aspect is not None else list(self.aspects)):
            # Beyond 1:2 a region gets too flat for a large object to stay larger than a small one.
            if not 0.5 <= a <= 2.0:
                raise ValueError(f"aspect ratios (width / height) must be in [0.5, 2], got {a}")


def image_shape(image_size: int, aspect: float, multiple: int = 8) -> tuple[int, int]:
    """(width, height) of about ``image_size**2`` pixels with width / height ~ ``aspect``, sides multiples of
    ``multiple``."""
    w = max(multiple, round(image_size * math.sqrt(aspect) / multiple) * multiple)
    h = max(multiple, round(image_size / math.sqrt(aspect) / multiple) * multiple)
    return int(w), int(h)


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), index]))


def sample_scene(rng: np.random.Generator, cfg: MTShapesConfig, scene_id: str) -> Scene:
    """A random scene: distinct regions, one object each, each object fully inside its region."""
    aspect = cfg.aspect if cfg.aspect is not None else float(rng.choice(cfg.aspects))
    width, height = image_shape(cfg.image_size, aspect, cfg.multiple)
    scale = math.sqrt(width * height) / 96.0
    cell_w, cell_h = width / 3.0, height / 3.0
    k = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    objects = []
    for cell in sorted(int(c) for c in rng.choice(9, size=k, replace=False)):
        row, col = divmod(cell, 3)
        size = _pick(rng, SIZES)
        r = min(RADIUS[size] * scale, min(cell_w, cell_h) / 2.0 - 1.5)
        # +-1 px margin so the anti-aliasing-free raster of the object stays inside its region.
        cx = float(rng.uniform(col * cell_w + r + 1, (col + 1) * cell_w - r - 1))
        cy = float(rng.uniform(row * cell_h + r + 1, (row + 1) * cell_h - r - 1))
        objects.append(ShapeObject(_pick(rng, SHAPES), _pick(rng, list(COLORS)),
                                   size, row, col, round(cx, 2), round(cy, 2), round(r, 2)))
    background = {
        "gray": int(rng.integers(90, 171)), "tint": [int(v) for v in rng.integers(-12, 13, size=3)],
        "angle": round(float(rng.uniform(0, math.pi)), 4), "period": round(float(rng.uniform(6, 20)), 3),
        "amplitude": round(float(rng.uniform(8, 22)), 3), "noise": cfg.noise,
        "noise_seed": int(rng.integers(2**31 - 1)),
    }
    return Scene(scene_id, width, height, tuple(objects), background)


def _draw_object(draw: ImageDraw.ImageDraw, o: ShapeObject, fill: Any) -> None:
    cx, cy, r = o.cx, o.cy, o.radius
    if o.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif o.shape == "square":
        s = 0.85 * r
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    elif o.shape == "cross":
        w = 0.35 * r
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {o.shape!r}; known: {SHAPES}")


def render_scene(scene: Scene) -> Image.Image:
    """The RGB image of a scene (striped grey background, solid objects, light pixel noise), from the description
    alone."""
    bg = scene.background
    yy, xx = np.mgrid[0:scene.height, 0:scene.width].astype(np.float32)
    along = xx * math.cos(bg["angle"]) + yy * math.sin(bg["angle"])
    base = bg["gray"] + bg["amplitude"] * np.sin(2 * math.pi * along / bg["period"])
    rgb = np.clip(base[..., None] + np.asarray(bg["tint"], np.float32), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        _draw_object(draw, o, COLORS[o.color])
    noise = np.random.default_rng(bg["noise_seed"]).standard_normal((scene.height, scene.width, 3), np.float32)
    pixels = np.asarray(image, np.float32) + np.float32(bg["noise"]) * noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def object_mask(scene: Scene) -> np.ndarray:
    """(height, width) int array: 0 for background, i + 1 where object i was drawn (same raster as the image)."""
    mask = Image.new("L", (scene.width, scene.height), 0)
    draw = ImageDraw.Draw(mask)
    for i, o in enumerate(scene.objects):
        _draw_object(draw, o, i + 1)
    return np.asarray(mask, dtype=np.int64)


def patch_labels(scene: Scene, grid_h: int, grid_w: int, min_cover: float = 0.2) -> dict[str, np.ndarray]:
    """Dense labels of a ``grid_h x grid_w`` patch grid, for pretraining a vision tower.

    Returns int64 arrays of shape (grid_h, grid_w): ``object`` (index into ``scene.objects``, -1 for empty),
    ``color`` / ``shape`` / ``size`` (0 for empty, else 1 + index into COLORS / SHAPES / SIZES). A patch takes the
    object that covers most of its pixels if that covers at least ``min_cover`` of the patch. Each object also
    labels its best-covered patch, so no object is missing from the labels.
    """
    mask = object_mask(scene)
    ys = np.round(np.linspace(0, scene.height, grid_h + 1)).astype(int)
    xs = np.round(np.linspace(0, scene.width, grid_w + 1)).astype(int)
    k = len(scene.objects)
    onehot = (mask[None] == np.arange(1, k + 1)[:, None, None]).astype(np.float64)  # (k, H, W)
    area = np.outer(np.diff(ys), np.diff(xs)).astype(np.float64)  # (grid_h, grid_w)
    cover = np.add.reduceat(np.add.reduceat(onehot, ys[:-1], axis=1), xs[:-1], axis=2) / area  # (k, gh, gw)
    obj = np.full((grid_h, grid_w), -1, dtype=np.int64)
    if k:
        best = cover.argmax(axis=0)
        keep = cover.max(axis=0) >= min_cover
        obj[keep] = best[keep]
        for i in range(k):
            py, px = np.unravel_index(cover[i].argmax(), cover[i].shape)
            if cover[i, py, px] > 0 and best[py, px] == i:
                obj[py, px] = i
    out = {"object": obj}
    for key, names in (("color", list(COLORS)), ("shape", list(SHAPES)), ("size", list(SIZES))):
        lut = np.array([0] + [1 + names.index(getattr(o, key)) for o in scene.objects], dtype=np.int64)
        out[key] = lut[obj + 1]
    return out


def region_name(cell: int) -> str:
    return f"{ROWS[cell // 3]} {COLS[cell % 3]}"


def _line_cells(line: str) -> list[int]:
    name, kind = line.split()
    if kind == "row":
        return [3 * ROWS.index(name) + c for c in range(3)]
    return [3 * r + COLS.index(name) for r in range(3)]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# A question is (text, answer, meta); meta["cells"] are the regions it is about (all 9 for whole-image questions),
# meta["objects"] the indices into scene.objects of the objects its answer depends on (empty when none is; for a
# relation, the object asked about first).
Question = tuple[str, str, dict[str, Any]]
ALL_CELLS = list(range(9))


def _indices(scene: Scene, keep: Callable[[ShapeObject], bool]) -> list[int]:
    return [i for i, o in enumerate(scene.objects) if keep(o)]


def _ask_attribute(rng: np.random.Generator, scene: Scene, used: set[int]) -> Question | None:
    objs = [o for o in scene.objects if o.cell not in used]
    if not objs:
        return None
    o = _pick(rng, objs)
    attr = ("color", "shape", "size")[int(rng.integers(3))]
    return (f"What {attr} is the object in the {region_name(o.cell)}?", getattr(o, attr),
            {"type": f"attr_{attr}", "cells": [o.cell], "objects": _indices(scene, lambda x: x is o)})


def _ask_existence(rng: np.random.Generator, scene: Scene, used: set[int], local: bool) -> Question | None:
    occupied = {o.cell for o in scene.objects}
    want_yes = bool(rng.integers(2))
    if local or rng.integers(2):
        pool = [c for c in ALL_CELLS if c not in used and (c in occupied) == want_yes]
        pool = pool or [c for c in ALL_CELLS if c not in used]
        if not pool:
            return None
        c = _pick(rng, pool)
        return (f"Is there an object in the {region_name(c)}?", "yes" if c in occupied else "no",
                {"type": "exist_region", "cells": [c], "objects": _indices(scene, lambda x: x.cell == c)})
    present = {(o.color, o.shape) for o in scene.objects}
    if want_yes:
        objs = [o for o in scene.objects if o.cell not in used] or list(scene.objects)
        o = _pick(rng, objs)
        color, shape, cells = o.color, o.shape, [o.cell]
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        color, shape = _pick(rng, absent)
        cells = ALL_CELLS
    return (f"Is there {_article(color)} {color} {shape}?", "yes" if (color, shape) in present else "no",
            {"type": "exist_thing", "cells": cells,
             "objects": _indices(scene, lambda x: (x.color, x.shape) == (color, shape))})


def _ask_count(rng: np.random.Generator, scene: Scene, used: set[int]) -> Question:
    kind = int(rng.integers(3))
    if kind == 0:
        lines = [ln for ln in LINES if not used & set(_line_cells(ln))] or list(LINES)
        line = _pick(rng, lines)
        cells = _line_cells(line)
        n = sum(o.cell in cells for o in scene.objects)
        return (f"How many objects are in the {line}?", str(n),
                {"type": "count_line", "cells": cells, "objects": _indices(scene, lambda x: x.cell in cells)})
    if kind == 1:
        present = sorted({o.color for o in scene.objects})
        color = _pick(rng, present) if rng.integers(2) else _pick(rng, list(COLORS))
        n = sum(o.color == color for o in scene.objects)
        return (f"How many {color} objects are there?", str(n),
                {"type": "count_color", "cells": ALL_CELLS, "objects": _indices(scene, lambda x: x.color == color)})
    present = sorted({o.shape for o in scene.objects})
    shape = _pick(rng, present) if rng.integers(2) else _pick(rng, SHAPES)
    n = sum(o.shape == shape for o in scene.objects)
    return (f"How many {PLURALS[shape]} are there?", str(n),
            {"type": "count_shape", "cells": ALL_CELLS, "objects": _indices(scene, lambda x: x.shape == shape)})


def _ask_relation(rng: np.random.Generator, scene: Scene, used: set[int]) -> Question | None:
    names = [o.name for o in scene.objects]
    unique = [o for o in scene.objects if names.count(o.name) == 1 and o.cell not in used]
    pairs = [(a, b) for a in unique for b in unique if a is not b and (a.col != b.col or a.row != b.row)]
    if not pairs:
        return None
    a, b = _pick(rng, pairs)
    horizontal = a.col != b.col and (a.row == b.row or bool(rng.integers(2)))
    if horizontal:
        answer = "left" if a.col < b.col else "right"
        text = f"Is the {a.name} left or right of the {b.name}?"
    else:
        answer = "above" if a.row < b.row else "below"
        text = f"Is the {a.name} above or below the {b.name}?"
    return text, answer, {"type": "rel_lr" if horizontal else "rel_ab", "cells": [a.cell, b.cell],
                          "objects": _indices(scene, lambda x: x is a) + _indices(scene, lambda x: x is b)}


def _ask(category: str, rng: np.random.Generator, scene: Scene, used: set[int], first: bool) -> Question | None:
    if category == "attribute":
        return _ask_attribute(rng, scene, used)
    if category == "existence":
        return _ask_existence(rng, scene, used, local=first)
    if category == "count":
        return _ask_count(rng, scene, used)
    return _ask_relation(rng, scene, used)


def sample_dialogue(rng: np.random.Generator, scene: Scene, turns: int = 3) -> list[Question]:
    """``turns`` questions of distinct categories (while there are categories left). The first is local (one or two
    regions). Each later local question avoids the regions asked about before, when the scene allows it."""
    used: set[int] = set()
    out: list[Question] = []
    categories: list[str] = []
    for t in range(turns):
        order = [str(c) for c in rng.permutation(CATEGORIES)]
        if t == 0:
            order = [c for c in order if c != "count"]  # counts of lines are local, colour/shape counts are not
        fresh = [c for c in order if c not in categories] or order
        for category in fresh:
            q = _ask(category, rng, scene, used, first=(t == 0))
            if q is not None and q[0] not in [p[0] for p in out]:
                break
        else:  # every remaining category is impossible here: fall back to an attribute question anywhere
            q = _ask_attribute(rng, scene, set())
            category = "attribute"
        assert q is not None
        out.append(q)
        categories.append(category)
        if len(q[2]["cells"]) < 9:
            used |= set(q[2]["cells"])
    return out


def generate_split(out_dir: str | os.PathLike, split: str, count: int, seed: int,
                   cfg: MTShapesConfig = MTShapesConfig(), turns: int = 3, progress: bool = True) -> int:
    """Write ``out_dir/split/{dialogues.jsonl, scenes.jsonl, images/*.png}`` with ``count`` dialogues."""
    from tqdm import tqdm

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    split_dir = Path(out_dir) / split
    (split_dir / "images").mkdir(parents=True, exist_ok=True)
    dialogues = []
    scenes_tmp = split_dir / "scenes.jsonl.tmp"
    with open(scenes_tmp, "w", encoding="utf-8") as f:
        for i in tqdm(range(count), desc=f"mt-shapes {split}", disable=not progress):
            rng = _rng(seed, split, i)
            did = f"mtshapes-{split}-{i:06d}"
            scene = sample_scene(rng, cfg, did)
            image_path = split_dir / "images" / f"{did}.png"
            render_scene(scene).save(image_path, compress_level=1)  # noisy pixels barely compress: be fast
            f.write(json.dumps({**scene.to_json(), "image": f"images/{did}.png"}) + "\n")
            qs = sample_dialogue(rng, scene, turns)
            dialogues.append(Dialogue(did, str(image_path), tuple(Turn(q, (a,), m) for q, a, m in qs), "mt_shapes",
                                      {"scene_id": did, "width": scene.width, "height": scene.height}))
    os.replace(scenes_tmp, split_dir / "scenes.jsonl")
    return write_dialogues(split_dir / "dialogues.jsonl", dialogues)


def split_counts(total: int, val: int | None = None, test: int | None = None) -> dict[str, int]:
    """Dialogues per split: by default 80 / 10 / 10 % of ``total``; explicit val / test counts take precedence."""
    val = total // 10 if val is None else val
    test = total // 10 if test is None else test
    if min(total, val, test) < 0 or val + test > total:
        raise ValueError(f"cannot split {total} dialogues into val={val} and test={test} plus a train split")
    return {"train": total - val - test, "val": val, "test": test}


def generate_splits(out_dir: str | os.PathLike, info_file: str, generate_split, total: int, seed: int, cfg,
                    val: int | None, test: int | None, turns: int, *extra) -> dict[str, int]:
    """The three splits of a synthetic benchmark (``generate_split(out_dir, split, n, seed, cfg, turns, *extra)``)
    and ``out_dir/info_file`` recording how they were made. Returns the number of dialogues per split."""
    counts = split_counts(total, val, test)
    for split, n in counts.items():
        generate_split(out_dir, split, n, seed, cfg, turns, *extra)
    info = {"seed": seed, "turns": turns, "counts": counts, "config": asdict(cfg)}
    Path(out_dir, info_file).write_text(json.dumps(info, indent=1) + "\n")
    return counts


def generate(out_dir: str | os.PathLike, total: int, seed: int, cfg: MTShapesConfig = MTShapesConfig(),
             val: int | None = None, test: int | None = None, turns: int = 3,
             progress: bool = True) -> dict[str, int]:
    """All three splits under ``out_dir``. Returns the number of dialogues per split."""
    return generate_splits(out_dir, "mt_shapes.json", generate_split, total, seed, cfg, val, test, turns, progress)


def load_scenes(path: str | os.PathLike) -> dict[str, Scene]:
    """``scenes.jsonl`` as a dict scene_id -> Scene."""
    scenes = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                scene = Scene.from_json(json.loads(line))
                scenes[scene.scene_id] = scene
    return scenes


def parse_aspect(text: str) -> float | None:
    """``"1"``, ``"1.5"``, ``"4:3"`` -> width / height. ``"random"`` -> ``None``."""
    if text == "random":
        return None
    try:
        if ":" in text:
            w, h = text.split(":")
            return float(w) / float(h)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"--aspect must be a number, W:H or 'random', got {text!r}") from None


def parse_aspects(values: Sequence[str]) -> tuple[float, ...]:
    out = tuple(parse_aspect(v) for v in values)
    if any(a is None for a in out):
        raise ValueError("--aspects takes numbers or W:H ratios, not 'random'")
    return out  # type: ignore[return-value]
