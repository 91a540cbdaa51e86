"""Training of the reference LVLMs: model and processor construction, stage 1 (the vision tower on dense labels)
and stage 2 (projector + decoder on whole dialogues, answer-only loss plus attention supervision); see
:mod:`infra.reference.recipe` for the recipe and :mod:`infra.reference.targets` for what it learns from.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from infra.reference.config import IGNORE, RecipeConfig
from infra.reference.targets import HEAD_GROUPS, SUPERVISED_HEADS, dialogue_example, thin_tokens, vision_example
from infra.reference.token_drop import generic_drop


# ----------------------------------------------------------------------------------------------------- model
def build_model(cfg: RecipeConfig, vocab_size: int, image_token_id: int, pad_id: int, bos_id: int, eos_id: int,
                video_token_id: int | None = None):
    """A randomly initialised model of transformers' own classes, sized by ``cfg``."""
    from transformers import CLIPVisionConfig, LlamaConfig

    if cfg.family == "qwen2_5_vl":
        return build_qwen(cfg, vocab_size, image_token_id, pad_id, bos_id, eos_id, video_token_id)

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


def build_qwen(cfg: RecipeConfig, vocab_size: int, image_token_id: int, pad_id: int, bos_id: int, eos_id: int,
               video_token_id: int | None = None):
    """A ``Qwen2_5_VLForConditionalGeneration``: a ViT of ``patch_size // 2`` patches whose 2 x 2 merger outputs the
    LLM width, attending over the whole image in every layer (a window covering the image), and a Qwen2 decoder
    with 3-D rotary positions, sized as the LLaVA references."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    half = cfg.text_hidden // cfg.text_heads // 2  # rotary frequencies per head, split over (t, h, w)
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=cfg.vision_layers, hidden_size=cfg.vision_hidden,
                           intermediate_size=2 * cfg.vision_hidden, num_heads=cfg.vision_heads,
                           patch_size=cfg.patch_size // 2, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=cfg.image_size, out_hidden_size=cfg.text_hidden,
                           fullatt_block_indexes=list(range(cfg.vision_layers))),
        text_config=dict(vocab_size=vocab_size, hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
                         num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                         num_key_value_heads=cfg.text_heads, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
                         initializer_range=cfg.text_init_std or cfg.text_hidden ** -0.5, tie_word_embeddings=True,
                         pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id),
        image_token_id=image_token_id, tie_word_embeddings=True,
        **({"video_token_id": video_token_id} if video_token_id is not None else {}))
    model = Qwen2_5_VLForConditionalGeneration(config)
    for key, value in (("pad_token_id", pad_id), ("bos_token_id", bos_id), ("eos_token_id", eos_id)):
        setattr(model.generation_config, key, value)
    return model


def vision_parts(model) -> tuple[list, list]:
    """(the vision tower's own parameters, its projector's when it sits inside the tower): Qwen2.5-VL's merger is
    the projector, trained in stage 2 as LLaVA's ``multi_modal_projector`` is."""
    tower = getattr(model.model, "vision_tower", None) or model.model.visual
    merger = {id(p) for p in tower.merger.parameters()} if hasattr(tower, "merger") else set()
    own = [p for p in tower.parameters() if id(p) not in merger]
    return own, [p for p in tower.parameters() if id(p) in merger]


def build_processor(cfg: RecipeConfig, tokenizer):
    """The image processor (PIL backend: no torchvision needed) + tokenizer + chat template, as one processor."""
    from infra.reference.tokenizer import CHAT_TEMPLATE, IMAGE

    t = cfg.tile_size
    if cfg.family == "qwen2_5_vl":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from infra.reference.qwen_processor import QwenImageProcessor

        # pixel bounds that resize a square image to t x t (sides rounded to the merged token's side)
        ip = Qwen2VLImageProcessorPil(patch_size=cfg.patch_size // 2, merge_size=2, temporal_patch_size=2,
                                      size={"shortest_edge": cfg.patch_size ** 2, "longest_edge": t * t})
        return QwenImageProcessor(ip, tokenizer, CHAT_TEMPLATE, num_frames=cfg.video_frames)
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


# ---------------------------------------------------------------------------------- stage 1: vision tower
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


