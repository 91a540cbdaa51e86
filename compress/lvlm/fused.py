"""Feature reducers as fixed-shape device functions: everything that depends only on (n, m, layout) (position
embeddings, pooling windows, sample indices) is computed once, so a reduction is a few kernels with no host work or
host-to-device copies, and can be captured in a CUDA graph.

``fused_reducer(fn, n, m, layout, device)`` -> ``f(x (n, d)) -> tokens (m, d)``, or None when ``fn`` has no fused
form (then the caller runs ``fn`` itself). MetaCompress (both generators, "paper" and "normed", with or without
locality or a Spatial prior) gives the tokens of ``MetaCompress.forward`` (the same operations in the same order);
Sample the same gather.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from compress.layout import Layout


def _metacompress(module, n: int, m: int, layout: Layout | None, device) -> Callable | None:
    from compress.layout import default_layout
    from compress.metacompress import pool_windows, spatial_prior_tables

    generator = getattr(module, "generator", "paper")
    if generator not in ("paper", "normed"):
        return None
    normed = generator == "normed"
    layout = layout or default_layout(n)
    with torch.no_grad():
        pos = module.position_embeddings(layout).to(device)
    distances = None
    if hasattr(module, "log_locality"):
        from compress.metacompress import locality_distances

        distances = locality_distances(layout, m, device).to(module.log_locality.dtype)
    query_pool = outside = None
    if hasattr(module, "score_gate"):
        query_pool, outside = spatial_prior_tables(layout, m, device, module.w_key.dtype)
    index, valid = pool_windows(n, m, module.kernel_size)
    index, valid = index.to(device), valid.to(device)
    wk, wq, omega = module.w_key, module.w_query, module.omega
    scale = math.sqrt(module.compress_dim)
    avg = module.pooling == "avg"
    if avg:
        weights = valid.to(wk.dtype) / valid.sum(1, keepdim=True).to(wk.dtype)

    def reduce(x: torch.Tensor) -> torch.Tensor:
        z = x.to(wk.dtype)
        if normed:  # centred per image, each token scaled to norm sqrt(d)
            z = z - z.mean(0, keepdim=True)
            z = z * (math.sqrt(z.shape[1]) / z.norm(dim=1, keepdim=True).clamp_min(1e-6))
        z = z + pos
        keys = z @ wk
        if query_pool is not None:
            pooled = query_pool @ z
        elif avg:
            pooled = torch.einsum("mk,mkd->md", weights, z[index])  # z[index]: (m, k, d)
        else:
            pooled = z[index].masked_fill(~valid[..., None], float("-inf")).amax(1)
        queries = pooled @ wq
        if normed:
            queries = F.normalize(queries * omega, dim=1, eps=1e-6)
            scores = module.log_temperature.exp() * queries @ F.normalize(keys, dim=1, eps=1e-6).T
        else:
            scores = (queries * omega) @ keys.T / scale  # (m, n)
        if outside is not None:
            scores = module.score_gate * scores - module.log_spatial_prior.exp() * outside
        if distances is not None:
            scores = scores + -module.log_locality.exp() * distances
        p = scores.softmax(-1)
        return (p @ x.to(p.dtype)).to(x.dtype)

    return reduce


def fused_reducer(fn, n: int, m: int, layout: Layout | None, device: torch.device) -> Callable | None:
    """The fused form of reducer ``fn`` for (n, m, layout), or None (see module doc)."""
    from compress.baselines.sample import sample_indices, sample_reduce
    from compress.metacompress import MetaCompress

    if isinstance(fn, MetaCompress):
        return _metacompress(fn, n, m, layout, device)
    if fn is sample_reduce:
        keep = sample_indices(n, m).to(device)
        return lambda x: x.index_select(0, keep)
    return None
