"""Chat messages of a dialogue and answer-only labels for the reference LVLMs (training and evaluation alike)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from infra.reference.config import IGNORE


def render_dialogue(turns: Sequence[tuple[str, str | None]], visual: str = "image") -> list[dict[str, Any]]:
    """Chat messages for (question, answer) turns; the image (``visual`` "video": the video) goes with the first
    question. A last answer of ``None`` leaves the turn open (for generation)."""
    msgs: list[dict[str, Any]] = []
    for t, (q, a) in enumerate(turns):
        content: list[dict[str, Any]] = ([{"type": visual}] if t == 0 else []) + [{"type": "text", "text": q}]
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
