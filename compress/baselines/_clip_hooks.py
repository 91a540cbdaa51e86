"""Shared access to transformers' CLIP vision tower for the vision-tower baselines (ToMe, PruMerge, VisionZip).

Works on ``CLIPVisionModel`` (transformers 5: it holds ``embeddings``, ``pre_layrnorm`` and ``encoder`` itself; the
LLaVA tower is ``model.model.vision_tower``) and on anything wrapping such a body in ``.vision_model`` (older
transformers' ``CLIPVisionTransformer``, ``CLIPVisionModelWithProjection``). The model is never copied or patched:
q/k projections are read through forward hooks that exist only inside ``capture_qk`` and are removed on exit, so an
idle model is exactly the unhooked one.

Indices: ``hidden_states`` has ``L + 1`` entries (0 = embeddings after ``pre_layrnorm``, ``i`` = output of encoder
layer ``i - 1``). ``feature_layer`` indexes it as LLaVA does (-2 = the input of the last layer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

SELECT_STRATEGIES = ("default", "full")


def vision_body(vision_tower: nn.Module) -> nn.Module:
    """The module holding ``embeddings``, ``pre_layrnorm`` and ``encoder.layers``."""
    body = getattr(vision_tower, "vision_model", vision_tower)
    for attr in ("embeddings", "pre_layrnorm", "encoder"):
        if not hasattr(body, attr):
            raise TypeError(f"{type(vision_tower).__name__} is not a CLIP vision tower (no .{attr}); pass "
                            "transformers' CLIPVisionModel, e.g. llava.model.vision_tower")
    return body


def encoder_layers(vision_tower: nn.Module) -> nn.ModuleList:
    return vision_body(vision_tower).encoder.layers


def feature_index(feature_layer: int, num_layers: int) -> int:
    """Position of ``feature_layer`` in ``hidden_states`` (0..L)."""
    if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
        raise ValueError(f"feature_layer={feature_layer!r}: the vision-tower baselines take one int layer "
                         "(multi-layer features are not supported)")
    if not -(num_layers + 1) <= feature_layer <= num_layers:
        raise ValueError(f"feature_layer={feature_layer} is outside hidden_states of a {num_layers}-layer tower "
                         f"(valid: {-(num_layers + 1)}..{num_layers})")
    return feature_layer % (num_layers + 1)


def layer_index(layer: int, num_layers: int) -> int:
    """Position of encoder layer ``layer`` (negative counts from the end) in 0..L-1."""
    if not -num_layers <= layer < num_layers:
        raise ValueError(f"encoder layer {layer} does not exist in a {num_layers}-layer tower")
    return layer % num_layers


def check_strategy(select_strategy: str) -> None:
    if select_strategy not in SELECT_STRATEGIES:
        raise ValueError(f"select_strategy={select_strategy!r}; use one of {SELECT_STRATEGIES} "
                         "('default' drops [CLS] as LLaVA does, 'full' keeps it)")


def check_budget(num_keep: int, available: int, method: str) -> None:
    if isinstance(num_keep, bool) or not isinstance(num_keep, int) or not 1 <= num_keep <= available:
        raise ValueError(f"{method}: num_keep={num_keep!r} must be an int in 1..{available} (tokens available)")


def tower_dtype(vision_tower: nn.Module) -> torch.dtype:
    return next(vision_tower.parameters()).dtype


@contextmanager
def capture_qk(vision_tower: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, dict[str, torch.Tensor]]]:
    """While active, ``store[l]["q"|"k"]`` receives the (B, N, C) q/k projections of encoder layer ``l``."""
    store: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    mods = encoder_layers(vision_tower)
    try:
        for layer in layers:
            slot = store.setdefault(layer, {})
            for name in ("q", "k"):
                proj = getattr(mods[layer].self_attn, f"{name}_proj")
                handles.append(proj.register_forward_hook(_saver(slot, name)))
        yield store
    finally:
        for h in handles:
            h.remove()


def _saver(slot: dict[str, torch.Tensor], name: str) -> Callable:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        slot[name] = output.detach()
    return hook


def run_tower(vision_tower: nn.Module, pixel_values: torch.Tensor, qk_layers: Sequence[int] = ()
              ) -> tuple[tuple[torch.Tensor, ...], dict[int, dict[str, torch.Tensor]]]:
    """pixel_values (B, 3, H, W) -> (hidden_states: L + 1 tensors (B, N + 1, C), q/k (B, N + 1, C) per layer)."""
    if pixel_values.dim() != 4:
        raise ValueError(f"expected pixel_values (B, 3, H, W), got shape {tuple(pixel_values.shape)}")
    with capture_qk(vision_tower, qk_layers) as qk:
        out = vision_tower(pixel_values=pixel_values.to(tower_dtype(vision_tower)), output_hidden_states=True)
    return out.hidden_states, qk


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, H, N, C / H)."""
    b, n, c = x.shape
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def cls_attention(q: torch.Tensor, k: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """q, k (B, N + 1, C) with [CLS] first -> (B, H, N): softmax over all N + 1 keys of the [CLS] query, the
    [CLS] column then dropped (as both PruMerge and VisionZip do). Computed in float32."""
    qh = split_heads(q.float(), num_heads)[:, :, :1]
    kh = split_heads(k.float(), num_heads)
    attn = torch.softmax((qh @ kh.transpose(-1, -2)) * scale, dim=-1)
    return attn[:, :, 0, 1:]


def allocate_crop_budget(num_keep: int, num_crops: int, weights: Sequence[float] | None = None) -> list[int]:
    """Split a whole-image budget over crops: shares proportional to ``weights`` (default equal), largest
    remainders first, ties to the earlier crop (the LLaVA-NeXT base image comes first). Sums to ``num_keep``."""
    if num_crops < 1 or num_keep < 0:
        raise ValueError(f"cannot split {num_keep} tokens over {num_crops} crops")
    w = [1.0] * num_crops if weights is None else [float(v) for v in weights]
    if len(w) != num_crops or min(w) < 0 or sum(w) <= 0:
        raise ValueError(f"weights {weights} do not fit {num_crops} crops (need {num_crops} non-negative values)")
    exact = [num_keep * v / sum(w) for v in w]
    shares = [int(e) for e in exact]
    order = sorted(range(num_crops), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: num_keep - sum(shares)]:
        shares[i] += 1
    return shares


def crops_of(pixel_values: torch.Tensor | Sequence[torch.Tensor], crops_per_image: Sequence[int] | None
             ) -> list[torch.Tensor]:
    """LLaVA-NeXT input -> one (K_b, 3, H, W) tensor of real crops per image. Accepts a padded (B, K, 3, H, W)
    batch (``crops_per_image`` gives each image's real count, as ``image_sizes`` implies) or a list of 4-D tensors."""
    if isinstance(pixel_values, (list, tuple)):
        crops = list(pixel_values)
    elif pixel_values.dim() == 5:
        crops = list(pixel_values.unbind(0))
    else:
        raise ValueError(f"expected LLaVA-NeXT pixel_values (B, K, 3, H, W), got {tuple(pixel_values.shape)}")
    if crops_per_image is not None:
        if len(crops_per_image) != len(crops):
            raise ValueError(f"crops_per_image has {len(crops_per_image)} entries for {len(crops)} images")
        crops = [c[:k] for c, k in zip(crops, crops_per_image)]
    for c in crops:
        if c.dim() != 4 or c.shape[0] < 1:
            raise ValueError(f"each image needs crops (K, 3, H, W) with K >= 1, got {tuple(c.shape)}")
    return crops
