"""Training recipe of the reference LVLMs (issue 4, item 5; docs/design.md §7).

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
   every reducer before the LLM moves. On data without MT-Shapes scenes stage 1 and the attention supervision are
   skipped (one logged line each, :func:`what_runs`) and the token drop is the generic one
   (:mod:`infra.reference.token_drop`: random or pooled removal, no metadata needed).

Evaluation (:func:`evaluate`) is the multi-turn protocol: greedy ``generate`` with the full image, the model's own
answers in the history, exact match per turn. Everything is saved as a plain local HF directory that
``AutoProcessor`` / ``AutoModelForImageTextToText`` load.

Modules: :mod:`infra.reference.config` (:class:`RecipeConfig`), :mod:`infra.reference.targets` (what the MT-Shapes
generator knows: dense labels, token views, attention targets, token drop), :mod:`infra.reference.training` (model,
stages 1 and 2), :mod:`infra.reference.evaluation`, :mod:`infra.reference.card` (MODEL_CARD.md,
recipe_summary.json); this one is the entry, :func:`build_reference`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from infra.reference.card import write_summary
from infra.reference.config import RecipeConfig
from infra.reference.evaluation import chance_accuracy, evaluate
from infra.reference.targets import scenes_for
from infra.reference.training import (build_model, build_processor, pretrain_vision, train_dialogues,
                                      warm_start_projector)

__all__ = ["RecipeConfig", "build_reference", "save_half"]


def save_half(model, out: Path) -> None:
    """Save with fp16 weights (half the size); ``from_pretrained`` restores them as float32 by default."""
    import torch

    model.to(torch.float16).save_pretrained(out)
    model.to(torch.float32)


def what_runs(cfg: RecipeConfig, scene_dialogues: int, dialogues: str | Path) -> dict[str, Any]:
    """Which parts of the recipe run, given ``scene_dialogues`` training dialogues with MT-Shapes scenes, and one
    line per part skipped or replaced, for the log and the model card (issue 16, item 4: never silently)."""
    notes: list[str] = []
    scenes = scene_dialogues > 0
    where = f"no MT-Shapes scenes.jsonl beside {dialogues}" if not scenes else ""
    stage1 = scenes and cfg.stage1_steps > 0
    if not scenes and cfg.stage1_steps > 0:
        notes.append(f"skipped: stage 1 (vision pretraining on dense per-patch labels): {where}; the vision tower "
                     "learns from the answers in stage 2 instead (lr scale 1.0)")
    attention = scenes and cfg.attention_weight > 0
    if not scenes and cfg.attention_weight > 0:
        notes.append(f"skipped: attention supervision (weight {cfg.attention_weight}): {where}; stage 2 learns from "
                     "the answer loss alone")
    drop = "none"
    if cfg.token_drop > 0:
        if cfg.token_drop_mode in ("random", "pool", "mixed"):
            drop = cfg.token_drop_mode
        elif scenes:
            drop = "scene" if cfg.token_drop_mode == "scene" else "scene (generic mixed where a dialogue has none)"
        elif cfg.token_drop_mode == "scene":
            notes.append(f"skipped: token drop (--token-drop-mode scene): {where}; every dialogue keeps all its "
                         "visual tokens")
        else:
            drop = "mixed"
            notes.append(f"replaced: the scene token drop needs MT-Shapes scenes ({where}); the generic drop "
                         f"(random or pooled removal) thins {cfg.token_drop:.0%} of the dialogues instead")
    return {"stage1": stage1, "attention_supervision": attention, "token_drop": drop,
            "scene_dialogues": scene_dialogues, "notes": notes}


def build_reference(family: str, out: str | Path, dialogues: str | Path, eval_dialogues: str | Path | None = None,
                    cfg: RecipeConfig | None = None, device: str = "cpu", threads: int | None = None,
                    eval_limit: int | None = None, eval_every: int = 0,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train a reference model on ``dialogues`` (a dialogues.jsonl) and save model + processor to ``out``.

    Stage 1 and the attention supervision run when MT-Shapes ``scenes.jsonl`` sits next to the dialogue file (else
    they are skipped, with a line in the log and the card, and the tower learns in stage 2 at ``vision_lr_scale``
    or 1.0; :func:`what_runs`). ``eval_dialogues`` (e.g. the test split) is scored
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
    summary["ran"] = what_runs(cfg, len(items), dialogues)
    summary["data_name"] = "MT-Shapes" if items else None
    for line in summary["ran"]["notes"]:
        log(line)
    if summary["ran"]["stage1"]:
        summary["stage1_curve"], head = pretrain_vision(model, processor, items, cfg, log, device)
        warm_start_projector(model, head)
    elif cfg.vision_lr_scale == 0:
        cfg.vision_lr_scale = 1.0  # no dense labels: the tower must learn from the answers
    summary["config"]["vision_lr_scale"] = cfg.vision_lr_scale
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
        summary["test"]["majority_by_type"] = chance_accuracy(train, test)
        blind = evaluate(model, processor, test, device=device, blank=True)
        summary["test"]["chance_by_type"] = blind["by_type"]  # the same model, blank images
        summary["test"]["blind_avg"] = blind["Avg"]
        summary["eval_s"] = time.time() - t2
        log("test " + json.dumps(summary["test"]))
    model.to("cpu")
    save_half(model, out)
    processor.save_pretrained(out)
    write_summary(summary, out)
    return summary
