"""Video through a Qwen-family model's own video path (docs/design.md §5, video).

A video file is decoded with PyAV into sampled frames (``decode_video``). The frames go through the model's image
processor one by one (its resize, rescale, normalisation and patch order); consecutive frames are paired into the
tower's temporal patches (``temporal_patch_size`` = 2, the last frame repeated for an odd count, as transformers'
video processor does), giving ``pixel_values_videos`` (T * H * W, C * 2 * p * p) and ``video_grid_thw`` (T, H, W).
transformers' own video processor needs torchvision, which the project does not install; building on the image
processor keeps one resize rule for both.

The merged tokens form one (H/2) x (W/2) segment per temporal step; segment i carries its temporal rotary position
``floor(i * tokens_per_second * seconds_per_step)`` (Qwen2.5-VL; Qwen2-VL counts steps), so every feature reducer,
MetaCompress's position embeddings (one 2-D table per step) and FastV run over (t, h, w) unchanged, and a kept token
keeps its (t, h, w) (``compress.lvlm.base.reduced_positions``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from compress.layout import Layout
from compress.lvlm.base import EncodedImage
from compress.lvlm.qwen2_5_vl import Qwen25VLAdapter, Qwen2VLAdapter, qwen_layout


@dataclass
class Video:
    """``frames``: (N, H, W, 3) uint8 RGB, the sampled frames in time order. ``fps``: sampled frames per second
    (N over the video's duration for uniform sampling). ``source``: the file (for messages)."""

    frames: np.ndarray
    fps: float
    source: str = "<frames>"


def _open(path: Path):
    import av

    if not path.is_file():
        raise FileNotFoundError(f"video file {path} does not exist; pass the path of a readable video")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as err:
        raise ValueError(f"video file {path} cannot be decoded ({err}); pass an MP4/WebM/MKV video file") from err
    if not container.streams.video:
        container.close()
        raise ValueError(f"video file {path} has no video stream; pass a file with one")
    return container


def sample_indices(total: int, stream_fps: float, num_frames: int | None = None, fps: float | None = None) -> list[int]:
    """Frame indices to keep of ``total`` frames: ``num_frames`` spread uniformly (first and last included), or one
    frame every ``1 / fps`` seconds starting at frame 0. Exactly one of the two must be given."""
    if (num_frames is None) == (fps is None):
        raise ValueError("give exactly one of num_frames and fps for frame sampling")
    if num_frames is not None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        return sorted(set(np.linspace(0, total - 1, min(num_frames, total)).round().astype(int).tolist()))
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    step = stream_fps / fps
    return sorted({min(total - 1, int(round(k * step))) for k in range(int((total - 1) / step + 1e-9) + 1)})


def decode_video(path: str | Path, num_frames: int | None = None, fps: float | None = None) -> Video:
    """Decode a video file into sampled RGB frames (``sample_indices``). Unreadable files raise one line naming the
    file."""
    import av

    path = Path(path)
    sample_indices(1, 1.0, num_frames, fps)  # the sampling arguments are checked before the file is opened
    container = _open(path)
    try:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 0) or 1.0
        total = stream.frames or sum(1 for p in container.demux(stream) if p.size)
        if total < 1:
            raise ValueError(f"video file {path} holds no frames; pass a non-empty video")
        container.seek(0)
        keep = set(sample_indices(total, rate, num_frames, fps))
        frames = [f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(stream)) if i in keep]
    except av.error.FFmpegError as err:
        raise ValueError(f"video file {path} cannot be decoded ({err}); pass an MP4/WebM/MKV video file") from err
    finally:
        container.close()
    if not frames:
        raise ValueError(f"video file {path}: no frame could be decoded; re-encode it (e.g. ffmpeg -i IN OUT.mp4)")
    sampled_fps = fps if fps is not None else len(frames) * rate / total
    return Video(np.stack(frames), sampled_fps, str(path))


