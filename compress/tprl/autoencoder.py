"""TPRL's compact state: a self-supervised token-wise autoencoder over the visual features.

Each visual token ``x_i`` (d,) is mapped to a latent ``z_i`` (d_latent,) independently of the others; the policy
works on ``z`` (the paper's "compact state representation for efficient policy learning"). Unlike the public TPRL code,
where the autoencoder exists but is never loaded, the policy in ``policy.py`` requires one.

Inputs are standardised per feature dimension with statistics taken from the training data (projected LLaVA features
have a few dimensions with very large magnitude that would otherwise dominate the MSE), and the reconstruction is
returned in the original scale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn


class TokenAutoencoder(nn.Module):
    """MLP autoencoder applied to every token: ``x (..., d) -> z (..., d_latent) -> x_hat (..., d)``."""

    def __init__(self, d: int, d_latent: int = 256, d_hidden: int = 512) -> None:
        super().__init__()
        self.d, self.d_latent, self.d_hidden = d, d_latent, d_hidden
        self.encoder = nn.Sequential(nn.Linear(d, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_latent))
        self.decoder = nn.Sequential(nn.Linear(d_latent, d_hidden), nn.GELU(), nn.Linear(d_hidden, d))
        # Standardisation statistics; identity until ``set_normalisation`` is called (fit_autoencoder does).
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("scale", torch.ones(d))

    def set_normalisation(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-6) -> None:
        """mean, std (d,): per-dimension statistics of the training tokens."""
        self.mean.copy_(mean)
        self.scale.copy_(std.clamp_min(eps))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) in feature scale -> z (..., d_latent)."""
        if x.shape[-1] != self.d:
            raise ValueError(f"TokenAutoencoder expects tokens of width {self.d}, got shape {tuple(x.shape)}; "
                             "fit an autoencoder on features of this model")
        return self.encoder(self.normalise(x.to(self.mean.dtype)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., d_latent) -> x_hat (..., d) in feature scale."""
        return self.decoder(z) * self.scale + self.mean

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., d) -> (x_hat (..., d), z (..., d_latent))."""
        z = self.encode(x)
        return self.decode(z), z

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """MSE between x (..., d) and its reconstruction, measured in standardised units (scalar)."""
        z = self.encode(x)
        return (self.decoder(z) - self.normalise(x.to(self.mean.dtype))).pow(2).mean()

    def config(self) -> dict:
        return {"d": self.d, "d_latent": self.d_latent, "d_hidden": self.d_hidden}


Features = Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]]


def _iterate(features: Features) -> Iterator[torch.Tensor]:
    for i, x in enumerate(features() if callable(features) else features):
        if x.dim() != 2:
            raise ValueError(f"fit_autoencoder: feature item {i} has shape {tuple(x.shape)}; expected (n_tokens, d)")
        yield x


def _token_batches(features: Features, batch_tokens: int, pool_tokens: int,
                   generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Tokens of consecutive images pooled (``pool_tokens``), shuffled, and cut into (batch_tokens, d) batches:
    tokens of one image are strongly correlated, so batches should mix images."""
    pool: list[torch.Tensor] = []
    size = 0
    for x in _iterate(features):
        pool.append(x)
        size += x.shape[0]
        if size >= pool_tokens:
            yield from _shuffled_batches(torch.cat(pool), batch_tokens, generator)
            pool, size = [], 0
    if pool:
        yield from _shuffled_batches(torch.cat(pool), batch_tokens, generator)


def _shuffled_batches(tokens: torch.Tensor, batch_tokens: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(tokens.shape[0], generator=generator)
    for start in range(0, tokens.shape[0], batch_tokens):
        yield tokens[order[start:start + batch_tokens]]


def _statistics(features: Features, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-dimension mean and std over the first ``max_tokens`` tokens (float64 sums), and the width d."""
    total = total_sq = None
    count = 0
    for x in _iterate(features):
        x = x[: max_tokens - count].double()
        total = x.sum(0) if total is None else total + x.sum(0)
        total_sq = x.pow(2).sum(0) if total_sq is None else total_sq + x.pow(2).sum(0)
        count += x.shape[0]
        if count >= max_tokens:
            break
    if count == 0:
        raise ValueError("fit_autoencoder: the feature iterable is empty; point it at the cached feature shards")
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(0).sqrt()
    return mean.float(), std.float(), mean.shape[0]


def fit_autoencoder(features: Features, d_latent: int = 256, d_hidden: int = 512, epochs: int = 1,
                    lr: float = 1e-3, weight_decay: float = 0.0, batch_tokens: int = 4096,
                    pool_tokens: int = 65536, stats_tokens: int = 200_000, seed: int = 0,
                    model: TokenAutoencoder | None = None, device: str | torch.device = "cpu",
                    on_step: Callable[[int, float], None] | None = None) -> tuple[TokenAutoencoder, list[float]]:
    """Train a ``TokenAutoencoder`` on cached visual features by MSE reconstruction (self-supervised).

    ``features``: (n_tokens, d) tensors, one per image; a re-iterable collection or a zero-argument callable that
    returns a fresh iterable (needed because the data is read once for statistics and once per epoch).
    ``model``: continue training this autoencoder (its normalisation is kept) instead of a new one.
    ``on_step(step, loss)``: optional callback, e.g. for metric logging. Returns (model in eval mode, loss per step).
    """
    if not callable(features) and iter(features) is features:
        raise ValueError("fit_autoencoder: `features` is a one-shot iterator; pass a list, a re-iterable dataset, or a "
                         "callable that returns a fresh iterator, since the features are read more than once")
    generator = torch.Generator().manual_seed(seed)
    if model is None:
        mean, std, d = _statistics(features, stats_tokens)
        torch.manual_seed(seed)
        model = TokenAutoencoder(d, d_latent, d_hidden)
        model.set_normalisation(mean, std)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    history: list[float] = []
    for _ in range(epochs):
        for batch in _token_batches(features, batch_tokens, pool_tokens, generator):
            loss = model.loss(batch.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append(loss.item())
            if on_step is not None:
                on_step(len(history), history[-1])
    return model.eval(), history
