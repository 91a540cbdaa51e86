"""Word-level tokenizer and chat template of the reference LVLMs (issue 4, item 5).

The reference models answer with single words, so a word-level vocabulary built from the training dialogues is
enough: lower-cased words and punctuation marks, split by the ``Whitespace`` pre-tokenizer (``\\w+|[^\\w\\s]+``).
The rendered chat is ``<s> USER: <image>\\n{question}\\nASSISTANT: {answer}</s>\\n USER: ...``; the template lives in
the tokenizer (``tokenizer.chat_template``) and in the processor, so ``apply_chat_template`` works on both.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, IMAGE)  # ids 0..4 in this order
# The video placeholder of the Qwen references: appended after the words (not among ids 0..4), so adding it to an
# existing vocabulary (a fine-tune with ``--init``) moves no id the parent learned.
VIDEO = "<video>"
TEMPLATE_WORDS: tuple[str, ...] = ("user", "assistant", ":")

# A message's content is either a string or a list of {"type": "image"} / {"type": "text", "text": ...} parts.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'video' %}<video>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n"
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def split_words(text: str) -> list[str]:
    """The words the tokenizer sees: lower-cased ``\\w+`` runs and punctuation runs (same rule as its
    pre-tokenizer)."""
    import re

    return re.findall(r"\w+|[^\w\s]+", text.lower())


def build_vocab(texts: Iterable[str], min_count: int = 1) -> list[str]:
    """Special tokens, then the template words, then every word seen ``min_count`` times, most frequent first
    (ties alphabetical, so the vocabulary is deterministic)."""
    counts = Counter(w for t in texts for w in split_words(t))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    vocab = list(SPECIAL_TOKENS) + [w for w in TEMPLATE_WORDS]
    vocab += [w for w in words if w not in vocab]
    return vocab


def make_tokenizer(vocab: list[str]) -> Any:
    """A ``PreTrainedTokenizerFast`` over a ``tokenizers`` WordLevel model with ``vocab`` (special tokens first)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    if list(vocab[: len(SPECIAL_TOKENS)]) != list(SPECIAL_TOKENS):
        raise ValueError(f"vocab must start with the special tokens {SPECIAL_TOKENS}, got {vocab[:5]}")
    if len(set(vocab)) != len(vocab):
        raise ValueError("vocab has duplicate entries")
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    video = VIDEO in vocab
    # matched before normalisation, so "<image>" / "<video>" stay one token
    core.add_special_tokens(list(SPECIAL_TOKENS) + ([VIDEO] if video else []))
    extra = {"image_token": IMAGE} | ({"video_token": VIDEO} if video else {})
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                  pad_token=PAD, extra_special_tokens=extra)
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"  # generation pads on the left
    return tok


def dialogue_texts(dialogues: Iterable[Any]) -> list[str]:
    """Every question and answer of ``dialogues`` (``pipeline.dialogues.Dialogue`` objects)."""
    texts: list[str] = []
    for d in dialogues:
        for t in d.turns:
            texts.append(t.question)
            texts.extend(t.answers)
    return texts


def tokenizer_from_dialogues(dialogues: Iterable[Any], video: bool = False) -> Any:
    """Vocabulary from every question and answer of ``dialogues``; ``video``: :data:`VIDEO` appended last."""
    vocab = build_vocab(dialogue_texts(dialogues))
    return make_tokenizer(vocab + [VIDEO] if video else vocab)


def extend_tokenizer(parent, dialogues: Iterable[Any], video: bool = False) -> tuple[Any, int]:
    """A fine-tune's tokenizer: ``parent``'s vocabulary in its own id order, then the words of ``dialogues`` it
    lacks (most frequent first) and, with ``video``, :data:`VIDEO` if missing. Returns (tokenizer, words added)."""
    old = [w for w, _ in sorted(parent.get_vocab().items(), key=lambda kv: kv[1])]
    have = set(old)
    new = [w for w in build_vocab(dialogue_texts(dialogues)) if w not in have]
    if video and VIDEO not in have and VIDEO not in new:
        new.append(VIDEO)
    return make_tokenizer(old + new), len(new)