def pair_frames(frame_patches: list[torch.Tensor], channels: int, temporal: int, patch: int) -> torch.Tensor:
    """Per-frame patches (each (L, C * temporal * p * p), the image processor's rows with the frame repeated over
    ``temporal``) -> (ceil(N / temporal) * L, C * temporal * p * p): step i's row j stacks frames i*temporal ..
    over the temporal axis (the last frame repeated to fill the last step)."""
    n = len(frame_patches)
    frame_patches = frame_patches + [frame_patches[-1]] * (-n % temporal)
    one = [f.reshape(f.shape[0], channels, temporal, patch, patch)[:, :, 0] for f in frame_patches]
    steps = [torch.stack(one[i: i + temporal], 2) for i in range(0, len(one), temporal)]
    return torch.cat(steps).reshape(-1, channels * temporal * patch * patch)


def video_pixels(image_processor, video: Video, channels: int = 3) -> dict[str, torch.Tensor]:
    """A decoded ``video`` -> pixel_values_videos (T * H * W, C * temporal * p * p), video_grid_thw (1, 3) and
    second_per_grid_ts (1,), on the CPU: each frame through the image processor, paired into temporal patches
    (``pair_frames``). The one rule for inference (``VideoPath.preprocess``) and the reference recipe."""
    per_frame = [image_processor(images=[f], return_tensors="pt") for f in video.frames]
    grids = {tuple(o["image_grid_thw"][0].tolist()) for o in per_frame}
    if len(grids) != 1:
        raise ValueError(f"video {video.source}: frames resize to different grids {sorted(grids)}; all frames "
                         "must have one size")
    _, h, w = grids.pop()
    temporal = int(image_processor.temporal_patch_size)
    pixels = pair_frames([o["pixel_values"] for o in per_frame], channels, temporal, int(image_processor.patch_size))
    steps = -(-len(per_frame) // temporal)
    return {"pixel_values_videos": pixels, "video_grid_thw": torch.tensor([[steps, h, w]]),
            "second_per_grid_ts": torch.tensor([temporal / video.fps])}


def step_times(steps: int, interval: torch.Tensor | float) -> list[int]:
    """Temporal rotary position of each step: floor(i * interval) in the dtype transformers' ``get_rope_index``
    multiplies in (float32), so the truncation agrees with the model's own."""
    return (torch.arange(steps) * torch.as_tensor(interval, dtype=torch.float32)).long().tolist()


@dataclass
class EncodedVideo(EncodedImage):
    """An ``EncodedImage`` whose ``pixel_values`` are ``pixel_values_videos``; ``seconds_per_step``: the time one
    temporal step spans (transformers' ``second_per_grid_ts``)."""

    seconds_per_step: float = 1.0


class VideoPath:
    """Mixed into a Qwen adapter: the visual placeholder is the model's video token, rendered by the chat template
    from ``{"type": "video"}`` content; ``prepare`` takes a video file, a ``Video`` or a list of frames."""

    def __init__(self, *args, num_frames: int = 8, fps: float | None = None, **kwargs):
        self.num_frames, self.fps = (None, fps) if fps is not None else (num_frames, None)
        super().__init__(*args, **kwargs)  # checks the template as an image model first
        config, tok = self.model.config, self.tokenizer
        self.image_token_id = int(config.video_token_id)
        self.image_token = tok.convert_ids_to_tokens(self.image_token_id)
        from compress.lvlm.conversation import check_rendering

        check_rendering(self.render(["q", "q"]), tok, str(self.model_dir))

    @classmethod
    def of(cls, adapter, num_frames: int = 8, fps: float | None = None):
        """The video adapter sharing ``adapter``'s model, tokenizer and processor."""
        return cls(adapter.model, adapter.tokenizer, adapter.image_processor, adapter.model_dir,
                   chat_template=adapter.chat_template, num_frames=num_frames, fps=fps)

    def _messages(self, questions: list[str], list_content: bool) -> list[dict]:
        msgs = super()._messages(questions, list_content)
        if self.image_token_id == int(self.model.config.video_token_id) and list_content:
            msgs[0]["content"] = [{"type": "video"} if c.get("type") == "image" else c for c in msgs[0]["content"]]
        return msgs

    def seconds_interval(self, seconds_per_step: float) -> torch.Tensor | float:
        tps = getattr(self.model.config.vision_config, "tokens_per_second", None)
        if self.family == "qwen2_vl" or tps is None:
            return 1.0  # Qwen2-VL numbers its temporal steps 0, 1, 2, ...
        return tps * torch.tensor(seconds_per_step, dtype=torch.float32)

    def load_video(self, video) -> Video:
        if isinstance(video, Video):
            return video
        if isinstance(video, (str, Path)):
            return decode_video(video, self.num_frames, self.fps)
        frames = np.stack([np.asarray(f.convert("RGB") if hasattr(f, "convert") else f) for f in video])
        return Video(frames, 1.0)

    def preprocess(self, video) -> dict[str, torch.Tensor]:
        out = video_pixels(self.image_processor, self.load_video(video),
                           int(getattr(self.model.config.vision_config, "in_channels", 3)))
        return {"pixel_values_videos": out["pixel_values_videos"].to(self.device, self.dtype),
                "video_grid_thw": out["video_grid_thw"].to(self.device),
                "second_per_grid_ts": out["second_per_grid_ts"]}

    def prepare(self, video) -> EncodedVideo:
        """video (file, ``Video`` or frames) -> its patches and the (t, h, w) layout (no tokens yet)."""
        video = self.load_video(video)
        inputs = self.preprocess(video)
        seconds = float(inputs["second_per_grid_ts"][0])
        grid = tuple(inputs["video_grid_thw"][0].tolist())
        layout = video_layout(grid, self.merge, self.seconds_interval(seconds))
        return EncodedVideo(None, layout, inputs["pixel_values_videos"], tuple(video.frames.shape[1:3]), seconds)

    @torch.no_grad()
    def features(self, prepared: EncodedVideo) -> EncodedVideo:
        """The vision tower and merger over the video: X (T * h' * w', d), step-major, row-major per step."""
        feats = self.model.model.get_video_features(pixel_values_videos=prepared.pixel_values,
                                                    video_grid_thw=self.grid_thw(prepared.layout)).pooler_output[0]
        if feats.shape[0] != prepared.layout.num_tokens:
            raise ValueError(f"{self.model_dir}: {feats.shape[0]} video tokens but the grid gives "
                             f"{prepared.layout.num_tokens}")
        return replace(prepared, tokens=feats)

    def full_forward_logits(self, ids: torch.Tensor, encoded: EncodedVideo) -> torch.Tensor:
        self.model.model.rope_deltas = None
        return self.model(input_ids=ids, pixel_values_videos=encoded.pixel_values,
                          video_grid_thw=self.grid_thw(encoded.layout),
                          second_per_grid_ts=torch.tensor([encoded.seconds_per_step]),
                          mm_token_type_ids=2 * (ids == self.image_token_id).int()).logits


def video_layout(grid_thw: tuple[int, int, int], merge: int, interval) -> Layout:
    """``qwen_layout`` with each temporal step's rotary time (``step_times``)."""
    layout = qwen_layout(grid_thw, merge)
    times = step_times(len(layout.segments), interval)
    return replace(layout, segments=tuple(replace(s, time=t) for s, t in zip(layout.segments, times)))


class Qwen25VLVideoAdapter(VideoPath, Qwen25VLAdapter):
    """Qwen2.5-VL on video (``VideoPath``)."""


class Qwen2VLVideoAdapter(VideoPath, Qwen2VLAdapter):
    """Qwen2-VL on video (``VideoPath``)."""


def video_adapter(adapter, num_frames: int = 8, fps: float | None = None):
    """The video adapter of a loaded Qwen-family adapter; other families are refused by name."""
    for image_cls, video_cls in ((Qwen2VLAdapter, Qwen2VLVideoAdapter), (Qwen25VLAdapter, Qwen25VLVideoAdapter)):
        if type(adapter) is image_cls:
            return video_cls.of(adapter, num_frames, fps)
    raise ValueError(f"{adapter.family} ({adapter.model_dir}) has no video path; video runs on the Qwen2.5-VL and "
                     "Qwen2-VL families")
