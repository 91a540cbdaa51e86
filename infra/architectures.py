"""Real LVLM architectures built from configs with random weights, for efficiency measurements.

Time, memory and FLOPs of a forward pass do not depend on weight values, so ``build_adapter("llava-1.5-7b")`` gives
the real LLaVA-1.5-7B compute graph (CLIP ViT-L/14-336, 2-layer GELU projector, Llama-2-7B/Vicuna decoder) without
downloading a checkpoint. Nothing here calls ``from_pretrained`` of a hub id.

The tokenizer is word-level and made in code: every id of the model's vocabulary decodes (random weights generate
any id), the image placeholder is one special token, and an English prompt tokenises to about one token per word
(Llama's SentencePiece gives ~1.2-1.3), which is close enough for prompt lengths of a few dozen tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# LLaVA's own (vicuna_v1) system prompt: the real models see it before the first USER turn.
SYSTEM_PROMPT = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the human's questions.")

# vicuna_v1 conversation format for structured content; the system prompt opens the dialogue.
CHAT_TEMPLATE = (
    SYSTEM_PROMPT + " {% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")

# Text whose words get their own tokenizer ids (others map to <unk>: still one token each, so lengths are right).
CORPUS = SYSTEM_PROMPT + (
    " USER : ASSISTANT Answer the question using a single word or phrase. What is the color of the car on the left "
    "side of the picture? Is the man to the left or to the right of the bicycle? What kind of furniture is in front "
    "of the window? Are there both cups and plates in this image? Which material is the table made of? Who is "
    "wearing a hat? What is the animal that is standing on the grass? Is the sky cloudy or clear? yes no red blue "
    "green white black two three wood metal dog cat")

CLIP_VIT_L_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                  "image_size": 336, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu",
                  "layer_norm_eps": 1e-5}
LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
LLAMA2_13B = dict(LLAMA2_7B, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                  num_key_value_heads=40)
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6
# Qwen2.5-VL-7B-Instruct's config.json: windowed ViT (patch 14, 2x2 merger to the LLM width), Qwen2.5-7B decoder.
QWEN25_VIT = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "out_hidden_size": 3584,
              "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "hidden_act": "silu"}
QWEN25_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
             "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}}
# ChatML with Qwen's default system prompt and vision markers (Qwen2.5-VL's chat template, images only).
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>")


@dataclass(frozen=True)
class Architecture:
    """``family``: "llava", "llava_next" or "qwen2_5_vl". ``vision`` / ``text``: CLIPVisionConfig / LlamaConfig (or
    Qwen2_5_VLVisionConfig / Qwen2_5_VLTextConfig) keyword arguments. ``image_size``: (height, width) of the benchmark
    image (random pixels)."""

    name: str
    family: str
    vision: dict
    text: dict
    image_size: tuple[int, int]
    grid_pinpoints: list | None = None
    feature_layer: int = -2
    strategy: str = "default"
    description: str = ""
    extra: dict = field(default_factory=dict)


ARCHITECTURES: dict[str, Architecture] = {
    "llava-1.5-7b": Architecture("llava-1.5-7b", "llava", CLIP_VIT_L_336, LLAMA2_7B, (336, 336),
                                 description="LLaVA-1.5-7B: CLIP ViT-L/14-336 (576 tokens), Vicuna-7B"),
    "llava-1.5-13b": Architecture("llava-1.5-13b", "llava", CLIP_VIT_L_336, LLAMA2_13B, (336, 336),
                                  description="LLaVA-1.5-13B: CLIP ViT-L/14-336 (576 tokens), Vicuna-13B"),
    "llava-next-7b": Architecture("llava-next-7b", "llava_next", CLIP_VIT_L_336, LLAMA2_7B, (672, 672),
                                  NEXT_PINPOINTS,
                                  description="LLaVA-NeXT-7B (v1.6 Vicuna): anyres 2x2 + base, 2928 tokens at 672x672"),
    # CI sizes: 16x16 = 256 visual tokens, a 4-layer decoder of width 128; well under a second per dialogue on one CPU
    # core. 6 vision layers so that ToMe (at most halving per layer) reaches a 90 % reduction.
    "tiny": Architecture("tiny", "llava", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6,
                                           "num_attention_heads": 2, "image_size": 64, "patch_size": 4,
                                           "projection_dim": 64},
                         {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
                          "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512,
                          "max_position_embeddings": 2048},
                         (64, 64), description="tiny LLaVA-1.5-shaped model for CPU tests"),
    "tiny-next": Architecture("tiny-next", "llava_next", {"hidden_size": 64, "intermediate_size": 128,
                                                          "num_hidden_layers": 6, "num_attention_heads": 2,
                                                          "image_size": 32, "patch_size": 4, "projection_dim": 64},
                              {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
                               "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512,
                               "max_position_embeddings": 2048},
                              (64, 64), [[32, 64], [64, 32], [64, 64]],
                              description="tiny LLaVA-NeXT-shaped model for CPU tests (anyres 2x2 + base)"),
    "qwen2.5-vl-7b": Architecture("qwen2.5-vl-7b", "qwen2_5_vl", QWEN25_VIT, QWEN25_7B, (672, 672),
                                  description="Qwen2.5-VL-7B: windowed ViT + 2x2 merger (576 tokens at 672x672), "
                                              "Qwen2.5-7B, 3-D rotary positions"),
    "tiny-qwen": Architecture("tiny-qwen", "qwen2_5_vl",
                              dict(QWEN25_VIT, depth=4, hidden_size=64, intermediate_size=128, num_heads=2,
                                   patch_size=4, window_size=16, out_hidden_size=128, fullatt_block_indexes=[1, 3]),
                              {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
                               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
                               "max_position_embeddings": 2048,
                               "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                   "mrope_section": [4, 6, 6]}},
                              (64, 64), description="tiny Qwen2.5-VL-shaped model for CPU tests (8x8 merged tokens)"),
}


def get_architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r} (--arch); known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def special_ids(vocab_size: int) -> dict[str, int]:
    """Llama's <unk>/<s>/</s> at 0/1/2; the image placeholder and pad where llava-hf puts them for a 32064 vocab
    (32000, 32001), i.e. 64 and 63 ids from the end."""
    return {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": vocab_size - 64, "<pad>": vocab_size - 63}


def qwen_special_ids(vocab_size: int) -> dict[str, int]:
    """Qwen's special tokens where Qwen2.5-VL-7B puts them in its 152064 vocabulary (151643 ..), i.e. from 421 ids
    before the end on; the image placeholder is <|image_pad|>."""
    first = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
             "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}
    return {k: v - 152064 + vocab_size for k, v in first.items()}


def build_qwen_config(arch: Architecture, decoder_layers: int | None = None) -> Any:
    """Qwen2_5_VLConfig of an architecture (see ``build_config``)."""
    from transformers import Qwen2_5_VLConfig

    ids = qwen_special_ids(arch.text["vocab_size"])
    text = dict(arch.text, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    if decoder_layers is not None:
        if decoder_layers < 1:
            raise ValueError(f"decoder_layers={decoder_layers} must be at least 1")
        text["num_hidden_layers"] = decoder_layers
    return Qwen2_5_VLConfig(vision_config=dict(arch.vision), text_config=text, image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"], **arch.extra)


def build_config(arch: Architecture | str, decoder_layers: int | None = None) -> Any:
    """The transformers config (LlavaConfig / LlavaNextConfig) of an architecture. ``decoder_layers``: a shallower
    decoder of the same width (a smoke test of the real shapes on a small machine; FLOPs follow the real depth)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    arch = get_architecture(arch) if isinstance(arch, str) else arch
    if arch.family == "qwen2_5_vl":
        return build_qwen_config(arch, decoder_layers)
    ids = special_ids(arch.text["vocab_size"])
    text_kwargs = dict(arch.text)
    if decoder_layers is not None:
        if decoder_layers < 1:
            raise ValueError(f"decoder_layers={decoder_layers} must be at least 1")
        text_kwargs["num_hidden_layers"] = decoder_layers
    text = LlamaConfig(**text_kwargs, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])
    vision = CLIPVisionConfig(**arch.vision)
    side = arch.vision["image_size"] // arch.vision["patch_size"]
    common = dict(vision_config=vision, text_config=text, image_token_index=ids["<image>"],
                  projector_hidden_act="gelu", vision_feature_layer=arch.feature_layer,
                  vision_feature_select_strategy=arch.strategy, image_seq_length=side * side, **arch.extra)
    if arch.family == "llava":
        return LlavaConfig(**common)
    if arch.family == "llava_next":
        return LlavaNextConfig(**common, image_grid_pinpoints=arch.grid_pinpoints)
    raise ValueError(f"architecture {arch.name}: family {arch.family!r} is not 'llava', 'llava_next' or "
                     "'qwen2_5_vl'")


