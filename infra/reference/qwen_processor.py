"""The reference Qwen2.5-VL's processor: the image path of transformers' ``Qwen2_5_VLProcessor`` (each image
placeholder expanded to the image's merged-token count, ``mm_token_type_ids`` marking them for the 3-D rotary
positions) without its video processor, which transformers builds from torchvision (not a dependency here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class QwenImageProcessor:
    """``image_processor``: a ``Qwen2VLImageProcessorPil``; ``tokenizer`` holds ``image_token`` as one special token."""

    def __init__(self, image_processor, tokenizer, chat_template: str):
        self.image_processor, self.tokenizer, self.chat_template = image_processor, tokenizer, chat_template
        self.image_token = tokenizer.image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def __call__(self, images: list, text: list[str], return_tensors: str = "pt", padding: bool = False,
                 padding_side: str | None = None) -> dict[str, Any]:
        """One image per text: input_ids / attention_mask (B, L), pixel_values (sum N_i, C * T * p * p),
        image_grid_thw (B, 3), mm_token_type_ids (B, L) (1 on image tokens)."""
        if len(images) != len(text):
            raise ValueError(f"{len(images)} images for {len(text)} texts: one image per text")
        enc = self.image_processor(images=images, return_tensors="pt")
        merge = self.image_processor.merge_size ** 2
        texts = []
        for t, grid in zip(text, enc["image_grid_thw"]):
            if t.count(self.image_token) != 1:
                raise ValueError(f"a text holds {t.count(self.image_token)} image placeholders, expected 1")
            texts.append(t.replace(self.image_token, self.image_token * (int(grid.prod()) // merge)))
        kwargs = {"padding_side": padding_side} if padding_side else {}
        out = dict(self.tokenizer(texts, padding=padding, return_tensors=return_tensors, **kwargs))
        out["mm_token_type_ids"] = (out["input_ids"] == self.image_token_id).int()
        out["pixel_values"], out["image_grid_thw"] = enc["pixel_values"], enc["image_grid_thw"]
        return out

    def save_pretrained(self, out: str | Path) -> None:
        """preprocessor_config.json (the adapter's image processor), the tokenizer and chat_template.jinja."""
        out = Path(out)
        self.image_processor.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        (out / "chat_template.jinja").write_text(self.chat_template)
