"""Compressed multi-turn chat (docs/design.md §5) and the teacher-forced forward used by training.

``ChatSession(adapter, method, rate)``: ``set_image(img)`` once, then ``ask(question)`` per turn. The image is
reduced once; every prefill goes through ``inputs_embeds``; the KV cache is reused across turns; the history holds
the model's own answers (``history="model"``) or the reference answers (``history="reference"``); greedy decoding
up to ``max_new_tokens``. ``BatchChatSession`` runs several dialogues at once (left padding) with the same results.

Cache protocol: after a turn the cache is rolled back to the end of its prompt, and the answer ids that go into
the history (own or reference) are fed at the start of the next turn together with that turn's prompt. Both
history modes thus share one path, and the cache never holds the EOS the template does not render.

Fast path (off by default; ``compress.lvlm.accel``): ``static_cache`` (preallocated KV cache, prompts left-padded to
length buckets), ``cuda_graphs`` (captured prefill and decode steps; needs ``static_cache``), ``device_image``
(preprocessing and vision tower on the device), ``fused_reducer`` (MetaCompress / Sample as fixed-shape kernels).
Answers equal the eager path's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.flops import llama_prefill_flops
from compress.lvlm import decoder
from compress.lvlm.base import EncodedImage, LVLMAdapter, reduced_positions
from compress.lvlm.efficiency import TurnStats, clock, peak_memory_bytes, reset_peak_memory
from compress.lvlm.methods import Method, check_applicable, get_method
from compress.reduction import num_keep as budget

HISTORY_MODES = ("model", "reference")


@dataclass
class TurnResult:
    """One turn of one dialogue. ``first_logits`` (V,): the logits of the first answer token (float32, CPU).
    ``stop_id``: the end-of-turn token that ended the answer (None when ``max_new_tokens`` cut it)."""

    question: str
    answer: str
    answer_ids: list[int]
    history_ids: list[int]
    first_logits: torch.Tensor
    stats: TurnStats
    stop_id: int | None = None

    @property
    def target_ids(self) -> list[int]:
        """The answer as a distillation target: its ids, then the end-of-turn token when the model stopped
        (docs/design.md §5), so a student learns when to stop."""
        return self.answer_ids + ([self.stop_id] if self.stop_id is not None else [])


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """rows of ids -> (ids (B, L), mask (B, L) bool), left-padded."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
    for b, r in enumerate(rows):
        if r:
            ids[b, width - len(r):] = torch.tensor(r, dtype=torch.long, device=device)
            mask[b, width - len(r):] = True
    return ids, mask


def expand_image(ids: list[int], image_token_id: int, count: int) -> list[int]:
    """The one image placeholder of a prompt -> ``count`` image token ids (one per visual token)."""
    i = ids.index(image_token_id)
    return ids[:i] + [image_token_id] * count + ids[i + 1:]


def is_prompt_dependent(method: Method) -> bool:
    """A feature reducer that decides with the prompt (TPRL): it needs ``prompt_embedding=`` (docs/design.md §5)."""
    return method.kind == "feature" and bool(getattr(method.fn, "prompt_dependent", False))


@torch.no_grad()
def prompt_embedding(adapter: LVLMAdapter, question: str) -> torch.Tensor:
    """The query of a prompt-dependent reducer: the mean of the LLM's input-embedding rows of the question's text
    tokens (the bare question, without template, image or VQA instruction, which are the same in every prompt)
    -> (d,) float32."""
    ids = adapter.tokenizer(question.strip(), add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"question {question!r} has no text tokens: a prompt-dependent method needs a question")
    rows = adapter.model.get_input_embeddings()(torch.tensor(ids, dtype=torch.long, device=adapter.device))
    return rows.float().mean(0)


def reduce_image(adapter: LVLMAdapter, method: Method, rate: float | None, image,
                 prompt_embedding: torch.Tensor | None = None, fast=None) -> tuple[torch.Tensor, float, float,
                                                                                   EncodedImage]:
    tokens, vision_s, reduce_s, encoded, _ = reduce_image_positions(adapter, method, rate, image, prompt_embedding,
                                                                    fast)
    return tokens, vision_s, reduce_s, encoded


