"""Training recipe of the reference LVLMs (issue 4, item 5; DESIGN section 7).

Small ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration`` models (a ``CLIPVisionModel`` tower,
a Llama decoder) trained from scratch on MT-Shapes dialogues, in two stages, because learning the visual grounding
end to end from answer tokens alone is what is slow (a naive recipe stayed at chance for 20 CPU minutes):

1. **Vision pretraining.** The tower plus a linear head learns dense per-patch labels that the MT-Shapes generator
   knows: the colour / shape / size of the object covering the patch (or "empty"), whether the patch is the
   object's best-covered one (one "anchor" per object, so counting objects = counting anchors), and the 3 x 3
   region the patch lies in (so the features carry absolute position, which region questions need; for
   LLaVA-NeXT only the base tile, the whole image at low resolution, can know it). The labels are pushed through
   the model's own image processor with nearest resampling, so they line up with the patches for any geometry.
2. **Projector + decoder.** The tower is frozen (or at ``vision_lr_scale`` times the lr); the projector and decoder
   learn on whole dialogues with an answer-only loss (all turns of a dialogue in one sequence: three answers for the
   price of about one, and the history the model will see at test time). On MT-Shapes two attention heads are
   also told where to look (:func:`attention_loss`): one gathers the question's key words, one fetches the patches
   of the objects the answer depends on (the generator knows them). Without that, and with Llama's default init
   std (0.02, made for widths of thousands), the decoder sat at chance for thousands of steps; with both, it
   leaves chance within a few hundred. With ``token_drop`` a share of the dialogues sees only some of its visual
   tokens (always those the answers depend on), so the decoder does not read the scene from token positions, which
   every reducer before the LLM moves.

Evaluation (:func:`evaluate`) is the multi-turn protocol: greedy ``generate`` with the full image, the model's own
answers in the history, exact match per turn. Everything is saved as a plain local HF directory that
``AutoProcessor`` / ``AutoModelForImageTextToText`` load.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.datasets.mt_shapes import COLORS, COLS, PLURALS, ROWS, SHAPES

FAMILIES = ("llava", "llava_next")
# Head groups of the vision pretraining: name -> number of classes (class 0 = empty / no anchor).
HEAD_GROUPS: dict[str, int] = {"color": 7, "shape": 5, "size": 3, "anchor": 2, "row": 3, "col": 3}
# The words of an MT-Shapes question that say what is asked and where (see :func:`attention_loss`).
KEY_WORDS = frozenset({"color", "shape", "size", "row", "column", "objects", "object", "above", "below",
                       *ROWS, *COLS, *COLORS, *SHAPES, *PLURALS.values()})
IGNORE = -100


@dataclass
class RecipeConfig:
    """Sizes and schedule. ``image_size``: the LLaVA input side (96 px, 8 px patches = 144 tokens); LLaVA-NeXT uses
    tiles of ``image_size // 2`` and ``grid_pinpoints`` multiples of it."""

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
    # positions that any pre-LLM reducer moves. 0: off.
    token_drop: float = 0.0
    weight_decay: float = 0.01
    seed: int = 0
    max_train: int | None = None
    log_every: int = 50
    # 1 x 2, 2 x 1 and 2 x 2 tiles: several aspect ratios at about 110-180 visual tokens, cheap enough for CPU.
    grid_pinpoints: list[list[int]] = field(default_factory=lambda: [[48, 96], [96, 48], [96, 96]])

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.tile_size % self.patch_size:
            raise ValueError(f"the tile side {self.tile_size} must be a multiple of patch_size {self.patch_size}")

    @property
    def tile_size(self) -> int:
        return self.image_size if self.family == "llava" else self.image_size // 2


