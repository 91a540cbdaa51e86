"""Image preprocessing as tensor ops on the model's device, and the vision tower as one fixed-shape function.

Preprocessing follows transformers' Pil image processors (CLIP for LLaVA-1.5, anyres for LLaVA-NeXT): resize
(bicubic; PIL's kernel through ``antialias=True``, rounded to 8 bits like PIL's output), centre crop, rescale,
normalise; LLaVA-NeXT adds the best-resolution resize, zero padding and the tiles. Tolerance: an identity resize
(an image already at the tower's size) gives the processor's values up to float rounding; a real resize differs from
PIL by at most a few 8-bit levels at a few pixels (PIL computes in fixed point): ``tests/test_device_preprocess.py``
checks at most 3 levels anywhere and a mean of at most 0.02 levels (seen: 2 and 0.005; a level is 1/255/std in
normalised units).

``tower_features`` runs only the CLIP layers the feature layer needs (hidden_states[-2]: 23 of 24 layers); with the
projector and LLaVA-NeXT's packing (as one precomputed gather, ``pack_index``) it equals ``adapter.features``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pil_to_tensor(image) -> torch.Tensor:
    """A PIL RGB image -> (H, W, 3) uint8 CPU tensor."""
    image = image.convert("RGB")
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)


def _get(size, key):
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """x (N, C, H, W) float in [0, 255] -> (N, C, height, width), bicubic like PIL's: two 1-D passes, each rounded to
    8 bits; the vertical one first when it shrinks the image, and more than the horizontal one does (Pillow's order,
    seen on Pillow 13)."""
    def one_pass(x, size):
        if tuple(x.shape[-2:]) == size:
            return x  # PIL copies on a same-size pass
        out = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        return out.round().clamp_(0, 255)

    h, w = x.shape[-2:]
    if h > height and h * width > height * w:  # H / height > 1 and > W / width
        return one_pass(one_pass(x, (height, w)), (height, width))
    return one_pass(one_pass(x, (h, width)), (height, width))


def shortest_edge(height: int, width: int, short: int) -> tuple[int, int]:
    """transformers' ``get_resize_output_image_size`` for a shortest-edge size."""
    small, large = (width, height) if width <= height else (height, width)
    new_large = int(short * large / small)
    return (new_large, short) if width <= height else (short, new_large)


def crop_normalise(x: torch.Tensor, proc) -> torch.Tensor:
    """Resize to the shortest edge, centre crop, rescale and normalise: x (N, 3, H, W) 8-bit values as float ->
    (N, 3, h, w) float32, as ``proc`` does per image."""
    if proc.do_resize:
        x = resize(x, *shortest_edge(x.shape[-2], x.shape[-1], _get(proc.size, "shortest_edge")))
    if proc.do_center_crop:
        ch, cw = _get(proc.crop_size, "height"), _get(proc.crop_size, "width")
        top, left = (x.shape[-2] - ch) // 2, (x.shape[-1] - cw) // 2
        if top < 0 or left < 0:
            raise ValueError(f"image {tuple(x.shape[-2:])} smaller than the crop {(ch, cw)}: not supported on device")
        x = x[..., top:top + ch, left:left + cw]
    if proc.do_rescale:
        x = x * float(proc.rescale_factor)
    if proc.do_normalize:  # per channel with Python scalars: no host-to-device copy (capturable)
        x = torch.stack([(x[:, c] - float(m)) / float(s) for c, (m, s) in enumerate(zip(proc.image_mean,
                                                                                          proc.image_std))], 1)
    return x


def patch_output_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """transformers' ``get_patch_output_size``: fit (height, width) into target keeping the aspect ratio."""
    th, tw = target
    scale_w, scale_h = tw / width, th / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), th), tw
    return th, min(math.ceil(width * scale_h), tw)


