"""A tiny pipeline workspace for stage tests: MT-Shapes at 32 px (20 train, 10 test dialogues) and a tiny LLaVA."""

from __future__ import annotations

from pathlib import Path

from tests.tiny_models import save_tiny


def make_workspace(root: Path, train: int = 20) -> Path:
    from pipeline.datasets.mt_shapes import MTShapesConfig, generate

    generate(root / "data", total=train + 10, seed=0, cfg=MTShapesConfig(image_size=32), val=0, test=10)
    save_tiny(root / "model", "llava", num_layers=2)
    return root


def make_config(root: Path, work: str = "work", per_shard: int = 4, **teacher):
    from pipeline.config import config_from_dict, resolve_paths

    data = {"work_dir": str(root / work), "model": {"path": str(root / "model")},
            "data": {"train": str(root / "data/train/dialogues.jsonl"), "test": str(root / "data/test/dialogues.jsonl"),
                     "val": str(root / "data/test/dialogues.jsonl")},
            "shards": {"dialogues_per_shard": per_shard}, "teacher": {"top_k": 8, "max_new_tokens": 3, **teacher},
            "evaluate": {"batch_size": 3}}
    return resolve_paths(config_from_dict(data), root)
