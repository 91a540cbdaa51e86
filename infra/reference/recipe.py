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
   price of about one, and the history the model will see at test time).

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

FAMILIES = ("llava", "llava_next")
# Head groups of the vision pretraining: name -> number of classes (class 0 = empty / no anchor).
HEAD_GROUPS: dict[str, int] = {"color": 7, "shape": 5, "size": 3, "anchor": 2, "row": 3, "col": 3}
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
    # Short sequences (LLaVA, after stage 1): for the first ``short_fraction`` of stage 2 the decoder sees only
    # ``short_tokens`` visual tokens: every patch the dense head calls an object, plus random background patches.
    # A 4x shorter sequence is a 4x cheaper step; the remaining steps see all tokens, as at test time.
    short_fraction: float = 0.7
    short_tokens: int = 48
    weight_decay: float = 0.01
    seed: int = 0
    max_train: int | None = None
    log_every: int = 50
    grid_pinpoints: list[list[int]] = field(default_factory=lambda: [[96, 96], [96, 144], [144, 96]])

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
                     bos_token_id=bos_id, eos_token_id=eos_id, tie_word_embeddings=True)
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


def patch_targets(labels: np.ndarray, scene, patch: int, min_cover: float = 0.2,
                  position_tiles: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Dense targets for every patch of processed label tiles.

    ``labels``: (T, 3, S, S) label tiles (see :func:`label_image`) as the image processor laid them out.
    Returns ``{group: (T, (S/patch)**2) int64}`` for :data:`HEAD_GROUPS`. A patch takes the object covering most of
    its pixels if that covers ``min_cover`` of it; each object's best-covered patch in a tile is its anchor. Region
    targets come from the patch's centre pixel; padding and tiles not in ``position_tiles`` (default: all) get
    :data:`IGNORE`.
    """
    from pipeline.datasets.mt_shapes import COLORS, SHAPES, SIZES

    t, _, s, _ = labels.shape
    g = s // patch
    obj = labels[:, 0].reshape(t, g, patch, g, patch).transpose(0, 1, 3, 2, 4).reshape(t, g * g, patch * patch)
    k = len(scene.objects)
    cover = (obj[..., None] == np.arange(1, k + 1)).mean(axis=2)  # (T, P, k)
    out = {name: np.zeros((t, g * g), np.int64) for name in ("color", "shape", "size", "anchor")}
    if k:
        best = cover.argmax(axis=2)
        hit = cover.max(axis=2) >= min_cover
        luts = {"color": [1 + list(COLORS).index(o.color) for o in scene.objects],
                "shape": [1 + list(SHAPES).index(o.shape) for o in scene.objects],
                "size": [1 + list(SIZES).index(o.size) for o in scene.objects]}
        for name, lut in luts.items():
            out[name] = np.where(hit, np.asarray(lut)[best], 0)
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
    from PIL import Image

    ip = processor.image_processor
    pv = ip(images=[image], return_tensors="pt")["pixel_values"]
    lab = ip(images=[label_image(scene)], return_tensors="np", resample=Image.NEAREST, do_rescale=False,
             do_normalize=False)["pixel_values"]
    pv, lab = pv.reshape(-1, *pv.shape[-3:]), np.asarray(lab).reshape(-1, *pv.shape[-3:])
    # LLaVA-NeXT: tile 0 is the whole image resized; only it can know where a patch lies in the image.
    position_tiles = None if cfg.family == "llava" else [0]
    targets = patch_targets(np.rint(lab).astype(np.int64), scene, cfg.patch_size, position_tiles=position_tiles)
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
    loss, accuracies of the last batch) and the dense head (stage 2 uses it to find object patches)."""
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


def dialogue_example(dialogue, processor) -> dict[str, Any]:
    """Model inputs of one whole dialogue with answer-only labels (first reference answer of each turn)."""
    from PIL import Image

    text = processor.apply_chat_template(render_dialogue([(t.question, t.answers[0]) for t in dialogue.turns]))
    with Image.open(dialogue.image) as im:
        enc = processor(images=[im.convert("RGB")], text=[text], return_tensors="pt")
    ex = {k: v[0] for k, v in enc.items() if k in ("input_ids", "pixel_values", "image_sizes")}
    ex["labels"] = answer_labels(ex["input_ids"], processor.tokenizer)
    return ex


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
    return batch


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


def object_patches(model, head, pixel_values):
    """(N, P) bool: patches the dense head calls part of an object (any colour, or an anchor)."""
    import torch

    with torch.no_grad():
        logits = head(tower_patch_features(model, pixel_values))
    n_color, n_shape, n_size = HEAD_GROUPS["color"], HEAD_GROUPS["shape"], HEAD_GROUPS["size"]
    anchor = logits[..., n_color + n_shape + n_size:n_color + n_shape + n_size + 2]
    return (logits[..., :n_color].argmax(-1) > 0) | (anchor.argmax(-1) > 0)


def short_batch(model, head, batch: dict[str, Any], n_keep: int, rng: random.Random) -> dict[str, Any]:
    """A LLaVA batch with only ``n_keep`` visual tokens per image (object patches first, then random background
    ones, in their original order), as ``inputs_embeds`` (B, L', d) + attention_mask + labels (B, L')."""
    import torch

    image_id = model.config.image_token_id
    feats = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output  # list of (P, d)
    objects = object_patches(model, head, batch["pixel_values"])  # (B, P)
    emb = model.get_input_embeddings()
    rows = []
    for b in range(batch["input_ids"].shape[0]):
        valid = batch["attention_mask"][b].bool()
        ids, labels = batch["input_ids"][b][valid], batch["labels"][b][valid]
        pos = (ids == image_id).nonzero().flatten()
        p0, p1 = int(pos[0]), int(pos[-1]) + 1
        obj = objects[b].nonzero().flatten().tolist()
        rest = [i for i in range(p1 - p0) if i not in set(obj)]
        keep = sorted(obj + rng.sample(rest, max(0, min(len(rest), n_keep - len(obj)))))
        f = feats[b][keep].to(emb.weight.dtype)
        e = torch.cat([emb(ids[:p0]), f, emb(ids[p1:])])
        lab = torch.cat([labels[:p0], labels.new_full((len(keep),), IGNORE), labels[p1:]])
        rows.append((e, lab))
    n = max(len(r[1]) for r in rows)
    embeds = rows[0][0].new_zeros(len(rows), n, rows[0][0].shape[-1])
    labels = torch.full((len(rows), n), IGNORE, dtype=torch.long, device=embeds.device)
    mask = torch.zeros((len(rows), n), dtype=torch.long, device=embeds.device)
    for b, (e, lab) in enumerate(rows):
        embeds[b, :len(lab)], labels[b, :len(lab)], mask[b, :len(lab)] = e, lab, 1
    return {"inputs_embeds": embeds, "attention_mask": mask, "labels": labels}


def train_dialogues(model, processor, dialogues: Sequence[Any], cfg: RecipeConfig,
                    log: Callable[[str], None] = print, device: str = "cpu",
                    evaluate_fn: Callable[[Any, int], dict[str, float]] | None = None,
                    eval_every: int = 0, head=None) -> list[dict[str, Any]]:
    """Stage 2: projector + decoder (+ the tower at ``vision_lr_scale``) on whole dialogues, answer-only loss.
    With the stage-1 ``head`` (LLaVA only), the first ``cfg.short_fraction`` of the steps use
    :func:`short_batch`."""
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
    t0, run_loss, run_n = time.time(), 0.0, 0
    for step in range(cfg.stage2_steps):
        model.train()
        idx = [rng.randrange(len(dialogues)) for _ in range(cfg.stage2_batch)]
        for i in idx:
            if i not in cache:
                cache[i] = dialogue_example(dialogues[i], processor)
        batch = {k: v.to(device) for k, v in collate([cache[i] for i in idx], pad_id).items()}
        for gr in opt.param_groups:
            gr["lr"] = cfg.stage2_lr * gr["scale"] * _schedule(step, cfg.stage2_steps, cfg.warmup)
        short = head is not None and cfg.family == "llava" and step < cfg.short_fraction * cfg.stage2_steps
        loss = model(**(short_batch(model, head, batch, cfg.short_tokens, rng) if short else batch)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        run_loss, run_n = run_loss + float(loss.detach()), run_n + 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.stage2_steps:
            row: dict[str, Any] = {"step": step + 1, "loss": round(run_loss / run_n, 4), "short": short,
                                   "s": round(time.time() - t0, 1)}
            run_loss, run_n = 0.0, 0
            if evaluate_fn is not None and eval_every and ((step + 1) % eval_every == 0
                                                           or step + 1 == cfg.stage2_steps):
                row["eval"] = evaluate_fn(model, step + 1)
            curve.append(row)
            log("stage2 " + json.dumps(row))
    for p in vision:
        p.requires_grad_(True)
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
    head = None
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
                                               head)
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
             "on whole dialogues, answer-only loss, projector warm-started from the stage-1 head"
             + (f"; the first {cfg['short_fraction']:.0%} of the steps with {cfg['short_tokens']} visual tokens "
                "(object patches + background), the rest with all of them." if summary["family"] == "llava" else "."),
             f"- Training dialogues: {summary['train_dialogues']} from `{summary['dialogues']}`.", "",
             "## Command", "```", command, "```", "",
             f"Wall time: {summary['train_s'] / 60:.1f} min training on {summary['device']} "
             f"({summary['threads']} threads, shared machine).", ""]
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
