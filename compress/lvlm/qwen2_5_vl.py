"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): dynamic resolution, a 2 x 2 merger, 3-D rotary positions.

The processor resizes an image to multiples of ``patch_size * merge_size`` (``smart_resize``), so the grid of visual
tokens (h', w') = (H / patch / 2, W / patch / 2) varies per image; the merger concatenates each 2 x 2 patch group
into one LLM token, row-major over (h', w'). Visual token (r, c) sits at rotary position (s, s + r, s + c) when the
image starts at text position s, and the text after the image continues at s + max(h', w') (transformers'
``get_rope_index``). Reduced tokens keep or take positions by the rule of docs/design.md §5 (``reduced_positions``).
The vision tower has no [CLS] token and no CLIP hooks: only feature reducers, FastV and "full" apply.
"""

from __future__ import annotations

from pathlib import Path

import torch

from compress.layout import Layout, Segment
from compress.lvlm.base import EncodedImage, LVLMAdapter, VisualPositions, load_image

_PROCESSOR = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil"


def qwen_layout(grid_thw: tuple[int, int, int], merge: int) -> Layout:
    """Layout of the merged tokens of a (T, H, W) patch grid: one (H/merge) x (W/merge) segment per temporal step."""
    t, h, w = (int(v) for v in grid_thw)
    if h % merge or w % merge:
        raise ValueError(f"patch grid {h}x{w} is not a multiple of the merge size {merge}")
    hh, ww = h // merge, w // merge
    return Layout(t * hh * ww, tuple(Segment("base" if t == 1 else f"t{i}", hh, ww, i * hh * ww, ww)
                                     for i in range(t)))


def grid_positions(layout: Layout) -> VisualPositions:
    """The unreduced positions of a Qwen layout: token (r, c) of temporal step i at (segment i's ``time``, r, c)
    (0 for an image; a video's steps carry floor(i x tokens_per_second x seconds per step), compress.lvlm.video);
    the span is max(h', w') for images and videos alike, as transformers' ``get_rope_index`` (docs/design.md §5)."""
    seg = layout.segments[0]
    times = torch.tensor([s.time for s in layout.segments])
    ti, r, c = torch.meshgrid(times, torch.arange(seg.height), torch.arange(seg.width), indexing="ij")
    offsets = torch.stack([ti, r, c], -1).reshape(-1, 3)
    return VisualPositions(offsets, max(seg.height, seg.width))


class Qwen25VLAdapter(LVLMAdapter):
    family = "qwen2_5_vl"

    model_class = "Qwen2_5_VLForConditionalGeneration"
    rope_dims = 3
    capabilities = frozenset()  # no [CLS], no CLIP tower

    @classmethod
    def load_processor(cls, model_dir: Path, config):
        """The directory's own image processor (Pil backend) when it has preprocessor_config.json; otherwise one sized
        for the vision tower (its patch, merge and temporal patch sizes; transformers' pixel bounds)."""
        from compress.lvlm.llava import _import

        proc = _import(_PROCESSOR)
        if (model_dir / "preprocessor_config.json").is_file():
            return proc.from_pretrained(str(model_dir))
        vc = config.vision_config
        return proc(patch_size=vc.patch_size, merge_size=vc.spatial_merge_size,
                    temporal_patch_size=vc.temporal_patch_size)

    def __init__(self, model, tokenizer, image_processor, model_dir, chat_template=None, conversation="auto"):
        tc, vc = model.config.text_config, model.config.vision_config
        if getattr(tc, "use_sliding_window", False):
            raise ValueError(f"{model_dir}: use_sliding_window=true is not supported by the multi-turn decoder driver "
                             "(one causal mask per layer); use a checkpoint without sliding-window attention")
        for key, want in (("patch_size", vc.patch_size), ("merge_size", vc.spatial_merge_size),
                          ("temporal_patch_size", vc.temporal_patch_size)):
            if getattr(image_processor, key, want) != want:
                raise ValueError(f"{model_dir}: the image processor's {key}={getattr(image_processor, key)} does not "
                                 f"match the vision tower's {want}; fix preprocessor_config.json")
        super().__init__(model, tokenizer, image_processor, model_dir, chat_template, conversation)

    # --- parts the CLIP-based families have and Qwen has not ---------------------------------------------------
    @property
    def feature_layer(self) -> int:
        raise ValueError(f"{self.family}: the vision tower has no selectable feature layer (its merger's output feeds "
                         "the LLM)")

    @property
    def select_strategy(self) -> str:
        raise ValueError(f"{self.family}: the vision tower has no [CLS] token to select")

    def project(self, vision_features: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{self.family}: the merger runs inside the vision tower; there is no separate projector")

    def encode_reduced_vision(self, fn, encoded: EncodedImage, num_keep: int | None, **options) -> torch.Tensor:
        raise ValueError(f"{self.family} ({self.model_dir}): vision-tower reducers need transformers' CLIP vision "
                         "tower; Qwen2.5-VL's windowed ViT has none (see compress.lvlm.methods.check_applicable)")

    # --- prompts -----------------------------------------------------------------------------------------------
    # The answer follows the generation prompt ``<|im_start|>assistant\n`` with no space (ChatML).
    answer_anchor, answer_lead = "\n", "\n"

    # --- images ------------------------------------------------------------------------------------------------
    @property
    def reference_grid(self) -> tuple[int, int]:
        """Dynamic resolution has no native grid: the merged grid of the largest square image the processor keeps
        (its ``longest_edge`` pixel bound), at most 32 x 32 (the table is interpolated to each layout)."""
        pixels = (getattr(self.image_processor, "size", None) or {}).get("longest_edge") or 1003520
        side = max(1, min(32, int(pixels ** 0.5) // (self.merge * int(self.model.config.vision_config.patch_size))))
        return side, side

    @property
    def merge(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    def grid_thw(self, layout: Layout) -> torch.Tensor:
        """(1, 3) long patch grid (T, H, W) of a layout, as the vision tower takes it."""
        seg = layout.segments[0]
        return torch.tensor([[len(layout.segments), seg.height * self.merge, seg.width * self.merge]],
                            device=self.device)

    def preprocess(self, image) -> dict[str, torch.Tensor]:
        image = load_image(image)
        out = self.image_processor(images=[image], return_tensors="pt")
        return {"pixel_values": out["pixel_values"].to(self.device, self.dtype),
                "image_grid_thw": torch.as_tensor(out["image_grid_thw"], device=self.device)}

    def prepare(self, image) -> EncodedImage:
        """image (PIL or path) -> flattened patches (N, C * T * p * p), size and merged-token layout (no tokens)."""
        pil = load_image(image)
        inputs = self.preprocess(pil)
        layout = qwen_layout(tuple(inputs["image_grid_thw"][0].tolist()), self.merge)
        return EncodedImage(None, layout, inputs["pixel_values"], (pil.height, pil.width))

    @torch.no_grad()
    def features(self, prepared: EncodedImage) -> EncodedImage:
        """Run the vision tower and its 2 x 2 merger: X_IMG (n, d), row-major over (h', w')."""
        feats = self.model.model.get_image_features(pixel_values=prepared.pixel_values,
                                                    image_grid_thw=self.grid_thw(prepared.layout)).pooler_output[0]
        if feats.shape[0] != prepared.layout.num_tokens:
            raise ValueError(f"{self.model_dir}: {feats.shape[0]} visual tokens but the grid gives "
                             f"{prepared.layout.num_tokens} for an image of size {prepared.image_size}")
        return EncodedImage(feats, prepared.layout, prepared.pixel_values, prepared.image_size)

    def layout_positions(self, layout: Layout) -> VisualPositions:
        return grid_positions(layout)

    def full_forward_logits(self, ids: torch.Tensor, encoded: EncodedImage) -> torch.Tensor:
        self.model.model.rope_deltas = None  # transformers caches them from an earlier call
        return self.model(input_ids=ids, pixel_values=encoded.pixel_values,
                          image_grid_thw=self.grid_thw(encoded.layout),
                          mm_token_type_ids=(ids == self.image_token_id).int()).logits


class Qwen2VLAdapter(Qwen25VLAdapter):
    """Qwen2-VL (``Qwen2VLForConditionalGeneration``): the same processor, 2 x 2 merger and image positions
    (transformers' ``get_rope_index`` places images alike); its tower is a plain ViT, also without [CLS]."""

    family = "qwen2_vl"
    model_class = "Qwen2VLForConditionalGeneration"
