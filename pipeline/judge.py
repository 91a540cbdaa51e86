"""The pairwise judge of free-form benchmarks (ConvBench), docs/design.md §3.5.

A judge is a language model asked which of two assistants answered a turn of a conversation better. It is either
an OpenAI-compatible ``/chat/completions`` endpoint (vLLM, llama.cpp server, OpenAI, ...: URL and model name in the
config, the key from an environment variable) or a local transformers causal-LM directory (safetensors, no remote
code). Calls are retried with exponential backoff, and every judgement is cached on disk by (judge, prompt), the
prompt holding the question, both answers and the conversation so far, so a re-run costs no call.

ConvBench's scoring (the official ``convbencheval.py``) is reproduced by :func:`pairwise_scores`: for every
conversation, one judgement per turn (S1, S2, S3) and one of the whole conversation given the three turn judgements
(S0). The judge sees the image description (the ``reference`` sheet's dense caption when the dialogue has one), both
assistants' whole conversations and, for the third turn, the row's ``third_turn_demands``, and ends with "Overall,
Response X is better.". Which assistant is "A" comes from the official ``pairwise.npy`` when given (0: the evaluated
model is A, by row), else from a seeded draw per dialogue. A turn scores 1 when the judge prefers the evaluated
model's answer and 0 otherwise (an unparsed verdict counts 0, as in the official scorer); when both answers of a turn
are identical no call is made and the turn scores 0.5. Since no published ConvBench version has per-turn human
answers, the other assistant is the full-token model (as the MetaCompress paper reports ConvBench for compressed
models); a table with human answers can use them instead (``baseline``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")

JUDGE_SYSTEM = ("You are an impartial judge of two AI assistants that each held the same conversation with a user "
                "about an image. You cannot see the image: rely on the image description. Prefer the response that is "
                "correct about the image, follows the user's instruction, stays consistent with the conversation so "
                "far and is helpful. Do not let the order, the length or the names of the assistants influence you.")


# ---------------------------------------------------------------------------------------------------- verdicts
@dataclass(frozen=True)
class Verdict:
    winner: Literal["A", "B"] | None  # None: the judgement names neither, or both
    text: str


_VERDICT = re.compile(r"response\s+([ab])\s+is\s+better")


def parse_verdict(text: str) -> Literal["A", "B"] | None:
    """The winner named by a judgement: the last "Overall, Response X is better" if present, else the only
    "Response X is better". Otherwise ``None``."""
    lowered = text.lower()
    overall = re.findall(r"overall\W+" + _VERDICT.pattern, lowered)
    if overall:
        return overall[-1].upper()  # type: ignore[return-value]
    named = set(_VERDICT.findall(lowered))
    return named.pop().upper() if len(named) == 1 else None  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------- prompts
def _conversation(name: str, questions: Sequence[str], answers: Sequence[str]) -> str:
    lines = [f"<|The Start of Assistant {name}'s Conversation with User|>"]
    for t, (q, a) in enumerate(zip(questions, answers)):
        lines += [f"### The {ORDINALS[t]} turn question from the user:", q, "",
                  f"### The {ORDINALS[t]} turn response from Assistant {name}:", a, ""]
    lines.append(f"<|The End of Assistant {name}'s Conversation with User|>")
    return "\n".join(lines)


def judge_messages(questions: Sequence[str], answers_a: Sequence[str], answers_b: Sequence[str], *,
                   turn: int | None, context: str = "", demands: str = "",
                   turn_judgements: Sequence[str] = ()) -> list[dict[str, str]]:
    """Chat messages asking which assistant did better on ``turn`` (0-based), or on the whole conversation
    (``turn=None``, with the per-turn ``turn_judgements``). Both whole conversations are in the prompt."""
    what = "whole conversations" if turn is None else f"{ORDINALS[turn]} turn responses"
    parts = [f"Image description: {context or '(none)'}", "",
             _conversation("A", questions, answers_a), "", _conversation("B", questions, answers_b), ""]
    if turn is not None and demands:
        parts += [f"When judging the {ORDINALS[turn]} turn, check in particular: {demands}", ""]
    for t, text in enumerate(turn_judgements):
        parts += [f"The judgement of the {ORDINALS[t]} turn: {text}", ""]
    parts.append(f"Think step by step, compare the {what} of the two assistants, and finish your response with "
                 "exactly one line: \"Overall, Response A is better.\" or \"Overall, Response B is better.\"")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": "\n".join(parts)}]


def plain_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """The judge messages as one text, for models without a chat template."""
    return "\n\n".join(m["content"] for m in messages) + "\n\nJudgement:"


# ------------------------------------------------------------------------------------------------------ judges
class Judge(Protocol):
    identity: str  # what the cache key holds besides the prompt (the endpoint's model name, or the model directory)

    def complete(self, messages: list[dict[str, str]]) -> str:
        ...


class JudgeError(RuntimeError):
    """The judge could not give a judgement (after the retries)."""


class OpenAICompatibleJudge:
    """A judge behind an OpenAI-compatible ``/chat/completions`` endpoint. ``url`` is the API base
    (``http://host:8000/v1``) or the full ``.../chat/completions`` address. The key is read from the environment
    variable ``api_key_env`` (optional for local servers). Connection errors, timeouts, HTTP 408/409/429 and 5xx are
    retried ``retries`` times, waiting ``backoff_s * 2**k`` seconds; other HTTP errors fail at once."""

    RETRIABLE = {408, 409, 429}

    def __init__(self, url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", max_tokens: int = 512,
                 timeout_s: float = 120.0, retries: int = 4, backoff_s: float = 2.0,
                 sleep: Callable[[float], None] = time.sleep):
        if not url or not model:
            raise ValueError("an OpenAI-compatible judge needs evaluate.judge.url and evaluate.judge.model")
        self.url = url if url.rstrip("/").endswith("/chat/completions") else url.rstrip("/") + "/chat/completions"
        self.model, self.max_tokens, self.timeout_s = model, max_tokens, timeout_s
        self.retries, self.backoff_s, self.sleep = retries, backoff_s, sleep
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self.identity = f"openai:{model}"

    def _once(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            payload = json.loads(response.read().decode())
        try:
            return str(payload["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"judge endpoint {self.url} returned no choices[0].message.content: "
                             f"{json.dumps(payload)[:300]}") from None

    def complete(self, messages: list[dict[str, str]]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                           "temperature": 0.0}).encode()
        last = ""
        for attempt in range(self.retries + 1):
            try:
                return self._once(body)
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read().decode(errors='replace')[:300]}"
                if e.code not in self.RETRIABLE and e.code < 500:
                    raise JudgeError(f"judge endpoint {self.url} answered {last}; check evaluate.judge.model and "
                                     "the key in the environment (evaluate.judge.api_key_env)") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"unreachable ({getattr(e, 'reason', e)})"
            except json.JSONDecodeError:
                last = "a reply that is not JSON"
            if attempt < self.retries:
                self.sleep(self.backoff_s * 2 ** attempt)
        raise JudgeError(f"judge endpoint {self.url}: {last}, after {self.retries + 1} tries; check "
                         "evaluate.judge.url (or --url)")


class LocalJudge:
    """A judge run locally from a transformers causal-LM directory (greedy decoding). Uses the tokenizer's chat
    template when it has one, else :func:`plain_prompt`."""

    def __init__(self, model_dir: str | os.PathLike, *, max_new_tokens: int = 512, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(model_dir).is_dir():
            raise FileNotFoundError(f"judge model directory not found: {model_dir} (evaluate.judge.model_dir)")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False,
                                                          use_safetensors=True).to(device).eval()
        self.max_new_tokens, self.device = max_new_tokens, device
        self.identity = f"local:{Path(model_dir).resolve().name}"

    def prompt(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return plain_prompt(messages)

    def complete(self, messages: list[dict[str, str]]) -> str:
        import torch

        encoded = self.tokenizer(self.prompt(messages), return_tensors="pt")
        encoded = {k: v.to(self.device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(**encoded, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=pad)
        return self.tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


class CachedJudge:
    """A judge whose judgements are kept in a JSON-lines file keyed by sha256(judge identity, messages): a re-run
    with the same questions, answers and judge makes no call. ``calls`` / ``hits`` count this process's use."""

    def __init__(self, judge: Judge, path: str | os.PathLike | None):
        self.judge, self.identity = judge, judge.identity
        self.path = Path(path) if path else None
        self.calls = self.hits = 0
        self._lock = threading.Lock()
        self._memory: dict[str, str] = {}
        if self.path is not None and self.path.is_file():
            with open(self.path, encoding="utf-8") as f:
                for n, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        entry = json.loads(line)
                        self._memory[entry["key"]] = entry["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line cut by an interrupted run: that judgement is simply asked again

    def key(self, messages: list[dict[str, str]]) -> str:
        return hashlib.sha256(json.dumps([self.identity, messages], sort_keys=True).encode()).hexdigest()

    def complete(self, messages: list[dict[str, str]]) -> str:
        key = self.key(messages)
        with self._lock:
            if key in self._memory:
                self.hits += 1
                return self._memory[key]
        text = self.judge.complete(messages)  # outside the lock: several dialogues may be judged at once
        with self._lock:
            self.calls += 1
            self._memory[key] = text
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": key, "judge": self.identity, "text": text}) + "\n")
        return text


def make_judge(*, url: str | None = None, model: str | None = None, model_dir: str | None = None,
               api_key_env: str = "OPENAI_API_KEY", max_tokens: int = 512, timeout_s: float = 120.0,
               retries: int = 4, backoff_s: float = 2.0, cache: str | os.PathLike | None = None,
               device: str = "cpu") -> CachedJudge:
    """A cached judge: ``model_dir`` (local transformers) or ``url`` + ``model`` (OpenAI-compatible); one of them."""
    if bool(model_dir) == bool(url):
        raise ValueError("configure exactly one judge: evaluate.judge.url + evaluate.judge.model (an OpenAI-compatible "
                         "endpoint) or evaluate.judge.model_dir (a local transformers model)")
    judge: Judge = (LocalJudge(model_dir, max_new_tokens=max_tokens, device=device) if model_dir else
                    OpenAICompatibleJudge(url or "", model or "", api_key_env=api_key_env, max_tokens=max_tokens,
                                          timeout_s=timeout_s, retries=retries, backoff_s=backoff_s))
    return CachedJudge(judge, cache)


# -------------------------------------------------------------------------------------------------- positions
def load_positions(path: str | os.PathLike) -> list[int]:
    """The official ``pairwise.npy`` (or a JSON list): per table row, 0 when the evaluated model is shown as A,
    1 when it is B."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairwise positions file not found: {path} (the official ConvBenchEval/pairwise.npy)")
    if path.suffix == ".npy":
        import numpy as np

        values = np.load(path, allow_pickle=False).reshape(-1).tolist()
    else:
        values = json.loads(path.read_text())
    if not isinstance(values, list) or any(v not in (0, 1) for v in values):
        raise ValueError(f"{path}: expected a list of 0/1 positions (0: the evaluated model is A)")
    return [int(v) for v in values]


def model_is_a(dialogue_id: str, row: int | None, positions: Sequence[int] | None, seed: int) -> bool:
    """Whether the evaluated model is shown as A: ``positions[row - 1] == 0`` (``row`` 1-based, as the builder
    stores it) when positions are given, else a draw seeded by ``seed`` and the dialogue id."""
    if positions is not None:
        if row is None or not 1 <= row <= len(positions):
            raise ValueError(f"dialogue {dialogue_id!r}: row {row} has no entry in the positions file "
                             f"({len(positions)} rows)")
        return positions[row - 1] == 0
    return random.Random(f"{seed}:{dialogue_id}").random() < 0.5


# ---------------------------------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class JudgedDialogue:
    """What the judge needs of one dialogue."""

    dialogue_id: str
    questions: tuple[str, ...]
    context: str = ""  # the image description
    demands: str = ""  # ConvBench's third_turn_demands
    row: int | None = None  # 1-based table row, for the positions file


def judge_dialogue(judge: Judge, d: JudgedDialogue, answers: Sequence[str], baseline: Sequence[str], *,
                   model_first: bool) -> tuple[list[float], float, list[str]]:
    """(per-turn scores, overall score, judgement texts) of ``answers`` against ``baseline`` for one dialogue."""
    if len(answers) != len(d.questions) or len(baseline) != len(d.questions):
        raise ValueError(f"dialogue {d.dialogue_id!r} has {len(d.questions)} turns but {len(answers)} answers and "
                         f"{len(baseline)} baseline answers")
    a, b = (answers, baseline) if model_first else (baseline, answers)
    mine = "A" if model_first else "B"
    scores, texts = [], []
    last = len(d.questions) - 1
    for t in range(len(d.questions)):
        if answers[t] == baseline[t]:
            scores.append(0.5)
            texts.append("The two responses are identical.")
            continue
        messages = judge_messages(d.questions, a, b, turn=t, context=d.context,
                                  demands=d.demands if t == last else "")
        text = judge.complete(messages)
        texts.append(text)
        scores.append(1.0 if parse_verdict(text) == mine else 0.0)
    if list(answers) == list(baseline):
        return scores, 0.5, texts
    text = judge.complete(judge_messages(d.questions, a, b, turn=None, context=d.context, turn_judgements=texts))
    return scores, 1.0 if parse_verdict(text) == mine else 0.0, texts + [text]


def pairwise_scores(judge: Judge, dialogues: Sequence[JudgedDialogue], answers: Mapping[str, Sequence[str]],
                    baseline: Mapping[str, Sequence[str]], *, positions: Sequence[int] | None = None,
                    seed: int = 0) -> dict[str, Any]:
    """ConvBench's scores of ``answers`` against ``baseline`` (dialogue id -> answer per turn), in percent:
    ``{"S1", "S2", "S3", "S0", "Avg", "per_dialogue": {id: {"turns": [..], "overall": ..}}}``. S_t is the mean turn-t
    score over the dialogues, S0 the mean overall score, Avg the mean of S1..S_T (as the paper's tables)."""
    if not dialogues:
        raise ValueError("pairwise_scores needs at least one dialogue")
    per: dict[str, dict[str, Any]] = {}
    for d in dialogues:
        for name, table in (("answers", answers), ("baseline answers", baseline)):
            if d.dialogue_id not in table:
                raise KeyError(f"no {name} for dialogue {d.dialogue_id!r}")
        turns, overall, _ = judge_dialogue(judge, d, answers[d.dialogue_id], baseline[d.dialogue_id],
                                           model_first=model_is_a(d.dialogue_id, d.row, positions, seed))
        per[d.dialogue_id] = {"turns": turns, "overall": overall}
    n_turns = max(len(d.questions) for d in dialogues)
    out: dict[str, Any] = {}
    for t in range(n_turns):
        at = [p["turns"][t] for p in per.values() if len(p["turns"]) > t]
        out[f"S{t + 1}"] = 100.0 * sum(at) / len(at)
    out["S0"] = 100.0 * sum(p["overall"] for p in per.values()) / len(per)
    out["Avg"] = sum(out[f"S{t + 1}"] for t in range(n_turns)) / n_turns
    out["per_dialogue"] = per
    return out
