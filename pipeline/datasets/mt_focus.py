"""MT-Focus: a second synthetic multi-turn benchmark, unlike MT-Shapes where it matters (docs/design.md §7).

MT-Shapes fills a textured image with 3-6 small objects on a 3 x 3 grid and asks each turn about a different part of
the scene. MT-Focus turns all three around:

- **Large plain backgrounds.** One flat colour per image, no texture, no noise; 1-3 objects, so most visual tokens
  are background and carry (almost) nothing.
- **Free positions.** Objects lie anywhere, not in grid cells; each lies wholly inside one quadrant of the image, so
  "left or right" and "top or bottom" have one answer.
- **Every turn about the same object.** A dialogue picks one object and asks three different things about it (its
  shape, size, side, height), naming it by its colour (colours are distinct within a scene). The tokens the first
  question needs are the tokens every later question needs: a prompt-agnostic compressor that keeps the object
  loses nothing across turns.

Scenes are written to ``focus_scenes.jsonl``, deliberately not ``scenes.jsonl``: the reference recipe's
MT-Shapes-only supervision must not find them, so a model trained on MT-Focus comes from the generic recipe alone.
Deterministic: dialogue i of a split depends only on ``(seed, split, i)``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# _draw_object: the same shapes as MT-Shapes (a FocusObject has its cx, cy, radius and shape)
from pipeline.datasets.mt_shapes import (COLORS, DEFAULT_ASPECTS, SHAPES, SIZES, SPLITS, _draw_object, generate_splits,
                                         image_shape)
from pipeline.dialogues import Dialogue, Turn, write_dialogues

RADIUS = {"small": 6.0, "large": 11.0}  # pixels at a 96 x 96 image; scaled with sqrt(image area)
SIDES = ("left", "right")
HEIGHTS = ("top", "bottom")
TYPES = ("shape", "size", "side", "height")
ANSWER_VOCAB: tuple[str, ...] = SHAPES + SIZES + SIDES + HEIGHTS
MARGIN = 2.0  # pixels between an object and the image's edges and mid-lines
SCENES_FILE = "focus_scenes.jsonl"


@dataclass(frozen=True)
class FocusObject:
    shape: str
    color: str
    size: str
    cx: float
    cy: float
    radius: float


@dataclass(frozen=True)
class FocusScene:
    scene_id: str
    width: int
    height: int
    background: tuple[int, int, int]
    objects: tuple[FocusObject, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {"scene_id": self.scene_id, "width": self.width, "height": self.height,
                "background": list(self.background), "objects": [asdict(o) for o in self.objects]}

    @staticmethod
    def from_json(obj: dict[str, Any]) -> FocusScene:
        return FocusScene(obj["scene_id"], int(obj["width"]), int(obj["height"]), tuple(obj["background"]),
                          tuple(FocusObject(**o) for o in obj["objects"]))


@dataclass(frozen=True)
class MTFocusConfig:
    """``image_size``: side of a square image; other aspect ratios keep about the same area. ``aspect``: width /
    height, or ``None`` for a random one per scene from ``aspects`` (LLaVA-NeXT)."""

    image_size: int = 96
    aspect: float | None = 1.0
    aspects: tuple[float, ...] = DEFAULT_ASPECTS
    multiple: int = 8
    min_objects: int = 1
    max_objects: int = 3

    def __post_init__(self) -> None:
        if self.image_size < 48:
            raise ValueError(f"MT-Focus image_size must be >= 48 pixels (a large object per quadrant), got "
                             f"{self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= 4:
            raise ValueError(f"MT-Focus needs 1 <= min_objects <= max_objects <= 4, got "
                             f"{self.min_objects}..{self.max_objects}")
        for a in ([self.aspect] if self.aspect is not None else list(self.aspects)):
            if not 0.5 <= a <= 2.0:
                raise ValueError(f"aspect ratios (width / height) must be in [0.5, 2], got {a}")


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    # A different stream from MT-Shapes' for the same (seed, split, index): the 7 marks MT-Focus.
    return np.random.default_rng(np.random.SeedSequence([seed, 7, SPLITS.index(split), index]))


def sample_scene(rng: np.random.Generator, cfg: MTFocusConfig, scene_id: str) -> FocusScene:
    """1-3 objects of distinct colours, each wholly inside one quadrant, none overlapping, on one flat colour."""
    aspect = cfg.aspect if cfg.aspect is not None else float(rng.choice(cfg.aspects))
    width, height = image_shape(cfg.image_size, aspect, cfg.multiple)
    scale = math.sqrt(width * height) / 96.0
    k = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    colors = [str(c) for c in rng.choice(list(COLORS), size=k, replace=False)]
    objects: list[FocusObject] = []
    for color in colors:
        for _ in range(100):  # rejection sampling; 4 quadrants always fit 3 objects
            size = SIZES[int(rng.integers(len(SIZES)))]
            r = min(RADIUS[size] * scale, min(width, height) / 4.0 - MARGIN - 1)
            qx, qy = int(rng.integers(2)), int(rng.integers(2))
            x0, y0 = qx * width / 2, qy * height / 2
            cx = float(rng.uniform(x0 + r + MARGIN, x0 + width / 2 - r - MARGIN))
            cy = float(rng.uniform(y0 + r + MARGIN, y0 + height / 2 - r - MARGIN))
            if all(math.hypot(cx - o.cx, cy - o.cy) > r + o.radius + MARGIN for o in objects):
                shape = SHAPES[int(rng.integers(len(SHAPES)))]
                objects.append(FocusObject(shape, color, size, round(cx, 2), round(cy, 2), round(r, 2)))
                break
    base = int(rng.integers(150, 236))
    background = tuple(int(np.clip(base + t, 0, 255)) for t in rng.integers(-20, 21, size=3))
    return FocusScene(scene_id, width, height, background, tuple(objects))


def render_scene(scene: FocusScene) -> Image.Image:
    """The RGB image: one flat background colour, solid objects, no texture or noise."""
    image = Image.new("RGB", (scene.width, scene.height), tuple(scene.background))
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        _draw_object(draw, o, COLORS[o.color])
    return image


def object_mask(scene: FocusScene) -> np.ndarray:
    """(height, width) int array: 0 for background, i + 1 where object i was drawn (same raster as the image)."""
    mask = Image.new("L", (scene.width, scene.height), 0)
    draw = ImageDraw.Draw(mask)
    for i, o in enumerate(scene.objects):
        _draw_object(draw, o, i + 1)
    return np.asarray(mask, dtype=np.int64)


def patch_objects(scene: FocusScene, grid_h: int, grid_w: int, min_cover: float = 0.2) -> np.ndarray:
    """(grid_h, grid_w) index of the object covering most of each patch (at least ``min_cover`` of it), else -1."""
    mask = object_mask(scene)
    ys = np.round(np.linspace(0, scene.height, grid_h + 1)).astype(int)
    xs = np.round(np.linspace(0, scene.width, grid_w + 1)).astype(int)
    out = np.full((grid_h, grid_w), -1, dtype=np.int64)
    for py in range(grid_h):
        for px in range(grid_w):
            cell = mask[ys[py]:ys[py + 1], xs[px]:xs[px + 1]]
            counts = np.bincount(cell.reshape(-1), minlength=len(scene.objects) + 1)[1:]
            if len(counts) and counts.max() >= min_cover * cell.size:
                out[py, px] = int(counts.argmax())
    return out


def answer(scene: FocusScene, index: int, kind: str) -> str:
    """The answer to a question of type ``kind`` about object ``index``."""
    o = scene.objects[index]
    if kind == "shape":
        return o.shape
    if kind == "size":
        return o.size
    if kind == "side":
        return SIDES[int(o.cx > scene.width / 2)]
    if kind == "height":
        return HEIGHTS[int(o.cy > scene.height / 2)]
    raise ValueError(f"unknown MT-Focus question type {kind!r}; known: {TYPES}")


QUESTIONS = {"shape": "What shape is the {} object?", "size": "Is the {} object small or large?",
             "side": "Is the {} object on the left or the right?",
             "height": "Is the {} object at the top or the bottom?"}


def sample_dialogue(rng: np.random.Generator, scene: FocusScene, turns: int = 3) -> list[tuple[str, str, dict]]:
    """``turns`` questions about one object, of distinct types while types are left."""
    index = int(rng.integers(len(scene.objects)))
    order = [str(t) for t in rng.permutation(TYPES)]
    kinds = (order * (turns // len(order) + 1))[:turns]
    color = scene.objects[index].color
    return [(QUESTIONS[k].format(color), answer(scene, index, k), {"type": k, "objects": [index]}) for k in kinds]


def generate_split(out_dir: str | os.PathLike, split: str, count: int, seed: int, cfg: MTFocusConfig = MTFocusConfig(),
                   turns: int = 3, progress: bool = True) -> int:
    """Write ``out_dir/split/{dialogues.jsonl, focus_scenes.jsonl, images/*.png}`` with ``count`` dialogues."""
    from tqdm import tqdm

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    split_dir = Path(out_dir) / split
    (split_dir / "images").mkdir(parents=True, exist_ok=True)
    dialogues = []
    tmp = split_dir / (SCENES_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in tqdm(range(count), desc=f"mt-focus {split}", disable=not progress):
            rng = _rng(seed, split, i)
            did = f"mtfocus-{split}-{i:06d}"
            scene = sample_scene(rng, cfg, did)
            image_path = split_dir / "images" / f"{did}.png"
            render_scene(scene).save(image_path)
            f.write(json.dumps({**scene.to_json(), "image": f"images/{did}.png"}) + "\n")
            qs = sample_dialogue(rng, scene, turns)
            turns_ = tuple(Turn(q, (a,), m) for q, a, m in qs)
            dialogues.append(Dialogue(did, str(image_path.resolve()), turns_, "mt_focus",
                                      {"focus_scene": did, "width": scene.width, "height": scene.height}))
    os.replace(tmp, split_dir / SCENES_FILE)
    return write_dialogues(split_dir / "dialogues.jsonl", dialogues)


def generate(out_dir: str | os.PathLike, total: int, seed: int, cfg: MTFocusConfig = MTFocusConfig(),
             val: int | None = None, test: int | None = None, turns: int = 3,
             progress: bool = True) -> dict[str, int]:
    """All three splits under ``out_dir``. Returns the number of dialogues per split."""
    return generate_splits(out_dir, "mt_focus.json", generate_split, total, seed, cfg, val, test, turns, progress)


def load_scenes(path: str | os.PathLike) -> dict[str, FocusScene]:
    """``focus_scenes.jsonl`` as a dict scene_id -> FocusScene."""
    with open(path, encoding="utf-8") as f:
        return {s.scene_id: s for s in (FocusScene.from_json(json.loads(line)) for line in f if line.strip())}