# ----------------------------------------------------------------------------------------------------- model
def build_model(cfg: RecipeConfig, vocab_size: int, image_token_id: int, pad_id: int, bos_id: int, eos_id: int):
    """A randomly initialised model of transformers' own classes, sized by ``cfg``."""
    from transformers import CLIPVisionConfig, LlamaConfig

    vc = CLIPVisionConfig(image_size=cfg.tile_size, patch_size=cfg.patch_size, hidden_size=cfg.vision_hidden,
                          intermediate_size=2 * cfg.vision_hidden, num_hidden_layers=cfg.vision_layers,
                          num_attention_heads=cfg.vision_heads, projection_dim=cfg.vision_hidden)
    tc = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
                     num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                     num_key_value_heads=cfg.text_heads, max_position_embeddings=1024, pad_token_id=pad_id,
                     bos_token_id=bos_id, eos_token_id=eos_id, tie_word_embeddings=True,
                     initializer_range=cfg.text_init_std or cfg.text_hidden ** -0.5)
    grid = (cfg.tile_size // cfg.patch_size) ** 2
    # vision_feature_layer=-1: the decoder reads the very layer that the dense heads were trained on.
    common = dict(vision_config=vc, text_config=tc, image_token_index=image_token_id, image_seq_length=grid,
                  vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=True)
    if cfg.family == "llava":
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        config = LlavaConfig(**common)
        model = LlavaForConditionalGeneration(config)
    else:
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

        config = LlavaNextConfig(image_grid_pinpoints=cfg.grid_pinpoints, **common)
        model = LlavaNextForConditionalGeneration(config)
    for key, value in (("pad_token_id", pad_id), ("bos_token_id", bos_id), ("eos_token_id", eos_id)):
        setattr(model.generation_config, key, value)
    return model


def build_processor(cfg: RecipeConfig, tokenizer):
    """The image processor (PIL backend: no torchvision needed) + tokenizer + chat template, as one processor."""
    from infra.reference.tokenizer import CHAT_TEMPLATE, IMAGE

    t = cfg.tile_size
    if cfg.family == "llava":
        from transformers import LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        ip = CLIPImageProcessorPil(size={"shortest_edge": t}, crop_size={"height": t, "width": t})
        return LlavaProcessor(image_processor=ip, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                              patch_size=cfg.patch_size, vision_feature_select_strategy="default",
                              image_token=IMAGE, num_additional_image_tokens=1)
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    ip = LlavaNextImageProcessorPil(size={"shortest_edge": t}, crop_size={"height": t, "width": t},
                                    image_grid_pinpoints=cfg.grid_pinpoints)
    return LlavaNextProcessor(image_processor=ip, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                              patch_size=cfg.patch_size, vision_feature_select_strategy="default",
                              image_token=IMAGE, num_additional_image_tokens=1)


# ------------------------------------------------------------------------------------ stage 1: dense labels
def label_image(scene) -> Any:
    """An RGB image of labels the size of the scene's image: R = object index + 1 (0 = background),
    G = region row + 1, B = region column + 1. Pushed through the image processor with nearest resampling, padding
    becomes 0 in every channel."""
    from PIL import Image

    from pipeline.datasets.mt_shapes import object_mask

    obj = object_mask(scene)  # (H, W): 0 background, i + 1 for object i
    h, w = obj.shape
    rows = np.repeat((np.arange(h) * 3 // h)[:, None] + 1, w, axis=1)
    cols = np.repeat((np.arange(w) * 3 // w)[None, :] + 1, h, axis=0)
    return Image.fromarray(np.stack([obj, rows, cols], axis=-1).astype(np.uint8), "RGB")


def patch_cover(labels: np.ndarray, objects: int, patch: int) -> np.ndarray:
    """(T, P, objects) share of each patch's pixels that each object covers, from label tiles (T, 3, S, S) (see
    :func:`label_image`; channel 0 = object index + 1)."""
    t, _, s, _ = labels.shape
    g = s // patch
    obj = labels[:, 0].reshape(t, g, patch, g, patch).transpose(0, 1, 3, 2, 4).reshape(t, g * g, patch * patch)
    return (obj[..., None] == np.arange(1, objects + 1)).mean(axis=2)


def label_tiles(scene, processor) -> tuple[np.ndarray, tuple[int, int]]:
    """The scene's :func:`label_image` laid out by the model's image processor (nearest resampling): label tiles
    (T, 3, S, S) int64 and the (height, width) the processor reports for the image."""
    from PIL import Image

    enc = processor.image_processor(images=[label_image(scene)], return_tensors="np", resample=Image.NEAREST,
                                    do_rescale=False, do_normalize=False)
    lab = np.asarray(enc["pixel_values"])
    size = tuple(int(v) for v in enc["image_sizes"][0]) if "image_sizes" in enc else (scene.height, scene.width)
    return np.rint(lab.reshape(-1, *lab.shape[-3:])).astype(np.int64), size


def patch_targets(labels: np.ndarray, scene, patch: int, min_cover: float = 0.2,
                  position_tiles: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Dense targets for every patch of processed label tiles.

    ``labels``: (T, 3, S, S) label tiles (see :func:`label_image`) as the image processor laid them out.
    Returns ``{group: (T, (S/patch)**2) int64}`` for :data:`HEAD_GROUPS`. A patch takes the object covering most of
    its pixels if that covers ``min_cover`` of it (colour 0 = no object; shape and size :data:`IGNORE` there); each
    object's best-covered patch in a tile is its anchor. Region targets come from the patch's centre pixel; padding
    and tiles not in ``position_tiles`` (default: all) get :data:`IGNORE`.
    """
    from pipeline.datasets.mt_shapes import SIZES

    t, _, s, _ = labels.shape
    g = s // patch
    k = len(scene.objects)
    cover = patch_cover(labels, k, patch)  # (T, P, k)
    out = {name: np.zeros((t, g * g), np.int64) for name in ("color", "anchor")}
    out |= {name: np.full((t, g * g), IGNORE, np.int64) for name in ("shape", "size")}
    if k:
        best = cover.argmax(axis=2)
        hit = cover.max(axis=2) >= min_cover
        luts = {"color": [1 + list(COLORS).index(o.color) for o in scene.objects],
                "shape": [1 + list(SHAPES).index(o.shape) for o in scene.objects],
                "size": [1 + list(SIZES).index(o.size) for o in scene.objects]}
        for name, lut in luts.items():
            # Shape and size are learned on object patches only: counted over every patch, "empty" dominates the
            # loss and the tower reached 91 % per patch while naming the shape of whole objects at chance (29 %).
            out[name] = np.where(hit, np.asarray(lut)[best], 0 if name == "color" else IGNORE)
        for ti in range(t):
            for i in range(k):
                p = int(cover[ti, :, i].argmax())
                if cover[ti, p, i] > 0:
                    out["anchor"][ti, p] = 1
    centre = labels[:, 1:, patch // 2::patch, patch // 2::patch].reshape(t, 2, g * g).astype(np.int64) - 1
    centre[centre < 0] = IGNORE
    if position_tiles is not None:
        mask = np.ones(t, bool)
        mask[list(position_tiles)] = False
        centre[mask] = IGNORE
    out["row"], out["col"] = centre[:, 0], centre[:, 1]
    return out


def vision_example(image, scene, processor, cfg: RecipeConfig) -> tuple[Any, dict[str, Any]]:
    """(pixel tiles (T, 3, S, S), targets {group: (T, P)}) for one image, through the model's image processor."""
    import torch

    pv = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    pv = pv.reshape(-1, *pv.shape[-3:])
    # LLaVA-NeXT: tile 0 is the whole image resized; only it can know where a patch lies in the image.
    position_tiles = None if cfg.family == "llava" else [0]
    targets = patch_targets(label_tiles(scene, processor)[0], scene, cfg.patch_size, position_tiles=position_tiles)
    return pv, {k: torch.from_numpy(v) for k, v in targets.items()}


class DenseHead:
    """A linear map from the tower's patch features to the logits of every :data:`HEAD_GROUPS` group."""

    def __new__(cls, hidden: int):
        import torch

        return torch.nn.Linear(hidden, sum(HEAD_GROUPS.values()))


def dense_loss(logits, targets: dict[str, Any]):
    """Sum over groups of the cross-entropy. ``logits`` (N, P, sum(HEAD_GROUPS)); targets {group: (N, P)}.
    Returns (loss, {group: accuracy on non-ignored patches})."""
    import torch.nn.functional as F

    loss, acc, start = 0.0, {}, 0
    for name, n in HEAD_GROUPS.items():
        lg, tg = logits[..., start:start + n].reshape(-1, n), targets[name].reshape(-1)
        start += n
        valid = tg != IGNORE
        if valid.any():
            loss = loss + F.cross_entropy(lg, tg, ignore_index=IGNORE)
            acc[name] = float((lg.argmax(-1)[valid] == tg[valid]).float().mean())
    return loss, acc


def tower_patch_features(model, pixel_values):
    """(N, P, d) patch features of the layer the decoder reads (CLS dropped), with gradients."""
    vt = model.model.vision_tower
    out = vt(pixel_values, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def pretrain_vision(model, processor, items: Sequence[tuple[str, Any]], cfg: RecipeConfig,
                    log: Callable[[str], None] = print, device: str = "cpu") -> tuple[list[dict[str, float]], Any]:
    """Stage 1. ``items``: (image path, Scene) pairs. Trains the tower in place; returns the logged curve (step,
    loss, accuracies of the last batch) and the dense head (stage 2 warm-starts the projector from it)."""
    import torch
    from PIL import Image

    torch.manual_seed(cfg.seed)
    head = DenseHead(cfg.vision_hidden).to(device)
    params = list(model.model.vision_tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.stage1_lr, weight_decay=cfg.weight_decay)
    cache: dict[int, tuple[Any, dict[str, Any]]] = {}
    rng = random.Random(cfg.seed)
    curve, t0 = [], time.time()
    model.train()
    for step in range(cfg.stage1_steps):
        idx = [rng.randrange(len(items)) for _ in range(cfg.stage1_batch)]
        for i in idx:
            if i not in cache:
                with Image.open(items[i][0]) as im:
                    cache[i] = vision_example(im.convert("RGB"), items[i][1], processor, cfg)
        pv = torch.cat([cache[i][0] for i in idx]).to(device)
        targets = {k: torch.cat([cache[i][1][k] for i in idx]).to(device) for k in HEAD_GROUPS}
        for gr in opt.param_groups:
            gr["lr"] = cfg.stage1_lr * _schedule(step, cfg.stage1_steps, cfg.warmup)
        loss, acc = dense_loss(head(tower_patch_features(model, pv)), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.stage1_steps:
            row = {"step": step + 1, "loss": float(loss.detach()), "s": time.time() - t0, **acc}
            curve.append(row)
            log("stage1 " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    return curve, head


# ------------------------------------------------------------------------------ stage 2: dialogue training
def render_dialogue(turns: Sequence[tuple[str, str | None]]) -> list[dict[str, Any]]:
    """Chat messages for (question, answer) turns; the image goes with the first question. A last answer of
    ``None`` leaves the turn open (for generation)."""
    msgs: list[dict[str, Any]] = []
    for t, (q, a) in enumerate(turns):
        content: list[dict[str, Any]] = ([{"type": "image"}] if t == 0 else []) + [{"type": "text", "text": q}]
        msgs.append({"role": "user", "content": content})
        if a is not None:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return msgs


def answer_labels(input_ids, tokenizer):
    """Labels that keep only the answer tokens and their end-of-turn token: the tokens after each
    ``ASSISTANT :`` up to and including ``</s>``. ``input_ids`` (L,) -> labels (L,) with :data:`IGNORE` elsewhere."""
    import torch

    a_id, c_id, eos = tokenizer.convert_tokens_to_ids("assistant"), tokenizer.convert_tokens_to_ids(":"), \
        tokenizer.eos_token_id
    labels = torch.full_like(input_ids, IGNORE)
    ids = input_ids.tolist()
    i = 0
    while i < len(ids) - 1:
        if ids[i] == a_id and ids[i + 1] == c_id:
            j = i + 2
            while j < len(ids):
                labels[j] = ids[j]
                if ids[j] == eos:
                    break
                j += 1
            i = j
        i += 1
    return labels


SUPERVISED_HEADS = 2  # heads 0 and 1 of the first layer and of each fetching layer (see attention_loss)
# A view of the image tokens: (object index per token (n,), -1 = none; one token per object, the one counted).
TokenView = tuple[np.ndarray, list[int]]


def objects_from_cover(cover: np.ndarray, min_cover: float = 0.2) -> TokenView:
    """A :data:`TokenView` from (n, k) cover shares: a token takes the object covering most of it if that covers
    ``min_cover`` of it, and each object's best-covered token is its counted one (and takes that object)."""
    n, k = cover.shape
    objects = np.full(n, -1, np.int64)
    if not k:
        return objects, []
    best = cover.argmax(axis=1)
    hit = cover.max(axis=1) >= min_cover
    objects[hit] = best[hit]
    counted = [int(cover[:, i].argmax()) for i in range(k)]
    for i, p in enumerate(counted):
        if cover[p, i] > 0 and best[p] == i:
            objects[p] = i
    return objects, counted


def token_views(scene, processor, cfg: RecipeConfig) -> list[TokenView]:
    """Where each object lies among the image tokens, one :data:`TokenView` per fetching layer (the last ones).

    LLaVA: one view, its ``grid x grid`` patches (object under each patch's pixels, counted token under the centre).
    LLaVA-NeXT: two views over all its tokens (base grid, then the unpadded crop grid with a newline ending each
    row): the base grid, the only one whose tokens know where they lie in the image (the second-to-last layer
    fetches the object a region names there), then the crops, at twice the resolution (the last layer fetches the
    object's shape there, by the colour the layer before brought). Supervising only the base grid left shape
    questions at 67 %. Crop tokens are laid out by transformers' own ``get_anyres_image_grid_shape`` /
    ``unpad_image``, as ``pack_image_features`` does."""
    from pipeline.datasets.mt_shapes import patch_labels

    if cfg.family == "llava":
        grid = cfg.tile_size // cfg.patch_size
        objects = patch_labels(scene, grid, grid)["object"].reshape(-1)
        counted = [int(o.cy * grid / scene.height) * grid + int(o.cx * grid / scene.width) for o in scene.objects]
        return [(objects, counted)]
    import torch
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    tiles, size = label_tiles(scene, processor)
    k, side = len(scene.objects), cfg.tile_size // cfg.patch_size
    cover = patch_cover(tiles, k, cfg.patch_size)  # (T, side * side, k)
    base = cover[0]
    if len(cover) == 1:  # one tile: the base grid and its newline only, seen by both fetching layers
        return [objects_from_cover(np.concatenate([base, np.zeros((1, k))]))] * 2
    rows, cols = get_anyres_image_grid_shape(list(size), cfg.grid_pinpoints, cfg.tile_size)
    grid = torch.from_numpy(cover[1:1 + rows * cols]).reshape(rows, cols, side, side, k)
    grid = unpad_image(grid.permute(4, 0, 2, 1, 3).reshape(k, rows * side, cols * side), list(size))
    crops = torch.cat([grid, grid.new_zeros(k, grid.shape[1], 1)], dim=2).reshape(k, -1).T.numpy()
    return [objects_from_cover(np.concatenate([base, np.zeros_like(crops)])),
            objects_from_cover(np.concatenate([np.zeros_like(base), crops]))]


def attention_targets(dialogue, views: Sequence[TokenView]):
    """(T, V, 2, 1 + n) float32: for each turn, each of the ``V`` views (see :func:`token_views`) and each
    supervised head, where the answer should look, as a distribution over [first token, image tokens 0 .. n - 1].

    Both heads look at the tokens of the objects the answer depends on (``turn.meta["objects"]``), or entirely at
    the first token (an attention sink) when there are none; a relation splits them (head 0: the object asked about
    first, head 1: the other), so the two positions are not averaged away; a count puts equal weight on the sink and
    on one token per object (its counted one), so the share left on the sink, 1 / (1 + n), says n. None when a turn
    lacks ``meta["objects"]``."""
    import torch

    if any("objects" not in t.meta for t in dialogue.turns):
        return None
    out = torch.zeros(len(dialogue.turns), len(views), SUPERVISED_HEADS, 1 + len(views[0][0]))
    for t, turn in enumerate(dialogue.turns):
        objects, kind = list(turn.meta["objects"]), str(turn.meta.get("type", ""))
        for v, (token_object, counted) in enumerate(views):
            for h in range(SUPERVISED_HEADS):
                row = out[t, v, h]
                if kind.startswith("count"):
                    row[[0] + [1 + counted[i] for i in objects]] = 1.0
                else:
                    mine = objects[h:h + 1] if kind.startswith("rel") and len(objects) == 2 else objects
                    hit = torch.from_numpy(np.isin(token_object, mine))
                    row[1:][hit] = 1.0
                    if not hit.any():
                        row[0] = 1.0
                row /= row.sum()
    return out


def dialogue_example(dialogue, processor, scene=None, cfg: RecipeConfig | None = None) -> dict[str, Any]:
    """Model inputs of one whole dialogue with answer-only labels (first reference answer of each turn). With an
    MT-Shapes ``scene`` and the recipe ``cfg``, also ``attn_pos`` (T,), the position that predicts each turn's first
    answer token, ``attn_target`` (see :func:`attention_targets`) and ``attn_question`` (see
    :func:`key_word_positions`)."""
    import torch
    from PIL import Image

    text = processor.apply_chat_template(render_dialogue([(t.question, t.answers[0]) for t in dialogue.turns]))
    with Image.open(dialogue.image) as im:
        enc = processor(images=[im.convert("RGB")], text=[text], return_tensors="pt")
    ex = {k: v[0] for k, v in enc.items() if k in ("input_ids", "pixel_values", "image_sizes")}
    ex["labels"] = answer_labels(ex["input_ids"], processor.tokenizer)
    if scene is None or cfg is None:
        return ex
    views = token_views(scene, processor, cfg)
    image_tokens = int((ex["input_ids"] == processor.tokenizer.convert_tokens_to_ids(processor.image_token)).sum())
    if len(views[0][0]) != image_tokens:
        raise ValueError(f"{dialogue.image}: {image_tokens} image tokens in the prompt but the token views of "
                         f"scene {scene.scene_id} cover {len(views[0][0])}; the recipe's layout does not match the "
                         "processor's")
    target = attention_targets(dialogue, views)
    if target is not None:
        answer = ex["labels"] != IGNORE
        before = torch.cat([answer.new_zeros(1), answer[:-1]])
        starts = (answer & ~before).nonzero().flatten() - 1  # the position before each answer's first token
        if len(starts) == len(target):
            ex["attn_pos"], ex["attn_target"] = starts, target
            relation = [str(t.meta.get("type", "")).startswith("rel") for t in dialogue.turns]
            ex["attn_question"] = key_word_positions(ex["input_ids"], starts, processor.tokenizer, relation)
    return ex


def key_word_positions(input_ids, answer_pos, tokenizer, relation: Sequence[bool]):
    """(T, 2, W) positions of each turn's key words (:data:`KEY_WORDS`: what is asked and where) for the two
    supervised heads, -1 padded: the words of the question that ends at the ``ASSISTANT :`` whose ``:`` sits at
    ``answer_pos[t]``. For a relation (``relation[t]``) head 1 takes the second object's colour and shape (the last
    two key words) and head 0 the rest; otherwise both take all of them."""
    import torch

    user, colon = tokenizer.convert_tokens_to_ids("user"), tokenizer.convert_tokens_to_ids(":")
    keys = {i for i in tokenizer.convert_tokens_to_ids(sorted(KEY_WORDS)) if i != tokenizer.unk_token_id}
    ids = input_ids.tolist()
    rows = []
    for p, rel in zip(answer_pos.tolist(), relation):
        start = p - 2
        while start > 1 and not (ids[start - 1] == colon and ids[start - 2] == user):
            start -= 1
        words = [i for i in range(start, p - 1) if ids[i] in keys]
        rows.append([words[:-2], words[-2:]] if rel and len(words) > 2 else [words, words])
    width = max(1, max(len(w) for r in rows for w in r))
    return torch.tensor([[w + [-1] * (width - len(w)) for w in r] for r in rows], dtype=torch.long)


def attention_loss(attentions, batch: dict[str, Any], image_token_id: int):
    """Where the answers should look, as cross-entropies at each answer-predicting position, for heads 0 and 1:

    - head h of the first layer against a uniform distribution over the turn's key words for h (it gathers what is
      asked and where: "colour", "top left", "red circle"; see :func:`key_word_positions`);
    - head h of each of the last ``V`` layers against :func:`attention_targets` for its view and h over [first
      token, the image tokens] (they fetch the objects that answer it).

    Supervising every hop makes each a one-step lookup, which small decoders learn within a few hundred steps;
    from answer tokens alone they sat at chance for thousands. ``attentions``: the model's per-layer (B, H, L, L)
    tuple; ``batch`` holds ``input_ids``, ``attn_pos`` (B, T; -1 = no turn), ``attn_target`` (B, T, V, 2, 1 + n;
    zero-padded past a dialogue's own image tokens) and ``attn_question`` (B, T, 2, W; key-word positions, -1
    padded). Returns the mean over dialogues of the mean over turns of the sum over the supervised heads."""
    import torch

    views = batch["attn_target"].shape[2]
    turns = batch["attn_pos"] >= 0  # (B, T)
    n_turns = turns.sum(1)
    rows = batch["attn_pos"].clamp(min=0)

    def at(layer, cols):  # layer (B, H, L, L), cols (B, 2, T, W) -> (B, 2, T, W): heads 0/1 at each answer row
        a = layer[:, :SUPERVISED_HEADS]
        a = a.gather(2, rows[:, None, :, None].expand(-1, a.shape[1], -1, a.shape[3]))
        return a.gather(3, cols)

    # Columns: the first token, then each dialogue's image tokens in order (padded with column 0 at weight 0).
    is_image = batch["input_ids"] == image_token_id
    b, t, _, _, width = batch["attn_target"].shape
    order = torch.sort((~is_image).to(torch.int8), dim=1, stable=True).indices[:, :width - 1]
    image_cols = torch.where(torch.gather(is_image, 1, order), order, 0)
    cols = torch.cat([image_cols.new_zeros(b, 1), image_cols], dim=1)
    cols = cols[:, None, None].expand(-1, SUPERVISED_HEADS, t, -1)
    target = batch["attn_target"].permute(0, 2, 3, 1, 4)  # (B, V, 2, T, W)
    fetch = torch.stack([at(layer, cols) for layer in attentions[len(attentions) - views:]], 1)
    per_turn = -(target * torch.log(fetch + 1e-6)).sum(-1).sum((1, 2))  # (B, T)
    words = batch["attn_question"].transpose(1, 2)  # (B, 2, T, K)
    has = words >= 0
    gathered = torch.log(at(attentions[0], words.clamp(min=0)) + 1e-6)
    per_turn = per_turn - ((gathered * has).sum(-1) / has.sum(-1).clamp(min=1)).sum(1)
    loss = (per_turn * turns).sum(1) / n_turns.clamp(min=1)
    live = n_turns > 0
    return loss[live].mean() if live.any() else loss.new_zeros(())


def collate(examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-padded batch: input_ids / labels / attention_mask (B, L), pixel_values stacked (tiles padded)."""
    import torch

    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for b, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[b, :k], labels[b, :k], mask[b, :k] = e["input_ids"], e["labels"], 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    pvs = [e["pixel_values"] for e in examples]
    if "image_sizes" in examples[0]:
        tiles = max(p.shape[0] for p in pvs)
        pvs = [torch.cat([p, p.new_zeros(tiles - p.shape[0], *p.shape[1:])]) for p in pvs]
        batch["image_sizes"] = torch.stack([e["image_sizes"] for e in examples])
    batch["pixel_values"] = torch.stack(pvs)
    if all("attn_pos" in e for e in examples):
        turns = max(len(e["attn_pos"]) for e in examples)
        batch["attn_pos"] = torch.full((len(examples), turns), -1, dtype=torch.long)
        width = max(e["attn_target"].shape[-1] for e in examples)
        batch["attn_target"] = torch.zeros(len(examples), turns, *examples[0]["attn_target"].shape[1:-1], width)
        words = max(e["attn_question"].shape[-1] for e in examples)
        batch["attn_question"] = torch.full((len(examples), turns, SUPERVISED_HEADS, words), -1, dtype=torch.long)
        for b, e in enumerate(examples):
            batch["attn_pos"][b, :len(e["attn_pos"])] = e["attn_pos"]
            batch["attn_target"][b, :len(e["attn_target"]), ..., :e["attn_target"].shape[-1]] = e["attn_target"]
            batch["attn_question"][b, :len(e["attn_question"]), :, :e["attn_question"].shape[-1]] = e["attn_question"]
    return batch


def drop_image_tokens(ex: dict[str, Any], keep, image_token_id: int) -> dict[str, Any]:
    """The supervised example ``ex`` (see :func:`dialogue_example`) with only its image tokens ``keep`` (sorted
    indices into its n image tokens, which sit before every question): ``input_ids`` / ``labels`` lose the others,
    ``attn_pos`` / ``attn_question`` shift left by the number removed, ``attn_target`` keeps [first token] + the kept
    columns. ``kept`` records ``keep`` for :func:`forward_kept`. ``keep`` must hold every token a target points at."""
    import torch

    ids = ex["input_ids"]
    image = (ids == image_token_id).nonzero().flatten()
    removed = torch.ones(len(image), dtype=torch.bool)
    removed[keep] = False
    stay = torch.ones(len(ids), dtype=torch.bool)
    stay[image[removed]] = False
    shift, end = int(removed.sum()), int(image[-1])
    columns = torch.cat([keep.new_zeros(1), keep + 1])
    target = ex["attn_target"][..., columns]
    if not torch.allclose(target.sum(-1), ex["attn_target"].sum(-1)):
        raise ValueError("drop_image_tokens: keep must hold every image token an attention target points at")
    question = ex["attn_question"]
    return ex | {"input_ids": ids[stay], "labels": ex["labels"][stay], "attn_pos": ex["attn_pos"] - shift,
                 "attn_question": torch.where(question > end, question - shift, question), "attn_target": target,
                 "kept": keep}


def thin_tokens(ex: dict[str, Any], rng: random.Random, image_token_id: int) -> dict[str, Any]:
    """:func:`drop_image_tokens` keeping a random 10-100 % of the image tokens, among them every one the example's
    attention targets point at (the objects its answers depend on), the rest drawn uniformly."""
    import torch

    n = int((ex["input_ids"] == image_token_id).sum())
    needed = set((ex["attn_target"][..., 1:].flatten(0, -2).sum(0) > 0).nonzero().flatten().tolist())
    others = [i for i in range(n) if i not in needed]
    k = max(len(needed), round(rng.uniform(0.1, 1.0) * n))
    keep = sorted(needed | set(rng.sample(others, k - len(needed))))
    return drop_image_tokens(ex, torch.tensor(keep, dtype=torch.long), image_token_id)


def forward_kept(model, inputs: dict[str, Any], kept: Sequence[Any], **kwargs):
    """``model(**inputs)`` where dialogue b's prompt holds only the image tokens ``kept[b]`` (indices into the
    features its image gives): the tower and projector run on the whole image, the kept features fill the image
    positions of ``inputs_embeds``."""
    import torch

    extra = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
    features = model.model.get_image_features(pixel_values=inputs["pixel_values"], **extra).pooler_output
    rows = torch.cat([f[k.to(f.device)] for f, k in zip(features, kept)])
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    mask = (inputs["input_ids"] == model.config.image_token_id)[..., None]
    embeds = embeds.masked_scatter(mask, rows.to(embeds.dtype))
    return model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], labels=inputs["labels"], **kwargs)


def warm_start_projector(model, head) -> None:
    """Copy the stage-1 head into the first rows of the projector's first linear layer, so that from the first
    stage-2 step part of every visual token is the tower's class evidence (colour, shape, size, anchor, region)
    rather than a random mix of it."""
    import torch

    lin = model.model.multi_modal_projector.linear_1
    k = head.weight.shape[0]
    if lin.weight.shape[0] < k:
        return  # a projector narrower than the head: nothing sensible to copy
    with torch.no_grad():
        lin.weight[:k] = head.weight.to(lin.weight.dtype)
        lin.bias[:k] = head.bias.to(lin.bias.dtype)


def train_dialogues(model, processor, dialogues: Sequence[Any], cfg: RecipeConfig,
                    log: Callable[[str], None] = print, device: str = "cpu",
                    evaluate_fn: Callable[[Any, int], dict[str, float]] | None = None,
                    eval_every: int = 0, scenes: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Stage 2: projector + decoder (+ the tower at ``vision_lr_scale``) on whole dialogues, answer-only loss.
    With MT-Shapes ``scenes`` and ``cfg.attention_weight`` > 0, two heads also learn where each answer should look
    (:func:`attention_loss`)."""
    import torch

    torch.manual_seed(cfg.seed + 1)
    vision = list(model.model.vision_tower.parameters())
    vision_ids = {id(p) for p in vision}
    rest = [p for p in model.parameters() if id(p) not in vision_ids]
    groups = [{"params": rest, "scale": 1.0}]
    for p in vision:
        p.requires_grad_(cfg.vision_lr_scale > 0)
    if cfg.vision_lr_scale > 0:
        groups.append({"params": vision, "scale": cfg.vision_lr_scale})
    opt = torch.optim.AdamW(groups, lr=cfg.stage2_lr, weight_decay=cfg.weight_decay)
    pad_id = processor.tokenizer.pad_token_id
    cache: dict[int, dict[str, Any]] = {}
    rng = random.Random(cfg.seed + 1)
    curve: list[dict[str, Any]] = []
    supervise = bool(scenes) and cfg.attention_weight > 0
    if supervise:
        model.set_attn_implementation("eager")  # attention weights are only materialised by eager attention
    drop_rng = random.Random(cfg.seed + 2)  # its own stream: token_drop=0 leaves the batches as they were
    image_id = model.config.image_token_id
    t0, run_loss, run_att, run_n = time.time(), 0.0, 0.0, 0
    for step in range(cfg.stage2_steps):
        model.train()
        idx = [rng.randrange(len(dialogues)) for _ in range(cfg.stage2_batch)]
        for i in idx:
            if i not in cache:
                scene = (scenes or {}).get(dialogues[i].meta.get("scene_id", dialogues[i].dialogue_id))
                if scene is not None and cfg.family == "llava" and scene.width != scene.height:
                    scene = None  # the centre crop would cut the image: the patch grid would not cover it
                cache[i] = dialogue_example(dialogues[i], processor, scene, cfg)
        examples = [cache[i] for i in idx]
        if cfg.token_drop > 0:
            examples = [thin_tokens(e, drop_rng, image_id) if "attn_pos" in e and drop_rng.random() < cfg.token_drop
                        else e for e in examples]
        batch = {k: v.to(device) for k, v in collate(examples, pad_id).items()}
        for gr in opt.param_groups:
            gr["lr"] = cfg.stage2_lr * gr["scale"] * _schedule(step, cfg.stage2_steps, cfg.warmup)
        inputs = {k: v for k, v in batch.items() if not k.startswith("attn_")}
        supervised = supervise and "attn_pos" in batch
        if any("kept" in e for e in examples):
            kept = [e.get("kept", torch.arange(int((e["input_ids"] == image_id).sum()))) for e in examples]
            out = forward_kept(model, inputs, kept, output_attentions=supervised)
        else:
            out = model(**inputs, output_attentions=supervised)
        loss = out.loss
        att_loss = attention_loss(out.attentions, batch, image_id) if supervised else None
        total = loss if att_loss is None else loss + cfg.attention_weight * att_loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        run_loss, run_n = run_loss + float(loss.detach()), run_n + 1
        run_att += float(att_loss.detach()) if att_loss is not None else 0.0
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.stage2_steps:
            row: dict[str, Any] = {"step": step + 1, "loss": round(run_loss / run_n, 4), "s": round(time.time() - t0, 1)}
            if supervise:
                row["attention_loss"] = round(run_att / run_n, 4)
            run_loss, run_att, run_n = 0.0, 0.0, 0
            if evaluate_fn is not None and eval_every and ((step + 1) % eval_every == 0
                                                           or step + 1 == cfg.stage2_steps):
                row["eval"] = evaluate_fn(model, step + 1)
            curve.append(row)
            log("stage2 " + json.dumps(row))
    for p in vision:
        p.requires_grad_(True)
    if supervise:
        model.set_attn_implementation("sdpa")
    return curve


# -------------------------------------------------------------------------------------------- evaluation
def answer_of(text: str) -> str:
    """The first word of a generated answer (the reference models answer in one word)."""
    words = text.strip().split()
    return words[0] if words else ""


def evaluate(model, processor, dialogues: Sequence[Any], batch_size: int = 32, device: str = "cpu",
             max_new_tokens: int = 3) -> dict[str, Any]:
    """Multi-turn exact-match accuracy with the model's own answers in the history (greedy ``generate``, full
    image). Returns ``per_turn_accuracy`` (Acc_1..Acc_T, Avg in percent) plus ``by_type`` (percent per
    ``turn.meta['type']`` when present) and ``n``."""
    import torch
    from PIL import Image

    from pipeline.metrics import exact_match, per_turn_accuracy

    tok = processor.tokenizer
    model.eval()
    scores: list[list[float]] = [[] for _ in dialogues]
    by_type: dict[str, list[float]] = defaultdict(list)
    for start in range(0, len(dialogues), batch_size):
        chunk = list(dialogues[start:start + batch_size])
        images = []
        for d in chunk:
            with Image.open(d.image) as im:
                images.append(im.convert("RGB"))
        history: list[list[tuple[str, str | None]]] = [[] for _ in chunk]
        for t in range(max(len(d.turns) for d in chunk)):
            live = [b for b, d in enumerate(chunk) if t < len(d.turns)]
            texts = [processor.apply_chat_template(render_dialogue(history[b] + [(chunk[b].turns[t].question, None)]),
                                                   add_generation_prompt=True) for b in live]
            enc = processor(images=[images[b] for b in live], text=texts, return_tensors="pt", padding=True,
                            padding_side="left")
            enc = {k: v.to(device) for k, v in enc.items()}
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            for row, b in enumerate(live):
                pred = answer_of(tok.decode(new[row], skip_special_tokens=True))
                turn = chunk[b].turns[t]
                s = exact_match(pred, list(turn.answers))
                scores[start + b].append(s)
                by_type[str(turn.meta.get("type", "all"))].append(s)
                history[b].append((turn.question, pred))
    result: dict[str, Any] = dict(per_turn_accuracy(scores))
    result["by_type"] = {k: 100.0 * sum(v) / len(v) for k, v in sorted(by_type.items())}
    result["n"] = len(dialogues)
    return result


def chance_accuracy(train: Sequence[Any], test: Sequence[Any]) -> dict[str, float]:
    """Accuracy (percent) per question type of always answering the most frequent training answer of that type:
    the chance level a model that ignores the image reaches."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for d in train:
        for t in d.turns:
            counts[str(t.meta.get("type", "all"))][t.answers[0].lower()] += 1
    hits: dict[str, list[float]] = defaultdict(list)
    for d in test:
        for t in d.turns:
            c = counts.get(str(t.meta.get("type", "all")))
            guess = max(c, key=c.get) if c else ""
            hits[str(t.meta.get("type", "all"))].append(float(guess in [a.lower() for a in t.answers]))
    return {k: 100.0 * sum(v) / len(v) for k, v in sorted(hits.items())}


# ------------------------------------------------------------------------------------------------ entry
def scenes_for(dialogues_path: str | Path) -> dict[str, Any]:
    """The MT-Shapes scenes next to a dialogue file (``scenes.jsonl``), or {} when there are none."""
    from pipeline.datasets.mt_shapes import load_scenes

    path = Path(dialogues_path).parent / "scenes.jsonl"
    return load_scenes(path) if path.is_file() else {}


def save_half(model, out: Path) -> None:
    """Save with fp16 weights (half the size); ``from_pretrained`` restores them as float32 by default."""
    import torch

    model.to(torch.float16).save_pretrained(out)
    model.to(torch.float32)


def build_reference(family: str, out: str | Path, dialogues: str | Path, eval_dialogues: str | Path | None = None,
                    cfg: RecipeConfig | None = None, device: str = "cpu", threads: int | None = None,
                    eval_limit: int | None = None, eval_every: int = 0,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train a reference model on ``dialogues`` (a dialogues.jsonl) and save model + processor to ``out``.

    Stage 1 runs when MT-Shapes ``scenes.jsonl`` sits next to the dialogue file (else it is skipped and the tower
    learns only in stage 2 at ``vision_lr_scale`` or 1.0). ``eval_dialogues`` (e.g. the test split) is scored
    at the end with :func:`evaluate`. Returns a summary (config, times, curves, accuracy) also written to
    ``out/recipe_summary.json``.
    """
    import torch

    from infra.reference.tokenizer import IMAGE, tokenizer_from_dialogues
    from pipeline.dialogues import load_dialogues

    cfg = cfg or RecipeConfig(family=family)
    cfg.family = family
    cfg.__post_init__()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train = load_dialogues(dialogues)
    if cfg.max_train:
        train = train[: cfg.max_train]
    if not train:
        raise ValueError(f"{dialogues}: no dialogues to train on")
    tok = tokenizer_from_dialogues(train)
    processor = build_processor(cfg, tok)
    model = build_model(cfg, len(tok), tok.convert_tokens_to_ids(IMAGE), tok.pad_token_id, tok.bos_token_id,
                        tok.eos_token_id).to(device)
    summary: dict[str, Any] = {"family": family, "config": asdict(cfg), "train_dialogues": len(train),
                               "dialogues": str(dialogues), "device": device, "threads": torch.get_num_threads(),
                               "parameters": sum(p.numel() for p in model.parameters())}
    t0 = time.time()
    scenes = scenes_for(dialogues)
    items = [(d.image, scenes[d.meta.get("scene_id", d.dialogue_id)]) for d in train
             if d.meta.get("scene_id", d.dialogue_id) in scenes]
    if items and cfg.stage1_steps > 0:
        summary["stage1_curve"], head = pretrain_vision(model, processor, items, cfg, log, device)
        warm_start_projector(model, head)
    elif cfg.vision_lr_scale == 0:
        cfg.vision_lr_scale = 1.0  # no dense labels: the tower must learn from the answers
    summary["stage1_s"] = time.time() - t0
    test = load_dialogues(eval_dialogues)[:eval_limit] if eval_dialogues else []
    evaluate_fn = (lambda m, step: evaluate(m, processor, test[:200], device=device)) if test else None
    t1 = time.time()
    summary["stage2_curve"] = train_dialogues(model, processor, train, cfg, log, device, evaluate_fn, eval_every,
                                               scenes)
    summary["stage2_s"] = time.time() - t1
    summary["train_s"] = time.time() - t0
    if test:
        t2 = time.time()
        summary["test"] = evaluate(model, processor, test, device=device)
        summary["test"]["chance_by_type"] = chance_accuracy(train, test)
        summary["eval_s"] = time.time() - t2
        log("test " + json.dumps(summary["test"]))
    model.to("cpu")
    save_half(model, out)
    processor.save_pretrained(out)
    (out / "recipe_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def model_card(summary: dict[str, Any], command: str) -> str:
    """A short MODEL_CARD.md from a :func:`build_reference` summary: recipe, command, times, accuracy per turn."""
    cfg = summary["config"]
    cls = "LlavaForConditionalGeneration" if summary["family"] == "llava" else "LlavaNextForConditionalGeneration"
    lines = [f"# Reference {summary['family']} (MT-Shapes)", "",
             f"Small `{cls}`"
             f" (CLIP vision tower, Llama decoder), {summary['parameters']:,} parameters, trained from scratch by "
             "`infra/reference/recipe.py`; weights saved in fp16.", "",
             "## Recipe",
             f"- Vision tower: {cfg['vision_layers']} layers x {cfg['vision_hidden']}, {cfg['patch_size']} px patches; "
             f"decoder: {cfg['text_layers']} layers x {cfg['text_hidden']}.",
             f"- Stage 1: {cfg['stage1_steps']} steps (batch {cfg['stage1_batch']}, lr {cfg['stage1_lr']}) on dense "
             "per-patch labels (colour / shape / size / anchor / 3x3 region).",
             f"- Stage 2: {cfg['stage2_steps']} steps (batch {cfg['stage2_batch']}, lr {cfg['stage2_lr']}, "
             "tower frozen) "
             "on whole dialogues, answer-only loss plus attention supervision (weight "
             f"{cfg.get('attention_weight', 0)}: two heads of the first layer gather the question's key words, "
             + ("two of the last fetch the patches of the objects the answer depends on"
                if summary["family"] == "llava" else
                "two of the second-to-last layer fetch the objects the answer depends on in the base grid (the "
                "only tokens that know where they lie), two of the last the same objects among the crop tokens")
             + "), projector warm-started from the stage-1 head, decoder init std 1/sqrt(width)."
             + (f" {cfg['token_drop']:.0%} of the dialogues see only a random 10-100 % of their visual tokens (always "
                "those the answers depend on), so the decoder survives token reduction."
                if cfg.get("token_drop") else ""),
             f"- Training dialogues: {summary['train_dialogues']} from `{summary['dialogues']}`.", "",
             "## Command", "```", command, "```", "",
             f"Wall time: {summary['train_s'] / 60:.1f} min training on {summary['device']} "
             f"({summary['threads']} torch thread(s)).", ""]
    test = summary.get("test")
    if test:
        turns = [k for k in test if k.startswith("Acc_")]
        lines += [f"## Accuracy (MT-Shapes test, {test['n']} dialogues, greedy, own answers in the history)", "",
                  "| " + " | ".join(turns + ["Avg"]) + " |", "|" + "---|" * (len(turns) + 1),
                  "| " + " | ".join(f"{test[k]:.1f}" for k in turns + ["Avg"]) + " |", "",
                  "| type | accuracy | chance (majority answer) |", "|---|---|---|"]
        lines += [f"| {k} | {v:.1f} | {test.get('chance_by_type', {}).get(k, float('nan')):.1f} |"
                  for k, v in test["by_type"].items()]
    curve = [r for r in summary.get("stage2_curve", []) if "eval" in r]
    if curve:
        lines += ["", "## Curve (200 test dialogues)", "", "| step | minutes | Avg |", "|---|---|---|"]
        lines += [f"| {r['step']} | {r['s'] / 60:.1f} | {r['eval']['Avg']:.1f} |" for r in curve]
    return "\n".join(lines) + "\n"
