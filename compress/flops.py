"""Analytic FLOP counts (a multiply-add is 2 FLOPs; element-wise work is ignored, as torch's FlopCounterMode does)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderShape:
    """The numbers of a Llama-style decoder that its FLOPs depend on."""

    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int

    @classmethod
    def from_config(cls, config) -> "DecoderShape":
        """From a transformers ``LlamaConfig``-like object (text config of an LVLM)."""
        return cls(config.hidden_size, config.num_hidden_layers, config.intermediate_size,
                   config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                   config.vocab_size)


LLAMA_7B = DecoderShape(hidden_size=4096, num_layers=32, intermediate_size=11008, num_heads=32, num_kv_heads=32,
                        vocab_size=32000)


def decoder_prefill_flops(shape: DecoderShape, seq_len: int, past_len: int = 0, logits_tokens: int = 1) -> int:
    """FLOPs of one prefill of ``seq_len`` new tokens over ``past_len`` cached ones.

    Attention is counted over the full (seq_len x (past_len + seq_len)) score matrix, as SDPA computes it;
    ``logits_tokens`` is how many positions go through the LM head (1 for generation).
    """
    d, s, kv = shape.hidden_size, seq_len, past_len + seq_len
    head_dim = d // shape.num_heads
    projections = 2 * s * d * (2 * d + 2 * shape.num_kv_heads * head_dim)
    attention = 2 * 2 * s * kv * d
    mlp = 2 * 3 * s * d * shape.intermediate_size
    return shape.num_layers * (projections + attention + mlp) + 2 * logits_tokens * d * shape.vocab_size


def metacompress_flops(n: int, m: int, d: int, compress_dim: int) -> int:
    """FLOPs of one MetaCompress reduction of (n, d) to (m, d): keys, queries, scores, P @ X."""
    return 2 * n * d * compress_dim + 2 * m * d * compress_dim + 2 * m * compress_dim * n + 2 * m * n * d
