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


def _recipe_lines(summary: dict[str, Any]) -> list[str]:
    """What actually ran (``summary['ran']``, :func:`infra.reference.recipe.what_runs`); a summary from before
    that record existed ran the whole MT-Shapes recipe."""
    cfg = summary["config"]
    ran = summary.get("ran", {"stage1": True, "attention_supervision": cfg.get("attention_weight", 0) > 0,
                              "token_drop": "scene" if cfg.get("token_drop") else "none", "notes": []})
    if ran["stage1"]:
        stage1 = (f"- Stage 1: {cfg['stage1_steps']} steps (batch {cfg['stage1_batch']}, lr {cfg['stage1_lr']}) on "
                  "dense per-patch labels (colour / shape / size / anchor / 3x3 region) from the MT-Shapes scenes.")
    else:
        why = ("inherited: the tower comes from the parent" if summary.get("parent") else
               "--stage1-steps 0" if not cfg.get("stage1_steps") else "no MT-Shapes scenes")
        stage1 = f"- Stage 1 (vision pretraining on dense labels): **did not run** ({why})."
    scale = cfg.get("vision_lr_scale", 0.0)
    tower = "tower frozen" if not scale else f"tower trained at {scale:g} x the lr"
    if ran["attention_supervision"]:
        attention = ("answer-only loss plus attention supervision (weight "
                     f"{cfg.get('attention_weight', 0)}: two heads of the first layer gather the question's key "
                     "words, " + ("two of the last fetch the patches of the objects the answer depends on"
                                  if summary["family"] != "llava_next" else
                                  "two of the second-to-last layer fetch the objects the answer depends on in the "
                                  "base grid (the only tokens that know where they lie), two of the last the same "
                                  "objects among the crop tokens") + ")")
    else:
        attention = "answer-only loss, **no attention supervision** (it needs MT-Shapes scenes)"
    warm = ", projector warm-started from the stage-1 head" if ran["stage1"] else ""
    if summary["family"] == "qwen2_5_vl":  # the head was trained on the merger's output: nothing to warm-start
        warm = ", the merger (Qwen's projector) trained with the decoder"
    drop = ran["token_drop"]
    share = f"{cfg.get('token_drop', 0):.0%}"
    if drop == "none":
        drop_text = " No token drop."
    elif drop.startswith("scene"):
        drop_text = (f" {share} of the dialogues see only a random 10-100 % of their visual tokens (always those the "
                     "answers depend on, from the scenes), so the decoder survives token reduction.")
        if drop != "scene":
            drop_text += (" Dialogues without scenes (other data, videos) get the generic drop instead (a random "
                          "10-100 % of their visual tokens, or runs of 2-10 averaged).")
    else:
        how = {"random": "a random 10-100 % of their visual tokens",
               "pool": "their visual tokens averaged in runs of 2-10",
               "mixed": "either a random 10-100 % of their visual tokens or their tokens averaged in runs of 2-10 "
                        "(one of the two, by coin flip)"}[drop]
        drop_text = (f" Generic token drop ({drop}, no generator metadata): {share} of the dialogues see {how}, "
                     "compacted to new positions.")
    if drop != "none" and summary["family"] == "qwen2_5_vl":
        drop_text += (" Thinned prompts carry explicit 3-D rotary positions by the rule inference uses (a kept token "
                      "keeps its (t, h, w), an averaged one takes its inputs' mean; the text after the image continues "
                      "after the full grid): `infra/reference/qwen_positions.py`.")
    lines = [stage1,
             f"- Stage 2: {cfg['stage2_steps']} steps (batch {cfg['stage2_batch']}, lr {cfg['stage2_lr']}, {tower}) "
             f"on whole dialogues, {attention}{warm}, decoder init std 1/sqrt(width).{drop_text}"]
    if ran["notes"]:
        lines += ["- Logged by the build: " + "; ".join(ran["notes"])]
    return lines