def build_qwen_tokenizer(vocab_size: int):
    """Word-level tokenizer over all ``vocab_size`` ids with Qwen's special tokens at Qwen's ids
    (``qwen_special_ids``), no BOS (as Qwen's), and ``QWEN_CHAT_TEMPLATE``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids = qwen_special_ids(vocab_size)
    words = list(dict.fromkeys(re.findall(r"\w+|[^\w\s]+", CORPUS + " system user assistant You are helpful")))
    vocab = dict(ids, **{"<unk>": 0})
    free = (i for i in range(vocab_size) if i not in vocab.values())
    for word in words + [f"<|w{i}|>" for i in range(vocab_size)]:
        if len(vocab) == vocab_size:
            break
        if word not in vocab:
            vocab[word] = next(free)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": [t for t in QWEN_SPECIALS if t != "<|endoftext|>"]})
    if tok.convert_tokens_to_ids("<|image_pad|>") != ids["<|image_pad|>"]:
        raise RuntimeError("the image placeholder did not keep its id; the tokenizer construction changed")
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def build_tokenizer(vocab_size: int):
    """Word-level tokenizer over all ``vocab_size`` ids: specials (see ``special_ids``), the words of ``CORPUS``,
    then filler tokens so that any generated id decodes. Adds BOS like Llama's; carries ``CHAT_TEMPLATE``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ids = special_ids(vocab_size)
    words = list(dict.fromkeys(re.findall(r"\w+|[^\w\s]+", CORPUS)))  # what the Whitespace pre-tokenizer splits
    vocab = dict(ids)
    free = (i for i in range(vocab_size) if i not in ids.values())
    for word in words + [f"<|w{i}|>" for i in range(vocab_size)]:
        if len(vocab) == vocab_size:
            break
        if word not in vocab:
            vocab[word] = next(free)
    if len(words) + len(ids) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is too small for the {len(words)} corpus words")
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", ids["<s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tok.convert_tokens_to_ids("<image>") != ids["<image>"]:
        raise RuntimeError("the image placeholder did not keep its id; the tokenizer construction changed")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_image_processor(arch: Architecture):
    """The Pil image processor of the family, sized for the vision tower (shortest edge, centre crop; Qwen: its
    patch and merge sizes, transformers' pixel bounds)."""
    if arch.family == "qwen2_5_vl":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        v = arch.vision
        factor = v["patch_size"] * v["spatial_merge_size"]
        return Qwen2VLImageProcessorPil(patch_size=v["patch_size"], merge_size=v["spatial_merge_size"],
                                        temporal_patch_size=v["temporal_patch_size"],
                                        size={"shortest_edge": 4 * factor * factor,
                                              "longest_edge": 16384 * factor * factor})
    size = arch.vision["image_size"]
    kwargs = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    if arch.family == "llava":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        return CLIPImageProcessorPil(**kwargs)
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(**kwargs, image_grid_pinpoints=arch.grid_pinpoints)


