"""Sample: equidistant down-sampling of the flattened sequence (token ``floor((i + 0.5) * n / m)``)."""

from __future__ import annotations

import torch

from compress.layout import Layout
from compress.reduction import Reduction


def sample_indices(n: int, m: int) -> torch.Tensor:
    """(m,) the token at the centre of each of ``m`` equal strides over ``n`` tokens."""
    return torch.floor((torch.arange(m, dtype=torch.float64) + 0.5) * n / m).long()


def sample_reduce(x: torch.Tensor, num_keep: int, layout: Layout | None = None) -> Reduction:
    """x (n, d) -> tokens (m, d), keep_indices (m,)."""
    keep = sample_indices(x.shape[0], num_keep).to(x.device)
    return Reduction(tokens=x[keep], keep_indices=keep)
