"""DeepSpeed for the compressor: the engine config built from ``TrainConfig`` and an engine that compiles nothing.

Why a client optimizer: DeepSpeed's own ``"optimizer"`` section maps AdamW to FusedAdam/CPUAdam, C++ ops that are
JIT-compiled for one to two minutes on first use (docs/design.md §10.2). A ``torch.optim`` optimizer passed to
``deepspeed.initialize`` with ``zero_allow_untested_optimizer`` compiles nothing, under every ZeRO stage.
Only the compressor's parameters reach the optimizer: the frozen LVLM gets no fp32 master copy and no state, and
under ZeRO-3 its weights (in ``model.dtype``) are partitioned across the workers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from pipeline.config import TrainConfig


def micro_batch_size(train: "TrainConfig", world_size: int) -> int:
    """Dialogues per worker per forward: ``train.batch_size`` (the global batch) = micro x accumulation x workers."""
    return batch_split(train, world_size)[0]


def batch_split(train: "TrainConfig", world_size: int) -> tuple[int, int]:
    """(micro batch per worker, gradient accumulation steps) over ``world_size`` workers; raises naming the keys."""
    import dataclasses

    from pipeline.config import batch_split as split

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return split(dataclasses.replace(train, num_workers=world_size))


def zero3_init_config(train: "TrainConfig", world_size: int, model_dtype: "torch.dtype",
                      persist_numel: int = 10_000) -> dict:
    """The config under which the frozen LVLM is built and loaded (transformers' ``HfDeepSpeedConfig``, docs/design.md
    §6.3): ZeRO-3, so ``from_pretrained`` creates every parameter already partitioned (``deepspeed.zero.Init``) and
    no worker ever holds the whole model. ``zero.Init`` casts what it creates to the config's half-precision mode, so
    that mode names ``model_dtype`` (fp32 otherwise): the LVLM keeps its dtype whatever the compressor's."""
    import torch

    config = ds_config(train, world_size, persist_numel)
    config["bf16"] = {"enabled": model_dtype == torch.bfloat16}
    config["fp16"] = {"enabled": model_dtype == torch.float16}
    return config


def ds_config(train: "TrainConfig", world_size: int, persist_numel: int = 10_000) -> dict:
    """The DeepSpeed config dict: ZeRO ``train.zero_stage``, ``train.grad_clip``, and DeepSpeed's bf16 mode only
    when ``train.compressor_dtype`` is bfloat16, on any device.

    Why not bf16 whenever there is a GPU: bf16 mode casts every parameter, so the compressor would compute in bf16
    while the saved compressor runs in its recorded dtype elsewhere (docs/design.md §6.3). In fp32 mode DeepSpeed
    casts nothing: the frozen LVLM keeps ``model.dtype`` as loaded, the compressor and its optimizer stay fp32.
    No ``optimizer`` / ``scheduler`` sections (see the module doc); ``train_batch_size`` is the global batch,
    micro batch x ``gradient_accumulation_steps`` x workers.
    ZeRO-3 keeps every parameter with fewer than ``persist_numel`` elements whole on each worker.
    """
    micro, accumulation = batch_split(train, world_size)
    zero: dict = {"stage": int(train.zero_stage)}
    if train.zero_stage == 3:
        zero.update({"stage3_param_persistence_threshold": int(persist_numel),
                     "stage3_gather_16bit_weights_on_model_save": False})
    if train.zero_stage in (1, 2):
        zero.update({"contiguous_gradients": True, "overlap_comm": False})
    config = {
        "train_batch_size": micro * accumulation * world_size,
        "train_micro_batch_size_per_gpu": micro,
        # engine.backward divides each micro batch's loss by this; engine.step steps the optimizer on every
        # accumulation-th call only
        "gradient_accumulation_steps": accumulation,
        # Value clipping is done by the client optimizer (make_optimizer); DeepSpeed clips only the global norm.
        "gradient_clipping": float(train.grad_clip) if train.clip_mode == "norm" else 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": train.compressor_dtype == "bfloat16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10 ** 9,  # progress goes to MLflow, not the log
        "wall_clock_breakdown": False,
    }
    return config


def make_optimizer(params, train: "TrainConfig") -> "torch.optim.Optimizer":
    """The client optimizer: SGD (the paper's, no momentum) or AdamW, both plain ``torch.optim``.

    With ``train.clip_mode == "value"`` its ``step`` first clamps every gradient element to ``[-grad_clip,
    grad_clip]``. Clamping is elementwise, so it gives the same result on ZeRO's flat partitions of the averaged
    gradient as on the whole gradient (docs/design.md §4.2).
    """
    import torch

    params = list(params)
    if not params:
        raise ValueError("no trainable parameters were given to the optimizer")
    if train.clip_mode not in ("norm", "value"):
        raise ValueError(f"train.clip_mode = {train.clip_mode!r}; use 'norm' or 'value'")
    if train.optimizer == "sgd":
        cls, kwargs = torch.optim.SGD, {}
    elif train.optimizer == "adamw":
        cls, kwargs = torch.optim.AdamW, {"weight_decay": 0.0}
    else:
        raise ValueError(f"train.optimizer = {train.optimizer!r}; use 'sgd' or 'adamw'")
    if train.clip_mode == "value" and train.grad_clip > 0:
        cls = _value_clipped(cls, float(train.grad_clip))
    return cls(params, lr=train.lr, **kwargs)


def _value_clipped(base: type, clip: float) -> type:
    """``base`` (a torch optimizer class) whose ``step`` clamps each gradient element to ``[-clip, clip]`` first."""
    import torch

    class ValueClipped(base):
        def step(self, closure=None):
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.clamp_(-clip, clip)
            return super().step(closure)

    ValueClipped.__name__ = ValueClipped.__qualname__ = f"ValueClipped{base.__name__}"
    return ValueClipped


def initialize(module: "torch.nn.Module", train: "TrainConfig", world_size: int, on_gpu: bool,
               persist_numel: int = 10_000):
    """Wrap ``module`` in a DeepSpeed engine whose optimizer sees only its trainable parameters.

    Expects a process group (Ray Train initialises gloo/nccl) or the RANK/WORLD_SIZE/MASTER_* variables.
    ``persist_numel``: under ZeRO-3, tensors smaller than this stay whole on every worker (no gather per use).
    Returns the engine; ``engine.optimizer`` is DeepSpeed's ZeRO wrapper around the client optimizer.
    """
    import deepspeed

    from pipeline.env import disable_deepspeed_shm_build

    disable_deepspeed_shm_build()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    trainable = [p for p in module.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=trainable,
                                           optimizer=make_optimizer(trainable, train),
                                           config=ds_config(train, world_size, persist_numel))
    return engine


def full_fp32_state(module: "torch.nn.Module") -> dict[str, "torch.Tensor"]:
    """The full fp32 tensors of ``module``'s trainable parameters (a submodule of the engine's), on the CPU.

    A collective under ZeRO (every rank must call it, in the same order): the master copies are partitioned
    (ZeRO-1/2 optimizer state, ZeRO-3 parameters). Without ZeRO the parameters themselves are returned.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param)  # None when no optimizer keeps a master copy (fp32, no ZeRO)
        state[name] = (param.detach() if full is None else full).float().cpu().clone()
    return state