def tower_patch_features(model, pixel_values, images: int = 1):
    """(N, P, d) patch features of the layer the decoder reads (CLS dropped), with gradients. Qwen2.5-VL: the
    merger's tokens of ``images`` square images whose flattened patches ``pixel_values`` concatenates."""
    if not hasattr(model.model, "vision_tower"):
        import torch

        side = int(round((pixel_values.shape[0] // images) ** 0.5))
        grid = torch.tensor([[1, side, side]] * images, device=pixel_values.device)
        out = model.model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid).pooler_output
        return torch.stack(list(out))
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
    head = DenseHead(cfg.text_hidden if cfg.family == "qwen2_5_vl" else cfg.vision_hidden).to(device)
    params = [p for part in vision_parts(model) for p in part] + list(head.parameters())
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
        loss, acc = dense_loss(head(tower_patch_features(model, pv, len(idx))), targets)
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
    if "mm_token_type_ids" in examples[0]:
        # Qwen2.5-VL: images' patches concatenated with one grid row per image, videos' alike, in batch order
        images = [e for e in examples if "image_grid_thw" in e]
        videos = [e for e in examples if "video_grid_thw" in e]
        if images:
            batch["pixel_values"] = torch.cat([e["pixel_values"] for e in images])
            batch["image_grid_thw"] = torch.stack([e["image_grid_thw"] for e in images])
        if videos:
            batch["pixel_values_videos"] = torch.cat([e["pixel_values_videos"] for e in videos])
            batch["video_grid_thw"] = torch.stack([e["video_grid_thw"] for e in videos])
            batch["second_per_grid_ts"] = torch.stack([e["second_per_grid_ts"] for e in videos])
        batch["mm_token_type_ids"] = torch.zeros_like(ids)
        for b, e in enumerate(examples):
            batch["mm_token_type_ids"][b, :len(e["mm_token_type_ids"])] = e["mm_token_type_ids"]
        pvs = []
    else:
        pvs = [e["pixel_values"] for e in examples]
    if "image_sizes" in examples[0]:
        tiles = max(p.shape[0] for p in pvs)
        pvs = [torch.cat([p, p.new_zeros(tiles - p.shape[0], *p.shape[1:])]) for p in pvs]
        batch["image_sizes"] = torch.stack([e["image_sizes"] for e in examples])
    if pvs:
        batch["pixel_values"] = torch.stack(pvs)
    # Dialogues without attention targets (no scene, generic drop, video) ride along as rows without turns
    # (attn_pos -1), which :func:`attention_loss` leaves out.
    supervised = [e for e in examples if "attn_pos" in e]
    if supervised:
        turns = max(len(e["attn_pos"]) for e in supervised)
        batch["attn_pos"] = torch.full((len(examples), turns), -1, dtype=torch.long)
        width = max(e["attn_target"].shape[-1] for e in supervised)
        batch["attn_target"] = torch.zeros(len(examples), turns, *supervised[0]["attn_target"].shape[1:-1], width)
        words = max(e["attn_question"].shape[-1] for e in supervised)
        batch["attn_question"] = torch.full((len(examples), turns, SUPERVISED_HEADS, words), -1, dtype=torch.long)
        for b, e in enumerate(examples):
            if "attn_pos" not in e:
                continue
            batch["attn_pos"][b, :len(e["attn_pos"])] = e["attn_pos"]
            batch["attn_target"][b, :len(e["attn_target"]), ..., :e["attn_target"].shape[-1]] = e["attn_target"]
            batch["attn_question"][b, :len(e["attn_question"]), :, :e["attn_question"].shape[-1]] = e["attn_question"]
    return batch


def forward_kept(model, inputs: dict[str, Any], kept: Sequence[Any], **kwargs):
    """``model(**inputs)`` where dialogue b's prompt holds only the image tokens ``kept[b]`` (indices into the
    features its image gives, or a (k, n) matrix mixing them: :mod:`infra.reference.token_drop`): the tower and
    projector run on the whole image, the kept features fill the image positions of ``inputs_embeds``. Qwen2.5-VL
    (images and videos): :func:`infra.reference.qwen_positions.qwen_forward_kept`, with explicit 3-D positions."""
    import torch

    if hasattr(model.model, "visual"):
        from infra.reference.qwen_positions import qwen_forward_kept

        return qwen_forward_kept(model, inputs, kept, **kwargs)
    extra = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
    features = model.model.get_image_features(pixel_values=inputs["pixel_values"], **extra).pooler_output
    rows = torch.cat([f[k.to(f.device)] if not k.is_floating_point() else k.to(f.device, f.dtype) @ f
                      for f, k in zip(features, kept)])
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    mask = (inputs["input_ids"] == model.config.image_token_id)[..., None]
    embeds = embeds.masked_scatter(mask, rows.to(embeds.dtype))
    return model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], labels=inputs["labels"], **kwargs)