def _data_lines(summary: dict[str, Any]) -> list[str]:
    """Training data per file and kind, the video sampling, and the parent of a fine-tune (``--init``); a summary
    from before those records existed names its one file."""
    data = summary.get("data") or [{"file": summary["dialogues"], "dialogues": summary["train_dialogues"]}]
    lines = []
    for d in data:
        kinds = ", ".join(f"{d[k]} {k}" for k in ("image", "video") if d.get(k))
        lines.append(f"- Training dialogues: {d['dialogues']} from `{d['file']}`" + (f" ({kinds})" if kinds else "")
                     + ".")
    if len(data) > 1:
        total = {k: sum(d.get(k, 0) for d in data) for k in ("image", "video")}
        lines.append(f"- In all: {summary['train_dialogues']} dialogues, {total['image']} image and {total['video']} "
                     "video, drawn uniformly in each batch.")
    if any(d.get("video") for d in data):
        lines.append(f"- Videos: {summary['config'].get('video_frames', 8)} frames sampled uniformly per video "
                     "through the model's own video path (`pixel_values_videos`, `video_grid_thw`); at inference "
                     "give `compress.lvlm.video.video_adapter` the same `num_frames`.")
    parent = summary.get("parent")
    if parent:
        lines.append(f"- Fine-tuned from `{parent['dir']}` (model.safetensors sha256 `{parent['sha256']}`, trained "
                     f"on {parent.get('data')}, {parent.get('stage2_steps')} stage-2 steps); stage 2 continued from "
                     "its weights, vocabulary grown by "
                     f"{parent.get('words_added', 0)} entries.")
    return lines


def _accuracy_lines(test: dict[str, Any], title: str, video: bool = False) -> list[str]:
    turns = [k for k in test if k.startswith("Acc_")]
    lines = [f"## Accuracy ({title}{test['n']} dialogues, greedy, own answers in the history)", "",
             "| " + " | ".join(turns + ["Avg"]) + " |", "|" + "---|" * (len(turns) + 1),
             "| " + " | ".join(f"{test[k]:.1f}" for k in turns + ["Avg"]) + " |", ""]
    if "blind_avg" in test:
        blank = "every frame of every video uniform grey" if video else "every image a uniform grey one of its size"
        lines += [f"Blind (the same model, {blank}): Avg "
                  f"{test['blind_avg']:.1f}.", "",
                  "| type | accuracy | chance (same model, blank images) | majority answer |", "|---|---|---|---|"]
        majority = test.get("majority_by_type", {})
        lines += [f"| {k} | {v:.1f} | {test['chance_by_type'].get(k, float('nan')):.1f} | "
                  f"{majority.get(k, float('nan')):.1f} |" for k, v in test["by_type"].items()]
    else:
        lines += ["| type | accuracy | chance (majority answer) |", "|---|---|---|"]
        lines += [f"| {k} | {v:.1f} | {test.get('chance_by_type', {}).get(k, float('nan')):.1f} |"
                  for k, v in test["by_type"].items()]
    return lines


def model_card(summary: dict[str, Any], command: str) -> str:
    """A short MODEL_CARD.md from a :func:`build_reference` summary: what ran, command, times, accuracy per turn and
    per type against the same model's blind accuracy (blank images)."""
    cfg = summary["config"]
    cls, parts = {"llava": ("LlavaForConditionalGeneration", "CLIP vision tower, Llama decoder"),
                  "llava_next": ("LlavaNextForConditionalGeneration", "CLIP vision tower, Llama decoder"),
                  "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration",
                                 "ViT with a 2 x 2 merger, Qwen2 decoder with 3-D rotary positions")}[summary["family"]]
    lines = [f"# Reference {summary['family']} ({summary.get('data_name') or summary['dialogues']})", "",
             f"Small `{cls}`"
             f" ({parts}), {summary['parameters']:,} parameters, "
             + ("fine-tuned from its parent (below)" if summary.get("parent") else "trained from scratch") + " by "
             "`infra/reference/recipe.py`; weights saved in fp16.", "",
             "## Recipe (what ran)",
             f"- Vision tower: {cfg['vision_layers']} layers x {cfg['vision_hidden']}, {cfg['patch_size']} px "
             + ("tokens (merged 2 x 2 patches)" if summary["family"] == "qwen2_5_vl" else "patches") + "; "
             f"decoder: {cfg['text_layers']} layers x {cfg['text_hidden']}.",
             *_recipe_lines(summary),
             *_data_lines(summary), "",
             "## Command", "```", command, "```", "",
             f"Wall time: {summary['train_s'] / 60:.1f} min training on {summary['device']} "
             f"({summary['threads']} torch thread(s)).", ""]
    by_kind = summary.get("test_by_kind") or ({"image": summary["test"]} if summary.get("test") else {})
    for i, (kind, test) in enumerate(by_kind.items()):
        lines += ([""] if i else []) + _accuracy_lines(test, f"test, {kind}, " if set(by_kind) != {"image"} else
                                                       "test, ", kind == "video")
    curve = [r for r in summary.get("stage2_curve", []) if "eval" in r]
    if curve:
        lines += ["", "## Curve (200 test dialogues)", "", "| step | minutes | Avg |", "|---|---|---|"]
        lines += [f"| {r['step']} | {r['s'] / 60:.1f} | {r['eval']['Avg']:.1f} |" for r in curve]
    return "\n".join(lines) + "\n"
