"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, anyres): a base grid, then the unpadded crop grid whose rows
each end with an image-newline token. The token count varies with the image's aspect ratio."""

from __future__ import annotations

from pathlib import Path

import torch

from compress.layout import Layout, Segment
from compress.lvlm.base import EncodedImage, LVLMAdapter, load_image
from compress.lvlm.llava import load_image_processor

_NEXT_PROCESSOR = "transformers.models.llava_next.image_processing_pil_llava_next.LlavaNextImageProcessorPil"


def next_layout(image_size: tuple[int, int], grid_pinpoints: list, tile: int, patch: int,
                full: bool = False) -> Layout:
    """Layout of a LLaVA-NeXT image of ``image_size`` (height, width), following transformers'
    ``pack_image_features``: base grid (h x w), then the anyres crops unpadded to (H', W') with a newline after each
    row; a single-crop image gets one newline after its base grid."""
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape, image_size_to_num_patches, unpad_image)

    if full:
        raise ValueError("vision_feature_select_strategy='full' is not supported for LLaVA-NeXT layouts")
    side = tile // patch
    base = Segment("base", side, side, 0, side)
    if image_size_to_num_patches(list(image_size), grid_pinpoints, tile) <= 1:
        return Layout(side * side + 1, (base,), (side * side,))
    rows, cols = get_anyres_image_grid_shape(list(image_size), grid_pinpoints, tile)
    h, w = unpad_image(torch.empty(1, rows * side, cols * side), list(image_size)).shape[1:]
    off = side * side
    newlines = tuple(off + r * (w + 1) + w for r in range(h))
    return Layout(off + h * (w + 1), (base, Segment("crops", h, w, off, w + 1)), newlines)


class LlavaNextAdapter(LVLMAdapter):
    family = "llava_next"

    model_class = "LlavaNextForConditionalGeneration"

    @classmethod
    def load_processor(cls, model_dir: Path, config):
        return load_image_processor(model_dir, _NEXT_PROCESSOR, config.vision_config.image_size,
                                    image_grid_pinpoints=config.image_grid_pinpoints)

    def layout(self, image_size: tuple[int, int]) -> Layout:
        vc = self.model.config.vision_config
        return next_layout(image_size, self.model.config.image_grid_pinpoints, vc.image_size, vc.patch_size,
                           self.select_strategy == "full")

    def preprocess(self, image) -> dict[str, torch.Tensor]:
        image = load_image(image)
        out = self.image_processor(images=[image], return_tensors="pt")
        return {"pixel_values": out["pixel_values"].to(self.device, self.dtype),
                "image_sizes": torch.as_tensor(out["image_sizes"], device=self.device)}

    def prepare(self, image) -> EncodedImage:
        """image (PIL or path) -> pixel values (1, K, 3, H, W), size and anyres layout (``tokens`` still None)."""
        pil = load_image(image)
        inputs = self.preprocess(pil)
        size = tuple(int(v) for v in inputs["image_sizes"][0].tolist())
        return EncodedImage(None, self.layout(size), inputs["pixel_values"], size)

    @torch.no_grad()
    def features(self, prepared: EncodedImage) -> EncodedImage:
        """Run the vision tower + projector + anyres packing: X_IMG (n, d) (base, unpadded crops, newlines)."""
        sizes = torch.tensor([prepared.image_size], device=self.device)
        feats = self.model.model.get_image_features(pixel_values=prepared.pixel_values,
                                                    image_sizes=sizes).pooler_output[0]
        if feats.shape[0] != prepared.layout.num_tokens:
            raise ValueError(f"{self.model_dir}: {feats.shape[0]} visual tokens but the anyres layout gives "
                             f"{prepared.layout.num_tokens} for an image of size {prepared.image_size}")
        return EncodedImage(feats, prepared.layout, prepared.pixel_values, prepared.image_size)

    def full_forward_logits(self, ids: torch.Tensor, encoded: EncodedImage) -> torch.Tensor:
        sizes = torch.tensor([encoded.image_size], device=self.device)
        return self.model(input_ids=ids, pixel_values=encoded.pixel_values, image_sizes=sizes).logits
