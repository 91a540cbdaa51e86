"""ToMe: token merging inside the CLIP vision tower (Bolya et al., ICLR 2023; facebookresearch/ToMe).

In every encoder layer that runs before the feature layer, between attention and MLP: split the tokens
alternately into A (even positions, [CLS] first) and B (odd), score A x B by the cosine similarity of the keys
averaged over heads, give each A token its best B partner, and merge the ``r`` best-scoring A tokens into their
partners by a size-weighted average (sizes = how many patches a token holds, tracked over layers). Attention
is proportional: ``log(size)`` is added to the logits of every key (ToMe's ``prop_attn``, recommended for
off-the-shelf models). [CLS] is never merged (its row scores -inf).

Differences from the official timm-only code, all to meet this project's contract:
- an exact budget: ``tome_schedule`` picks per-layer ``r`` so that exactly ``num_keep`` tokens leave the
  feature layer (as even as possible, never more than half of the mergeable tokens per layer);
- the encoder layers are run by ``tome_forward`` from the tower's own submodules (no copy of the model file, no
  patch), which reproduces ``CLIPEncoderLayer.forward`` exactly when nothing is merged;
- output order: ``order="spatial"`` (default) sorts tokens by the first patch they contain, so the LLM sees raster
  order; ``order="tome"`` keeps ToMe's own order ([unmerged A sorted] + [B]).
Budget: ``num_keep`` patch tokens (``select_strategy="default"``, [CLS] dropped as in LLaVA) or [CLS] plus
``num_keep - 1`` tokens (``"full"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compress.baselines._clip_hooks import (check_budget, check_strategy, crops_of, encoder_layers, feature_index,
                                            split_heads, tower_dtype, vision_body, allocate_crop_budget)


def max_merges(num_tokens: int, num_layers: int, protected: int = 1) -> int:
    """Most merges ``num_layers`` layers can make from ``num_tokens`` tokens (each layer at most half)."""
    total = 0
    for _ in range(num_layers):
        r = (num_tokens - protected) // 2
        total, num_tokens = total + r, num_tokens - r
    return total


def tome_schedule(num_tokens: int, target_tokens: int, num_layers: int, protected: int = 1) -> list[int]:
    """Per-layer merge counts ``r_l`` with ``sum(r_l) == num_tokens - target_tokens`` (token counts include
    [CLS]). Spread evenly (ToMe's constant ``r``), earlier layers taking the remainder, raised where a later layer's
    cap of ``(t - protected) // 2`` would otherwise make the target unreachable."""
    remaining = num_tokens - target_tokens
    if remaining < 0 or target_tokens < protected:
        raise ValueError(f"ToMe cannot go from {num_tokens} to {target_tokens} tokens")
    if remaining > max_merges(num_tokens, num_layers, protected):
        lowest = num_tokens - max_merges(num_tokens, num_layers, protected)
        raise ValueError(f"ToMe cannot reach {target_tokens} tokens from {num_tokens} in {num_layers} layers (each "
                         f"merges at most half); the fewest reachable is {lowest}: raise num_keep or the feature layer")
    schedule, t = [], num_tokens
    for layer in range(num_layers):
        left = num_layers - layer
        cap = (t - protected) // 2
        r = min(cap, -(-remaining // left))
        while r < cap and r + max_merges(t - r, left - 1, protected) < remaining:
            r += 1
        schedule.append(r)
        t, remaining = t - r, remaining - r
    return schedule


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool = True
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """metric (B, t, c) -> (unm_idx (B, ceil(t/2) - r), src_idx (B, r), dst_idx (B, r)), indices within A (even
    positions) resp. B (odd positions). ``unm_idx`` is sorted so [CLS] stays first."""
    m = metric / metric.norm(dim=-1, keepdim=True)
    scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)
    if class_token:
        scores[:, 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)
    src_idx, unm_idx = edge_idx[:, :r], edge_idx[:, r:]
    return unm_idx.sort(dim=-1).values, src_idx, node_idx.gather(1, src_idx)


def merge_sum(x: torch.Tensor, unm_idx: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor,
              reduce: str = "sum") -> torch.Tensor:
    """x (B, t, c) -> (B, t - r, c): [unmerged A] + [B with the merged A rows reduced in ("sum" or "amin")]."""
    a, b = x[:, ::2], x[:, 1::2]
    c = x.shape[-1]
    unm = a.gather(1, unm_idx[..., None].expand(-1, -1, c))
    src = a.gather(1, src_idx[..., None].expand(-1, -1, c))
    dst = b.scatter_reduce(1, dst_idx[..., None].expand(-1, -1, c), src, reduce=reduce)
    return torch.cat([unm, dst], dim=1)


def merge_wavg(x: torch.Tensor, size: torch.Tensor, idx: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge: x (B, t, c), size (B, t) float32 -> (B, t - r, c) in x's dtype, (B, t - r) float32.
    Computed in float32: sizes reach hundreds, which bfloat16 does not hold exactly."""
    xs = merge_sum(x.float() * size[..., None], *idx)
    s = merge_sum(size[..., None], *idx)
    return (xs / s).to(x.dtype), s[..., 0]


def _attention(layer: nn.Module, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP self-attention on x (B, t, C) with log(size) added to the logits -> (out (B, t, C), keys mean over
    heads (B, t, C / H))."""
    attn = layer.self_attn
    h = layer.layer_norm1(x)
    q, k, v = (split_heads(p(h), attn.num_heads) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    bias = None if size is None else size.log().to(q.dtype)[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    out = attn.out_proj(out.transpose(1, 2).reshape(x.shape))
    return out, k.mean(dim=1)


def tome_forward(vision_tower: nn.Module, pixel_values: torch.Tensor, schedule: Sequence[int],
                 prop_attn: bool = True, track_source: bool = False) -> dict[str, torch.Tensor]:
    """Run embeddings and the first ``len(schedule)`` encoder layers, merging ``schedule[l]`` tokens in layer l.

    pixel_values (B, 3, H, W) -> dict with ``hidden`` (B, t, C) (the output of the last layer run, [CLS] first),
    ``size`` (B, t) patches per token (float), ``first`` (B, t) the lowest input position each token holds, and
    with ``track_source`` ``source`` (B, t, N + 1), the 0/1 map of the input tokens each token holds.
    t = N + 1 - sum(schedule)."""
    body = vision_body(vision_tower)
    layers = encoder_layers(vision_tower)
    x = body.pre_layrnorm(body.embeddings(pixel_values.to(tower_dtype(vision_tower))))
    b, n, _ = x.shape
    t = n
    for r in schedule:  # the cap keeps [CLS] out of the merged set
        if not 0 <= r <= (t - 1) // 2:
            raise ValueError(f"ToMe schedule {list(schedule)}: a layer can merge 0..{(t - 1) // 2} of {t} tokens")
        t -= r
    size = torch.ones(b, n, dtype=torch.float32, device=x.device)
    first = torch.arange(n, device=x.device).expand(b, n)[..., None]
    source = torch.eye(n, dtype=x.dtype, device=x.device).expand(b, n, n) if track_source else None
    for layer, r in zip(layers, schedule):
        out, metric = _attention(layer, x, size if prop_attn else None)
        x = x + out
        if r > 0:
            idx = bipartite_soft_matching(metric, r)
            first = merge_sum(first, *idx, reduce="amin")
            if source is not None:
                source = merge_sum(source, *idx)
            x, size = merge_wavg(x, size, idx)
        x = x + layer.mlp(layer.layer_norm2(x))
    res = {"hidden": x, "size": size, "first": first[..., 0]}
    if source is not None:
        res["source"] = source
    return res


@torch.no_grad()
def tome(vision_tower: nn.Module, pixel_values: torch.Tensor, num_keep: int, feature_layer: int = -2,
         select_strategy: str = "default", *, schedule: Sequence[int] | None = None, prop_attn: bool = True,
         order: str = "spatial", crops_per_image: Sequence[int] | None = None) -> torch.Tensor:
    """pixel_values (B, 3, H, W) -> features (B, num_keep, C) at ``feature_layer``, before the projector.

    ``schedule``: explicit per-layer ``r`` (one per layer run; must sum to the needed merges), default
    ``tome_schedule``. LLaVA-NeXT input (B, K, 3, H, W) or a list of (K_b, 3, H, W): ToMe runs per crop with the
    whole-image budget split by ``allocate_crop_budget`` (our extension; the paper uses ToMe on LLaVA-1.5 only)."""
    check_strategy(select_strategy)
    if order not in ("spatial", "tome"):
        raise ValueError(f"order={order!r}; use 'spatial' or 'tome'")
    if isinstance(pixel_values, (list, tuple)) or pixel_values.dim() == 5:
        if schedule is not None:
            raise ValueError("an explicit ToMe schedule cannot fit every crop budget; leave schedule=None")
        images = crops_of(pixel_values, crops_per_image)
        jobs = [(b, i, s) for b, crops in enumerate(images)
                for i, s in enumerate(allocate_crop_budget(num_keep, crops.shape[0])) if s > 0]
        done: dict[tuple[int, int], torch.Tensor] = {}
        for share in sorted({s for _, _, s in jobs}):  # crops with the same share run as one batch
            group = [(b, i) for b, i, s in jobs if s == share]
            feats = tome(vision_tower, torch.stack([images[b][i] for b, i in group]), share, feature_layer,
                         select_strategy, prop_attn=prop_attn, order=order)
            done.update(zip(group, feats))
        return torch.stack([torch.cat([done[(b, i)] for bb, i, _ in jobs if bb == b]) for b in range(len(images))])
    num_layers = len(encoder_layers(vision_tower))
    run = feature_index(feature_layer, num_layers)
    n = vision_body(vision_tower).embeddings.num_patches
    full = select_strategy == "full"
    check_budget(num_keep, n + full, "tome")
    target = num_keep + (not full)  # tokens incl. [CLS] leaving the feature layer
    if schedule is None:
        schedule = tome_schedule(n + 1, target, run)
    elif len(schedule) != run or sum(schedule) != n + 1 - target:
        raise ValueError(f"schedule {list(schedule)} must have {run} entries summing to {n + 1 - target}")
    res = tome_forward(vision_tower, pixel_values, schedule, prop_attn)
    x = res["hidden"]
    if order == "spatial":
        x = x.gather(1, res["first"].argsort(dim=1)[..., None].expand_as(x))
    return x if full else x[:, 1:]
