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


# --- real-checkpoint tokenizers (docs/design.md §5): SentencePiece in Llama's legacy mode, byte-level BPE ----------
CORPUS = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the human's questions. USER: ASSISTANT: [INST] [/INST] What is the color "
          "of the car on the left? Is there a dog? Answer the question using a single word or phrase. yes no red "
          "blue two three").split(". ")


def sentencepiece_tokenizer(directory: str | Path):
    """A SentencePiece BPE model trained here (Llama's settings: dummy prefix, byte fallback, unk/bos/eos = 0/1/2),
    written as ``tokenizer.model`` with a Llama ``tokenizer_config.json`` (legacy=True, as llava-hf's LLaVA-1.5) and
    loaded with ``AutoTokenizer``; ``<image>`` and ``<pad>`` are added special tokens. -> tokenizer"""
    import io
    import json

    import sentencepiece as spm
    from transformers import AutoTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=buf, vocab_size=300, model_type="bpe", unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        split_digits=True, character_coverage=1.0, minloglevel=2)
    (directory / "tokenizer.model").write_bytes(buf.getvalue())
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    tok = AutoTokenizer.from_pretrained(str(directory))
    tok.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
    return tok


def byte_bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 style, no prefix space) trained here, BOS added like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<image>"])


def tiny_llava_for(tokenizer, family: str = "llava", num_layers: int = 2, seed: int = 0, text_model: str = "llama"):
    """A tiny LLaVA / LLaVA-NeXT model sized for ``tokenizer`` (vocabulary, image token id, BOS/EOS/pad ids);
    ``text_model`` "mistral" gives LLaVA-NeXT a Mistral text config (llava-v1.6-mistral). -> model"""
    import torch
    from transformers import (LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaNextConfig, LlavaNextForConditionalGeneration, MistralConfig)

    image_id = tokenizer.convert_tokens_to_ids("<image>")
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, initializer_range=0.2)
    text = MistralConfig(**common) if text_model == "mistral" else LlamaConfig(**common)
    torch.manual_seed(seed)
    if family == "llava":
        cfg = LlavaConfig(vision_config=_vision_config(32, 4), text_config=text, image_token_index=image_id,
                          image_seq_length=64, vision_feature_layer=-2, vision_feature_select_strategy="default")
        return LlavaForConditionalGeneration(cfg).eval()
    cfg = LlavaNextConfig(vision_config=_vision_config(16, 4), text_config=text, image_token_index=image_id,
                          image_grid_pinpoints=PINPOINTS, image_seq_length=16, vision_feature_layer=-2,
                          vision_feature_select_strategy="default")
    return LlavaNextForConditionalGeneration(cfg).eval()


# llava-hf/llava-1.5-7b-hf's chat template (no system prompt; answers end with a space, not </s>): what the hub ships.
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ item['text'] + ' '}}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def save_llava_hf(model_dir: str | Path, num_layers: int = 2, seed: int = 0) -> Path:
    """A tiny LLaVA-1.5 saved in the llava-hf layout: config.json + generation_config.json + model.safetensors, a
    SentencePiece tokenizer (tokenizer.model, tokenizer.json, tokenizer_config.json) with ``<image>``/``<pad>`` added,
    and a ``LlavaProcessor`` (processor_config.json, preprocessor_config.json with a CLIPImageProcessor, the hub's
    chat template). -> the directory"""
    from transformers import GenerationConfig, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model_dir = Path(model_dir)
    tok = sentencepiece_tokenizer(model_dir / "_sp")
    model = tiny_llava_for(tok, "llava", num_layers=num_layers, seed=seed)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(str(model_dir))
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=LLAVA_HF_TEMPLATE, patch_size=4,
                   vision_feature_select_strategy="default").save_pretrained(str(model_dir))
    import json
    import shutil

    # the hub's file set: preprocessor_config.json, chat_template.json, tokenizer.model, special_tokens_map.json
    image_processor.save_pretrained(str(model_dir))
    jinja = model_dir / "chat_template.jinja"
    (model_dir / "chat_template.json").write_text(json.dumps({"chat_template": jinja.read_text()}))
    jinja.unlink()
    shutil.copy(model_dir / "_sp" / "tokenizer.model", model_dir / "tokenizer.model")
    (model_dir / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "additional_special_tokens": ["<image>"]}))
    shutil.rmtree(model_dir / "_sp")
    return model_dir
