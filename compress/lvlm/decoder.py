"""A thin driver over transformers' Llama decoder layers, for batched multi-turn chat with a reused KV cache.

Why not ``LlamaModel.forward``: FastV leaves the layers with different cache lengths (layers < K keep every
token, layers >= K only the kept ones), so each layer needs its own key mask; and pruned tokens keep their original
rotary positions. The driver calls the model's own ``LlamaDecoderLayer`` modules (weights, attention kernel,
``DynamicCache`` updates all theirs) and only owns the masks and positions.

Conventions: B dialogues in a batch; a step feeds ``q`` new positions per row, left-padded (``new_mask`` False on
pads; pads may also sit between turns). Real tokens get consecutive positions per row, counted over real tokens
only, so a padded row computes exactly what the same row computes alone.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
import torch
from torch import nn


@dataclass
class DecoderState:
    """cache: ``DynamicCache`` (or None: no cache, a single forward). key_masks[l]: (B, kv_l) bool, real cached
    keys of layer l (layers sharing a mask share the tensor object). next_pos: (B,) positions consumed so far.
    layer_tokens[l]: (B,) real cached tokens of layer l (for KV-cache length and FLOPs)."""

    cache: object | None
    key_masks: list[torch.Tensor]
    next_pos: torch.Tensor
    layer_tokens: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def empty(cls, lm: nn.Module, batch: int, device: torch.device, use_cache: bool = True) -> "DecoderState":
        from transformers import DynamicCache

        empty = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        n = len(lm.layers)
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        return cls(DynamicCache(config=lm.config) if use_cache else None, [empty] * n, zeros.clone(), [zeros] * n)

    def snapshot(self) -> tuple:
        lengths = [m.shape[1] for m in self.key_masks]
        return lengths, list(self.key_masks), self.next_pos.clone(), list(self.layer_tokens)

    def restore(self, snap: tuple) -> None:
        """Roll back to a snapshot: drop the cache entries added since (e.g. the tokens decoded this turn)."""
        lengths, masks, next_pos, tokens = snap
        if self.cache is not None:
            for layer, length in zip(self.cache.layers, lengths):
                extra = layer.get_seq_length() - length
                if extra > 0:
                    layer.crop(-extra)
        self.key_masks, self.next_pos, self.layer_tokens = masks, next_pos, tokens


def additive_mask(key_mask: torch.Tensor, q: int, dtype: torch.dtype) -> torch.Tensor:
    """key_mask (B, kv) bool; the last q keys are the queries themselves. -> (B, 1, q, kv) additive mask:
    0 where query i may see key j (a real key, not in the future), the dtype's minimum elsewhere."""
    kv = key_mask.shape[1]
    i = torch.arange(q, device=key_mask.device)[:, None]
    j = torch.arange(kv, device=key_mask.device)[None, :]
    allowed = (j <= kv - q + i)[None] & key_mask[:, None, :]
    out = torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device)
    return out.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def attention_kernel(config) -> str:
    """The decoder's attention implementation; the driver supports ``sdpa`` and ``eager`` and refuses the others by
    name: ``flash_attention_2`` (and flex/paged kernels) read a 2-D padding mask, not the per-layer key masks and
    gapped positions FastV and left padding need (docs/design.md §5)."""
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation={impl!r} is not supported by the multi-turn decoder driver (per-row key "
                         "masks, FastV's pruned layers); load the model with attn_implementation='sdpa' (default) or "
                         "'eager'")
    return impl


def mask_free(layer: nn.Module, key_mask: torch.Tensor, q: int) -> bool:
    """Whether a layer's step needs no mask tensor: every key real and either one query (a decode step sees all
    keys) or, with SDPA, a prompt over no cached keys (SDPA's own causal flag, which lets it pick a flash or
    memory-efficient kernel). Eager attention needs the causal mask for q > 1."""
    kv = key_mask.shape[1]
    if not bool(key_mask.all()):
        return False
    if q == 1:
        return True
    return kv == q and getattr(layer.self_attn.config, "_attn_implementation", None) == "sdpa"


@contextlib.contextmanager
def eager_attention(attn: nn.Module):
    """Run one attention module with eager attention and capture its weights (B, H, q, kv) in ``box["weights"]``.
    Only this layer changes kernel (flash/sdpa return no weights); the config copy keeps the others untouched."""
    box: dict[str, torch.Tensor] = {}
    original = attn.config
    attn.config = copy.copy(original)
    attn.config._attn_implementation = "eager"
    handle = attn.register_forward_hook(lambda mod, args, out: box.__setitem__("weights", out[1]))
    try:
        yield box
    finally:
        handle.remove()
        attn.config = original


