"""A static KV cache for the decoder driver (``compress.lvlm.decoder``): the same computation with preallocated
buffers and in-place writes at device-side offsets, so that every step has fixed shapes and can be captured in a
CUDA graph (``compress.lvlm.graphs``).

Layout: layer l keeps K/V buffers (B, H_kv, L, hd) of L = ``max_len`` slots and belongs to a group g; the layers of
a group hold the same tokens (one group; with FastV, layers < K and layers >= K). A group has a key mask (B, L)
(real tokens), a device offset (slots used: pads take slots too, masked) and real-token counts (B,). The queries of
a step see the first ``window`` slots (a bucket >= the slots used after the step), masked by key mask and causality:
the same keys, in the same order, as the dynamic cache, so results equal the dynamic path's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.lvlm.decoder import last_query_attention

GROUPS = 2  # one group, plus the pruned layers of FastV


class StaticKV:
    """The ``past_key_values`` of the decoder layers: ``update(k, v, layer_idx)`` writes k, v (B, H, q, hd) at the
    slots the driver set (``slots[layer_idx]`` (q,) long) and returns the first ``window`` slots (B, H, W, hd)."""

    def __init__(self, layers: int, batch: int, heads: int, head_dim: int, max_len: int, dtype, device):
        shape = (batch, heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slots: list[torch.Tensor | None] = [None] * layers
        self.window = max_len

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        k, v, slots = self.keys[layer_idx], self.values[layer_idx], self.slots[layer_idx]
        k.index_copy_(2, slots, key_states.to(k.dtype))
        v.index_copy_(2, slots, value_states.to(v.dtype))
        return k[:, :, : self.window], v[:, :, : self.window]


def bucket(n: int, step: int = 64) -> int:
    """A length bucket >= n: powers of two up to ``step``, then multiples of ``step``."""
    if n <= step:
        return max(1, 1 << (n - 1).bit_length())
    return -(-n // step) * step


@dataclass
class StaticState:
    """cache: StaticKV. masks (G, B, L) bool, offsets (G,) long, tokens (G, B) long: per group (see module doc);
    next_pos (B,): positions consumed; group[l]: the group of layer l; used[g]: host copy of offsets[g]."""

    cache: StaticKV
    masks: torch.Tensor
    offsets: torch.Tensor
    tokens: torch.Tensor
    next_pos: torch.Tensor
    group: list[int]
    used: list[int]
    window_step: int = 256

    @classmethod
    def allocate(cls, lm: nn.Module, batch: int, max_len: int, window_step: int = 256) -> "StaticState":
        cfg, p = lm.config, lm.norm.weight
        heads = cfg.num_key_value_heads or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        n = len(lm.layers)
        cache = StaticKV(n, batch, heads, head_dim, max_len, p.dtype, p.device)
        dev = p.device
        return cls(cache, torch.zeros(GROUPS, batch, max_len, dtype=torch.bool, device=dev),
                   torch.zeros(GROUPS, dtype=torch.long, device=dev),
                   torch.zeros(GROUPS, batch, dtype=torch.long, device=dev),
                   torch.zeros(batch, dtype=torch.long, device=dev), [0] * n, [0] * GROUPS, window_step)

    @property
    def max_len(self) -> int:
        return self.masks.shape[-1]

    @property
    def layer_tokens(self) -> list[torch.Tensor]:
        """(B,) real cached tokens of each layer (as ``DecoderState.layer_tokens``)."""
        return [self.tokens[g] for g in self.group]

    def reset(self) -> None:
        """An empty cache (buffers kept: their addresses are in the captured graphs)."""
        self.masks.zero_()
        self.offsets.zero_()
        self.tokens.zero_()
        self.next_pos.zero_()
        self.group = [0] * len(self.group)
        self.used = [0] * GROUPS

    def split(self, layer: int) -> None:
        """Layers >= ``layer`` become group 1 (FastV's pruned layers); the cache must be empty."""
        if any(self.used):
            raise ValueError("FastV prunes the first prefill only: the static cache must be empty")
        self.group = [0 if i < layer else 1 for i in range(len(self.group))]

    def snapshot(self) -> tuple:
        return list(self.used), self.offsets.clone(), self.tokens.clone(), self.next_pos.clone(), list(self.group)

    def restore(self, snap: tuple) -> None:
        """Roll back to a snapshot in place: slots written since are masked out and will be overwritten."""
        used, offsets, tokens, next_pos, group = snap
        for g, u in enumerate(used):
            self.masks[g, :, u:] = False
        self.offsets.copy_(offsets)
        self.tokens.copy_(tokens)
        self.next_pos.copy_(next_pos)
        self.used, self.group = list(used), list(group)

    def window(self, q: int, groups: set[int]) -> int:
        """Slots the queries of a q-token step attend to: a bucket >= the slots used after the step."""
        need = max(self.used[g] for g in groups) + q
        if need > self.max_len:
            raise ValueError(f"the static KV cache holds {self.max_len} slots, the dialogue needs {need}: raise "
                             "max_cache_len")
        return min(-(-need // self.window_step) * self.window_step, self.max_len)

    def runs(self, start: int = 0, stop: int | None = None) -> list[tuple[range, int]]:
        """Contiguous layers [start, stop) of one group -> [(layers, group)]."""
        stop = len(self.group) if stop is None else stop
        out: list[tuple[range, int]] = []
        for i in range(start, stop):
            if out and out[-1][1] == self.group[i]:
                out[-1] = (range(out[-1][0].start, i + 1), self.group[i])
            else:
                out.append((range(i, i + 1), self.group[i]))
        return out


def positions(state: StaticState, new_mask: torch.Tensor) -> torch.Tensor:
    """new_mask (B, q) -> positions (B, q): consecutive over real tokens per row (pads clamp to 0); advances
    next_pos in place."""
    pos = (state.next_pos[:, None] + new_mask.long().cumsum(1) - 1).clamp(min=0)
    state.next_pos.add_(new_mask.sum(1))
    return pos


def static_mask(key_mask: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """key_mask (B, W) bool, slots (q,) the queries' own slots -> (B, 1, q, W) additive mask: 0 where query i may
    see key j (a real key at a slot <= its own), the dtype's minimum elsewhere."""
    j = torch.arange(key_mask.shape[1], device=key_mask.device)
    allowed = (j[None, :] <= slots[:, None])[None] & key_mask[:, None, :]
    out = torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device)
    return out.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def run_layers(lm: nn.Module, state: StaticState, hidden: torch.Tensor, cur: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, layers: range, window: int, weights_of: int | None = None):
    """Layers ``layers`` (one group) on hidden (B, q, d) with real positions cur (B, q) and rotary cos/sin (B, q, hd);
    writes their cache at the group's offset and advances it. Fixed shapes, no host sync: capturable.
    Returns hidden (B, q, d), and the last query row's attention weights (B, H, 1, q) of layer ``weights_of`` when
    given (a first prefill: the keys are the queries)."""
    g = state.group[layers.start]
    slots = state.offsets[g] + torch.arange(cur.shape[1], device=cur.device)
    state.masks[g].index_copy_(1, slots, cur)
    mask = static_mask(state.masks[g, :, :window], slots, hidden.dtype)
    state.cache.window = window
    weights = None
    for i in layers:
        state.cache.slots[i] = slots
        layer = lm.layers[i]
        call = dict(attention_mask=mask, past_key_values=state.cache, use_cache=True, position_embeddings=(cos, sin))
        if i == weights_of:  # FastV ranks with the last query row only (docs/design.md §4.4.2)
            with last_query_attention(layer.self_attn, cur) as box:
                hidden = layer(hidden, **call)
            weights = box["weights"]
        else:
            hidden = layer(hidden, **call)
    state.offsets[g:g + 1].add_(cur.shape[1])
    state.tokens[g].add_(cur.sum(1))
    return hidden if weights_of is None else (hidden, weights)


def _advance(state: StaticState, layers: list[range], q: int) -> None:
    for g in {state.group[r.start] for r in layers}:
        state.used[g] += q


def forward(lm: nn.Module, state: StaticState, embeds: torch.Tensor, new_mask: torch.Tensor, pruner=None,
            record: list | None = None, head=None, graphs=None, pad_step: int = 64):
    """``decoder.forward`` on the static cache: embeds (B, q, d), new_mask (B, q) -> (hidden (B, q', d) after the final
    norm, or ``head(hidden)`` when given; new_mask (B, q')). ``pruner``: FastV, at the first prefill (the rows kept
    after it are left-padded to a ``bucket``). ``graphs``: a ``compress.lvlm.graphs.Graphs`` that runs (captures,
    replays) each fixed-shape piece; None runs them directly."""
    q = new_mask.shape[1]
    last = len(lm.layers)
    if pruner is not None:
        state.split(pruner.k)
    cut = pruner.layer + 1 if pruner is not None else last
    first = [r for r, _ in state.runs(0, cut)]
    window = state.window(q, {state.group[r.start] for r in first})

    def piece_one(embeds, new_mask):
        pos = positions(state, new_mask)
        cos, sin = lm.rotary_emb(embeds, position_ids=pos)
        hidden = embeds
        weights = None
        for r in first:
            out = run_layers(lm, state, hidden, new_mask, cos, sin, r, window,
                             pruner.layer if pruner is not None and pruner.layer in r else None)
            hidden, weights = out if isinstance(out, tuple) else (out, weights)
        if pruner is not None:
            return hidden, weights, cos, sin
        hidden = lm.norm(hidden)
        return (head(hidden),) if head is not None else (hidden,)

    if record is not None:
        before = state.tokens.clone()
    run = graphs.run if graphs is not None else (lambda key, fn, inputs, st: fn(*inputs))
    out = run(("one", tuple(embeds.shape), window, cut, tuple(state.group), head is not None), piece_one,
              (embeds, new_mask), state)
    _advance(state, first, q)
    if record is not None:
        real = new_mask.sum(1)
        record += [(real, before[state.group[i]] + real) for i in range(cut)]
    if pruner is None:
        return out[0], new_mask
    hidden, weights, cos, sin = out
    idx, valid = pruner(weights[..., :q], new_mask)
    width = bucket(idx.shape[1], pad_step)
    if width > idx.shape[1]:  # left-pad the kept rows to a bucket: invalid columns at position 0
        pad = width - idx.shape[1]
        idx = torch.cat([idx.new_zeros(idx.shape[0], pad), idx], 1)
        valid = torch.cat([valid.new_zeros(valid.shape[0], pad), valid], 1)
    take = idx[..., None]
    hidden = hidden.gather(1, take.expand(-1, -1, hidden.shape[-1]))
    cos = cos.gather(1, take.expand(-1, -1, cos.shape[-1]))  # original rotary positions, gapped
    sin = sin.gather(1, take.expand(-1, -1, sin.shape[-1]))
    cur = new_mask.gather(1, idx) & valid
    second = [r for r, _ in state.runs(cut, last)]
    window2 = state.window(width, {state.group[r.start] for r in second})

    def piece_two(hidden, cur, cos, sin):
        for r in second:
            hidden = run_layers(lm, state, hidden, cur, cos, sin, r, window2)
        hidden = lm.norm(hidden)
        return (head(hidden),) if head is not None else (hidden,)

    if record is not None:
        before = state.tokens.clone()
    out = run(("two", tuple(hidden.shape), window2, cut, tuple(state.group), head is not None), piece_two,
              (hidden, cur, cos, sin), state)
    _advance(state, second, width)
    if record is not None:
        real = cur.sum(1)
        record += [(real, before[state.group[i]] + real) for i in range(cut, last)]
    return out[0], cur