def reduce_image_positions(adapter: LVLMAdapter, method: Method, rate: float | None, image,
                           prompt_embedding: torch.Tensor | None = None, fast=None) -> tuple:
    """One image (PIL, path, or an ``EncodedImage`` whose tokens the extract stage cached) -> (visual tokens for
    the LLM (k, d), vision seconds, reducer seconds, the encoded image). ``none`` and ``llm`` methods keep all of
    X_IMG (FastV prunes later, inside the LLM). ``prompt_embedding`` (d,): given to prompt-dependent reducers.
    ``fast``: an ``Accelerator`` (its ``prepare`` / ``features`` / ``reduce``), or None for the eager path.
    ``reduce_image_positions`` also returns the tokens' ``VisualPositions`` (None for 1-D families)."""
    dev = adapter.device
    src = fast if fast is not None else adapter
    t0 = clock(dev)
    cached = isinstance(image, EncodedImage) and image.tokens is not None
    if method.kind == "vision":
        if cached:
            raise ValueError(f"method {method.name!r} works inside the vision tower: give it the image, not features")
        prepared = src.prepare(image)
        t1 = clock(dev)
        with torch.no_grad():
            count = None if method.adaptive else budget(prepared.layout.num_tokens, rate)
            tokens = adapter.encode_reduced_vision(method.fn, prepared, count, **method.options)
        return tokens, t1 - t0, clock(dev) - t1, prepared, None
    encoded = image if cached else src.features(src.prepare(image))
    t1 = clock(dev)
    full = adapter.visual_positions(encoded)
    if method.kind != "feature":
        return encoded.tokens, t1 - t0, 0.0, encoded, full
    options = method.options if prompt_embedding is None else {**method.options, "prompt_embedding": prompt_embedding}
    count = budget(encoded.tokens.shape[0], rate)
    tokens = fast.reduce(method.fn, encoded.tokens, count, encoded.layout) if fast is not None and not options \
        else None
    positions = None
    if tokens is None:
        with torch.no_grad():
            reduction = method.fn(encoded.tokens, count, encoded.layout, **options)
        tokens = reduction.tokens
        if full is not None:
            positions = reduced_positions(full, reduction, method.fn)
    return tokens.to(adapter.dtype), t1 - t0, clock(dev) - t1, encoded, positions


