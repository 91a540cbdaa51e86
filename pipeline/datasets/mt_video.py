"""MT-Video: synthetic multi-turn questions about short videos of MT-Shapes objects (docs/design.md §7, video).

A video holds three objects of distinct colours on one flat background, each in its own third of the frame (columns
or rows), and each with one event: one moves along its third (up/down in a column, left/right in a row), one
appears at a later frame, one changes colour at a later frame. The three turns ask about different objects and
events, "when" (which frame an object first appears in, which half of the video an event happens in) and "what"
(the new colour, the direction, the shape, how many objects the last frame shows), so what the first question needs
is not what the later ones need. Objects are drawn with MT-Shapes' own drawing; frames are written as an MPEG-4 file
with PyAV. Frames are numbered from 1 in questions. Deterministic: video i of a split depends only on
``(seed, split, i)``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.datasets.mt_shapes import (COLORS, SHAPES, SIZES, SPLITS, ShapeObject, _draw_object, generate_splits,
                                         image_shape)
from pipeline.dialogues import Dialogue, Turn, write_dialogues

EVENTS = ("move", "appear", "change")
TYPES = ("appear_frame", "appear_half", "change_color", "change_half", "direction", "shape", "count_end")
QUESTIONS = {
    "appear_frame": "In which frame does the {name} first appear?",
    "appear_half": "Does the {name} appear in the first or the second half of the video?",
    "change_color": "The {name} changes colour. What colour does it become?",
    "change_half": "Does the {name} change colour in the first or the second half of the video?",
    "direction": "Which way does the {name} move?",
    "shape": "What shape is the {color} object?",
    "count_end": "How many objects are there in the last frame?",
}
FOR_EVENT = {"move": ("direction", "shape"), "appear": ("appear_frame", "appear_half", "shape"),
             "change": ("change_color", "change_half", "shape")}
RADIUS = {"small": 5.5, "large": 8.5}  # pixels at a 96 x 96 frame; scaled with sqrt(frame area)
SCENES_FILE = "video_scenes.jsonl"


@dataclass(frozen=True)
class VideoObject:
    """``event``: move | appear | change. A mover goes from (x0, y0) in frame 1 to (x1, y1) in the last frame;
    ``frame`` (0-based) is when an appearing object first shows or a changing one takes ``new_color``."""

    shape: str
    color: str
    size: str
    radius: float
    event: str
    x0: float
    y0: float
    x1: float
    y1: float
    frame: int = 0
    new_color: str | None = None

    def name(self) -> str:
        return f"{self.color} {self.shape}"

    def at(self, f: int, frames: int) -> tuple[float, float, str] | None:
        """(cx, cy, colour) in frame ``f`` (0-based), or None when not yet visible."""
        if self.event == "appear" and f < self.frame:
            return None
        s = f / max(frames - 1, 1)
        color = self.new_color if self.event == "change" and f >= self.frame else self.color
        return self.x0 + s * (self.x1 - self.x0), self.y0 + s * (self.y1 - self.y0), color


@dataclass(frozen=True)
class VideoScene:
    scene_id: str
    width: int
    height: int
    frames: int
    fps: int
    background: tuple[int, int, int]
    objects: tuple[VideoObject, ...]

    def to_json(self) -> dict:
        return {**asdict(self), "objects": [asdict(o) for o in self.objects]}


@dataclass(frozen=True)
class MTVideoConfig:
    image_size: int = 96
    aspect: float = 1.0
    frames: int = 8
    fps: int = 4

    def __post_init__(self) -> None:
        if self.image_size < 48:
            raise ValueError(f"--image-size must be >= 48 pixels for three objects per frame, got {self.image_size}")
        if not 4 <= self.frames <= 64:
            raise ValueError(f"--frames must be in 4..64, got {self.frames}")
        if self.fps < 1:
            raise ValueError(f"--fps must be >= 1, got {self.fps}")


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, 11, SPLITS.index(split), index]))


def sample_scene(rng: np.random.Generator, cfg: MTVideoConfig, scene_id: str) -> VideoScene:
    """Three objects, one per third of the frame, each with one of the three events."""
    width, height = image_shape(cfg.image_size, cfg.aspect)
    scale = math.sqrt(width * height) / 96.0
    columns = bool(rng.integers(2))  # columns: movers go up/down; rows: movers go left/right
    palette = [str(c) for c in rng.permutation(list(COLORS))]
    events = [str(e) for e in rng.permutation(EVENTS)]
    objects = []
    for i, event in enumerate(events):
        size = SIZES[int(rng.integers(len(SIZES)))]
        r = RADIUS[size] * scale
        lo, hi = (i * width / 3, (i + 1) * width / 3) if columns else (i * height / 3, (i + 1) * height / 3)
        across = float(rng.uniform(lo + r + 1, hi - r - 1))
        along_len = height if columns else width
        a0, a1 = float(rng.uniform(r + 1, along_len / 3)), float(rng.uniform(2 * along_len / 3, along_len - r - 1))
        if event != "move":
            a0 = a1 = float(rng.uniform(r + 1, along_len - r - 1))
        elif rng.integers(2):
            a0, a1 = a1, a0
        x0, y0, x1, y1 = (across, a0, across, a1) if columns else (a0, across, a1, across)
        frame = int(rng.integers(1, cfg.frames)) if event != "move" else 0
        objects.append(VideoObject(SHAPES[int(rng.integers(len(SHAPES)))], palette[i], size, round(r, 2), event,
                                   round(x0, 2), round(y0, 2), round(x1, 2), round(y1, 2), frame,
                                   palette[3] if event == "change" else None))
    base = int(rng.integers(150, 236))
    background = tuple(int(np.clip(base + t, 0, 255)) for t in rng.integers(-20, 21, size=3))
    return VideoScene(scene_id, width, height, cfg.frames, cfg.fps, background, tuple(objects))


def render_frames(scene: VideoScene) -> list[Image.Image]:
    """Every frame of the video, drawn with MT-Shapes' ``_draw_object``."""
    frames = []
    for f in range(scene.frames):
        image = Image.new("RGB", (scene.width, scene.height), tuple(scene.background))
        draw = ImageDraw.Draw(image)
        for o in scene.objects:
            where = o.at(f, scene.frames)
            if where is not None:
                cx, cy, color = where
                _draw_object(draw, ShapeObject(o.shape, color, o.size, 0, 0, cx, cy, o.radius), COLORS[color])
        frames.append(image)
    return frames


