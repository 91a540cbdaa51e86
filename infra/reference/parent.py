"""``--init DIR``: stage 2 continued from a reference this recipe built (docs/design.md §7), so a reference can be
fine-tuned on more data (another benchmark, video) without rebuilding it. The parent's weights load through
transformers' own ``from_pretrained``; its sizes come from its ``recipe_summary.json`` (the processor must lay out
tokens exactly as the parent learned them); its vocabulary is kept id for id and grows by the new data's words
(their embedding rows start at the mean of the old ones: transformers' ``resize_token_embeddings``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from infra.reference.config import RecipeConfig

# The recipe fields that fix the architecture and the processor's layout: taken from the parent, never the CLI.
SIZE_KEYS = ("image_size", "patch_size", "vision_hidden", "vision_layers", "vision_heads", "text_hidden",
             "text_layers", "text_heads", "text_intermediate", "text_init_std", "grid_pinpoints")
MODEL_CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
                 "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


def weights_sha256(model_dir: Path) -> str:
    """sha256 of ``model_dir/model.safetensors``, streamed."""
    from pipeline.hashing import stream_sha256

    with open(model_dir / "model.safetensors", "rb") as f:
        return stream_sha256(f)


def parent_summary(init: str | Path, family: str) -> tuple[Path, dict[str, Any]]:
    """(the directory, its recipe summary) after checking it is a reference of ``family`` built by this recipe."""
    from compress.lvlm import model_family

    init = Path(init)
    try:  # a readable HF directory with weights and tokenizer, or one line saying what it lacks
        found = model_family(init)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"--init: {err}") from None
    if found != family:
        raise ValueError(f"--init {init}: a {found} model, but --family {family}; pass --family {found} or another "
                         "--init")
    if not (init / "model.safetensors").is_file():
        raise FileNotFoundError(f"--init {init}: no model.safetensors (sharded weights are not a reference of this "
                                "recipe); pass a directory written by `metacompress reference build`")
    path = init / "recipe_summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"--init {init}: no recipe_summary.json, so its sizes are unknown; pass a directory "
                                "written by `metacompress reference build`")
    summary = json.loads(path.read_text())
    if "config" not in summary:
        raise ValueError(f"{path}: no 'config' record; pass a directory written by `metacompress reference build`")
    return init, summary


def load_parent(init: str | Path, cfg: RecipeConfig, train: Sequence[Any], video: bool):
    """The parent's model (float32) and a tokenizer extended by ``train``'s words (``video``: and the video
    placeholder), with ``cfg``'s sizes set to the parent's. Returns (model, tokenizer, record for the card)."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    from infra.reference.tokenizer import VIDEO, extend_tokenizer

    init, summary = parent_summary(init, cfg.family)
    for key in SIZE_KEYS:
        if key in summary["config"]:
            setattr(cfg, key, summary["config"][key])
    cfg.__post_init__()
    model = getattr(transformers, MODEL_CLASSES[cfg.family]).from_pretrained(str(init), dtype=torch.float32,
                                                                             use_safetensors=True)
    tok, added = extend_tokenizer(AutoTokenizer.from_pretrained(str(init)), train, video)
    if len(tok) != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))
    if video:
        model.config.video_token_id = tok.convert_tokens_to_ids(VIDEO)
    record = {"dir": str(init.resolve()), "sha256": weights_sha256(init), "words_added": added,
              "data": summary.get("data_name") or summary.get("dialogues"), "stage2_steps":
              summary["config"].get("stage2_steps"), "parent": summary.get("parent")}
    return model, tok, record
