"""Conversation formats: the prompt text each checkpoint family was trained with (docs/design.md §5).

The hub's chat templates do not always render what the authors trained on: llava-hf's LLaVA-1.5 template drops the
vicuna_v1 system prompt and the ``</s>`` after each answer, and an older llava-v1.6-mistral template renders a
literal ``<\\s>`` between turns. So a checkpoint runs with the format of its training code:

- ``vicuna_v1`` (LLaVA-1.5, LLaVA-NeXT with a Vicuna/Llama LLM): ``SYSTEM USER: <image>\\nQ1 ASSISTANT: A1</s>USER:
  Q2 ASSISTANT:`` (LLaVA's ``conv_vicuna_v1``: separators " " after a user turn and "</s>" after an answer).
- ``mistral_instruct`` (llava-v1.6-mistral): ``[INST] <image>\\nQ1 [/INST] A1</s>[INST] Q2 [/INST]`` (LLaVA's
  ``conv_mistral_instruct``, empty system prompt; the space before an answer is the answer's own word-boundary).
- ``template``: the checkpoint's own chat template, verbatim.

``auto`` picks the family's format when the tokenizer can spell its fixed text (a real checkpoint), and the
checkpoint's template otherwise (the word-level test models never saw the system prompt; compare ``VQA_SUFFIX``).
Every template, built-in or not, is rendered once on a probe dialogue and refused when it renders a tag-like text that
is not one of the tokenizer's special tokens (``<\\s>``).
"""

from __future__ import annotations

import re

# LLaVA's vicuna_v1 system prompt.
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the human's questions.")

_USER_CONTENT = ("{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}"
                 "{% endif %}{% endfor %}")
_ANSWER = "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}"

TEMPLATES = {
    "vicuna_v1": (VICUNA_SYSTEM + " {% for m in messages %}{% if m['role'] == 'user' %}USER: " + _USER_CONTENT
                  + " {% elif m['role'] == 'assistant' %}ASSISTANT: " + _ANSWER + "</s>{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}ASSISTANT:{% endif %}"),
    "mistral_instruct": ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] " + _USER_CONTENT
                         + " [/INST]{% elif m['role'] == 'assistant' %} " + _ANSWER + "</s>{% endif %}{% endfor %}"),
}
# The fixed text of each format, for the "can the tokenizer spell it" test of ``auto``.
FIXED_TEXT = {"vicuna_v1": VICUNA_SYSTEM + " USER: ASSISTANT:", "mistral_instruct": "[INST] [/INST]"}
FORMATS = ("auto", "template", *TEMPLATES)

_TAG = re.compile(r"(?<!<)<[\\/]*[A-Za-z_|][\w|]*>(?!>)")


def family_format(family: str, text_model_type: str | None) -> str | None:
    """The conversation format a family's checkpoints were trained with, or None when the project does not know it
    (then the checkpoint's template is used)."""
    if family == "llava":
        return "vicuna_v1"
    if family == "llava_next":
        return {"mistral": "mistral_instruct", "llama": "vicuna_v1"}.get(text_model_type or "")
    return None


def spells(tokenizer, text: str) -> bool:
    """Whether ``tokenizer`` writes ``text`` with fewer than half of its tokens unknown."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    unk = tokenizer.unk_token_id
    unknown = sum(i == unk for i in ids) if unk is not None else 0
    return bool(ids) and 2 * unknown < len(ids)


def resolve(conversation: str, family: str, text_model_type: str | None, tokenizer, checkpoint_template: str | None,
            where: str) -> tuple[str, str]:
    """-> (format name, jinja chat template). ``conversation`` is one of ``FORMATS``."""
    if conversation not in FORMATS:
        raise ValueError(f"conversation={conversation!r}; use one of {FORMATS}")
    if conversation == "auto":
        name = family_format(family, text_model_type)
        conversation = name if name and spells(tokenizer, FIXED_TEXT[name]) else "template"
    if conversation == "template":
        if not checkpoint_template:
            raise ValueError(f"{where} has no chat template; pass conversation='vicuna_v1' or 'mistral_instruct'")
        return "template", checkpoint_template
    return conversation, TEMPLATES[conversation]


def check_rendering(text: str, tokenizer, where: str) -> None:
    """Refuse a rendered prompt holding a tag-like text (``<\\s>``, ``</S>``) that is not one of the tokenizer's
    special tokens: the model would read it as plain characters, never as the separator it was trained with."""
    special = set(tokenizer.all_special_tokens) | {str(t) for t in tokenizer.get_added_vocab()}
    bad = sorted({m.group(0) for m in _TAG.finditer(text)} - special)
    if bad:
        raise ValueError(f"the chat template of {where} renders {bad}, which the tokenizer does not know as special "
                         f"tokens (the separator it was trained with is {tokenizer.eos_token!r}); pass "
                         "conversation='vicuna_v1' / 'mistral_instruct' or fix the checkpoint's chat_template")
