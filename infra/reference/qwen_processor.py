"""The reference Qwen2.5-VL's processor: the image path of transformers' ``Qwen2_5_VLProcessor`` (each image
placeholder expanded to the image's merged-token count, ``mm_token_type_ids`` marking them for the 3-D rotary
positions) and a video path built, like the project's own (``compress.lvlm.video``, docs/design.md §5, video), on
the image processor: transformers' video processor needs torchvision (not a dependency here), and one resize rule
for frames and images keeps the train-time inputs equal to what ``video_adapter`` feeds at inference."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class QwenImageProcessor:
    """``image_processor``: a ``Qwen2VLImageProcessorPil``; ``tokenizer`` holds ``image_token`` (and, for video,
    ``video_token``) as one special token. ``num_frames`` / ``fps``: how a video file is sampled
    (``compress.lvlm.video.decode_video``; exactly one is used, ``fps`` when given)."""

    def __init__(self, image_processor, tokenizer, chat_template: str, num_frames: int = 8, fps: float | None = None):
        self.image_processor, self.tokenizer, self.chat_template = image_processor, tokenizer, chat_template
        self.image_token = tokenizer.image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token = getattr(tokenizer, "video_token", None)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token) if self.video_token else None
        self.num_frames, self.fps = (None, fps) if fps is not None else (num_frames, None)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def video_inputs(self, video) -> dict[str, Any]:
        """One video (a file or a ``compress.lvlm.video.Video``) -> pixel_values_videos (T * H * W, C * 2 * p * p),
        video_grid_thw (1, 3), second_per_grid_ts (1,): ``VideoPath.preprocess``'s rule (frames through the image
        processor one by one, paired into temporal patches by ``pair_frames``)."""
        from compress.lvlm.video import Video, decode_video, video_pixels

        if not isinstance(video, Video):
            video = decode_video(video, self.num_frames, self.fps)
        return video_pixels(self.image_processor, video)

    def __call__(self, images: list | None = None, text: list[str] | None = None, videos: list | None = None,
                 return_tensors: str = "pt", padding: bool = False, padding_side: str | None = None) -> dict[str, Any]:
        """One image (or, with ``videos``, one video) per text: input_ids / attention_mask (B, L), mm_token_type_ids
        (B, L) (1 on image tokens, 2 on video tokens); pixel_values (sum N_i, C * T * p * p) and image_grid_thw
        (B, 3), or pixel_values_videos, video_grid_thw (B, 3) and second_per_grid_ts (B,)."""
        import torch

        if (images is None) == (videos is None):
            raise ValueError("pass images or videos (one per text), not both")
        visuals = images if videos is None else videos
        if len(visuals) != len(text):
            raise ValueError(f"{len(visuals)} images/videos for {len(text)} texts: one per text")
        if videos is None:
            enc = dict(self.image_processor(images=images, return_tensors="pt"))
            grids, token, kind = enc["image_grid_thw"], self.image_token, 1
        else:
            if self.video_token is None:
                raise ValueError("this reference's tokenizer has no video token; rebuild it with the current recipe")
            parts = [self.video_inputs(v) for v in videos]
            enc = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            grids, token, kind = enc["video_grid_thw"], self.video_token, 2
        merge = self.image_processor.merge_size ** 2
        texts = []
        for t, grid in zip(text, grids):
            if t.count(token) != 1:
                raise ValueError(f"a text holds {t.count(token)} {token} placeholders, expected 1")
            texts.append(t.replace(token, token * (int(grid.prod()) // merge)))
        kwargs = {"padding_side": padding_side} if padding_side else {}
        out = dict(self.tokenizer(texts, padding=padding, return_tensors=return_tensors, **kwargs))
        out["mm_token_type_ids"] = kind * (out["input_ids"] == self.tokenizer.convert_tokens_to_ids(token)).int()
        keys = ("pixel_values", "image_grid_thw") if videos is None else \
            ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
        return out | {k: enc[k] for k in keys}

    def save_pretrained(self, out: str | Path) -> None:
        """preprocessor_config.json (the adapter's image processor), the tokenizer and chat_template.jinja."""
        out = Path(out)
        self.image_processor.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        (out / "chat_template.jinja").write_text(self.chat_template)
