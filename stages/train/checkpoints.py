"""The train stage's resume checkpoints in formats that cannot run code: safetensors + JSON (docs/design.md §8).

DeepSpeed's own ``engine.save_checkpoint`` writes ``torch.save`` pickles and ``load_checkpoint`` unpickles them
(``weights_only=False``): a file planted in the work directory would run on resume. Here every rank writes

* ``rank-<r>.safetensors``: the base optimizer's parameters (the rank's fp32 master partition under ZeRO, the
  module's own parameters without it), its tensor state (``exp_avg``, ``exp_avg_sq``, ``step``, ...) and the torch
  RNG state;
* ``rank-<r>.json``: run hash, step, world size, ZeRO stage, last metrics, the optimizer's param groups and
  non-tensor state, the sha256 of the safetensors file;

and rank 0 also ``compressor.safetensors`` (the full fp32 weights of the compressor, identical on every rank), with
its sha256 in ``rank-0.json``. Ray Train merges the ranks' files into one checkpoint directory.

Loading reads only those names, with ``json.loads`` and ``safetensors`` (neither runs code), checks every sha256,
the run hash and the world size; any other file in the directory is never opened. A checkpoint that fails a check
is refused with a warning naming the file and the run restarts from step 0 (the result does not depend on where it
resumed: the data order is a function of the step). Every rank takes the same decision (one all-reduce).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.hashing import file_sha256

log = logging.getLogger("metacompress")

FORMAT = "metacompress-train-checkpoint/1"
COMPRESSOR_FILE = "compressor.safetensors"


class CheckpointRefused(ValueError):
    """A resume checkpoint that is damaged, foreign or incomplete."""


def base_optimizer(engine):
    """The ``torch.optim`` optimizer under DeepSpeed's wrappers (ZeRO, bf16); the engine's own without them."""
    import torch

    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and getattr(opt, "optimizer", None) is not None:
        opt = opt.optimizer
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"cannot find the torch optimizer under {type(engine.optimizer).__name__}")
    return opt


def _flat_params(engine) -> list:
    """The tensors the base optimizer steps (its state is keyed by them): the rank's fp32 master partitions under
    ZeRO-3 / ZeRO-1/2 / the bf16 optimizer, the module's parameters without a wrapper. ZeRO-3 hands them to the
    optimizer only during its step, so they are taken from the wrapper, not from ``param_groups``."""
    wrapper = engine.optimizer
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        found = getattr(wrapper, name, None)
        if found:
            return list(found)
    return [p for group in base_optimizer(engine).param_groups for p in group["params"]]


def save(directory: str | Path, engine, module, rank: int, world: int, zero_stage: int, step: int, run_hash: str,
         metrics: dict, extra: dict | None = None) -> None:
    """Write this rank's part of the checkpoint into ``directory``. A collective: every rank must call it."""
    import torch
    from safetensors.torch import save_file

    from infra.deepspeed import full_fp32_state

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    full = full_fp32_state(module)  # collective under ZeRO
    opt = base_optimizer(engine)
    params = _flat_params(engine)
    tensors = {f"param.{i}": p.detach().cpu().contiguous().clone() for i, p in enumerate(params)}
    scalars: dict[str, dict] = {}
    entries = [i for i, p in enumerate(params) if opt.state.get(p)]
    for i in entries:
        for key, value in opt.state[params[i]].items():
            if torch.is_tensor(value):
                tensors[f"state.{i}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(i), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    name = f"rank-{rank}.safetensors"
    save_file(tensors, str(directory / name))
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    record = {"format": FORMAT, "run_hash": run_hash, "step": int(step), "rank": rank, "world_size": world,
              "zero_stage": int(zero_stage), "metrics": metrics, "extra": extra or {}, "param_groups": groups,
              "param_shapes": [list(p.shape) for p in params], "optimizer_scalars": scalars,
              "state_entries": entries, "files": {name: file_sha256(directory / name)}}
    if rank == 0:
        save_file({k: v.contiguous() for k, v in full.items()}, str(directory / COMPRESSOR_FILE))
        record["files"][COMPRESSOR_FILE] = file_sha256(directory / COMPRESSOR_FILE)
    (directory / f"rank-{rank}.json").write_text(json.dumps(record, indent=1, allow_nan=True) + "\n")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointRefused(f"{path} is missing")
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointRefused(f"{path} is not valid JSON ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointRefused(f"{path} is not a {FORMAT} record")
    return record


def _checked_tensors(directory: Path, name: str, record: dict) -> dict:
    from safetensors.torch import load_file

    path = directory / name
    expected = record.get("files", {}).get(name)
    if not path.is_file():
        raise CheckpointRefused(f"{path} is missing")
    if expected is None or file_sha256(path) != expected:
        raise CheckpointRefused(f"{path}: sha256 differs from the one recorded in its rank-*.json (damaged file)")
    try:
        return load_file(str(path))
    except Exception as e:  # a damaged header that still hashed to the record cannot happen; kept as a guard
        raise CheckpointRefused(f"{path} is not a readable safetensors file ({e})") from None


def read(directory: str | Path, rank: int, world: int, run_hash: str) -> tuple[dict, dict, dict]:
    """This rank's (record, tensors, compressor weights); raises ``CheckpointRefused`` naming the file at fault."""
    directory = Path(directory)
    record = _read_json(directory / f"rank-{rank}.json")
    head = record if rank == 0 else _read_json(directory / "rank-0.json")
    for r in (record, head):
        if r.get("run_hash") != run_hash:
            raise CheckpointRefused(f"{directory}: written by run {r.get('run_hash')!r}, not this run ({run_hash})")
        if r.get("world_size") != world:
            raise CheckpointRefused(f"{directory}: written by {r.get('world_size')} workers, this run has {world}")
    if head.get("step") != record.get("step"):
        raise CheckpointRefused(f"{directory}: ranks disagree on the step ({head.get('step')} vs {record.get('step')})")
    tensors = _checked_tensors(directory, f"rank-{rank}.safetensors", record)
    compressor = _checked_tensors(directory, COMPRESSOR_FILE, head)
    return record, tensors, compressor


def check_shapes(engine, module, record: dict, tensors: dict, compressor: dict) -> None:
    """Refuse a checkpoint whose tensors do not fit this engine (another ZeRO stage, model or world size)."""
    import torch

    params = _flat_params(engine)
    for i, p in enumerate(params):
        saved = tensors.get(f"param.{i}")
        if saved is None or tuple(saved.shape) != tuple(p.shape):
            raise CheckpointRefused(f"optimizer partition {i} has shape {None if saved is None else list(saved.shape)} "
                                    f"in the checkpoint, {list(p.shape)} here (another ZeRO stage or model)")
    if len(params) != len(record.get("param_shapes", [])) or "rng.torch" not in tensors:
        raise CheckpointRefused("the checkpoint's optimizer record does not match its tensors")
    named = dict(module.named_parameters())
    if set(named) != set(compressor):
        raise CheckpointRefused("the checkpoint's compressor tensors do not match this run's compressor")
    for key, param in named.items():
        shape = tuple(getattr(param, "ds_shape", None) or param.shape)
        if tuple(compressor[key].shape) != shape or not torch.isfinite(compressor[key]).all():
            raise CheckpointRefused(f"compressor tensor {key!r} in the checkpoint has shape "
                                    f"{list(compressor[key].shape)} or non-finite values; this run needs {list(shape)}")


def restore(engine, module, record: dict, tensors: dict, compressor: dict) -> None:
    """Put the saved state into a freshly initialised engine: the compressor's (16-bit or fp32) parameters on every
    rank, the base optimizer's master parameters and state, the RNG state, the engine's step counters."""
    import deepspeed
    import torch

    opt = base_optimizer(engine)
    params = _flat_params(engine)
    named = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(named.values()), modifier_rank=0):
        with torch.no_grad():
            for key, param in named.items():
                param.data.copy_(compressor[key].to(param.dtype))
    with torch.no_grad():
        for i, p in enumerate(params):
            p.data.copy_(tensors[f"param.{i}"].to(p.device, p.dtype))
    # the optimizer state, keyed by the master tensors it steps (torch's load_state_dict cannot be used: under
    # ZeRO-3 the param groups hold those tensors only during a step)
    opt.state.clear()
    for i in record["state_entries"]:
        prefix = f"state.{i}."
        entry = {}
        for key, value in tensors.items():
            if key.startswith(prefix):
                same_shape = tuple(value.shape) == tuple(params[i].shape)
                entry[key[len(prefix):]] = value.to(params[i].device) if same_shape else value
        entry.update(record["optimizer_scalars"].get(str(i), {}))
        opt.state[params[i]] = entry
    for group, saved in zip(opt.param_groups, record["param_groups"]):
        group.update({k: tuple(v) if k == "betas" else v for k, v in saved.items() if k != "params"})
    torch.set_rng_state(tensors["rng.torch"])
    engine.global_steps = int(record["step"])
    engine.global_samples = int(record["step"]) * engine.train_batch_size()
    # ZeRO-1/2 lazily link the optimizer state to per-parameter views on the first step; let them re-link.
    if hasattr(engine.optimizer, "_hp_optimizer_states_linked"):
        engine.optimizer._hp_optimizer_states_linked = False


def resume(checkpoint, engine, module, rank: int, world: int, run_hash: str) -> tuple[int, dict, dict]:
    """(step, metrics, extra) from a Ray Train checkpoint, or (0, {}, {}) when there is none or it is refused.
    A collective: every rank loads or every rank starts over."""
    import torch
    import torch.distributed as dist

    loaded, reason = None, ""
    if checkpoint is not None:
        try:
            with checkpoint.as_directory() as ckpt_dir:
                found = read(ckpt_dir, rank, world, run_hash)
            check_shapes(engine, module, *found)
            loaded = found
        except CheckpointRefused as e:
            reason = str(e)
    device = f"cuda:{torch.cuda.current_device()}" if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1 if loaded is not None else 0], dtype=torch.int64, device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if int(flag) == 0:
        if (checkpoint is not None and rank == 0) or reason:
            log.warning("train: checkpoint %s refused (%s); training this rate from step 0",
                        getattr(checkpoint, "path", checkpoint), reason or "another worker refused it")
        return 0, {}, {}
    record, tensors, compressor = loaded
    restore(engine, module, record, tensors, compressor)
    return int(record["step"]), dict(record.get("metrics", {})), dict(record.get("extra", {}))
