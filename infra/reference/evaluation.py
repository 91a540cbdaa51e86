"""Evaluation of a built reference model: multi-turn exact-match accuracy per turn and per question type, the same
with blank images (the model's blind chance), and the majority answer's accuracy per type."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from infra.reference.chat import render_dialogue

BLANK = (128, 128, 128)  # the blank image's colour: mid grey, no object, no background hue


def answer_of(text: str) -> str:
    """The first word of a generated answer (the reference models answer in one word)."""
    words = text.strip().split()
    return words[0] if words else ""


def evaluate(model, processor, dialogues: Sequence[Any], batch_size: int = 32, device: str = "cpu",
             max_new_tokens: int = 3, blank: bool = False) -> dict[str, Any]:
    """Multi-turn exact-match accuracy with the model's own answers in the history (greedy ``generate``, full
    image). Returns ``per_turn_accuracy`` (Acc_1..Acc_T, Avg in percent) plus ``by_type`` (percent per
    ``turn.meta['type']`` when present) and ``n``. ``blank``: every image replaced by a uniform grey one of its
    size, so the scores are what the model reaches blind: the chance level of that model on those questions,
    priors over the question's words included (a majority answer per type ignores them). Video dialogues (Qwen2.5-VL
    references) go through the processor's video path, sampled as in training; blank: grey frames. One call scores
    one kind (``infra.reference.recipe.score`` splits them)."""
    import torch

    from pipeline.metrics import exact_match, per_turn_accuracy

    kinds = {d.kind for d in dialogues}
    if len(kinds) > 1:
        raise ValueError(f"evaluate: one visual kind per call, got {sorted(kinds)}")
    video = kinds == {"video"}

    tok = processor.tokenizer
    model.eval()
    scores: list[list[float]] = [[] for _ in dialogues]
    by_type: dict[str, list[float]] = defaultdict(list)
    for start in range(0, len(dialogues), batch_size):
        chunk = list(dialogues[start:start + batch_size])
        images = [_visual(d, processor, blank) for d in chunk]
        history: list[list[tuple[str, str | None]]] = [[] for _ in chunk]
        for t in range(max(len(d.turns) for d in chunk)):
            live = [b for b, d in enumerate(chunk) if t < len(d.turns)]
            texts = [processor.apply_chat_template(render_dialogue(history[b] + [(chunk[b].turns[t].question, None)],
                                                                   "video" if video else "image"),
                                                   add_generation_prompt=True) for b in live]
            enc = processor(**{"videos" if video else "images": [images[b] for b in live]}, text=texts,
                            return_tensors="pt", padding=True, padding_side="left")
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


def _visual(dialogue, processor, blank: bool):
    """The dialogue's RGB image, or its sampled ``Video`` (the processor's sampling); ``blank``: uniform grey."""
    if dialogue.kind == "video":
        from dataclasses import replace

        import numpy as np

        from compress.lvlm.video import decode_video

        v = decode_video(dialogue.image, processor.num_frames, processor.fps)
        return replace(v, frames=np.full_like(v.frames, BLANK[0])) if blank else v
    from PIL import Image

    with Image.open(dialogue.image) as im:
        return Image.new("RGB", im.size, BLANK) if blank else im.convert("RGB")


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
