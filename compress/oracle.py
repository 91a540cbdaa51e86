"""The per-image fixed compression matrix (paper section 4, appendix 8.1, algorithm 2).

A free ``P_raw`` (m, n) from N(0, sigma_raw^2); ``P = softmax(P_raw)`` row-wise; optimised by SGD on
``loss_fn(P @ x, P) + entropy_weight * entropy(P)`` for one image. ``loss_fn`` is any differentiable loss of the
compressed tokens (typically the KL of the LVLM's answers against the full-token teacher).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from compress.losses import entropy_loss
from compress.reduction import Reduction


@dataclass
class OracleFit:
    reduction: Reduction
    losses: list[float]


def fit_oracle(x: torch.Tensor, num_keep: int, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               steps: int = 500, lr: float = 10.0, init_std: float = 0.1, entropy_weight: float = 1.0,
               seed: int = 0) -> OracleFit:
    """Fit P (num_keep, n) for one sequence ``x`` (n, d); ``loss_fn(tokens (m, d), P (m, n)) -> scalar``."""
    x = x.detach()
    generator = torch.Generator().manual_seed(seed)
    raw = (torch.randn(num_keep, x.shape[0], generator=generator) * init_std).to(x.device, torch.float32)
    raw.requires_grad_(True)
    optimizer = torch.optim.SGD([raw], lr=lr)
    losses = []
    for _ in range(steps):
        p = raw.softmax(-1)
        loss = loss_fn(p.to(x.dtype) @ x, p) + entropy_weight * entropy_loss(p)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        p = raw.softmax(-1)
        return OracleFit(Reduction(tokens=p.to(x.dtype) @ x, matrix=p), losses)
