"""Training data for the compressor: which dialogues a worker takes at each step, and the examples themselves.

The order of epoch ``e`` (docs/design.md §6.3), a pure function of (seed, epoch, rank), so a resumed run finds its
data position from the step counter alone:
1. the deal: ``default_rng([seed, e])`` draws an order of the shards and, shard by shard, an order of its rows; the
   rows in that order are cut into ``world`` contiguous parts of equal size (+-1), worker ``r`` takes part ``r``:
   every epoch deals the shards afresh, each worker still reads whole shards (but the two at its part's ends);
2. the shuffle buffer: a worker's part is a run of shard segments; the rows of each ``window`` consecutive segments
   are shuffled together (``default_rng([seed, e, r])``), so a batch mixes shards while at most a window of shards
   is held in memory (``CachedSource``).
Every worker makes the same number of steps per epoch (the smallest part // micro batch; the rest of an epoch is
dropped), which keeps the collectives of DeepSpeed in step. ``Prefetcher`` reads the next batches on a thread while
the step runs, in the same order.

Two sources give the same :class:`Example`: ``CachedSource`` reads the extract + teacher shards; ``OnlineSource``
runs the vision tower and the teacher (greedy multi-turn generation + top-k targets) on the fly (paper Algorithm 1).
The online targets are rounded to the cache's storage types (features to ``stages.outputs.storage_dtype``, log-probs to
float16), so switching modes never changes what the compressor is trained on.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from compress.layout import Layout
from stages.common import feature_row

Key = tuple[int, int]  # (shard, row)


@dataclass
class Example:
    """One dialogue: ``features`` X_IMG (n, d) as stored; ``answer_ids[t]`` the teacher's answer ids of turn t;
    ``topk_logprobs`` (A, k) float32, ``topk_ids`` (A, k) int64, ``tail_logmass`` (A,) float32 over the A answer
    tokens of all turns, in order."""

    dialogue_id: str
    features: torch.Tensor
    layout: Layout
    questions: list[str]
    answer_ids: list[list[int]]
    topk_logprobs: torch.Tensor
    topk_ids: torch.Tensor
    tail_logmass: torch.Tensor


def rank_shards(num_shards: int, rank: int, world: int) -> list[int]:
    """The fixed deal of the held-out passes (``validation.kl_pass``), whose order does not matter."""
    return list(range(rank, num_shards, world))


def steps_per_epoch(shard_rows: list[int], world: int, micro: int) -> int:
    """Steps every worker makes per epoch (its part of the deal holds ``sum(shard_rows) // world`` rows or one more);
    raises when that is less than one micro batch."""
    rows = sum(shard_rows)
    steps = rows // world // micro
    if steps == 0:
        raise ValueError(f"train: each of the {world} workers gets {rows // world} of the {rows} dialogues per epoch, "
                         f"fewer than one micro batch of {micro}; use fewer train.num_workers or a smaller "
                         "train.batch_size")
    return steps


def planned_epochs(per_epoch: int, epochs: int, min_steps: int) -> int:
    """``epochs``, raised to the fewest whole epochs that give at least ``min_steps`` steps: the length adapts to the
    data size (a small dataset gets more passes, a large one the configured number; docs/design.md §4.2)."""
    if per_epoch < 1 or epochs < 1 or min_steps < 0:
        raise ValueError(f"per_epoch ({per_epoch}) and epochs ({epochs}) must be >= 1, min_steps ({min_steps}) >= 0")
    return max(epochs, -(-min_steps // per_epoch))


def heldout_plan(plan: dict | None, limit: int | None) -> dict | None:
    """``plan`` cut to its first ``limit`` dialogues (shards in order, the last one partly; None: all of them, 0: no
    held-out pass), so the pass after training costs the same at any data size."""
    if plan is None or limit is None:
        return plan
    if limit == 0:
        return None
    rows, left = [], limit
    for n in plan["shard_rows"]:
        rows.append(min(n, left))
        left -= rows[-1]
    return {**plan, "shard_rows": rows}


def epoch_order(shard_rows: list[int], seed: int, epoch: int, rank: int, world: int, window: int = 2) -> list[Key]:
    """The (shard, row) keys worker ``rank`` visits in ``epoch`` (see the module doc)."""
    return list(_epoch_order(tuple(shard_rows), seed, epoch, rank, world, window))


@functools.lru_cache(maxsize=4)
def _epoch_order(shard_rows: tuple[int, ...], seed: int, epoch: int, rank: int, world: int,
                 window: int) -> tuple[Key, ...]:
    if window < 1:
        raise ValueError(f"train.shuffle_shards = {window}: must be >= 1 (1: rows shuffled within a shard only)")
    rng = np.random.default_rng([seed, epoch])
    deal = [(int(s), rng.permutation(shard_rows[s])) for s in rng.permutation(len(shard_rows))]
    total = sum(shard_rows)
    first, stop = rank * total // world, (rank + 1) * total // world
    segments, start = [], 0  # this worker's part of the dealt rows, as (shard, rows) runs
    for shard, rows in deal:
        lo, hi = max(first - start, 0), min(stop - start, len(rows))
        if lo < hi:
            segments.append([(shard, int(r)) for r in rows[lo:hi]])
        start += len(rows)
    rng = np.random.default_rng([seed, epoch, rank])
    order: list[Key] = []
    for w in range(0, len(segments), window):
        buffer = [key for segment in segments[w:w + window] for key in segment]
        order += [buffer[int(i)] for i in rng.permutation(len(buffer))]
    return tuple(order)


def batch_keys(shard_rows: list[int], seed: int, step: int, rank: int, world: int, micro: int,
               per_epoch: int, window: int = 2) -> list[Key]:
    """The micro batch of worker ``rank`` at global step ``step`` (0-based); ``window``: ``train.shuffle_shards``."""
    epoch, position = divmod(step, per_epoch)
    return list(_epoch_order(tuple(shard_rows), seed, epoch, rank, world, window)[position * micro:
                                                                                    (position + 1) * micro])


class CachedSource:
    """Examples from feature + teacher shards. ``questions``: dialogue_id -> questions (from the dialogue file:
    the shards hold no text). Keeps the ``keep`` most recently used shards in memory (and every shard of the current
    batch): a shuffle window of ``train.shuffle_shards`` shards (2 by default) is read once."""

    def __init__(self, feature_args: dict, teacher_args: dict, questions: dict[str, list[str]], adapter=None,
                 keep: int = 2):
        from pipeline.shards import StageOutput
        from stages.common import FeatureReader

        self.features = FeatureReader(feature_args, adapter)  # ``adapter`` projects a pre-projector cache
        self.teacher = StageOutput(**teacher_args)
        self.questions, self.keep = questions, keep
        self._cache: OrderedDict[int, list[Example]] = OrderedDict()

    def _load(self, shard: int) -> list[Example]:
        feats, targets = self.features.read_records(shard), self.teacher.read_records(shard)
        if [r["dialogue_id"] for r in feats] != [r["dialogue_id"] for r in targets]:
            raise ValueError(f"{self.features.out.shard_uri(shard)} and {self.teacher.shard_uri(shard)} do not hold "
                             "the same dialogues in the same order; re-run the teacher stage on these features")
        out = []
        for f, t in zip(feats, targets):
            did = f["dialogue_id"]
            if did not in self.questions:
                raise KeyError(f"dialogue {did!r} of {self.features.out.shard_uri(shard)} is not in the dialogue "
                               "file; the cache was built from another dataset: re-run extract and teacher")
            out.append(Example(
                did, *feature_row(f), self.questions[did],
                [[int(i) for i in a] for a in t["answer_ids"]],
                _cat([np.asarray(x, dtype=np.float32) for x in t["topk_logprobs"]], np.float32),
                _cat([np.asarray(x, dtype=np.int64) for x in t["topk_ids"]], np.int64),
                _cat([np.asarray(x, dtype=np.float32) for x in t["tail_logmass"]], np.float32)))
        return out

    def examples(self, keys: list[Key]) -> list[Example]:
        needed = list(dict.fromkeys(s for s, _ in keys))
        for shard in needed:
            if shard not in self._cache:
                self._cache[shard] = self._load(shard)
            self._cache.move_to_end(shard)
        batch = [self._cache[s][r] for s, r in keys]
        while len(self._cache) > max(self.keep, len(needed)):
            self._cache.popitem(last=False)
        return batch


class Prefetcher:
    """The examples of steps ``start, start + 1, ... < stop`` computed on a background thread up to ``depth`` steps
    ahead of the loop, so the next batch is ready when the step asks (the shard reads, sha256 checks and decoding
    overlap the model). ``get(step)`` returns exactly ``source.examples(keys_of(step))``, in order: the batches stay
    a pure function of (seed, step), so a resumed run continues the same order. Only for sources whose reads run no
    collective (``CachedSource`` under ZeRO 0-2: the projector of a pre-projector cache is a plain forward)."""

    def __init__(self, source, keys_of, start: int, stop: int, depth: int = 2):
        import queue
        import threading

        if depth < 1:
            raise ValueError(f"Prefetcher: depth {depth} must be >= 1")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._next = start

        def produce() -> None:
            for step in range(start, stop):
                try:
                    item = (step, source.examples(keys_of(step)), None)
                except BaseException as err:  # noqa: BLE001 - handed to the loop, which raises it
                    self._queue.put((step, None, err))
                    return
                self._queue.put(item)

        threading.Thread(target=produce, name="train-prefetch", daemon=True).start()

    def get(self, step: int) -> list[Example]:
        if step != self._next:
            raise ValueError(f"Prefetcher: asked for step {step}, the next one is {self._next} (steps go in order)")
        got, examples, err = self._queue.get()
        if err is not None:
            raise err
        self._next = got + 1
        return examples


def _cat(parts: list[np.ndarray], dtype) -> torch.Tensor:
    parts = [p for p in parts if len(p)]
    if not parts:
        return torch.from_numpy(np.zeros((0,), dtype=dtype))
    return torch.from_numpy(np.concatenate(parts))


class OnlineSource:
    """Examples computed at each step from the images (paper Algorithm 1). ``shards[i]``: the dialogue records
    (dialogue_id, image, questions) of shard i, cut exactly as the extract stage cuts the split."""

    def __init__(self, adapter, shards: list[list[dict]], top_k: int, max_new_tokens: int, storage_dtype: str):
        self.adapter, self.shards = adapter, shards
        self.top_k, self.max_new_tokens = top_k, max_new_tokens
        self.storage = getattr(torch, storage_dtype)

    def examples(self, keys: list[Key]) -> list[Example]:
        records = [self.shards[s][r] for s, r in keys]
        return online_examples(self.adapter, records, self.top_k, self.max_new_tokens, self.storage)


@torch.no_grad()
def online_examples(adapter, records: list[dict], top_k: int, max_new_tokens: int,
                    storage: torch.dtype) -> list[Example]:
    """Vision tower + full-token teacher for ``records`` (dialogue_id, image, questions): the teacher's greedy
    answers (its own history) and its top-k targets at every answer token, as the teacher stage caches them."""
    from compress.losses import topk_targets
    from compress.lvlm.base import EncodedImage
    from compress.lvlm.session import BatchChatSession, answer_logits_batch

    ad = adapter
    encoded = []
    for rec in records:
        enc = ad.encode(rec["image"])
        tokens = enc.tokens.to(storage).to(ad.device, ad.dtype)  # what the cache would hold
        encoded.append(EncodedImage(tokens, enc.layout, None, enc.image_size))
    out: list[Example | None] = [None] * len(records)
    groups: dict[int, list[int]] = {}
    for j, rec in enumerate(records):  # dialogues with the same number of turns are generated together
        groups.setdefault(len(rec["questions"]), []).append(j)
    for turns, group in groups.items():
        session = BatchChatSession(ad, "full", max_new_tokens=max_new_tokens, history="model")
        session.set_images([encoded[j] for j in group])
        answers: list[list[list[int]]] = [[] for _ in group]
        for t in range(turns):
            for b, result in enumerate(session.ask([records[j]["questions"][t] for j in group])):
                answers[b].append(result.target_ids)  # with the end-of-turn token, as the teacher cache
        forced = answer_logits_batch(ad, [encoded[j].tokens for j in group],
                                     [records[j]["questions"] for j in group], answers,
                                     image_positions=[ad.positions_after(encoded[j].layout) for j in group])
        for j, ans, fo in zip(group, answers, forced):
            top, ids, tail = topk_targets(fo.logits, top_k)
            out[j] = Example(records[j]["dialogue_id"], encoded[j].tokens.to(storage).cpu(), encoded[j].layout,
                             list(records[j]["questions"]), ans, top.half().float(), ids.long(), tail.float())
    return out  # type: ignore[return-value]
