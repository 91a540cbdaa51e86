"""LLaVA-PruMerge and PruMerge+ (Shang et al., arXiv 2403.15388; 42Shawn/LLaVA-PruMerge), LLaVA-1.5 only.

Per image, inside the vision tower, before the projector:
1. [CLS] attention ``a`` (N,) over the patches from the q/k projections of encoder layer ``attn_layer`` (default the
   last layer, as the official hooks on ``layers[23]``): one head over the full width, scale ``C ** -0.5``, softmax
   over all N + 1 keys (the official formula, which is the paper's ``softmax(q_cls K^T / sqrt(d_k))``).
2. Keep: PruMerge keeps the upper IQR outliers of ``a`` (``a > Q3 + 1.5 IQR``, quartiles by linear interpolation
   as ``numpy.percentile``), at least one; PruMerge+ keeps the outliers (the highest ``num_keep - 1`` if more) and
   fills up to the budget with spatially uniform tokens.
3. Merge: each kept token ``i`` takes its ``knn`` (32) nearest tokens among all other patches by cosine similarity of
   the L2-normalised keys, and becomes ``x_i + sum_j a_j x_j`` (``merge="official"``: the official sum, whose
   ``/ sum(weights)`` is commented out and matches the paper's "weighted sum" of Algorithm 1), or the
   attention-weighted average of ``{i} + neighbours`` (``merge="wavg"``, scale-preserving for training-free use).
4. One extra token, the ``a``-weighted sum (``"official"``) or average (``"wavg"``) of the pruned tokens, goes last.

Budget: every returned token counts, the extra token included. PruMerge: ``max(1, #outliers) + 1`` per image
(adaptive, returned with the counts, see ``AdaptiveFeatures``), or with ``num_keep`` the official fixed-ratio
mode: top ``num_keep - 1`` by ``a`` + the extra token. PruMerge+: exactly ``num_keep``.

Fixed against the official code: per-image IQR (the official pools the quartiles over the whole batch), batch > 1
for PruMerge+ (the official concatenates a (1, n) onto (B, k)), an exact budget instead of the
``arange(0, 575, int(int(1/ratio)/3))`` fill (a zero step there raises), no Python loop over tokens, kept tokens in
raster order (the official order is by attention). LLaVA-NeXT (anyres, 5-D ``pixel_values``) is refused, as in the
paper.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from compress.baselines._clip_hooks import (check_budget, cls_attention, encoder_layers, feature_index, layer_index,
                                            run_tower)
from compress.baselines.sample import sample_indices


class AdaptiveFeatures(NamedTuple):
    """features (B, m_max, C), zero-padded after each image's ``counts[b]`` tokens; counts (B,) long."""

    features: torch.Tensor
    counts: torch.Tensor

    @property
    def mean_kept(self) -> float:
        return float(self.counts.float().mean())

    def as_list(self) -> list[torch.Tensor]:
        return [f[:int(c)] for f, c in zip(self.features, self.counts)]


def iqr_outliers(a: torch.Tensor) -> torch.Tensor:
    """a (N,) -> bool mask (N,) of ``a > Q3 + 1.5 * (Q3 - Q1)``."""
    q1, q3 = torch.quantile(a.double(), torch.tensor([0.25, 0.75], dtype=torch.float64, device=a.device))
    return a.double() > q3 + 1.5 * (q3 - q1)


def prumerge_keep(a: torch.Tensor, num_keep: int | None = None, plus: bool = False) -> torch.Tensor:
    """a (N,) [CLS] attention -> sorted kept indices (k,). ``num_keep`` counts the extra token, so k = num_keep - 1
    when given; ``None`` (PruMerge only) keeps the outliers."""
    outliers = iqr_outliers(a).nonzero()[:, 0]
    if num_keep is None:
        if plus:
            raise ValueError("PruMerge+ needs num_keep (its budget is fixed)")
        if outliers.numel() == 0:  # no outlier: keep the most attended token rather than none
            return a.argmax().reshape(1)
        return outliers
    k = num_keep - 1
    if not plus or outliers.numel() >= k:
        return a.topk(k).indices.sort().values
    rest = torch.ones_like(a, dtype=torch.bool)
    rest[outliers] = False
    candidates = rest.nonzero()[:, 0]
    fill = candidates[sample_indices(candidates.numel(), k - outliers.numel()).to(a.device)]
    return torch.cat([outliers, fill]).sort().values