def anyres_tiles(x: torch.Tensor, proc) -> list[torch.Tensor]:
    """LLaVA-NeXT: x (1, 3, H, W) float 8-bit values -> K tiles (1, 3, h, w) of 8-bit values: the whole image
    resized to the tile size, then the tiles of the best-resolution resize, zero-padded (centred), row-major."""
    from transformers.image_processing_utils import select_best_resolution

    height, width = x.shape[-2:]
    best = select_best_resolution((height, width), proc.image_grid_pinpoints)
    nh, nw = patch_output_size(height, width, best)
    resized = resize(x, nh, nw)
    top, left = (best[0] - nh) // 2, (best[1] - nw) // 2
    padded = F.pad(resized, (left, best[1] - nw - left, top, best[0] - nh - top))
    side = _get(proc.crop_size, "height") or _get(proc.size, "height") or _get(proc.size, "shortest_edge")
    size = (_get(proc.size, "height"), _get(proc.size, "width"))
    size = size if all(size) else (_get(proc.size, "shortest_edge"),) * 2
    tiles = [padded[..., i:i + side, j:j + side] for i in range(0, best[0], side) for j in range(0, best[1], side)]
    return [resize(x, *size)] + tiles


def pixel_values(family: str, proc, image: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """image (H, W, 3) uint8 on the device -> the processor's pixel values in ``dtype``: (1, 3, h, w) for "llava",
    (1, K, 3, h, w) for "llava_next". Fixed shapes for a given image size: capturable."""
    x = image.permute(2, 0, 1)[None].float()
    if family == "llava":
        return crop_normalise(x, proc).to(dtype)
    tiles = [crop_normalise(t, proc) for t in anyres_tiles(x, proc)]
    return torch.cat(tiles, 0)[None].to(dtype)


# --- vision tower -----------------------------------------------------------------------------------------------
def _transformer(tower):
    return getattr(tower, "vision_model", tower)  # CLIPVisionModel wraps CLIPVisionTransformer in older releases


def tower_features(adapter, pixel_values: torch.Tensor) -> torch.Tensor:
    """pixel_values (K, 3, h, w) -> projected visual tokens (K, n, d): the CLIP layers up to the feature layer (the
    rest is never read), the select strategy, the projector."""
    vt = _transformer(adapter.model.model.vision_tower)
    layers = vt.encoder.layers
    layer = adapter.feature_layer
    depth = len(layers) + 1 + layer if layer < 0 else layer  # hidden_states[i] = the output of i layers
    hidden = vt.pre_layrnorm(vt.embeddings(pixel_values.to(adapter.dtype)))
    for block in layers[:depth]:
        hidden = block(hidden, None)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    if adapter.select_strategy == "default":
        hidden = hidden[:, 1:]
    return adapter.project(hidden)


def pack_index(adapter, image_size: tuple[int, int], tiles: int, per_tile: int) -> torch.Tensor:
    """LLaVA-NeXT's packing (base tile, unpadded crops, newline after each row) of ``tiles`` x ``per_tile`` tokens
    as a gather index into their flattening plus one newline row (index tiles * per_tile): (n,) long."""
    mm = adapter.model.model
    marks = torch.arange(tiles * per_tile, dtype=torch.float64).view(tiles, per_tile, 1)
    packed, _ = mm.pack_image_features([marks], torch.tensor([list(image_size)]), adapter.select_strategy,
                                       image_newline=torch.tensor([-1.0], dtype=torch.float64))
    packed = packed[0] if isinstance(packed, (list, tuple)) else packed  # a list per image, or one tensor
    index = packed.reshape(-1).long()
    return torch.where(index < 0, tiles * per_tile, index).to(adapter.device)


def packed_features(adapter, pixel_values: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """pixel_values (1, 3, h, w) or (1, K, 3, h, w) -> X_IMG (n, d) as ``adapter.features`` (index: ``pack_index``
    for LLaVA-NeXT, None for LLaVA-1.5)."""
    feats = tower_features(adapter, pixel_values[0] if pixel_values.dim() == 5 else pixel_values)
    if index is None:
        return feats[0]
    flat = feats.reshape(-1, feats.shape[-1])
    newline = adapter.model.model.image_newline.to(flat.dtype)[None]
    return torch.cat([flat, newline], 0).index_select(0, index)
