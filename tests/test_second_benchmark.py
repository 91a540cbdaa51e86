"""MT-Focus, the second benchmark (pipeline/datasets/mt_focus.py): determinism from the seed, and answers that agree
with what the rendered image shows, read back from its pixels without the generator's scene description."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# The palette as the images show it (docs/design.md §7); a copy, so a change to the generator's colours fails here.
PALETTE = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225), "yellow": (240, 210, 30),
           "purple": (150, 60, 200), "orange": (245, 135, 25)}


def _generate(root: Path, seed: int, n: int = 40) -> Path:
    from pipeline.datasets import mt_focus

    mt_focus.generate_split(root, "test", n, seed)
    return root / "test"


def _records(split: Path) -> list[dict]:
    return [json.loads(line) for line in (split / "dialogues.jsonl").read_text().splitlines()]


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    a, b, c = (_generate(tmp_path / name, seed) for name, seed in (("a", 3), ("b", 3), ("c", 4)))
    assert _records(a) == _records(b)
    assert [(a / "images" / p.name).read_bytes() == p.read_bytes() for p in sorted((b / "images").iterdir())] \
        == [True] * 40
    assert [r["turns"] for r in _records(a)] != [r["turns"] for r in _records(c)]
    # The recipe's MT-Shapes supervision must not find these scenes: the model comes from the generic recipe.
    assert not (a / "scenes.jsonl").exists() and (a / "focus_scenes.jsonl").is_file()


def _shape_from_mask(mask: np.ndarray) -> str:
    """Shape read from an object's pixels: how much of its bounding box it fills, and its up-down symmetry."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    fill = box.mean()
    if fill > 0.92:
        return "square"
    if fill > 0.7:
        return "circle"
    symmetric = (box & box[::-1]).sum() / box.sum()
    return "cross" if symmetric > 0.85 else "triangle"


def test_answers_agree_with_the_pixels(tmp_path):
    """Per turn, the object named by its colour is found in the image by that colour alone; its side, height, size
    (bounding box: at most 13 px small, at least 18 px large at 96 px) and shape read from those pixels equal the
    answer. Every turn of a dialogue names the same object, and asks a different thing."""
    from PIL import Image

    split = _generate(tmp_path, 0, 60)
    seen = set()
    for record in _records(split):
        image = np.asarray(Image.open(split / record["image"]).convert("RGB")).astype(int)
        h, w, _ = image.shape
        named = {t["question"].split(" the ")[1].split()[0] for t in record["turns"]}
        assert len(named) == 1 and len({t["meta"]["type"] for t in record["turns"]}) == 3
        color = named.pop()
        mask = (np.abs(image - np.array(PALETTE[color])).sum(-1) == 0)
        ys, xs = np.nonzero(mask)
        assert len(xs) > 20, (record["dialogue_id"], color)
        # wholly on one side of each mid-line, so the position answers are unambiguous
        assert (xs < w / 2).all() or (xs >= w / 2).all()
        assert (ys < h / 2).all() or (ys >= h / 2).all()
        extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
        read = {"side": "left" if xs.mean() < w / 2 else "right", "height": "top" if ys.mean() < h / 2 else "bottom",
                "size": "small" if extent <= 13 else "large" if extent >= 18 else "?",
                "shape": _shape_from_mask(mask)}
        for turn in record["turns"]:
            kind = turn["meta"]["type"]
            assert turn["answers"] == [read[kind]], (record["dialogue_id"], turn, read)
            seen.add((kind, read[kind]))
    # every answer of every type occurs in 60 dialogues
    assert {a for k, a in seen} == {"left", "right", "top", "bottom", "small", "large",
                                    "circle", "square", "triangle", "cross"}


def test_backgrounds_are_plain_and_objects_few(tmp_path):
    """One flat background colour (its most common pixel covers most of the image) and 1-3 distinct colours."""
    from PIL import Image

    split = _generate(tmp_path, 1, 30)
    for record, scene in zip(_records(split), (split / "focus_scenes.jsonl").read_text().splitlines()):
        pixels = np.asarray(Image.open(split / record["image"]).convert("RGB")).reshape(-1, 3)
        colours, counts = np.unique(pixels, axis=0, return_counts=True)
        assert tuple(colours[counts.argmax()]) == tuple(json.loads(scene)["background"])
        assert counts.max() >= 0.7 * len(pixels)
        objects = [c for c in colours.tolist() if tuple(c) in PALETTE.values()]
        assert 1 <= len(objects) <= 3 and len(colours) == len(objects) + 1


def test_data_command_writes_the_splits(tmp_path, capsys):
    from pipeline.commands.cli import main

    assert main(["data", "mt-focus", "--out", str(tmp_path), "--dialogues", "10", "--val", "2", "--test", "2"]) == 0
    counts = {s: len((tmp_path / s / "dialogues.jsonl").read_text().splitlines()) for s in ("train", "val", "test")}
    assert counts == {"train": 6, "val": 2, "test": 2}
    assert main(["data", "mt-focus", "--out", str(tmp_path), "--dialogues", "10"]) != 0
    assert "already exists; choose another --out or pass --overwrite" in capsys.readouterr().err
