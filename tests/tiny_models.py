"""Tiny random LLaVA / LLaVA-NeXT models built from configs, with a tiny word-level tokenizer (no downloads).

Plain functions (not fixtures) so any test can use them:
``tiny_llava()``, ``tiny_llava_next()`` -> (model, tokenizer); ``save_tiny(dir, family)`` writes a loadable
checkpoint directory (model, tokenizer with chat template, image-processor config); ``random_image(h, w, seed)``.
"""

from __future__ import annotations

from pathlib import Path

WORDS = ("what is the color shape of in on at left right top bottom middle red green blue yellow circle square "
         "triangle star yes no one two three four how many are there which side answer question using a single "
         "word or phrase big small object").split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
PUNCT = ["USER", "ASSISTANT", ":", "?", ".", ","]
VOCAB = SPECIALS + PUNCT + WORDS
IMAGE_TOKEN_ID = 4

# LLaVA-1.5's conversation format written for structured content, as llava-hf processors use it.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def tiny_tokenizer():
    """Word-level tokenizer over ``VOCAB`` (whitespace/punctuation split, BOS added like Llama's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = CHAT_TEMPLATE
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID
    return tok


def _text_config(num_layers: int):
    from transformers import LlamaConfig

    # initializer_range 0.2: random logits spread enough that greedy argmax is not decided by float noise.
    return LlamaConfig(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2, initializer_range=0.2)


def _vision_config(image_size: int, patch_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(image_size=image_size, patch_size=patch_size, num_hidden_layers=2, hidden_size=32,
                            intermediate_size=64, num_attention_heads=2, projection_dim=32)


def tiny_llava(num_layers: int = 3, seed: int = 0, image_size: int = 32, patch_size: int = 4):
    """LLaVA-1.5-shaped model: (image_size/patch_size)^2 visual tokens (64 by default). -> (model, tokenizer)"""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(vision_config=_vision_config(image_size, patch_size), text_config=_text_config(num_layers),
                      image_token_index=IMAGE_TOKEN_ID, image_seq_length=(image_size // patch_size) ** 2,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(cfg).eval(), tiny_tokenizer()


PINPOINTS = [[16, 32], [32, 16], [32, 32]]


def tiny_llava_next(num_layers: int = 3, seed: int = 0):
    """LLaVA-NeXT-shaped model: 16x16 tiles of 4x4 patches (16 base tokens) and anyres crops up to 2x2 tiles.
    -> (model, tokenizer)"""
    import torch
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    cfg = LlavaNextConfig(vision_config=_vision_config(16, 4), text_config=_text_config(num_layers),
                          image_token_index=IMAGE_TOKEN_ID, image_grid_pinpoints=PINPOINTS, image_seq_length=16,
                          vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # the image newline is initialised to zeros/empty in some versions: make it distinct
        model.model.image_newline.normal_(0, 1.0)
    return model, tiny_tokenizer()


def tiny_image_processor(family: str):
    """The Pil image processor matching the tiny model's vision tower."""
    if family == "llava":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        return CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                      image_grid_pinpoints=PINPOINTS)


def save_tiny(model_dir: str | Path, family: str = "llava", num_layers: int = 3, seed: int = 0) -> Path:
    """Write a tiny checkpoint directory (config.json, model.safetensors, tokenizer + chat template,
    preprocessor_config.json) that ``compress.lvlm.load_adapter`` loads."""
    model_dir = Path(model_dir)
    model, tok = (tiny_llava if family == "llava" else tiny_llava_next)(num_layers=num_layers, seed=seed)
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    tiny_image_processor(family).save_pretrained(str(model_dir))
    return model_dir


def tiny_adapter(family: str = "llava", num_layers: int = 3, seed: int = 0):
    """An adapter around an in-memory tiny model (no directory round trip)."""
    if family == "llava":
        from compress.lvlm.llava import LlavaAdapter

        model, tok = tiny_llava(num_layers=num_layers, seed=seed)
        return LlavaAdapter(model, tok, tiny_image_processor("llava"), "<tiny-llava>")
    from compress.lvlm.llava_next import LlavaNextAdapter

    model, tok = tiny_llava_next(num_layers=num_layers, seed=seed)
    return LlavaNextAdapter(model, tok, tiny_image_processor("llava_next"), "<tiny-llava-next>")


def random_image(height: int = 32, width: int = 32, seed: int = 0):
    """A PIL RGB image of random pixels."""
    import torch
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    return Image.frombytes("RGB", (width, height), bytes(arr.flatten().tolist()))
