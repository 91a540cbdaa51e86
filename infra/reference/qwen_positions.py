"""Token drop for the reference Qwen2.5-VL (docs/design.md §5 and §7): its 3-D rotary positions come from the image
(or video) grid, so a prompt thinned to some visual tokens gets explicit ``position_ids`` by the project's own rule,
the one every reducer's tokens get at inference: a kept token keeps its (t, h, w), a mixed token (a row of a (k, n)
matrix) takes the weighted mean of its inputs' positions (``compress.lvlm.base.reduced_positions``), and the text
after the visual tokens continues at start + span, as transformers' ``get_rope_index`` places it after the full
grid. Positions are built by the stages' own builder (``LVLMAdapter.rope_inputs`` and the decoder driver's
arithmetic), so training sees the positions evaluation feeds."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any


def full_positions(model, grid_thw, seconds_per_step=None):
    """The unreduced ``VisualPositions`` of one image (``seconds_per_step`` None) or video of patch grid
    ``grid_thw`` (3,): ``grid_positions`` of its merged-token layout, a video's steps at their rotary times."""
    from compress.lvlm.qwen2_5_vl import grid_positions, qwen_layout
    from compress.lvlm.video import video_layout

    vc = model.config.vision_config
    grid = tuple(int(v) for v in grid_thw)
    if seconds_per_step is None:
        return grid_positions(qwen_layout(grid, vc.spatial_merge_size))
    # transformers' interval: tokens_per_second x the step's seconds, in float32 (compress.lvlm.video.step_times)
    return grid_positions(video_layout(grid, vc.spatial_merge_size, vc.tokens_per_second * seconds_per_step))


def kept_positions(full, kept):
    """``full`` reduced to ``kept``: sorted indices (k,) or a (k, n) mixing matrix (``reduced_positions``)."""
    from compress.lvlm.base import reduced_positions
    from compress.reduction import Reduction

    if kept.is_floating_point():
        return reduced_positions(full, Reduction(None, matrix=kept))
    return reduced_positions(full, Reduction(None, keep_indices=kept))


def thinned_position_ids(input_ids, attention_mask, visual_ids: Sequence[int], positions: Sequence[Any]):
    """(3, B, L) position ids of a right-padded batch ``input_ids`` (B, L) whose row b holds the visual tokens (any
    of ``visual_ids``) of ``positions[b]``: ``rope_inputs``' offsets and advances, summed as the decoder driver does
    (``compress.lvlm.decoder.forward`` from position 0). Pads take the position reached; no real token sees them."""
    import torch

    from compress.lvlm.base import LVLMAdapter

    visual = torch.zeros_like(input_ids, dtype=torch.bool)
    for v in visual_ids:
        visual |= input_ids == v
    marked = torch.where(visual, -1, input_ids)  # one id for images and videos alike, never a real token
    builder = SimpleNamespace(rope_dims=3, image_token_id=-1)
    offsets, advance = LVLMAdapter.rope_inputs(builder, marked, attention_mask.bool(), list(positions))
    adv = advance * attention_mask.long()
    return ((adv.cumsum(1) - adv)[..., None] + offsets).permute(2, 0, 1)


def qwen_forward_kept(model, inputs: dict[str, Any], kept: Sequence[Any], **kwargs):
    """``model(**inputs)`` where row b's prompt holds only the visual tokens ``kept[b]`` (indices or a (k, n)
    matrix over its image's or video's merged tokens): the tower runs on the whole image / video, the kept
    features fill the visual positions of ``inputs_embeds``, and :func:`thinned_position_ids` places them."""
    import torch

    config = model.config
    ids = inputs["input_ids"]
    image_id, video_id = int(config.image_token_id), int(config.video_token_id)
    images = videos = iter(())
    if "pixel_values" in inputs:
        images = zip(model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                    image_grid_thw=inputs["image_grid_thw"]).pooler_output,
                     inputs["image_grid_thw"], [None] * len(inputs["image_grid_thw"]))
    if "pixel_values_videos" in inputs:
        videos = zip(model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"],
                                                    video_grid_thw=inputs["video_grid_thw"]).pooler_output,
                     inputs["video_grid_thw"], inputs["second_per_grid_ts"])
    rows, positions = [], []
    for b, k in enumerate(kept):
        feats, grid, seconds = next(videos if bool((ids[b] == video_id).any()) else images)
        k = k.to(feats.device)
        rows.append(k.to(feats.dtype) @ feats if k.is_floating_point() else feats[k])
        positions.append(kept_positions(full_positions(model, grid, seconds), k.cpu()))
    embeds = model.get_input_embeddings()(ids)
    mask = ((ids == image_id) | (ids == video_id))[..., None]
    embeds = embeds.masked_scatter(mask, torch.cat(rows).to(embeds.dtype))
    position_ids = thinned_position_ids(ids, inputs["attention_mask"], (image_id, video_id), positions)
    return model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], labels=inputs["labels"],
                 position_ids=position_ids.to(ids.device), **kwargs)