class BatchChatSession:
    """B dialogues at once. ``method``: a registry name or a ``Method``; ``rate`` in (0, 1) (ignored by "full");
    ``compressor``: MetaCompress module or directory; ``fastv_k``: FastV's ranking layer is k-1.
    ``recompress="per_turn"`` (analysis, docs/design.md §5): a prompt-dependent method (FastV) re-prefills the whole
    history each turn and re-ranks with the new question, instead of reusing the turn-1 pruned cache.
    ``static_cache``, ``cuda_graphs``, ``device_image``, ``fused_reducer``, ``max_cache_len``: the fast path (module
    doc); ``self.fast`` is its ``Accelerator`` (None on the eager path)."""

    def __init__(self, adapter: LVLMAdapter, method: str | Method = "full", rate: float | None = None, *,
                 compressor=None, max_new_tokens: int = 16, history: str = "model", vqa: bool = True,
                 fastv_k: int = 2, recompress: str = "once", static_cache: bool = False, cuda_graphs: bool = False,
                 device_image: bool = False, fused_reducer: bool = False, max_cache_len: int | None = None):
        self.adapter = adapter
        self.method = get_method(method, compressor) if isinstance(method, str) else method
        check_applicable(self.method, adapter)
        if adapter.rope_dims != 1 and (static_cache or cuda_graphs or device_image or fused_reducer):
            raise ValueError(f"{adapter.family} ({adapter.model_dir}) uses 3-D rotary positions, which the fast path "
                             "(static_cache, cuda_graphs, device_image, fused_reducer) does not carry; run it eagerly")
        if self.method.kind != "none" and (rate is None or not 0.0 < rate < 1.0):
            raise ValueError(f"reduction rate must be in (0, 1) for method {self.method.name!r}, got {rate}")
        if history not in HISTORY_MODES:
            raise ValueError(f"history={history!r}; use one of {HISTORY_MODES}")
        layers = adapter.text_config.num_hidden_layers
        fastv_k = int(self.method.options.get("k", fastv_k))
        if self.method.kind == "llm" and not 1 <= fastv_k < layers:
            raise ValueError(f"fastv_k={fastv_k} must be in [1, {layers - 1}] for a {layers}-layer LLM")
        if recompress not in ("once", "per_turn"):
            raise ValueError(f"recompress={recompress!r}; use 'once' (reuse the cache) or 'per_turn'")
        self.recompress = recompress
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        self.rate, self.max_new_tokens, self.history = rate, max_new_tokens, history
        self.vqa, self.fastv_k = vqa, fastv_k
        self.image_tokens: list[torch.Tensor] = []
        self.fast = None
        if static_cache or cuda_graphs or device_image or fused_reducer:
            from compress.lvlm.accel import Accelerator

            self.fast = Accelerator.get(adapter, static_cache=static_cache, cuda_graphs=cuda_graphs,
                                        device_image=device_image, fused_reducer=fused_reducer,
                                        max_cache_len=max_cache_len)
        self.static = static_cache

    # --- image -------------------------------------------------------------------------------------------------
    def set_images(self, images: list) -> None:
        """Encode and reduce each dialogue's image once; starts new dialogues (empty history and cache)."""
        self.encoded, self.image_tokens, self._first_cost, self.image_positions = [], [], [], []
        # A prompt-dependent reducer waits for the first question (``ask``); until then the image holds all tokens.
        self._deferred = is_prompt_dependent(self.method)
        for image in images:
            method = get_method("full") if self._deferred else self.method
            tokens, vision_s, reduce_s, enc, positions = reduce_image_positions(self.adapter, method, self.rate, image,
                                                                                fast=self.fast)
            self.image_tokens.append(tokens)
            self.image_positions.append(positions)
            self.encoded.append(enc)
            self._first_cost.append((vision_s, reduce_s))
        self.questions: list[list[str]] = [[] for _ in images]
        self.pending: list[list[int]] = [[] for _ in images]
        self.fed: list[list[int]] = [[] for _ in images]  # every prompt/history id so far (for re-prefills)
        self.state = None  # decoder.DecoderState, or static_cache.StaticState on the fast path
        self.fastv_kept: list[torch.Tensor] | None = None
        self.turn = 0

    # --- one turn ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def ask(self, questions: list[str], reference_answers: list | None = None) -> list[TurnResult]:
        """One turn of every dialogue: questions[b] -> TurnResult per dialogue (greedy answer and figures)."""
        ad, lm, dev = self.adapter, self.adapter.language_model, self.adapter.device
        batch = len(self.image_tokens)
        if not batch:
            raise ValueError("set_image(s) first: the session has no image")
        if len(questions) != batch:
            raise ValueError(f"{len(questions)} questions for {batch} dialogues")
        if self.history == "reference" and (reference_answers is None or any(a is None for a in reference_answers)):
            raise ValueError("history='reference' needs a reference answer for every dialogue at every turn")
        # per_turn: a prompt-dependent method re-decides on each new question over a fresh prefill of the history
        first = self.turn == 0 or (self.recompress == "per_turn" and self.method.kind == "llm")
        image_tokens, first_cost, positions = self.image_tokens, self._first_cost, self.image_positions
        if self.turn == 0 and self._deferred:  # the first turn's question decides; the result serves every turn
            image_tokens, first_cost, positions = self._reduce_with(questions)
        new = []
        for b, q in enumerate(questions):  # all rows first: a bad question leaves the session unchanged
            seg = ad.segment_ids(self.questions[b] + [q], self.vqa)[-1]
            if self.turn == 0:
                seg = expand_image(seg, ad.image_token_id, image_tokens[b].shape[0])
            new.append(self.pending[b] + seg)
        self.image_tokens, self._first_cost, self.image_positions = image_tokens, first_cost, positions
        for b, ids_b in enumerate(new):
            self.fed[b] = self.fed[b] + ids_b
        rows = self.fed if first else new
        pad_id = ad.tokenizer.pad_token_id if ad.tokenizer.pad_token_id is not None else 0
        ids, new_mask = _left_pad(rows, pad_id, dev)
        if self.static:  # a length bucket, so that a few captured prefills serve every prompt
            ids, new_mask = self.fast.pad(ids, new_mask, pad_id)
        reset_peak_memory(dev)
        t0 = clock(dev)
        embeds = ad.embed(ids, self.image_tokens if first else [None] * batch)
        pruner = None
        if first:
            self.state = self.fast.new_state(batch) if self.static else decoder.DecoderState.empty(lm, batch, dev)
            if self.method.kind == "llm":
                from compress.baselines.fastv import FastV

                pruner = FastV((ids == ad.image_token_id) & new_mask, self.rate, self.fastv_k)
        record: list = []
        if self.static:
            logits = self.fast.prefill(self.state, embeds, new_mask, pruner, record)
        else:
            mrope = ad.rope_inputs(ids, new_mask, self.image_positions) if first else None
            hidden, _ = decoder.forward(lm, self.state, embeds, new_mask, pruner, record, mrope)
            logits = ad.lm_head(hidden[:, -1]).float()
        t1 = clock(dev)
        if pruner is not None:
            self.fastv_kept = pruner.kept
        snap = self.state.snapshot()
        first_logits = logits.cpu().clone()
        out = self._decode(logits)
        t2 = clock(dev)
        kv_len = torch.stack(self.state.layer_tokens).float().mean(0).tolist()
        self.state.restore(snap)
        peak = peak_memory_bytes(dev)

        results = []
        for b in range(batch):
            hist = out[b] if self.history == "model" else ad.answer_ids(reference_answers[b])
            vision_s, reduce_s = self._first_cost[b] if self.turn == 0 else (0.0, 0.0)
            lengths = [(int(q[b]), int(kv[b])) for q, kv in record]
            visual = (len(self.fastv_kept[b]) if self.fastv_kept is not None else self.image_tokens[b].shape[0])
            stats = TurnStats(
                turn=self.turn + 1, vision_s=vision_s, reduce_s=reduce_s, prefill_s=t1 - t0, decode_s=t2 - t1,
                ttft_s=vision_s + reduce_s + (t1 - t0), total_s=vision_s + reduce_s + (t2 - t0),
                peak_memory_bytes=peak, prefill_tokens=int(new_mask[b].sum()),
                prefill_flops=llama_prefill_flops(ad.text_config, 0, layer_lengths=lengths),
                kv_cache_len=kv_len[b], visual_tokens=visual, new_tokens=len(out[b]))
            results.append(TurnResult(questions[b], ad.decode(out[b]), out[b], hist, first_logits[b], stats,
                                      self._stops[b]))
            self.pending[b] = list(hist)
            self.questions[b].append(questions[b])
        self.turn += 1
        return results

    def _reduce_with(self, questions: list[str]) -> tuple[list[torch.Tensor], list[tuple[float, float]], list]:
        """Reduce each encoded image with its first question's embedding -> (tokens per row, (vision_s, reduce_s)
        per row; the embedding's time counts as the reducer's, positions per row)."""
        tokens, costs, positions = [], [], []
        for enc, q, (vision_s, _) in zip(self.encoded, questions, self._first_cost):
            t0 = clock(self.adapter.device)
            query = prompt_embedding(self.adapter, q)
            embed_s = clock(self.adapter.device) - t0
            reduced, _, reduce_s, _, pos = reduce_image_positions(self.adapter, self.method, self.rate, enc,
                                                                  prompt_embedding=query, fast=self.fast)
            tokens.append(reduced)
            costs.append((vision_s, embed_s + reduce_s))
            positions.append(pos)
        return tokens, costs, positions

    def _decode(self, logits: torch.Tensor) -> list[list[int]]:
        """Greedy decoding from the prefill's last logits (B, V) -> answer ids per row, without the stop token.
        A finished row keeps running on masked tokens that nothing attends to."""
        ad, lm = self.adapter, self.adapter.language_model
        batch = logits.shape[0]
        finished = torch.zeros(batch, dtype=torch.bool, device=logits.device)
        out: list[list[int]] = [[] for _ in range(batch)]
        self._stops: list[int | None] = [None] * batch
        for step in range(self.max_new_tokens):
            logits[:, ad.image_token_id] = float("-inf")  # the placeholder is never an answer
            tok = logits.argmax(-1)
            for b in range(batch):
                if not finished[b]:
                    if int(tok[b]) in ad.stop_ids:
                        finished[b] = True
                        self._stops[b] = int(tok[b])
                    else:
                        out[b].append(int(tok[b]))
            if bool(finished.all()) or step == self.max_new_tokens - 1:
                break
            if self.static:
                logits = self.fast.step(self.state, tok, ~finished)
                continue
            embeds = ad.model.get_input_embeddings()(tok[:, None])
            hidden, _ = decoder.forward(lm, self.state, embeds, ~finished[:, None])
            logits = ad.lm_head(hidden[:, -1]).float()
        return out


