"""Random: ``m`` tokens uniformly without replacement, kept in their original order; seeded."""

from __future__ import annotations

import torch

from compress.layout import Layout
from compress.reduction import Reduction


def random_reduce(x: torch.Tensor, num_keep: int, layout: Layout | None = None, seed: int = 0) -> Reduction:
    """x (n, d) -> tokens (m, d), keep_indices (m,) sorted."""
    generator = torch.Generator().manual_seed(seed)
    keep = torch.randperm(x.shape[0], generator=generator)[:num_keep].sort().values.to(x.device)
    return Reduction(tokens=x[keep], keep_indices=keep)
