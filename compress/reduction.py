"""The common result of every token reducer, and the token budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def num_keep(n: int, rate: float) -> int:
    """Tokens that survive a reduction ``rate`` in (0, 1): ``m = max(1, round(n * (1 - rate)))``."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"reduction rate must be in (0, 1), got {rate}")
    return max(1, round(n * (1.0 - rate)))


@dataclass
class Reduction:
    """``tokens``: (m, d) reduced sequence. ``matrix``: (m, n) P with ``tokens == P @ x`` for linear methods.
    ``keep_indices``: (m,) sorted indices into the input for pure selection methods."""

    tokens: torch.Tensor
    matrix: torch.Tensor | None = None
    keep_indices: torch.Tensor | None = None