def warm_start_projector(model, head) -> None:
    """Copy the stage-1 head into the first rows of the projector's first linear layer, so that from the first
    stage-2 step part of every visual token is the tower's class evidence (colour, shape, size, anchor, region)
    rather than a random mix of it."""
    import torch

    if not hasattr(model.model, "multi_modal_projector"):
        return  # Qwen2.5-VL: the head was trained on the merger's output, which already feeds the decoder
    lin = model.model.multi_modal_projector.linear_1
    k = head.weight.shape[0]
    if lin.weight.shape[0] < k:
        return  # a projector narrower than the head: nothing sensible to copy
    with torch.no_grad():
        lin.weight[:k] = head.weight.to(lin.weight.dtype)
        lin.bias[:k] = head.bias.to(lin.bias.dtype)


def _drop(ex: dict[str, Any], cfg: RecipeConfig, rng: random.Random, image_id: int,
          video_id: int | None = None) -> dict[str, Any]:
    """One example after the token drop of ``cfg.token_drop_mode`` (see :class:`RecipeConfig`). With scene
    targets and mode ``auto`` / ``scene``, the scene drop (one draw per example, as before the generic drop existed:
    builds where every dialogue has targets are unchanged); else the generic one (a video: over its video tokens)."""
    mode = cfg.token_drop_mode
    if "video_grid_thw" in ex:
        image_id = video_id
    if mode in ("auto", "scene") and "attn_pos" in ex:
        return thin_tokens(ex, rng, image_id) if rng.random() < cfg.token_drop else ex
    if mode == "scene":
        return ex
    if rng.random() >= cfg.token_drop:
        return ex
    return generic_drop(ex, rng, image_id, "mixed" if mode == "auto" else mode)


def train_dialogues(model, processor, dialogues: Sequence[Any], cfg: RecipeConfig,
                    log: Callable[[str], None] = print, device: str = "cpu",
                    evaluate_fn: Callable[[Any, int], dict[str, float]] | None = None,
                    eval_every: int = 0, scenes: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Stage 2: projector + decoder (+ the tower at ``vision_lr_scale``) on whole dialogues, answer-only loss.
    With MT-Shapes ``scenes`` and ``cfg.attention_weight`` > 0, two heads also learn where each answer should look
    (:func:`attention_loss`)."""
    import torch

    torch.manual_seed(cfg.seed + 1)
    vision = vision_parts(model)[0]
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
    video_id = getattr(model.config, "video_token_id", None)
    t0, run_loss, run_att, run_n = time.time(), 0.0, 0.0, 0
    for step in range(cfg.stage2_steps):
        model.train()
        idx = [rng.randrange(len(dialogues)) for _ in range(cfg.stage2_batch)]
        for i in idx:
            if i not in cache:
                scene = (scenes or {}).get(dialogues[i].meta.get("scene_id", dialogues[i].dialogue_id))
                if scene is not None and cfg.family != "llava_next" and scene.width != scene.height:
                    scene = None  # the centre crop would cut the image: the patch grid would not cover it
                cache[i] = dialogue_example(dialogues[i], processor, scene, cfg)
        examples = [cache[i] for i in idx]
        if cfg.token_drop > 0:
            examples = [_drop(e, cfg, drop_rng, image_id, video_id) for e in examples]
        batch = {k: v.to(device) for k, v in collate(examples, pad_id).items()}
        for gr in opt.param_groups:
            gr["lr"] = cfg.stage2_lr * gr["scale"] * _schedule(step, cfg.stage2_steps, cfg.warmup)
        inputs = {k: v for k, v in batch.items() if not k.startswith("attn_")}
        supervised = supervise and "attn_pos" in batch
        if any("kept" in e for e in examples):
            visual = [(e["input_ids"] == image_id) | (e["input_ids"] == (video_id or image_id)) for e in examples]
            kept = [e.get("kept", torch.arange(int(v.sum()))) for e, v in zip(examples, visual)]
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