class ChatSession:
    """One dialogue: ``set_image(image)`` then ``ask(question[, reference_answer])`` -> TurnResult."""

    def __init__(self, adapter: LVLMAdapter, method: str | Method = "full", rate: float | None = None, **options):
        self.batch = BatchChatSession(adapter, method, rate, **options)

    def set_image(self, image) -> None:
        self.batch.set_images([image])

    def ask(self, question: str, reference_answer=None) -> TurnResult:
        return self.batch.ask([question], None if reference_answer is None else [reference_answer])[0]

    @property
    def image_tokens(self) -> torch.Tensor:
        return self.batch.image_tokens[0]

    @property
    def fastv_kept(self) -> torch.Tensor | None:
        return None if self.batch.fastv_kept is None else self.batch.fastv_kept[0]


# --- teacher-forced forward --------------------------------------------------------------------------------------
@dataclass
class AnswerLogits:
    """logits (A, V): at each answer token, the model's prediction of it (from the previous position);
    target_ids (A,): the answer tokens; turn_index (A,): the turn (0-based) of each."""

    logits: torch.Tensor
    target_ids: torch.Tensor
    turn_index: torch.Tensor


def dialogue_ids(adapter: LVLMAdapter, num_image_tokens: int, turns: list[str], answers: list,
                 vqa: bool = True) -> tuple[list[int], list[int], list[int]]:
    """Token ids of S_1 a_1 ... S_T a_T (image placeholder expanded) -> (ids, answer positions, turn of each).
    An answer given as ids that ends with a stop id (``TurnResult.target_ids``) makes that end-of-turn token a target
    too; when the next segment opens with the same token (the ``</s>`` separator of vicuna_v1 / mistral_instruct,
    docs/design.md §5) it is that token, not a second one."""
    if len(turns) != len(answers):
        raise ValueError(f"{len(turns)} questions but {len(answers)} answers")
    segments = adapter.segment_ids(turns, vqa)
    segments[0] = expand_image(segments[0], adapter.image_token_id, num_image_tokens)
    ids, positions, turn_of = [], [], []
    skip = None
    for t, (seg, ans) in enumerate(zip(segments, answers)):
        ids += seg[1:] if skip is not None and seg[:1] == [skip] else seg
        a = adapter.answer_ids(ans)
        skip = a[-1] if a and not isinstance(ans, str) and a[-1] in adapter.stop_ids else None
        positions += range(len(ids), len(ids) + len(a))
        turn_of += [t] * len(a)
        ids += a
    return ids, positions, turn_of


