"""The reference recipe's sizes, schedule and switches (:class:`RecipeConfig`) and the label value no loss counts.

Its own module so that every part of the recipe (:mod:`infra.reference.targets`, :mod:`infra.reference.training`,
:mod:`infra.reference.recipe`) can read it without importing the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FAMILIES = ("llava", "llava_next", "qwen2_5_vl")
TOKEN_DROP_MODES = ("auto", "scene", "random", "pool", "mixed")
# The label of positions (tokens, patches) that no loss counts: the cross-entropies' ignore_index.
IGNORE = -100


@dataclass
class RecipeConfig:
    """Sizes and schedule. ``image_size``: the LLaVA input side (96 px, 8 px patches = 144 tokens); LLaVA-NeXT uses
    tiles of ``image_size // 2`` and ``grid_pinpoints`` multiples of it. Qwen2.5-VL: ``patch_size`` is the side of
    one merged LLM token (its ViT patch is half of it, merged 2 x 2), so a square image gives LLaVA's token grid."""

    family: str = "llava"
    image_size: int = 96
    patch_size: int = 8
    vision_hidden: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    text_intermediate: int = 384
    # Init std of the decoder's weights; None: 1/sqrt(text_hidden). Llama's 0.02 suits widths of thousands; at 128
    # it makes every attention logit ~0.05 and the attention needs hundreds of steps of weight growth to select.
    text_init_std: float | None = None
    stage1_steps: int = 600
    stage1_batch: int = 32
    stage1_lr: float = 2e-3
    stage2_steps: int = 3000
    stage2_batch: int = 32
    # 1e-3, not 2e-3/3e-3: on single-turn colour questions (3000 dialogues, full 144 tokens, batch 16) 3e-3 sat at
    # chance (loss 0.87 after 225 steps) while 1e-3 left the plateau within 130 steps (loss 0.77, 36 % held-out).
    stage2_lr: float = 1e-3
    warmup: int = 100
    vision_lr_scale: float = 0.0
    # Weight of the attention supervision (:func:`attention_loss`); 0 turns it off.
    attention_weight: float = 1.0
    # Share of supervised training dialogues whose visual tokens are thinned to a random 10-100 %, always keeping the
    # tokens their answers depend on (:func:`drop_image_tokens`), so the decoder does not read the scene from token
    # positions that any pre-LLM reducer moves. 0: off. Qwen2.5-VL's thinned prompts get explicit 3-D positions
    # (:mod:`infra.reference.qwen_positions`).
    token_drop: float = 0.0
    # Which drop: "auto" (the scene drop where a dialogue has MT-Shapes targets, else the generic one, mixed),
    # "scene" (only the scene drop: dialogues without targets keep every token), or a generic one for every dialogue
    # ("random", "pool", "mixed"; :mod:`infra.reference.token_drop`), which needs no generator metadata.
    token_drop_mode: str = "auto"
    # Frames sampled uniformly from each training / evaluation video (Qwen2.5-VL only; compress.lvlm.video's
    # ``decode_video``): the ``num_frames`` to give ``video_adapter`` at inference, so that it sees what training saw.
    video_frames: int = 8
    weight_decay: float = 0.01
    seed: int = 0
    max_train: int | None = None
    log_every: int = 50
    # 1 x 2, 2 x 1 and 2 x 2 tiles: several aspect ratios at about 110-180 visual tokens, cheap enough for CPU.
    grid_pinpoints: list[list[int]] = field(default_factory=lambda: [[48, 96], [96, 48], [96, 96]])

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.token_drop_mode not in TOKEN_DROP_MODES:
            raise ValueError(f"token_drop_mode must be one of {TOKEN_DROP_MODES}, got {self.token_drop_mode!r}")
        if self.video_frames < 1:
            raise ValueError(f"video_frames must be >= 1, got {self.video_frames}")
        if self.patch_size % 2 and self.family == "qwen2_5_vl":
            raise ValueError(f"patch_size {self.patch_size}: Qwen2.5-VL merges 2 x 2 patches; use an even size")
        if self.tile_size % self.patch_size:
            raise ValueError(f"the tile side {self.tile_size} must be a multiple of patch_size {self.patch_size}")

    @property
    def tile_size(self) -> int:
        return self.image_size // 2 if self.family == "llava_next" else self.image_size
