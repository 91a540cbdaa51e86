"""GPU memory per stage actor, from the model's shape and the config: will a job fit the cluster's GPUs?

Every figure is a count of bytes from tensor shapes (docs/design.md §6.4), for the largest input the stage can meet:

- weights: every parameter of the LVLM (vision tower, projector, LLM) in the stage's dtype; each actor loads the
  whole model; a training worker under ZeRO-3 holds ``1 / num_workers`` of it (partitioned as it loads) plus the
  parameters DeepSpeed gathers for the layers at work, at most ``stage3_max_live_parameters`` (DeepSpeed's default,
  ``ZERO3_LIVE_PARAMETERS``); the few vectors kept whole on every worker are left out;
- KV cache: ``2 * layers * kv_heads * head_dim * tokens * batch`` elements, tokens = the most visual tokens the
  model can produce (LLaVA-NeXT: base grid + the largest unpadded crop grid with its newline tokens) plus the text
  of every turn;
- prefill activations: one decoder layer's transients ``batch * tokens * (4 * hidden + 3 * intermediate)``;
- FastV: its ranking layer's float32 attention scores of the last query row, ``batch * heads * tokens``;
- train: activations kept for the backward pass through the frozen LLM on the reduced sequence
  (``34 * tokens * batch * hidden`` bytes per layer in 16-bit, Korthikanti et al. 2022 without the attention-score
  term, which SDPA does not store; with ``train.activation_checkpointing`` each layer keeps only its input, ``tokens *
  batch * hidden`` elements, and one layer at a time is recomputed in full) and the answer logits with their gradient
  in float32, at the micro batch per worker.

Qwen2.5-VL / Qwen2-VL have no fixed image size (dynamic resolution): the most visual tokens are ``max_pixels / (patch
* merge)**2``, ``max_pixels`` the processor's (its ``preprocessor_config.json``, or the one ``--arch`` builds) unless
``--max-pixels`` says otherwise; the plan states the figure it assumed.

The plan is a lower bound of what PyTorch allocates (allocator fragmentation and kernel workspaces come on top), so
a GPU counts as fitting only when the total stays under ``USABLE_SHARE`` of its memory less ``CUDA_CONTEXT``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 2**30
USABLE_SHARE = 0.9
CUDA_CONTEXT = 1.0 * GIB

# GPU type -> memory in GiB (the card's, as nvidia-smi reports it, rounded down).
GPUS = {"T4": 15, "A10G": 22, "L4": 22, "L40S": 44, "A100-40GB": 39, "A100-80GB": 79, "H100-80GB": 79, "H200": 139}
# EC2 instance family -> its GPU type (for ray_cluster.yaml's node types).
EC2_GPUS = {"g4dn": "T4", "g5": "A10G", "g6": "L4", "g6e": "L40S", "p4d": "A100-40GB", "p4de": "A100-80GB",
            "p5": "H100-80GB", "p5e": "H200", "p5en": "H200"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SYSTEM_TOKENS, QUESTION_TOKENS, TEMPLATE_TOKENS = 40, 24, 8
ZERO3_LIVE_PARAMETERS = 10**9  # DeepSpeed's stage3_max_live_parameters default: gathered elements kept at most
QWEN_FAMILIES = ("qwen2_5_vl", "qwen2_vl")


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, read from a LlavaConfig / LlavaNextConfig."""

    params: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    max_visual_tokens: int
    note: str = ""  # an assumption the figures rest on, printed with the plan

    @classmethod
    def of(cls, config, max_pixels: int | None = None) -> "ModelShape":
        """From a transformers config object (``AutoConfig.from_pretrained(dir)`` or ``build_config(arch)``);
        ``max_pixels``: the image size bound of a dynamic-resolution family (Qwen), required there."""
        if config.model_type in QWEN_FAMILIES:
            return cls._qwen(config, max_pixels)
        t, v = config.text_config, config.vision_config
        head_dim = t.hidden_size // t.num_attention_heads
        kv = getattr(t, "num_key_value_heads", None) or t.num_attention_heads
        per_layer = t.hidden_size * (t.hidden_size + 2 * kv * head_dim) + t.hidden_size ** 2 \
            + 3 * t.hidden_size * t.intermediate_size + 2 * t.hidden_size
        text = t.num_hidden_layers * per_layer + 2 * t.vocab_size * t.hidden_size + t.hidden_size
        side = v.image_size // v.patch_size
        # CLIP: per layer q/k/v/o and two MLP matrices with biases, two layer norms; then the patch embedding,
        # [CLS] and position embeddings, pre- and post-layernorm.
        vision = v.num_hidden_layers * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size
                                        + 9 * v.hidden_size + v.intermediate_size) \
            + 3 * v.patch_size ** 2 * v.hidden_size + (side * side + 2) * v.hidden_size + 4 * v.hidden_size
        projector = v.hidden_size * t.hidden_size + t.hidden_size ** 2 + 2 * t.hidden_size
        visual = side * side
        pinpoints = getattr(config, "image_grid_pinpoints", None)
        if pinpoints:
            projector += t.hidden_size  # the image_newline vector
            # base grid + the unpadded crop grid of an image of the pinpoint's own aspect, newline per row
            visual += max((h // v.patch_size) * (w // v.patch_size + 1) for h, w in pinpoints)
        return cls(text + vision + projector, t.num_hidden_layers, t.hidden_size, t.intermediate_size,
                   t.num_attention_heads, kv, t.vocab_size, visual)

    @classmethod
    def _qwen(cls, config, max_pixels: int | None) -> "ModelShape":
        """Qwen2.5-VL / Qwen2-VL: the parameters counted on the meta device (no weights), the visual tokens of an
        image of ``max_pixels`` (each token: a merge x merge square of patches)."""
        import torch
        import transformers

        if not max_pixels or max_pixels < 1:
            raise ValueError(f"{config.model_type}: dynamic resolution needs the processor's max_pixels; pass "
                             "--max-pixels N (e.g. 12845056, Qwen's default)")
        t, v = config.text_config, config.vision_config
        name = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration"}
        with torch.device("meta"):
            params = sum(p.numel() for p in getattr(transformers, name[config.model_type])(config).parameters())
        factor = v.patch_size * v.spatial_merge_size
        visual = max_pixels // factor ** 2
        kv = getattr(t, "num_key_value_heads", None) or t.num_attention_heads
        note = (f"{config.model_type} has dynamic resolution: images of at most {max_pixels} pixels (the "
                f"processor's max_pixels, or --max-pixels), i.e. at most {max_pixels} // {factor}^2 = {visual} visual "
                "tokens")
        return cls(params, t.num_hidden_layers, t.hidden_size, t.intermediate_size, t.num_attention_heads, kv,
                   t.vocab_size, visual, note)

    def kv_bytes(self, batch: int, tokens: int, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * (self.hidden // self.heads) * tokens * batch * dtype_bytes

    def prefill_bytes(self, batch: int, tokens: int, dtype_bytes: int) -> int:
        return batch * tokens * (4 * self.hidden + 3 * self.intermediate) * dtype_bytes + batch * self.vocab * 4


def text_tokens(turns: int, max_new_tokens: int) -> int:
    """Prompt text of a whole dialogue: the system prompt, then per turn a question, an answer and the template."""
    return SYSTEM_TOKENS + turns * (QUESTION_TOKENS + max_new_tokens + TEMPLATE_TOKENS)


@dataclass(frozen=True)
class StageMemory:
    stage: str
    batch: int
    tokens: int
    weights: int
    kv_cache: int
    activations: int
    fastv: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.fastv


def stage_memory(shape: ModelShape, config, turns: int = 3) -> list[StageMemory]:
    """Per-actor memory of every GPU stage for a ``PipelineConfig``."""
    dtype = DTYPE_BYTES[config.model.dtype]
    ev, tr = config.evaluate, config.train
    weights = shape.params * dtype
    full = shape.max_visual_tokens + text_tokens(turns, max(ev.max_new_tokens, config.teacher.max_new_tokens))
    # FastV (any K) reads the last query row of one eager layer
    fastv = ev.batch_size * shape.heads * full * 4 if any(m.startswith("fastv") for m in ev.methods) else 0
    rows = [
        StageMemory("extract", config.extract.batch_size, shape.max_visual_tokens, weights, 0,
                    shape.prefill_bytes(config.extract.batch_size, shape.max_visual_tokens, dtype), 0),
        StageMemory("teacher", ev.batch_size, full, weights, shape.kv_bytes(ev.batch_size, full, dtype),
                    shape.prefill_bytes(ev.batch_size, full, dtype), 0),
        StageMemory("evaluate", ev.batch_size, full, weights, shape.kv_bytes(ev.batch_size, full, dtype),
                    shape.prefill_bytes(ev.batch_size, full, dtype), fastv),
    ]
    # Training runs the LVLM in model.dtype (docs/design.md §6.3), on the sequence reduced at the smallest rate,
    # micro batch per worker; ZeRO-3 holds the worker's partition and the gathered layers.
    from pipeline.config import batch_split

    micro = batch_split(tr)[0]
    kept = math.ceil(shape.max_visual_tokens * (1 - min(tr.rates))) + text_tokens(turns, config.teacher.max_new_tokens)
    answers = turns * config.teacher.max_new_tokens
    layer = 34 * kept * micro * shape.hidden * dtype // 2  # one layer's activations kept for its backward
    kept_layers = shape.layers * kept * micro * shape.hidden * dtype + layer if tr.activation_checkpointing \
        else shape.layers * layer
    backward = kept_layers + 2 * micro * answers * shape.vocab * 4
    train_weights = weights
    if tr.zero_stage == 3:
        train_weights = -(-weights // tr.num_workers) + min(shape.params, ZERO3_LIVE_PARAMETERS) * dtype
    rows.append(StageMemory("train", micro, kept, train_weights, 0, backward, 0))
    return rows


def usable_bytes(gpu: str) -> int:
    return int(GPUS[gpu] * GIB * USABLE_SHARE - CUDA_CONTEXT)


def cluster_gpus(cluster: dict) -> dict[str, str]:
    """node type -> GPU type of a Ray cluster-launcher config (AWS InstanceType, or ``resources: {"GPU_TYPE": 1}``
    naming a key of GPUS); node types without a GPU are left out."""
    found = {}
    for name, node in (cluster.get("available_node_types") or {}).items():
        named = [k for k in (node.get("resources") or {}) if k in GPUS]
        family = str((node.get("node_config") or {}).get("InstanceType", "")).split(".")[0]
        if named:
            found[name] = named[0]
        elif family in EC2_GPUS:
            found[name] = EC2_GPUS[family]
    return found


def misfits(rows: list[StageMemory], gpu: str) -> list[StageMemory]:
    return [r for r in rows if r.total > usable_bytes(gpu)]


def advice(row: StageMemory, shape: ModelShape, config, gpu: str) -> str:
    """What to change so that ``row`` fits ``gpu``."""
    fits = [name for name in GPUS if row.total <= usable_bytes(name)]
    bigger = f"a GPU with more memory ({', '.join(fits)})" if fits else "a model that fits one GPU"
    if row.stage == "train":
        return ("set train.activation_checkpointing: true, a smaller train.micro_batch_size (with more "
                "gradient_accumulation_steps: the global batch stays), or train.zero_stage: 3 with more "
                f"train.num_workers (weights / workers), or use {bigger}")
    if config.model.dtype == "float32":
        return f"set model.dtype: bfloat16 (float32 doubles the weights and the KV cache), or use {bigger}"
    # teacher and evaluate share evaluate.batch_size: the advice must fit both
    key, sharing = ("extract.batch_size", {"extract"}) if row.stage == "extract" else \
        ("evaluate.batch_size", {"teacher", "evaluate"})
    for batch in range(row.batch - 1, 0, -1):
        rows = [r for r in stage_memory(shape, _with_batch(config, row.stage, batch)) if r.stage in sharing]
        if not misfits(rows, gpu):
            return f"set {key}: {batch} (or less), or use {bigger}"
    return f"use {bigger}"


def _with_batch(config, stage: str, batch: int):
    import copy

    changed = copy.deepcopy(config)
    (changed.extract if stage == "extract" else changed.evaluate).batch_size = batch
    return changed
