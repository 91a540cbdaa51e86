"""The per-image fixed compression matrix (paper section 4, appendix 8.1, algorithm 2).

A free ``P_raw`` (m, n) from N(0, sigma_raw^2); ``P = softmax(P_raw)`` row-wise; optimised by SGD on
``loss_fn(P @ x, P) + entropy_weight * entropy(P)`` for one image. ``loss_fn`` is any differentiable loss of the
compressed tokens (typically the KL of the LVLM's answers against the full-token teacher).

The paper's start (near-uniform rows) and optimizer (SGD, lr 10) are the defaults. They can leave the oracle worse
than a trained MetaCompress (docs/design.md §4.3), which is no bound at all; ``init="pool"`` (rows start as the
pooling windows MetaCompress starts from) and ``optimizer="adam"`` make it one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from compress.losses import entropy_loss
from compress.metacompress import pool_windows
from compress.reduction import Reduction


@dataclass
class OracleFit:
    reduction: Reduction
    losses: list[float]


def fit_oracle(x: torch.Tensor, num_keep: int, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               steps: int = 500, lr: float = 10.0, init_std: float = 0.1, entropy_weight: float = 1.0,
               seed: int = 0, init: str = "random", optimizer: str = "sgd", kernel_size: int = 3) -> OracleFit:
    """Fit P (num_keep, n) for one sequence ``x`` (n, d); ``loss_fn(tokens (m, d), P (m, n)) -> scalar``.
    ``init``: "random" (the paper's) or "pool" (row i starts on pooling window i of ``kernel_size`` tokens);
    ``optimizer``: "sgd" (the paper's) or "adam"."""
    if init not in ("random", "pool") or optimizer not in ("sgd", "adam"):
        raise ValueError(f"init={init!r} / optimizer={optimizer!r}: use 'random'|'pool' and 'sgd'|'adam'")
    x = x.detach()
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randn(num_keep, x.shape[0], generator=generator) * init_std
    if init == "pool":  # in-window logits 0, the rest -8: each row holds ~99 % of its mass on its window
        index, valid = pool_windows(x.shape[0], num_keep, kernel_size)
        start = torch.full_like(raw, -8.0)
        start.scatter_(1, index, torch.where(valid, 0.0, -8.0))
        raw = raw + start
    raw = raw.to(x.device, torch.float32).requires_grad_(True)
    optimizer = torch.optim.SGD([raw], lr=lr) if optimizer == "sgd" else torch.optim.Adam([raw], lr=lr)
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