def default_dtype(device: str):
    """bf16 on a GPU, fp32 on CPU."""
    import torch

    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def build_adapter(name: str, device: str = "cpu", dtype=None, attn_implementation: str = "sdpa", seed: int = 0,
                  decoder_layers: int | None = None):
    """An adapter (LlavaAdapter / LlavaNextAdapter / Qwen25VLAdapter) around the architecture with random weights,
    created directly on ``device`` in ``dtype`` (default: ``default_dtype``), so a 7B model never exists in fp32 on
    the host. ``decoder_layers``: see ``build_config``."""
    import torch
    from transformers import (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
                              Qwen2_5_VLForConditionalGeneration)

    arch = get_architecture(name)
    dtype = dtype or default_dtype(device)
    config = build_config(arch, decoder_layers)
    cls = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration,
           "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}[arch.family]
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.eval().requires_grad_(False)
    if arch.family == "qwen2_5_vl":
        from compress.lvlm.qwen2_5_vl import Qwen25VLAdapter

        return Qwen25VLAdapter(model, build_qwen_tokenizer(arch.text["vocab_size"]), build_image_processor(arch),
                               f"<random {arch.name}>", chat_template=QWEN_CHAT_TEMPLATE)
    if arch.family == "llava_next":
        with torch.no_grad():  # the image newline may start as zeros/uninitialised: give it values like the rest
            model.model.image_newline.normal_(0, 0.02)
    tokenizer = build_tokenizer(arch.text["vocab_size"])
    processor = build_image_processor(arch)
    if arch.family == "llava":
        from compress.lvlm.llava import LlavaAdapter as Adapter
    else:
        from compress.lvlm.llava_next import LlavaNextAdapter as Adapter
    return Adapter(model, tokenizer, processor, f"<random {arch.name}>", chat_template=CHAT_TEMPLATE)


def random_image(height: int, width: int, seed: int = 0):
    """A PIL RGB image of uniform random pixels (height, width)."""
    import torch
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    return Image.frombytes("RGB", (width, height), pixels.numpy().tobytes())
