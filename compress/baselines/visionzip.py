"""VisionZip (Yang et al., CVPR 2025; dvlab-research/VisionZip): dominant + contextual tokens, before the projector.

Per image (or LLaVA-NeXT crop), from the CLIP layer that produces the feature layer (``attn_layer``, default the
layer whose output is ``hidden_states[feature_layer]``: layer 22 for LLaVA's -2, as the official code):
1. Dominant: the [CLS] attention summed over heads ranks the patches; [CLS] itself plus the top ``dominant - 1``
   patches are kept in raster order (official: ``dominant`` counts [CLS]; ``keep_cls=False`` keeps ``dominant``
   patches instead).
2. Contextual: the remaining M patches, in raster order, give ``contextual`` targets at ``arange(0, M, max(1, M //
   contextual))[:contextual]``; every other remaining patch joins its most cosine-similar target, the similarity
   taken on the keys of that layer averaged over heads. ``merge="mean"`` (default) makes each contextual token the
   plain average of its group (target included), the paper's "merge by averaging"; ``merge="official"`` gives the
   released ``target + mean(assigned)``, whose scale drifts with the group (docs/design.md §4.4.5).
Output: [dominant] + [contextual], ``num_keep = dominant + contextual`` tokens, every one of them reaching the LLM.
Default split: the published 54+10 / 108+20 / 162+30 ratio (``contextual = round(num_keep * 10 / 64)``).

LLaVA-NeXT (``pixel_values`` (B, K, 3, H, W) or a list of (K_b, 3, H, W)): crops are compressed one by one, but the
budget holds for the whole image: ``allocate_crop_budget`` splits ``dominant`` and ``contextual`` over the crops so
that every image gets exactly ``num_keep`` tokens (the official version applies its budget per crop, so its count
grows with the crop count, VisionZip #17). The result is a flat sequence (crop by crop, base image first): no unpad
and no image newlines, as in the official version.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compress.baselines._clip_hooks import (allocate_crop_budget, check_budget, check_strategy, cls_attention,
                                            crops_of, encoder_layers, feature_index, layer_index, run_tower,
                                            split_heads, vision_body)

__all__ = ["allocate_crop_budget", "visionzip", "visionzip_select", "visionzip_split"]


def visionzip_split(num_keep: int) -> tuple[int, int]:
    """(dominant, contextual) for a budget, at the published 54:10 ratio."""
    contextual = round(num_keep * 10 / 64)
    return num_keep - contextual, contextual


def visionzip_select(hidden: torch.Tensor, cls_attn: torch.Tensor, metric: torch.Tensor, dominant: int,
                     contextual: int, keep_cls: bool = True, merge: str = "mean"
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (B, N + 1, C) with [CLS] first, cls_attn (B, N) over the patches, metric (B, N + 1, Ck) ->
    (tokens (B, dominant + contextual, C), dominant_idx (B, dominant), target_idx (B, contextual)); indices are
    positions in the N + 1 sequence."""
    if merge not in ("mean", "official"):
        raise ValueError(f"merge={merge!r}; use 'mean' or 'official'")
    b, n1, c = hidden.shape
    n, d_patch = n1 - 1, dominant - int(keep_cls)
    if d_patch < 0 or contextual < 0 or contextual > n - d_patch:
        raise ValueError(f"visionzip: dominant={dominant} (keep_cls={keep_cls}), contextual={contextual} do not fit "
                         f"{n} patches")
    top = cls_attn.topk(d_patch, dim=1).indices.sort(dim=1).values + 1
    dom_idx = torch.cat([top.new_zeros(b, 1), top], 1) if keep_cls else top
    tokens = [hidden.gather(1, dom_idx[..., None].expand(-1, -1, c))]
    rest_mask = torch.ones(b, n1, dtype=torch.bool, device=hidden.device)
    rest_mask[:, 0] = False
    rest_mask.scatter_(1, top, False)
    m = n - d_patch
    rest = rest_mask.nonzero()[:, 1].view(b, m)  # raster order
    pos = torch.arange(0, m, max(1, m // max(contextual, 1)), device=hidden.device)[:contextual]
    is_target = torch.zeros(m, dtype=torch.bool, device=hidden.device)
    is_target[pos] = True
    target, others = rest[:, is_target], rest[:, ~is_target]
    if contextual > 0:
        mk = F.normalize(metric.float(), dim=-1)
        pick = lambda t, idx: t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
        sim = pick(mk, others) @ pick(mk, target).transpose(1, 2)  # (B, M - contextual, contextual)
        assign = F.one_hot(sim.argmax(-1), contextual).float()
        sums = assign.transpose(1, 2) @ pick(hidden.float(), others)
        counts = assign.sum(1)[..., None]
        t_h = pick(hidden.float(), target)
        ctx = (t_h + sums) / (1 + counts) if merge == "mean" else t_h + sums / counts.clamp_min(1)
        tokens.append(ctx.to(hidden.dtype))
    return torch.cat(tokens, 1), dom_idx, target


def _signals(vision_tower: nn.Module, pixel_values: torch.Tensor, feature_layer: int, attn_layer: int | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pixel_values (B, 3, H, W) -> hidden (B, N + 1, C), [CLS] attention summed over heads (B, N), keys averaged
    over heads (B, N + 1, C / H)."""
    layers = encoder_layers(vision_tower)
    fi = feature_index(feature_layer, len(layers))
    if attn_layer is None and fi == 0:
        raise ValueError("visionzip: feature_layer points at the embeddings; no attention layer produces it, "
                         "pass attn_layer")
    li = layer_index(fi - 1 if attn_layer is None else attn_layer, len(layers))
    hidden, qk = run_tower(vision_tower, pixel_values, [li])
    attn = layers[li].self_attn
    a = cls_attention(qk[li]["q"], qk[li]["k"], attn.num_heads, attn.scale).sum(1)
    return hidden[fi], a, split_heads(qk[li]["k"], attn.num_heads).mean(1)


@torch.no_grad()
def visionzip(vision_tower: nn.Module, pixel_values: torch.Tensor | Sequence[torch.Tensor], num_keep: int,
              feature_layer: int = -2, select_strategy: str = "default", *, dominant: int | None = None,
              contextual: int | None = None, keep_cls: bool = True, attn_layer: int | None = None,
              merge: str = "mean", crops_per_image: Sequence[int] | None = None) -> torch.Tensor:
    """pixel_values (B, 3, H, W), (B, K, 3, H, W) or a list of (K_b, 3, H, W) -> features (B, num_keep, C).

    ``select_strategy="full"`` forces ``keep_cls``; ``"default"`` follows ``keep_cls`` (True: the official
    VisionZip re-inserts [CLS], and it counts in the budget). ``dominant``/``contextual``: an explicit split of the
    whole-image budget (must sum to ``num_keep``). ``crops_per_image``: real crop counts of a padded 5-D batch."""
    check_strategy(select_strategy)
    keep_cls = keep_cls or select_strategy == "full"
    if dominant is None and contextual is None:
        dominant, contextual = visionzip_split(num_keep)
    elif dominant is None or contextual is None or dominant + contextual != num_keep:
        raise ValueError(f"visionzip: dominant={dominant} + contextual={contextual} must both be given and sum to "
                         f"num_keep={num_keep}")
    n = vision_body(vision_tower).embeddings.num_patches
    if isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 4:
        check_budget(num_keep, n + keep_cls, "visionzip")
        hidden, a, metric = _signals(vision_tower, pixel_values, feature_layer, attn_layer)
        return visionzip_select(hidden, a, metric, dominant, contextual, keep_cls, merge)[0]
    images = crops_of(pixel_values, crops_per_image)
    check_budget(num_keep, min(c.shape[0] for c in images) * (n + keep_cls), "visionzip (whole image)")
    hidden, a, metric = _signals(vision_tower, torch.cat(images), feature_layer, attn_layer)
    out, start = [], 0
    for crops in images:
        k = crops.shape[0]
        parts = []
        for i, (d, c) in enumerate(zip(allocate_crop_budget(dominant, k), allocate_crop_budget(contextual, k))):
            j = start + i
            if d + c > 0:
                parts.append(visionzip_select(hidden[j:j + 1], a[j:j + 1], metric[j:j + 1], d, c,
                                              keep_cls and d > 0, merge)[0][0])
        out.append(torch.cat(parts))
        start += k
    return torch.stack(out)
