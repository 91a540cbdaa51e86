"""Analytic FLOP counts. A multiply-add is 2 FLOPs; only matrix products count (norms, RoPE, softmax and
element-wise work are ignored, as ``torch.utils.flop_counter.FlopCounterMode`` does). Attention is counted over the
full (q x kv) score matrix, as the kernels compute it."""

from __future__ import annotations

from typing import Any, Sequence

# A 7B Llama (LLaVA-1.5-7B / LLaVA-NeXT-7B decoders), as a config-like dict.
LLAMA_7B = {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 11008, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32000}


def _get(config: Any, key: str, default=None):
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def decoder_dims(config: Any) -> dict[str, int]:
    """hidden, intermediate, heads, kv heads, head_dim, vocab, layers of a Llama-like config (object or dict)."""
    hidden = int(_get(config, "hidden_size"))
    heads = int(_get(config, "num_attention_heads"))
    return {"hidden": hidden, "intermediate": int(_get(config, "intermediate_size")), "heads": heads,
            "kv_heads": int(_get(config, "num_key_value_heads") or heads),
            "head_dim": int(_get(config, "head_dim") or hidden // heads), "vocab": int(_get(config, "vocab_size")),
            "layers": int(_get(config, "num_hidden_layers"))}


def layer_flops(config: Any, q: int, kv: int) -> int:
    """FLOPs of one Llama decoder layer for q query tokens over kv keys (kv includes the q new ones)."""
    c = decoder_dims(config)
    d, hd = c["hidden"], c["head_dim"]
    proj = 2 * q * d * hd * (2 * c["heads"] + 2 * c["kv_heads"])  # q, o and k, v projections
    attn = 2 * 2 * q * kv * c["heads"] * hd  # scores and the weighted sum of values
    mlp = 2 * 3 * q * d * c["intermediate"]  # gate, up, down
    return proj + attn + mlp


def llama_prefill_flops(config: Any, seq_len: int, cached_len: int = 0, logits_tokens: int = 1,
                        layer_lengths: Sequence[tuple[int, int]] | None = None) -> int:
    """Prefill FLOPs of a Llama decoder: ``seq_len`` new tokens over ``cached_len`` cached ones in every layer, and
    ``logits_tokens`` positions through the LM head. ``layer_lengths``: explicit (q, kv) per layer instead (FastV:
    the layers after the pruning layer see fewer tokens). E.g. a 7B Llama (hidden 4096, 32 layers, intermediate
    11008, vocab 32000) on 640 tokens: ~8.8 TFLOPs."""
    c = decoder_dims(config)
    lengths = layer_lengths or [(seq_len, cached_len + seq_len)] * c["layers"]
    return sum(layer_flops(config, q, kv) for q, kv in lengths) + 2 * logits_tokens * c["hidden"] * c["vocab"]


def metacompress_flops(n: int, m: int, d: int, compress_dim: int) -> int:
    """FLOPs of one MetaCompress reduction of (n, d) to (m, d): keys, queries, scores, P @ X."""
    return 2 * n * d * compress_dim + 2 * m * d * compress_dim + 2 * m * compress_dim * n + 2 * m * n * d