@contextlib.contextmanager
def last_query_attention(attn: nn.Module, key_mask: torch.Tensor):
    """Run one attention module with its own kernel and compute, from the same inputs, the attention weights of the
    last query row only: ``box["weights"]`` (B, H, 1, L) float32, what eager attention's last row holds, without the
    (B, H, L, L) matrix (FastV ranks with that row; docs/design.md §4.4.2). A first prefill only: key_mask (B, L)
    marks the real keys, which are the queries themselves (the last query sees all of them)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    box: dict[str, torch.Tensor] = {}

    def hook(mod, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        if hidden.shape[1] != key_mask.shape[1]:
            raise ValueError("the last-row attention of FastV needs a first prefill (no cached keys)")
        b, length, _ = hidden.shape
        hd = mod.head_dim
        q = mod.q_proj(hidden[:, -1:]).view(b, 1, -1, hd).transpose(1, 2)
        k = mod.k_proj(hidden).view(b, length, -1, hd).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        k = repeat_kv(k, q.shape[1] // k.shape[1])
        logits = torch.matmul(q, k.transpose(2, 3)).float() * mod.scaling
        logits = logits.masked_fill(~key_mask[:, None, None, :], torch.finfo(torch.float32).min)
        box["weights"] = logits.softmax(-1)

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield box
    finally:
        handle.remove()


def forward(lm: nn.Module, state: DecoderState, embeds: torch.Tensor, new_mask: torch.Tensor,
            pruner=None, record: list | None = None, mrope: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed embeds (B, q, d) (new_mask (B, q) bool) through every layer of ``lm`` (a ``LlamaModel``), appending
    to ``state``. ``pruner`` (with ``.layer`` and ``__call__(weights, new_mask) -> (index, valid)``) shortens the
    sequence after that layer. ``record`` gets one (q_real (B,), kv_real (B,)) pair per layer, for FLOPs.
    ``mrope``: (offsets (B, q, 3) long, advance (B, q) long) for a 3-D rotary family (docs/design.md §5): a token's
    (t, h, w) is its base plus its offsets, the base being the text position reached before it (each real token moves
    it by its ``advance``: 1 for text, the image's span after its last visual token). None: 1-D positions.
    Returns (hidden (B, q', d) after the final norm, new_mask (B, q'))."""
    if mrope is None:
        pos = (state.next_pos[:, None] + new_mask.long().cumsum(1) - 1).clamp(min=0)
        rope_pos = pos
        state.next_pos = state.next_pos + new_mask.sum(1)
    else:
        offsets, advance = mrope
        adv = advance * new_mask.long()
        pos = state.next_pos[:, None] + adv.cumsum(1) - adv
        rope_pos = pos[None] + offsets.permute(2, 0, 1)
        state.next_pos = state.next_pos + adv.sum(1)
    hidden = embeds
    cos, sin = lm.rotary_emb(hidden, position_ids=rope_pos)
    cur = new_mask
    memo: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    key_masks, tokens = list(state.key_masks), list(state.layer_tokens)
    for index, layer in enumerate(lm.layers):
        key = (id(state.key_masks[index]), id(cur))
        if key not in memo:  # layers that share their cached mask share the 4-D mask too
            km = torch.cat([state.key_masks[index], cur], 1)
            memo[key] = (km, None if mask_free(layer, km, cur.shape[1]) else
                         additive_mask(km, cur.shape[1], hidden.dtype))
        km, mask = memo[key]
        key_masks[index] = km
        real = cur.sum(1)
        tokens[index] = state.layer_tokens[index] + real
        if record is not None:
            record.append((real, tokens[index]))
        call = dict(attention_mask=mask, position_ids=pos, past_key_values=state.cache,
                    use_cache=state.cache is not None, position_embeddings=(cos, sin))
        if pruner is not None and index == pruner.layer:
            with last_query_attention(layer.self_attn, km) as box:
                hidden = layer(hidden, **call)
            idx, valid = pruner(box["weights"], cur)
            take = idx[..., None]
            hidden = hidden.gather(1, take.expand(-1, -1, hidden.shape[-1]))
            cos = cos.gather(1, take.expand(-1, -1, cos.shape[-1]))  # original rotary positions, gapped
            sin = sin.gather(1, take.expand(-1, -1, sin.shape[-1]))
            pos = pos.gather(1, idx)
            cur = cur.gather(1, idx) & valid
        else:
            hidden = layer(hidden, **call)
    state.key_masks, state.layer_tokens = key_masks, tokens
    return lm.norm(hidden), cur
