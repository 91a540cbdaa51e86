"""The model card of a reference model: MODEL_CARD.md and recipe_summary.json, from a
:func:`infra.reference.recipe.build_reference` summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_summary(summary: dict[str, Any], out: Path) -> None:
    """Write ``summary`` to ``out/recipe_summary.json``."""
    (out / "recipe_summary.json").write_text(json.dumps(summary, indent=1) + "\n")


def write_model_card(summary: dict[str, Any], command: str, out: Path) -> None:
    """Write :func:`model_card` to ``out/MODEL_CARD.md``."""
    (out / "MODEL_CARD.md").write_text(model_card(summary, command))


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