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
recipe_summary.json), :mod:`infra.reference.parent` (``--init``: stage 2 continued from a built reference),
:mod:`infra.reference.qwen_positions` (Qwen2.5-VL's token drop: explicit 3-D positions),
:mod:`infra.reference.qwen_processor` (Qwen2.5-VL's image and video inputs); this one is the entry,
:func:`build_reference`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
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


def what_runs(cfg: RecipeConfig, scene_dialogues: int, dialogues: str | Path, parent: bool = False) -> dict[str, Any]:
    """Which parts of the recipe run, given ``scene_dialogues`` training dialogues with MT-Shapes scenes, and one
    line per part skipped or replaced, for the log and the model card (issue 16, item 4: never silently).
    ``parent``: stage 2 continues an ``--init`` model, whose tower already learned (stage 1 is not missed)."""
    notes: list[str] = []
    scenes = scene_dialogues > 0
    where = f"no MT-Shapes scenes.jsonl beside {dialogues}" if not scenes else ""
    stage1 = scenes and cfg.stage1_steps > 0
    if not scenes and cfg.stage1_steps > 0 and not parent:
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


Paths = str | Path | Sequence[str | Path]


def _files(paths: Paths | None) -> list[Path]:
    return [] if paths is None else [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]


def load_training(files: Sequence[Path], family: str, max_train: int | None) -> tuple[list[Any], list[dict]]:
    """The dialogues of every file (``max_train``: the first N of each), and one record per file (path, kind
    counts) for the card. Video dialogues need the Qwen family (the only one with a video path)."""
    from pipeline.dialogues import load_dialogues

    train, data = [], []
    for path in files:
        part = load_dialogues(path)[:max_train or None]
        if not part:
            raise ValueError(f"{path}: no dialogues to train on")
        videos = sum(d.kind == "video" for d in part)
        if videos and family != "qwen2_5_vl":
            raise ValueError(f"{path}: {videos} video dialogues, but --family {family} has no video path; use "
                             "--family qwen2_5_vl or leave this file out")
        data.append({"file": str(path), "dialogues": len(part), "image": len(part) - videos, "video": videos,
                     "source": sorted({d.source for d in part})})
        train += part
    return train, data


def score(model, processor, train: Sequence[Any], test: Sequence[Any], device: str) -> dict[str, Any]:
    """:func:`evaluate` per visual kind of ``test`` (one generate batch holds one kind), each with the same model's
    blind accuracy (blank images / grey videos) and the majority answer per question type."""
    results = {}
    for kind in sorted({d.kind for d in test}):
        part = [d for d in test if d.kind == kind]
        res = evaluate(model, processor, part, device=device)
        res["majority_by_type"] = chance_accuracy([d for d in train if d.kind == kind], part)
        blind = evaluate(model, processor, part, device=device, blank=True)
        res["chance_by_type"], res["blind_avg"] = blind["by_type"], blind["Avg"]
        results[kind] = res
    return results


def build_reference(family: str, out: str | Path, dialogues: Paths, eval_dialogues: Paths | None = None,
                    cfg: RecipeConfig | None = None, device: str = "cpu", threads: int | None = None,
                    eval_limit: int | None = None, eval_every: int = 0,
                    log: Callable[[str], None] = print, init: str | Path | None = None) -> dict[str, Any]:
    """Train a reference model on ``dialogues`` (one dialogues.jsonl or several: images and, for Qwen2.5-VL, videos
    mixed; ``cfg.max_train`` takes the first N of each) and save model + processor to ``out``.

    Stage 1 and the attention supervision run when MT-Shapes ``scenes.jsonl`` sits next to a dialogue file (else
    they are skipped, with a line in the log and the card, and the tower learns in stage 2 at ``vision_lr_scale``
    or 1.0; :func:`what_runs`). ``init``: a reference directory of the same family to continue from
    (:mod:`infra.reference.parent`; its sizes win over ``cfg``'s, and the tower keeps ``vision_lr_scale``).
    ``eval_dialogues`` (e.g. the test splits) are scored at the end per visual kind (:func:`score`): ``test`` is
    the first kind's result (images before videos), ``test_by_kind`` all of them. Returns a summary (config, data,
    parent, times, curves, accuracy) also written to ``out/recipe_summary.json``.
    """
    import torch

    from infra.reference.tokenizer import IMAGE, VIDEO, tokenizer_from_dialogues
    from pipeline.dialogues import load_dialogues

    cfg = cfg or RecipeConfig(family=family)
    cfg.family = family
    cfg.__post_init__()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    out = Path(out)
    files = _files(dialogues)
    if not files:
        raise ValueError("no training dialogues: pass at least one dialogues.jsonl")
    train, data = load_training(files, family, cfg.max_train)
    video = family == "qwen2_5_vl"  # every Qwen reference carries the video placeholder, for a later fine-tune
    parent = None
    if init is not None:
        from infra.reference.parent import load_parent

        model, tok, parent = load_parent(init, cfg, train, video)
        log(f"init: stage 2 continues {parent['dir']} (model.safetensors sha256 {parent['sha256'][:12]}...), "
            f"{parent['words_added']} new vocabulary entries")
    else:
        tok = tokenizer_from_dialogues(train, video=video)
        model = build_model(cfg, len(tok), tok.convert_tokens_to_ids(IMAGE), tok.pad_token_id, tok.bos_token_id,
                            tok.eos_token_id, tok.convert_tokens_to_ids(VIDEO) if video else None)
    model.to(device)
    out.mkdir(parents=True, exist_ok=True)  # after every input was read: bad input leaves no directory behind
    processor = build_processor(cfg, tok)
    shown = str(files[0]) if len(files) == 1 else [str(f) for f in files]
    summary: dict[str, Any] = {"family": family, "config": asdict(cfg), "train_dialogues": len(train),
                               "dialogues": shown, "data": data, "parent": parent, "device": device,
                               "threads": torch.get_num_threads(),
                               "parameters": sum(p.numel() for p in model.parameters())}
    t0 = time.time()
    scenes = {k: v for f in files for k, v in scenes_for(f).items()}
    items = [(d.image, scenes[d.meta.get("scene_id", d.dialogue_id)]) for d in train
             if d.kind == "image" and d.meta.get("scene_id", d.dialogue_id) in scenes]
    summary["ran"] = what_runs(cfg, len(items), " / ".join(str(f) for f in files), parent is not None)
    names = sorted({"MT-Shapes" if items else "", "MT-Video" if any(d.source == "mt_video" for d in train) else ""}
                   - {""})
    summary["data_name"] = " + ".join(names) or None
    for line in summary["ran"]["notes"]:
        log(line)
    if summary["ran"]["stage1"]:
        summary["stage1_curve"], head = pretrain_vision(model, processor, items, cfg, log, device)
        warm_start_projector(model, head)
    elif cfg.vision_lr_scale == 0 and parent is None:
        cfg.vision_lr_scale = 1.0  # no dense labels: the tower must learn from the answers
    summary["config"]["vision_lr_scale"] = cfg.vision_lr_scale
    summary["stage1_s"] = time.time() - t0
    test = [d for f in _files(eval_dialogues) for d in load_dialogues(f)[:eval_limit]]
    first = [d for d in test if d.kind == min(d.kind for d in test)][:200] if test else []
    evaluate_fn = (lambda m, step: evaluate(m, processor, first, device=device)) if test else None
    t1 = time.time()
    summary["stage2_curve"] = train_dialogues(model, processor, train, cfg, log, device, evaluate_fn, eval_every,
                                               scenes)
    summary["stage2_s"] = time.time() - t1
    summary["train_s"] = time.time() - t0
    if test:
        t2 = time.time()
        summary["test_by_kind"] = score(model, processor, train, test, device)
        summary["test"] = summary["test_by_kind"][min(summary["test_by_kind"])]
        summary["eval_s"] = time.time() - t2
        log("test " + json.dumps(summary["test_by_kind"]))
    model.to("cpu")
    save_half(model, out)
    processor.save_pretrained(out)
    write_summary(summary, out)
    return summary