def answer_logits_batch(adapter: LVLMAdapter, image_tokens: list[torch.Tensor], turns: list[list[str]],
                        answers: list[list], vqa: bool = True,
                        image_positions: list | None = None) -> list[AnswerLogits]:
    """Teacher-forced forward of B dialogues (left-padded) in one pass, differentiable w.r.t. image_tokens[b]
    (m_b, d). answers[b][t]: a string or token ids; ids ending with a stop id (``TurnResult.target_ids``) make the
    end-of-turn token a target as well (``dialogue_ids``). ``image_positions[b]``: the ``VisualPositions`` of
    image_tokens[b], required by 3-D rotary families (``reduced_positions``)."""
    ad, lm = adapter, adapter.language_model
    if ad.rope_dims != 1 and (image_positions is None or len(image_positions) != len(image_tokens)):
        raise ValueError(f"{ad.family} uses 3-D rotary positions: pass image_positions (one VisualPositions per "
                         "dialogue, compress.lvlm.base.reduced_positions) with the image tokens")
    built = [dialogue_ids(ad, x.shape[0], q, a, vqa) for x, q, a in zip(image_tokens, turns, answers)]
    pad_id = ad.tokenizer.pad_token_id if ad.tokenizer.pad_token_id is not None else 0
    ids, mask = _left_pad([b[0] for b in built], pad_id, ad.device)
    embeds = ad.embed(ids, list(image_tokens))
    state = decoder.DecoderState.empty(lm, len(built), ad.device, use_cache=False)
    hidden, _ = decoder.forward(lm, state, embeds, mask, mrope=ad.rope_inputs(ids, mask, image_positions or []))
    out = []
    for b, (row, positions, turn_of) in enumerate(built):
        shift = ids.shape[1] - len(row)
        at = torch.tensor(positions, dtype=torch.long, device=ad.device) + shift
        out.append(AnswerLogits(ad.lm_head(hidden[b, at - 1]), ids[b, at],
                                torch.tensor(turn_of, dtype=torch.long)))
    return out


def answer_logits(adapter: LVLMAdapter, image_tokens: torch.Tensor, turns: list[str], answers: list,
                  vqa: bool = True, image_positions=None) -> AnswerLogits:
    """Teacher-forced logits at every answer token of one dialogue, given the reduced image tokens (m, d) (and, for a
    3-D rotary family, their ``VisualPositions``)."""
    return answer_logits_batch(adapter, [image_tokens], [turns], [answers], vqa,
                               None if image_positions is None else [image_positions])[0]