def prumerge_merge(x: torch.Tensor, a: torch.Tensor, keys: torch.Tensor, keep: torch.Tensor, knn: int = 32,
                   merge: str = "official", extra_token: bool = True) -> torch.Tensor:
    """x (N, C) patch features, a (N,) [CLS] attention, keys (N, Ck), keep (k,) -> (k + extra_token, C)."""
    if merge not in ("official", "wavg"):
        raise ValueError(f"merge={merge!r}; use 'official' or 'wavg'")
    n = x.shape[0]
    kn = torch.nn.functional.normalize(keys.float(), dim=-1)
    sim = kn[keep] @ kn.T
    sim[torch.arange(keep.numel(), device=x.device), keep] = -torch.inf  # a token is not its own neighbour
    nbr = sim.topk(min(knn, n - 1), dim=-1).indices  # (k, knn)
    w = a.float()[nbr]
    xf = x.float()
    pulled = (w[..., None] * xf[nbr]).sum(1)
    if merge == "official":
        merged = xf[keep] + pulled
    else:
        ak = a.float()[keep]
        merged = (ak[:, None] * xf[keep] + pulled) / (ak + w.sum(1))[:, None]
    out = [merged]
    if extra_token:
        pruned = torch.ones(n, dtype=torch.bool, device=x.device)
        pruned[keep] = False
        ap = a.float()[pruned]
        extra = (ap[:, None] * xf[pruned]).sum(0, keepdim=True)
        if merge == "wavg":
            extra = extra / ap.sum().clamp_min(torch.finfo(torch.float32).tiny)
        out.append(extra)
    return torch.cat(out).to(x.dtype)


def _prumerge_run(vision_tower: nn.Module, pixel_values: torch.Tensor, num_keep: int | None, feature_layer: int,
                  select_strategy: str, plus: bool, family: str, attn_layer: int, knn: int, merge: str,
                  extra_token: bool) -> AdaptiveFeatures:
    name = "prumerge_plus" if plus else "prumerge"
    if family != "llava" or (not isinstance(pixel_values, torch.Tensor)) or pixel_values.dim() != 4:
        raise ValueError(f"{name} is defined for LLaVA-1.5 only (single 336px image, pixel_values (B, 3, H, W)), as "
                         f"in the PruMerge and MetaCompress papers; got family={family!r}. For LLaVA-NeXT use "
                         "visionzip, tome or a feature reducer")
    if select_strategy != "default":
        raise ValueError(f"{name} works on the patch tokens ([CLS] dropped, select_strategy='default'), "
                         f"got {select_strategy!r}")
    layers = len(encoder_layers(vision_tower))
    fi, li = feature_index(feature_layer, layers), layer_index(attn_layer, layers)
    hidden, qk = run_tower(vision_tower, pixel_values, [li])
    x = hidden[fi][:, 1:]
    n, c = x.shape[1], x.shape[2]
    if num_keep is not None:
        check_budget(num_keep, n + 1 if extra_token else n, name)
        if extra_token and num_keep < 2:
            raise ValueError(f"{name}: num_keep={num_keep} leaves no kept token next to the extra token; use >= 2")
    a = cls_attention(qk[li]["q"], qk[li]["k"], num_heads=1, scale=qk[li]["q"].shape[-1] ** -0.5)[:, 0]
    keys = qk[li]["k"][:, 1:]
    rows = []
    for b in range(x.shape[0]):  # per image: the adaptive count differs between images
        keep = prumerge_keep(a[b], None if num_keep is None else num_keep + (not extra_token), plus)
        rows.append(prumerge_merge(x[b], a[b], keys[b], keep, knn, merge, extra_token))
    counts = torch.tensor([r.shape[0] for r in rows], device=x.device)
    feats = x.new_zeros(len(rows), int(counts.max()), c)
    for b, r in enumerate(rows):
        feats[b, :r.shape[0]] = r
    return AdaptiveFeatures(feats, counts)


@torch.no_grad()
def prumerge(vision_tower: nn.Module, pixel_values: torch.Tensor, num_keep: int | None = None,
             feature_layer: int = -2, select_strategy: str = "default", *, family: str = "llava",
             attn_layer: int = -1, knn: int = 32, merge: str = "official", extra_token: bool = True
             ) -> AdaptiveFeatures:
    """PruMerge. pixel_values (B, 3, H, W) -> AdaptiveFeatures(features (B, m_max, C), counts (B,)).

    ``num_keep=None``: adaptive IQR count (report ``.mean_kept``); an int: the official fixed-ratio mode with
    exactly ``num_keep`` tokens (extra token included)."""
    return _prumerge_run(vision_tower, pixel_values, num_keep, feature_layer, select_strategy, False, family,
                         attn_layer, knn, merge, extra_token)


@torch.no_grad()
def prumerge_plus(vision_tower: nn.Module, pixel_values: torch.Tensor, num_keep: int, feature_layer: int = -2,
                  select_strategy: str = "default", *, family: str = "llava", attn_layer: int = -1, knn: int = 32,
                  merge: str = "official", extra_token: bool = True) -> torch.Tensor:
    """PruMerge+. pixel_values (B, 3, H, W) -> features (B, num_keep, C): IQR outliers + spatially uniform tokens
    (equidistant over the not-yet-kept patches in raster order) + the extra token."""
    if num_keep is None:
        raise ValueError("prumerge_plus needs num_keep (its budget is fixed); use prumerge for the adaptive count")
    return _prumerge_run(vision_tower, pixel_values, num_keep, feature_layer, select_strategy, True, family,
                         attn_layer, knn, merge, extra_token).features
