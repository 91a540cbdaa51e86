"""Token drop that needs no generator metadata (issue 16, item 4; docs/design.md §7).

MT-Shapes' token drop keeps the tokens each answer depends on, which only its scene generator knows. On any other
data the recipe cannot know them, so it removes visual tokens blindly, in the two ways the reducers before the LLM
do: a **random** subset (10-100 % kept, in their original order, like Random / Sample / pruners), or **pooled**
runs of g consecutive tokens averaged into one (g from 2 to 10, i.e. 50-90 % removed, like Spatial / merging /
MetaCompress's soft assignment). Either way the survivors sit at new positions, so a decoder trained with it cannot
read the scene from token positions. An answer whose object was dropped becomes a guess the loss still counts:
noise the model learns to live with.

An example keeps its image features implicit: ``kept`` is either sorted indices (n_kept,) into the image's
features or a (n_kept, n) row-stochastic matrix that mixes them (:func:`infra.reference.training.forward_kept`).
"""

from __future__ import annotations

import random
from typing import Any

GENERIC_MODES = ("random", "pool", "mixed")


def random_keep(n: int, rng: random.Random) -> Any:
    """Sorted indices of a uniformly random 10-100 % of ``n`` tokens (at least one)."""
    import torch

    k = max(1, round(rng.uniform(0.1, 1.0) * n))
    return torch.tensor(sorted(rng.sample(range(n), k)), dtype=torch.long)


def pool_matrix(n: int, group: int) -> Any:
    """(ceil(n / group), n) matrix averaging runs of ``group`` consecutive tokens (the last run may be shorter)."""
    import torch

    rows = -(-n // group)
    m = torch.zeros(rows, n)
    for r in range(rows):
        cols = slice(r * group, min(n, (r + 1) * group))
        m[r, cols] = 1.0 / (cols.stop - cols.start)
    return m


def generic_drop(ex: dict[str, Any], rng: random.Random, image_token_id: int, mode: str = "mixed") -> dict[str, Any]:
    """``ex`` (a :func:`infra.reference.targets.dialogue_example`) with fewer image tokens: ``random``, ``pool`` or
    ``mixed`` (each call picks one of the two); ``image_token_id``: the example's visual token (a Qwen video's
    video token). ``input_ids`` / ``labels`` lose the removed image positions (they
    precede every answer, so the answers' labels shift with their tokens); ``kept`` says how the survivors come from
    the image's features. Attention targets, which point at the original positions, are dropped."""
    import torch

    if mode not in GENERIC_MODES:
        raise ValueError(f"generic token-drop mode must be one of {GENERIC_MODES}, got {mode!r}")
    if mode == "mixed":
        mode = rng.choice(("random", "pool"))
    ids = ex["input_ids"]
    image = (ids == image_token_id).nonzero().flatten()
    n = len(image)
    kept = random_keep(n, rng) if mode == "random" else pool_matrix(n, rng.randint(2, 10))
    stay = torch.ones(len(ids), dtype=torch.bool)
    stay[image[len(kept):]] = False  # the image tokens are one run: keep its first len(kept) positions
    out = {k: v for k, v in ex.items() if not k.startswith("attn_")}
    if "mm_token_type_ids" in ex:  # Qwen2.5-VL: the token types follow the tokens
        out["mm_token_type_ids"] = ex["mm_token_type_ids"][stay]
    return out | {"input_ids": ids[stay], "labels": ex["labels"][stay], "kept": kept}
