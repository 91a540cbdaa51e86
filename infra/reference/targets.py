"""What the reference recipe trains towards that only the MT-Shapes scene generator knows (docs/design.md §7).

- Stage 1, dense labels: per patch, the colour / shape / size of the object covering it, its anchor patch and its
  3 x 3 region, pushed through the model's own image processor (:func:`label_image` ... :func:`vision_example`).
- Stage 2, attention supervision: where each object lies among the image tokens (:func:`token_views`), where each
  answer should look (:func:`attention_targets`), the question's key words (:func:`key_word_positions`), all
  packed with the dialogue's inputs and answer-only labels by :func:`dialogue_example`.
- Token drop: a supervised example thinned to some of its image tokens, always those its answers depend on
  (:func:`drop_image_tokens`, :func:`thin_tokens`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from infra.reference.chat import answer_labels, render_dialogue
from infra.reference.config import IGNORE, RecipeConfig
from pipeline.datasets.mt_shapes import COLORS, COLS, PLURALS, ROWS, SHAPES

# Head groups of the vision pretraining: name -> number of classes (class 0 = empty / no anchor).
HEAD_GROUPS: dict[str, int] = {"color": 7, "shape": 5, "size": 3, "anchor": 2, "row": 3, "col": 3}
# The words of an MT-Shapes question that say what is asked and where (see :func:`attention_loss`).
KEY_WORDS = frozenset({"color", "shape", "size", "row", "column", "objects", "object", "above", "below",
                       *ROWS, *COLS, *COLORS, *SHAPES, *PLURALS.values()})
SUPERVISED_HEADS = 2  # heads 0 and 1 of the first layer and of each fetching layer (see attention_loss)
# A view of the image tokens: (object index per token (n,), -1 = none; one token per object, the one counted).
TokenView = tuple[np.ndarray, list[int]]


def scenes_for(dialogues_path: str | Path) -> dict[str, Any]:
    """The MT-Shapes scenes next to a dialogue file (``scenes.jsonl``), or {} when there are none."""
    from pipeline.datasets.mt_shapes import load_scenes

    path = Path(dialogues_path).parent / "scenes.jsonl"
    return load_scenes(path) if path.is_file() else {}


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
    if cfg.family == "qwen2_5_vl":
        # flattened patches (N, C * T * p * p); the labels follow a same-sized plain processor whose patch is one
        # merged token (a square image is resized alike by both, and the merger's tokens are row-major)
        from types import SimpleNamespace

        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        t = cfg.tile_size
        processor = SimpleNamespace(image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": t}, crop_size={"height": t, "width": t}))
    else:
        pv = pv.reshape(-1, *pv.shape[-3:])
    # LLaVA-NeXT: tile 0 is the whole image resized; only it can know where a patch lies in the image.
    position_tiles = [0] if cfg.family == "llava_next" else None
    targets = patch_targets(label_tiles(scene, processor)[0], scene, cfg.patch_size, position_tiles=position_tiles)
    return pv, {k: torch.from_numpy(v) for k, v in targets.items()}


# ----------------------------------------------------------------------------- stage 2: attention targets
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

    if cfg.family != "llava_next":  # one grid of tokens (Qwen2.5-VL: its merged tokens, row-major)
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

    video = getattr(dialogue, "kind", "image") == "video"
    text = processor.apply_chat_template(render_dialogue([(t.question, t.answers[0]) for t in dialogue.turns],
                                                         "video" if video else "image"))
    if video:  # Qwen2.5-VL's video path (the processor refuses it for a tokenizer without a video token)
        enc = processor(videos=[dialogue.image], text=[text], return_tensors="pt")
    else:
        with Image.open(dialogue.image) as im:
            enc = processor(images=[im.convert("RGB")], text=[text], return_tensors="pt")
    # Qwen2.5-VL: pixel_values(_videos) (N, C * T * p * p) are the image's / video's patches, no batch dim
    flat = ("pixel_values", "pixel_values_videos") if "image_grid_thw" in enc or "video_grid_thw" in enc else ()
    ex = {k: v if k in flat else v[0] for k, v in enc.items()
          if k in ("input_ids", "pixel_values", "image_sizes", "image_grid_thw", "mm_token_type_ids",
                   "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")}
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


# ----------------------------------------------------------------------------------------------- token drop
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
    types = {"mm_token_type_ids": ex["mm_token_type_ids"][stay]} if "mm_token_type_ids" in ex else {}
    return ex | types | {"input_ids": ids[stay], "labels": ex["labels"][stay], "attn_pos": ex["attn_pos"] - shift,
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
