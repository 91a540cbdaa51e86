"""What every LVLM adapter shares: the tokenizer, the chat template, prompt segments, image-token embedding.

A dialogue is tokenised as segments ``S_1 a_1 S_2 a_2 ... S_T a_T``: ``S_t`` is the template text between answer
``t-1`` and answer ``t`` (``S_1`` holds the one image placeholder), ``a_t`` the answer's token ids (the model's own
generated ids, or a tokenised reference answer). Each segment is tokenised on its own, so the ids of a cached
prefix never change when a later turn is added: the condition for reusing the KV cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.layout import Layout

VQA_SUFFIX = "Answer the question using a single word or phrase."

# LLaVA-1.5's own conversation format (vicuna_v1), used only when the directory carries no chat template.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'][0]['text'] + ' ' }}"
    "{% elif m['role'] == 'user' %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% else %}ASSISTANT: {% for c in m['content'] %}"
    "{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")

_SENTINEL = "\u2063ANSWER{}\u2063"  # invisible separator: never produced by a template on its own


@dataclass
class EncodedImage:
    """``tokens``: X_IMG (n, d), the projected visual sequence right before the LLM (None before the vision
    tower ran). ``layout``: where each token sits. ``pixel_values``: the processor's output for this image
    ((1, 3, H, W) LLaVA; (1, K, 3, H, W) NeXT). ``image_size``: (height, width) of the original image."""

    tokens: torch.Tensor | None
    layout: Layout
    pixel_values: torch.Tensor
    image_size: tuple[int, int]


@dataclass
class VisualPositions:
    """Rotary positions of one image's visual tokens for a 3-D rotary family (docs/design.md §5), relative to the
    position where the image starts. ``offsets``: (k, 3) long, (t, h, w) of each token. ``span``: the positions the
    image consumes; the text after it starts at ``start + span`` whatever the reduction kept."""

    offsets: torch.Tensor
    span: int


def reduced_positions(full: VisualPositions, reduction, reducer=None) -> VisualPositions:
    """The positions of a feature reducer's output tokens (the rule of docs/design.md §5): a kept token
    (``keep_indices``) keeps its (t, h, w); a token of a reducer with ``positions_at_window_centres`` (MetaCompress, the
    per-image oracle) takes the position of its pooling window's centre, input token ``floor((i + 0.5) n / m)``; any
    other linear token (``matrix`` P (m, n), e.g. Spatial's window averages) the P-weighted mean of its inputs'
    positions, rounded half up. The span is the full image's."""
    n = full.offsets.shape[0]
    if reduction.keep_indices is not None:
        return VisualPositions(full.offsets[reduction.keep_indices.to(full.offsets.device).long()], full.span)
    if reduction.matrix is None:
        raise ValueError(f"reducer {reducer!r} returned neither keep_indices nor a matrix: the positions of its tokens "
                         "are unknown, so it cannot run on a 3-D rotary family")
    p = reduction.matrix.detach().double()
    if p.shape[1] != n:
        raise ValueError(f"reduction matrix has {p.shape[1]} columns but the image has {n} visual tokens")
    if getattr(reducer, "positions_at_window_centres", False):  # MetaCompress, the per-image oracle
        return window_centre_positions(full, p.shape[0])
    mean = (p @ full.offsets.to(p.device).double()) / p.sum(1, keepdim=True).clamp(min=1e-12)
    # a half-way mean (a window of even width) rounds up even when the weights' float error puts it a hair below
    return VisualPositions(torch.floor(mean + 0.5 + 1e-6).long().to(full.offsets.device), full.span)


def window_centre_positions(full: VisualPositions, m: int) -> VisualPositions:
    """MetaCompress's rule for 3-D rotary families: its token i takes the position of input token
    ``floor((i + 0.5) n / m)``, the centre of its pooling window, whatever P's rows hold."""
    from compress.metacompress import pool_windows

    centres = pool_windows(full.offsets.shape[0], m, 1)[0][:, 0].to(full.offsets.device)
    return VisualPositions(full.offsets[centres], full.span)


def load_image(image: Any):
    """A PIL image from a PIL image or a path; RGB. Raises ValueError naming the file when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist; pass the path of a readable image")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"image file {path} cannot be read as an image ({err}); pass a JPEG/PNG file") from err


def read_chat_template(model_dir: Path, tokenizer) -> str:
    """The model's own chat template: processor files first (chat_template.jinja / chat_template.json), then the
    tokenizer's; LLaVA-1.5's conversation format when the directory has none."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    js = model_dir / "chat_template.json"
    if js.is_file():
        return json.loads(js.read_text())["chat_template"]
    return getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE


class LVLMAdapter:
    """Base of the per-family adapters. Subclasses set ``family`` and implement ``preprocess``, ``encode`` and
    ``encode_reduced_vision``."""

    family = ""
    model_class = ""  # transformers' class for the family
    # Rotary positions (docs/design.md §5): 1 = consecutive 1-D positions over every fed token (LLaVA); 3 = (t, h, w)
    # multimodal positions (Qwen2.5-VL), where reduced visual tokens carry ``VisualPositions``.
    rope_dims = 1
    # What the family's vision side offers to the methods that need it (``compress.lvlm.methods.CAPABILITIES``).
    capabilities: frozenset = frozenset({"clip_tower", "cls"})

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, attn_implementation: str | None = None,
                        conversation: str = "auto") -> "LVLMAdapter":
        import transformers
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        # Straight onto the device (docs/design.md §6.4): with a device_map transformers builds the model on the meta
        # device and copies each tensor of the memory-mapped safetensors file to its place on ``device``, in
        # ``dtype``; a plain load followed by ``.to(device)`` held a whole host copy per actor first. Under a live
        # ZeRO-3 config (the train stage's, docs/design.md §6.3) transformers partitions each tensor as it loads and
        # places the partitions itself: a device_map is refused there.
        from transformers.integrations import is_deepspeed_zero3_enabled

        model = getattr(transformers, cls.model_class).from_pretrained(
            str(model_dir), dtype=dtype or torch.float32, attn_implementation=attn_implementation,
            use_safetensors=True, device_map=None if is_deepspeed_zero3_enabled() else {"": device})
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        return cls(model, tokenizer, cls.load_processor(model_dir, model.config), model_dir,
                   conversation=conversation)

    @classmethod
    def load_processor(cls, model_dir: Path, config):
        raise NotImplementedError

    def __init__(self, model: nn.Module, tokenizer, image_processor, model_dir: str | Path,
                 chat_template: str | None = None, conversation: str = "auto"):
        from compress.lvlm.decoder import attention_kernel

        attention_kernel(model.config.text_config)  # flash_attention_2 & co. refused by name
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_dir = Path(model_dir)
        # The conversation format (docs/design.md §5): an explicit template wins; otherwise the format the family
        # was trained with when the tokenizer can spell it, else the checkpoint's own template.
        if chat_template is not None:
            self.conversation, self.chat_template = "given", chat_template
        else:
            from compress.lvlm.conversation import resolve

            own = read_chat_template(self.model_dir, tokenizer)
            self.conversation, self.chat_template = resolve(
                conversation, self.family, getattr(model.config.text_config, "model_type", None), tokenizer, own,
                str(self.model_dir))
        self.image_token_id = int(model.config.image_token_id)
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if eos is None:
            eos = model.config.text_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self._list_content = True
        # LLaVA-1.5 was trained with the single-word instruction; a model whose tokenizer cannot spell it (most of
        # its tokens unknown, e.g. the word-level reference models) never saw it, and unknown tokens would only
        # confuse it.
        ids = tokenizer(VQA_SUFFIX, add_special_tokens=False).input_ids
        unknown = sum(i == tokenizer.unk_token_id for i in ids) if tokenizer.unk_token_id is not None else 0
        self.vqa_suffix = VQA_SUFFIX if 2 * unknown < len(ids) else None
        from compress.lvlm.conversation import check_rendering

        check_rendering(self.render(["q", "q"]), tokenizer, str(self.model_dir))

    # --- model parts -------------------------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        """The bare decoder (``LlamaModel``: embed_tokens, layers, norm, rotary_emb)."""
        return self.model.model.language_model

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def text_config(self):
        return self.model.config.text_config

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def reference_grid(self) -> tuple[int, int]:
        """The token grid MetaCompress's position table is stored at (docs/design.md §4.1): the vision tower's own."""
        vc = self.model.config.vision_config
        return vc.image_size // vc.patch_size, vc.image_size // vc.patch_size  # 24 x 24 for 336 px

    @property
    def feature_layer(self) -> int:
        layer = self.model.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"{self.model_dir}: vision_feature_layer={layer} is a list; vision-tower reducers need "
                             "one feature layer")
        return layer

    @property
    def select_strategy(self) -> str:
        return self.model.config.vision_feature_select_strategy

    def project(self, vision_features: torch.Tensor) -> torch.Tensor:
        """(..., C_vision) vision-tower features -> (..., d) LLM inputs through the model's projector."""
        return self.model.model.multi_modal_projector(vision_features)

    # --- prompts -----------------------------------------------------------------------------------------------
    def format_question(self, question: str, vqa: bool = True) -> str:
        """The user text of a turn; VQA prompts end with the single-word instruction (once), for models that know
        it (``vqa_suffix``)."""
        question = question.strip()
        if not question:
            raise ValueError("empty question: every turn needs a question text")
        if vqa and self.vqa_suffix and not question.endswith(self.vqa_suffix):
            question = f"{question}\n{self.vqa_suffix}"
        return question

    def _messages(self, questions: list[str], list_content: bool) -> list[dict]:
        msgs: list[dict] = []
        for t, q in enumerate(questions):
            if t:
                msgs.append({"role": "assistant", "content": [{"type": "text", "text": _SENTINEL.format(t - 1)}]
                             if list_content else _SENTINEL.format(t - 1)})
            if list_content:
                content = ([{"type": "image"}] if t == 0 else []) + [{"type": "text", "text": q}]
            else:
                content = (f"{self.image_token}\n" if t == 0 else "") + q
            msgs.append({"role": "user", "content": content})
        return msgs

    def render(self, questions: list[str]) -> str:
        """The chat-template text of ``questions`` (already formatted) with answer sentinels, ending with the
        generation prompt. Templates that want string content get ``"<image>\\n" + question``."""
        last_err: Exception | None = None
        for list_content in ([True, False] if self._list_content else [False]):
            try:
                text = self.tokenizer.apply_chat_template(
                    self._messages(questions, list_content), chat_template=self.chat_template, tokenize=False,
                    add_generation_prompt=True)
            except Exception as err:  # a template written for the other content format
                last_err = err
                continue
            if text.count(self.image_token) == 1:
                self._list_content = list_content
                return text
        raise ValueError(f"the chat template of {self.model_dir} did not render exactly one image placeholder "
                         f"{self.image_token!r} for the first user turn ({last_err}); give the directory a "
                         "chat_template.jinja that renders {'type': 'image'} content")

    def segment_texts(self, questions: list[str]) -> list[str]:
        """Texts ``S_1 .. S_T`` (see module doc). S_t is what follows answer t-1 in the rendering of the first t
        turns, up to the generation prompt: exactly the text the model saw when turn t was asked (a later
        rendering may differ in whitespace around the answer, which would break a cached prefix)."""
        segments = []
        for t in range(len(questions)):
            text = self.render(questions[: t + 1])
            if t:
                head, sep, text = text.partition(_SENTINEL.format(t - 1))
                if not sep:
                    raise ValueError(f"the chat template of {self.model_dir} dropped the assistant answer of turn {t}")
            segments.append(text)
        return segments

    def segment_ids(self, questions: list[str], vqa: bool = True) -> list[list[int]]:
        """Token ids of ``S_1 .. S_T``; S_1 starts with the tokenizer's own special tokens (BOS) and holds exactly
        one image token id; a question containing the image placeholder is an error."""
        qs = [self.format_question(q, vqa) for q in questions]
        for t, q in enumerate(qs):
            if self.image_token in q:
                raise ValueError(f"question of turn {t + 1} contains the image placeholder {self.image_token!r}")
        texts = self.segment_texts(qs)
        ids = [self.tokenizer(texts[0], add_special_tokens=True).input_ids]
        ids += [self.tokenizer(s, add_special_tokens=False).input_ids for s in texts[1:]]
        if ids[0].count(self.image_token_id) != 1:
            raise ValueError(f"{self.model_dir}: the first prompt tokenises to {ids[0].count(self.image_token_id)} "
                             f"image tokens (id {self.image_token_id}), expected 1: the tokenizer must keep "
                             f"{self.image_token!r} as one special token")
        return ids

    def answer_ids(self, answer: str | list[int]) -> list[int]:
        """A reference answer as the model would generate it (no special tokens); ids pass through unchanged."""
        if isinstance(answer, str):
            return self.answer_text_ids(answer.strip())
        return [int(i) for i in answer]

    # What the generation prompt ends with, and what precedes an answer after it (ChatML: "\n" and "\n").
    answer_anchor, answer_lead = ":", ": "

    def answer_text_ids(self, text: str) -> list[int]:
        """``text`` tokenised as it reads right after the generation prompt (``ASSISTANT:`` / ``[/INST]``) and a space:
        the ids of ``answer_lead + text`` past those of ``answer_anchor``. SentencePiece's dummy prefix and byte-level
        BPE's ``Ġ`` thus both give the word-initial pieces the whole-conversation tokenisation has (docs/design.md
        §5)."""
        tok = self.tokenizer
        anchor = tok(self.answer_anchor, add_special_tokens=False).input_ids
        both = tok(self.answer_lead + text, add_special_tokens=False).input_ids
        if both[: len(anchor)] == anchor:
            return both[len(anchor):]
        return tok(text, add_special_tokens=False).input_ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    # --- embedding ---------------------------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor, image_tokens: list[torch.Tensor | None]) -> torch.Tensor:
        """ids (B, L) with image token ids at the image positions; image_tokens[b] (k_b, d) or None.
        Returns (B, L, d): the token embeddings with row b's image positions replaced, in order, by image_tokens[b]
        (differentiable w.r.t. the image tokens)."""
        emb = self.model.get_input_embeddings()(ids)
        is_img = ids == self.image_token_id
        rows = []
        for b, tokens in enumerate(image_tokens):
            count = int(is_img[b].sum())
            k = 0 if tokens is None else tokens.shape[0]
            if count != k:
                raise ValueError(f"row {b}: {count} image token ids in the prompt but {k} image tokens given")
            if k:
                e = emb[b].clone()
                e[is_img[b]] = tokens.to(e.dtype)
                rows.append(e)
            else:
                rows.append(emb[b])
        return torch.stack(rows)

    # --- images (family specific) ------------------------------------------------------------------------------
    def preprocess(self, image) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def prepare(self, image) -> EncodedImage:
        raise NotImplementedError

    def features(self, prepared: EncodedImage) -> EncodedImage:
        raise NotImplementedError

    def encode(self, image) -> EncodedImage:
        """image (PIL or path) -> X_IMG (n, d) and its layout."""
        return self.features(self.prepare(image))

    def encode_reduced_vision(self, fn, encoded: EncodedImage, num_keep: int | None, **options) -> torch.Tensor:
        """Run a vision-tower reducer ``fn`` (see ``compress.baselines.vision``) on the image and project its
        features: -> (m, d) LLM inputs."""
        import inspect

        from compress.baselines.vision import feature_list

        if "family" in inspect.signature(fn).parameters:  # reducers defined for some families only say so
            options = {"family": self.family, **options}
        out = fn(self.model.model.vision_tower, encoded.pixel_values.to(self.device, self.dtype), num_keep,
                 self.feature_layer, self.select_strategy, **options)
        return self.project(feature_list(out)[0])

    # --- positions -----------------------------------------------------------------------------------------------
    def layout_positions(self, layout: Layout) -> VisualPositions | None:
        """The unreduced ``VisualPositions`` of an image of ``layout``; None for 1-D families (their visual tokens
        count on)."""
        return None

    def visual_positions(self, encoded: EncodedImage) -> VisualPositions | None:
        return self.layout_positions(encoded.layout)

    def positions_after(self, layout: Layout, reduction=None, reducer=None) -> VisualPositions | None:
        """What a stage passes as ``answer_logits_batch(image_positions=...)`` for one image of ``layout``: its tokens
        unreduced (``reduction`` None) or a reducer's ``Reduction`` of them (``reduced_positions``); None for 1-D
        families."""
        full = self.layout_positions(layout)
        if full is None or reduction is None:
            return full
        return reduced_positions(full, reduction, reducer)

    def rope_inputs(self, ids: torch.Tensor, mask: torch.Tensor,
                    positions: list[VisualPositions | None]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``decoder.forward``'s ``mrope`` for a prompt ids (B, L) (real where ``mask``) whose row b holds the
        visual tokens of ``positions[b]``: (offsets (B, L, 3), advance (B, L)); None for 1-D families."""
        if self.rope_dims == 1:
            return None
        is_img = (ids == self.image_token_id) & mask
        offsets = torch.zeros(*ids.shape, 3, dtype=torch.long, device=ids.device)
        advance = mask.long().clone()
        for b, pos in enumerate(positions):
            idx = is_img[b].nonzero()[:, 0]
            if not len(idx):
                continue
            if pos is None or pos.offsets.shape[0] != len(idx):
                raise ValueError(f"row {b}: {len(idx)} visual tokens in the prompt but positions for "
                                 f"{None if pos is None else pos.offsets.shape[0]}")
            offsets[b, idx] = pos.offsets.to(ids.device)
            advance[b, idx] = 0
            advance[b, idx[-1]] = pos.span
        return offsets, advance

    def full_forward_logits(self, ids: torch.Tensor, encoded: EncodedImage) -> torch.Tensor:
        """The model's own path: ``model(input_ids, pixel_values, ...)`` logits (1, L, V); ids hold n image ids.
        Used by tests as the independent reference."""
        raise NotImplementedError
