"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one h x w grid of visual tokens per image."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compress.layout import Layout, Segment
from compress.lvlm.base import EncodedImage, LVLMAdapter, load_image

_PROCESSORS = {  # preprocessor_config.json image_processor_type prefix -> Pil class name (no torchvision here)
    "LlavaImageProcessor": "transformers.models.llava.image_processing_pil_llava.LlavaImageProcessorPil",
    "CLIPImageProcessor": "transformers.models.clip.image_processing_pil_clip.CLIPImageProcessorPil",
}


def _import(path: str):
    import importlib

    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def load_image_processor(model_dir: Path, default: str, image_size: int, **defaults):
    """The directory's own image processor (Pil backend) when it has preprocessor_config.json; otherwise ``default``
    sized for the vision tower (resize the shortest edge to ``image_size``, centre crop)."""
    cfg_path = model_dir / "preprocessor_config.json"
    if cfg_path.is_file():
        kind = json.loads(cfg_path.read_text()).get("image_processor_type", "")
        for prefix, cls_path in _PROCESSORS.items():
            if kind.startswith(prefix):
                return _import(cls_path).from_pretrained(str(model_dir))
        return _import(default).from_pretrained(str(model_dir))
    return _import(default)(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                            **defaults)


class LlavaAdapter(LVLMAdapter):
    family = "llava"

    model_class = "LlavaForConditionalGeneration"

    @classmethod
    def load_processor(cls, model_dir: Path, config):
        """The directory's processor; LLaVA-1.5's pad-to-square (docs/design.md §5) when the checkpoint asks for it:
        ``"do_pad": true`` in preprocessor_config.json (llava-hf's LlavaImageProcessor) or ``"image_aspect_ratio":
        "pad"`` in config.json (LLaVA's own checkpoints). Padding is the image-mean colour, before the resize."""
        proc = load_image_processor(model_dir, _PROCESSORS["CLIPImageProcessor"], config.vision_config.image_size)
        pre = model_dir / "preprocessor_config.json"
        wants_pad = getattr(config, "image_aspect_ratio", None) == "pad" or (
            pre.is_file() and json.loads(pre.read_text()).get("do_pad") is True)
        pad = _import(_PROCESSORS["LlavaImageProcessor"])
        if wants_pad and not (isinstance(proc, pad) and proc.do_pad):  # CLIP's processor ignores do_pad
            if pre.is_file():
                proc = pad.from_pretrained(str(model_dir), do_pad=True)
            else:
                side = config.vision_config.image_size
                proc = pad(size={"shortest_edge": side}, crop_size={"height": side, "width": side}, do_pad=True)
        return proc

    def grid(self) -> tuple[int, int]:
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        return side, side

    def layout(self) -> Layout:
        """One grid; with the 'full' strategy the [CLS] token comes first as its own 1x1 segment."""
        h, w = self.grid()
        if self.select_strategy == "full":
            return Layout(h * w + 1, (Segment("cls", 1, 1, 0, 1), Segment("base", h, w, 1, w)))
        return Layout.grid(h, w)

    def preprocess(self, image) -> dict[str, torch.Tensor]:
        image = load_image(image)
        out = self.image_processor(images=[image], return_tensors="pt")
        return {"pixel_values": out["pixel_values"].to(self.device, self.dtype)}

    def prepare(self, image) -> EncodedImage:
        """image (PIL or path) -> pixel values, size and layout (``tokens`` still None: no vision tower run)."""
        pil = load_image(image)
        pv = self.preprocess(pil)["pixel_values"]
        return EncodedImage(None, self.layout(), pv, (pil.height, pil.width))

    @torch.no_grad()
    def features(self, prepared: EncodedImage) -> EncodedImage:
        """Run the vision tower + projector: X_IMG (n, d) with the configured feature layer and strategy."""
        feats = self.model.model.get_image_features(pixel_values=prepared.pixel_values).pooler_output[0]
        if feats.shape[0] != prepared.layout.num_tokens:
            raise ValueError(f"{self.model_dir}: {feats.shape[0]} visual tokens but the grid gives "
                             f"{prepared.layout.num_tokens}; check vision_config.image_size / patch_size")
        return EncodedImage(feats, prepared.layout, prepared.pixel_values, prepared.image_size)

    def full_forward_logits(self, ids: torch.Tensor, encoded: EncodedImage) -> torch.Tensor:
        return self.model(input_ids=ids, pixel_values=encoded.pixel_values).logits