def write_video(path: str | os.PathLike, frames: list[Image.Image], fps: int) -> None:
    """Frames -> an MPEG-4 file (yuv420p; a high bit rate keeps the flat colours within a few levels)."""
    import av

    tmp = Path(str(path) + ".tmp.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        stream.bit_rate = 4_000_000
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())
    os.replace(tmp, path)


def answer(scene: VideoScene, index: int, kind: str) -> str:
    """The answer to a question of type ``kind`` about object ``index`` (frames counted from 1)."""
    o = scene.objects[index]
    half = "first" if o.frame < scene.frames / 2 else "second"
    if kind == "appear_frame":
        return str(o.frame + 1)
    if kind in ("appear_half", "change_half"):
        return half
    if kind == "change_color":
        return str(o.new_color)
    if kind == "direction":
        dx, dy = o.x1 - o.x0, o.y1 - o.y0
        return ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
    if kind == "shape":
        return o.shape
    if kind == "count_end":
        return str(sum(o.at(scene.frames - 1, scene.frames) is not None for o in scene.objects))
    raise ValueError(f"unknown MT-Video question type {kind!r}; known: {TYPES}")


def sample_dialogue(rng: np.random.Generator, scene: VideoScene, turns: int = 3) -> list[tuple[str, str, dict]]:
    """One question per object while objects are left (in random order; a "when" or "what" type its event allows),
    then the count of the last frame."""
    order = [int(i) for i in rng.permutation(len(scene.objects))]
    out = []
    for t in range(turns):
        if t < len(order):
            o = scene.objects[order[t]]
            kind = str(rng.choice(FOR_EVENT[o.event]))
            text = QUESTIONS[kind].format(name=o.name(), color=o.color)
            out.append((text, answer(scene, order[t], kind), {"type": kind, "objects": [order[t]]}))
        else:
            out.append((QUESTIONS["count_end"], answer(scene, 0, "count_end"), {"type": "count_end", "objects": []}))
    return out


def generate_split(out_dir: str | os.PathLike, split: str, count: int, seed: int, cfg: MTVideoConfig = MTVideoConfig(),
                   turns: int = 3, progress: bool = True) -> int:
    """Write ``out_dir/split/{dialogues.jsonl, video_scenes.jsonl, videos/*.mp4}`` with ``count`` dialogues."""
    from tqdm import tqdm

    split_dir = Path(out_dir) / split
    (split_dir / "videos").mkdir(parents=True, exist_ok=True)
    dialogues = []
    tmp = split_dir / (SCENES_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in tqdm(range(count), desc=f"mt-video {split}", disable=not progress):
            rng = _rng(seed, split, i)
            did = f"mtvideo-{split}-{i:06d}"
            scene = sample_scene(rng, cfg, did)
            path = split_dir / "videos" / f"{did}.mp4"
            write_video(path, render_frames(scene), scene.fps)
            f.write(json.dumps({**scene.to_json(), "video": f"videos/{did}.mp4"}) + "\n")
            turns_ = tuple(Turn(q, (a,), m) for q, a, m in sample_dialogue(rng, scene, turns))
            dialogues.append(Dialogue(did, str(path.resolve()), turns_, "mt_video",
                                      {"video_scene": did, "frames": scene.frames, "fps": scene.fps}, kind="video"))
    os.replace(tmp, split_dir / SCENES_FILE)
    return write_dialogues(split_dir / "dialogues.jsonl", dialogues)


def generate(out_dir: str | os.PathLike, total: int, seed: int, cfg: MTVideoConfig = MTVideoConfig(),
             val: int | None = None, test: int | None = None, turns: int = 3,
             progress: bool = True) -> dict[str, int]:
    """All three splits under ``out_dir``. Returns the number of dialogues per split."""
    return generate_splits(out_dir, "mt_video.json", generate_split, total, seed, cfg, val, test, turns, progress)
