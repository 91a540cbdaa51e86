"""LVLM adapters (one per model family), the compressed multi-turn chat session and its efficiency figures.

``load_adapter(model_dir)`` picks the family from ``config.json``'s ``model_type``.
"""

from __future__ import annotations

import json
from pathlib import Path

ADAPTERS = {  # model_type -> "module:class"; imported lazily (transformers is heavy)
    "llava": "compress.lvlm.llava:LlavaAdapter",
    "llava_next": "compress.lvlm.llava_next:LlavaNextAdapter",
    "qwen2_5_vl": "compress.lvlm.qwen2_5_vl:Qwen25VLAdapter",
    "qwen2_vl": "compress.lvlm.qwen2_5_vl:Qwen2VLAdapter",
}
# Families users ask for that the project cannot serve correctly, and why (docs/design.md §5); refused by name.
UNSUPPORTED = {
    "qwen3_vl": "its DeepStack adds vision features inside the first LLM layers, which the decoder driver does not "
                "carry",
    "llava_onevision": "its anyres-max packing has no adapter yet",
    "internlmxcomposer2": "it runs only with remote code, which is never trusted",
}


def model_family(model_dir: str | Path) -> str:
    """``model_type`` from ``model_dir/config.json``; errors name the directory and what is missing."""
    model_dir = Path(model_dir)
    cfg = model_dir / "config.json"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist; pass a local Hugging Face checkpoint "
                                "directory (config.json, weights, tokenizer)")
    if not cfg.is_file():
        raise FileNotFoundError(f"{cfg} is missing: {model_dir} is not a Hugging Face checkpoint directory")
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg} is not valid JSON ({err})") from err
    if model_type in UNSUPPORTED:
        raise ValueError(f"{model_dir}: model_type {model_type!r} is not supported: {UNSUPPORTED[model_type]}; "
                         f"supported families: {sorted(ADAPTERS)}")
    if model_type not in ADAPTERS:
        raise ValueError(f"{model_dir}: model_type {model_type!r} is not supported; supported families: "
                         f"{sorted(ADAPTERS)}")
    weights = list(model_dir.glob("*.safetensors")) + list(model_dir.glob("*.safetensors.index.json"))
    if not weights:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors weights; save the model with save_pretrained")
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise FileNotFoundError(f"{model_dir} has no tokenizer files (tokenizer.json / tokenizer_config.json)")
    return model_type


def load_adapter(model_dir: str | Path, device: str = "cpu", dtype=None, attn_implementation: str | None = None,
                 conversation: str = "auto"):
    """The adapter for the checkpoint in ``model_dir`` (LlavaAdapter / LlavaNextAdapter / Qwen25VLAdapter /
    Qwen2VLAdapter); remote code is never trusted (transformers' own classes only). ``conversation``: the prompt
    format (``compress.lvlm.conversation``; ``auto`` = the format the family was trained with)."""
    import importlib

    module, cls = ADAPTERS[model_family(model_dir)].split(":")
    return getattr(importlib.import_module(module), cls).from_pretrained(
        model_dir, device=device, dtype=dtype, attn_implementation=attn_implementation, conversation=conversation)


__all__ = ["ADAPTERS", "UNSUPPORTED", "load_adapter", "model_family"]
