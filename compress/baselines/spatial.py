"""Spatial: 2-D average pooling of each segment's grid to its share of ``m`` (layout tokens are dropped).

Shares are proportional to segment sizes (largest remainder). A segment of h x w pooled to ``k`` cells is cut into
``r ~ h * sqrt(k / (h * w))`` horizontal bands whose cell counts differ by at most one, and each band into equal
column ranges, so every output is the mean of a rectangle and the count is exact for any ``k`` (for ``k = r * c``
dividing the grid this is ordinary ``r x c`` adaptive average pooling).
"""

from __future__ import annotations

import math

import torch

from compress.layout import Layout, Segment, default_layout
from compress.reduction import Reduction


def split_budget(total: int, sizes: list[int]) -> list[int]:
    """Largest-remainder split of ``total <= sum(sizes)`` over parts proportional to ``sizes``."""
    whole = sum(sizes)
    exact = [total * s / whole for s in sizes]
    shares = [math.floor(e) for e in exact]
    order = sorted(range(len(sizes)), key=lambda i: exact[i] - shares[i], reverse=True)
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


def _bounds(length: int, parts: int, i: int) -> tuple[int, int]:
    return (i * length) // parts, ((i + 1) * length) // parts


def segment_pooling_matrix(seg: Segment, k: int, n: int) -> torch.Tensor:
    """(k, n) rows averaging rectangles of the segment's grid."""
    rows = round(seg.height * math.sqrt(k / (seg.height * seg.width)))
    rows = min(seg.height, k, max(rows, -(-k // seg.width), 1))  # no band may need more cells than columns
    per_row = [k // rows + (1 if r < k % rows else 0) for r in range(rows)]
    matrix = torch.zeros(k, n)
    out = 0
    for r, count in enumerate(per_row):
        r0, r1 = _bounds(seg.height, rows, r)
        for c in range(count):
            c0, c1 = _bounds(seg.width, count, c)
            cells = [seg.offset + i * seg.row_stride + j for i in range(r0, r1) for j in range(c0, c1)]
            matrix[out, cells] = 1.0 / len(cells)
            out += 1
    return matrix


def spatial_matrix(layout: Layout, m: int) -> torch.Tensor:
    """(m, n) the spatial pooling matrix of a layout."""
    sizes = [s.height * s.width for s in layout.segments]
    if m > sum(sizes):
        raise ValueError(f"cannot keep {m} tokens of a layout with {sum(sizes)} grid tokens")
    shares = split_budget(m, sizes)
    return torch.cat([segment_pooling_matrix(s, k, layout.num_tokens) for s, k in zip(layout.segments, shares) if k])


def spatial_reduce(x: torch.Tensor, num_keep: int, layout: Layout | None = None) -> Reduction:
    """x (n, d) -> tokens (m, d) = P x with P (m, n) from :func:`spatial_matrix`."""
    p = spatial_matrix(layout or default_layout(x.shape[0]), num_keep).to(x.device, x.dtype)
    return Reduction(tokens=p @ x, matrix=p)
