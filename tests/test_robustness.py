"""The object-oracle probe of the reference models (infra/reference/robustness.py)."""

from __future__ import annotations

import numpy as np


def test_rankings_keep_asked_objects_then_others_then_evenly_spaced():
    from infra.reference.robustness import rankings

    objects = np.array([-1, 0, 0, -1, 1, -1, 2, -1, -1, -1])
    order = {k: np.argsort(-v, kind="stable")[:5].tolist() for k, v in rankings(objects, [1], 5).items()}
    assert order["object oracle"][:1] == [4]  # the asked object first
    assert sorted(order["object oracle"][1:4]) == [1, 2, 6]  # then the other objects
    assert order["sample"] == [1, 3, 5, 7, 9]  # the Sample baseline: floor((i + 0.5) * 10 / 5)
    assert order["asked objects only"] == [4, 1, 3, 5, 7]  # the asked object, then the evenly spaced ones


def test_keeping_every_token_changes_no_answer(tmp_path):
    """With --keep = all 144 tokens every ranking keeps the same tokens in the same order: same accuracy."""
    from infra.reference.robustness import first_turn_accuracy
    from pipeline.datasets import mt_shapes

    mt_shapes.generate_split(tmp_path, "test", 6, seed=3, progress=False)
    table = first_turn_accuracy("infra/reference/llava", tmp_path / "test" / "dialogues.jsonl", keep=144)
    assert set(table) == {"all tokens", "object oracle", "asked objects only", "sample", "random",
                          "prompt attention (TPRL's teacher)"}
    assert all(by == table["all tokens"] for by in table.values())
