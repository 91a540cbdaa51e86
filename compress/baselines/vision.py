"""Vision-tower reducers by name: they run inside transformers' CLIP vision tower, before the projector.

Call shape: ``fn(vision_tower, pixel_values (B, 3, H, W), num_keep, feature_layer=-2, select_strategy="default",
**options) -> Tensor (B, num_keep, C_vision)``; the LVLM adapter applies ``multi_modal_projector`` afterwards.
Exception: ``prumerge`` returns ``AdaptiveFeatures(features (B, m_max, C), counts (B,))`` because its count is
adaptive (``num_keep=None``); ``feature_list`` turns either result into one (m_b, C) tensor per image.
``visionzip`` and ``tome`` also take LLaVA-NeXT crops (B, K, 3, H, W) with a whole-image budget; ``prumerge`` and
``prumerge_plus`` refuse them (LLaVA-1.5 only).
"""

from __future__ import annotations

import torch

from compress.baselines.prumerge import AdaptiveFeatures, prumerge, prumerge_plus
from compress.baselines.tome import tome
from compress.baselines.visionzip import visionzip

VISION_REDUCERS = {
    "tome": tome,
    "prumerge": prumerge,
    "prumerge_plus": prumerge_plus,
    "visionzip": visionzip,
}


def feature_list(out: torch.Tensor | AdaptiveFeatures) -> list[torch.Tensor]:
    """A vision reducer's result -> one (m_b, C) tensor per image."""
    if isinstance(out, AdaptiveFeatures):
        return out.as_list()
    return list(out.unbind(0))
