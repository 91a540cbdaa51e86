"""Random: ``m`` tokens uniformly without replacement, kept in their original order; seeded. In the evaluation
each image has its own seed, derived from its id and a configurable seed (:class:`PerImageRandom`)."""

from __future__ import annotations

import hashlib
from collections import deque

import torch

from compress.layout import Layout
from compress.reduction import Reduction


def random_reduce(x: torch.Tensor, num_keep: int, layout: Layout | None = None, seed: int = 0) -> Reduction:
    """x (n, d) -> tokens (m, d), keep_indices (m,) sorted."""
    generator = torch.Generator().manual_seed(seed)
    keep = torch.randperm(x.shape[0], generator=generator)[:num_keep].sort().values.to(x.device)
    return Reduction(tokens=x[keep], keep_indices=keep)


def image_seed(image_id: str, seed: int = 0) -> int:
    """The seed of one image: sha256 of the configured seed and the image id, as a 63-bit integer. The same image
    gets the same tokens in every dialogue, run and method order; another ``seed`` gives an independent draw."""
    digest = hashlib.sha256(f"{int(seed)}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class PerImageRandom:
    """Random with a seed per image (:func:`image_seed`). The caller names the images, in the order they will be
    reduced, with :meth:`for_images`; each call then takes the next seed. A call without a named image fails
    rather than fall back to a shared seed."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self._pending: deque[int] = deque()

    def for_images(self, image_ids: list[str]) -> None:
        self._pending = deque(image_seed(i, self.seed) for i in image_ids)

    def __call__(self, x: torch.Tensor, num_keep: int, layout: Layout | None = None) -> Reduction:
        if not self._pending:
            raise RuntimeError("PerImageRandom: no image id left for this reduction; call for_images(ids) with one "
                               "id per image before reducing them")
        return random_reduce(x, num_keep, layout, seed=self._pending.popleft())
