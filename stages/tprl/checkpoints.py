"""The tprl stage's checkpoints: policy, optimizer, iteration and RNG state in safetensors + JSON (nothing that
unpickles), written to a temporary directory and renamed; on any storage URI (pipeline.storage, docs/design.md §6.4)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline import storage
from pipeline.hashing import file_sha256

log = logging.getLogger("metacompress")

KEEP_CHECKPOINTS = 2


def save_checkpoint(directory: str | Path, iteration: int, policy, optimizer, meta: dict) -> str | Path:
    """``directory/ckpt-<iteration>``: tensors.safetensors (policy weights, optimizer tensors, torch RNG state) and
    state.json (the rest), written in a temporary directory and renamed; older ones beyond the last two removed."""
    import torch
    from safetensors.torch import save_file

    tensors = {f"policy.{k}": v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for idx, entry in opt["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    final = f"{directory}/ckpt-{iteration:06d}"
    with storage.staged_dir(final) as tmp:
        tmp = Path(tmp)
        save_file(tensors, str(tmp / "tensors.safetensors"))
        state = {**meta, "iteration": iteration, "spec": policy.spec(), "param_groups": opt["param_groups"],
                 "optimizer_scalars": scalars, "optimizer_entries": sorted(int(i) for i in opt["state"]),
                 "tensors_sha256": file_sha256(str(tmp / "tensors.safetensors"))}
        (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    for old in _checkpoints(directory)[:-KEEP_CHECKPOINTS]:
        storage.delete(f"{directory}/{old}")
    return _typed(final)


def _typed(uri: str) -> str | Path:
    """A local checkpoint as a Path (what callers of a local directory get), a remote one as its URI."""
    return uri if storage.is_remote(uri) else Path(uri)


def _checkpoints(directory: str | Path) -> list[str]:
    """Names of the finished checkpoints in ``directory``, oldest first (temporary names are not ``ckpt-*``)."""
    return [n for n in storage.listdir(str(directory)) if n.startswith("ckpt-") and ".tmp-" not in n]


def checkpoint_problem(path: str | Path) -> str | None:
    """None when ``path`` is a complete checkpoint whose tensors are the bytes its state.json recorded; else why
    not, naming the file. Only state.json (JSON) and tensors.safetensors are ever read (docs/design.md §8)."""
    try:
        state = json.loads(storage.read_bytes(f"{path}/state.json").decode("utf-8"))
    except FileNotFoundError:
        return f"{path}/state.json is missing"
    except ValueError as e:
        return f"{path}/state.json is not valid JSON ({e})"
    if not isinstance(state, dict) or not isinstance(state.get("tensors_sha256"), str):
        return f"{path}/state.json records no sha256 for its tensors"
    tensors = f"{path}/tensors.safetensors"
    if not storage.is_file(tensors):
        return f"{tensors} is missing"
    if storage.file_sha256(tensors) != state["tensors_sha256"]:
        return f"{tensors} changed after it was written (sha256 differs from state.json)"
    return None


def latest_checkpoint(directory: str | Path) -> str | Path | None:
    """The newest intact checkpoint; damaged or foreign ones are skipped with a warning naming the file."""
    for path in reversed([f"{directory}/{name}" for name in _checkpoints(directory)]):
        problem = checkpoint_problem(path)
        if problem is None:
            return _typed(path)
        log.warning("tprl: checkpoint refused: %s", problem)
    return None


def load_checkpoint(path: str | Path, make_optimizer) -> tuple[object, object, dict]:
    """-> (policy, optimizer built by ``make_optimizer(policy)`` with its saved state, state.json). Restores the
    torch RNG state."""
    import torch
    from safetensors.torch import load

    from compress.tprl import TPRLPolicy

    problem = checkpoint_problem(path)
    if problem:
        raise ValueError(f"tprl checkpoint refused: {problem}; delete {path} to start over")
    tensors = load(storage.read_bytes(f"{path}/tensors.safetensors"))
    state = json.loads(storage.read_bytes(f"{path}/state.json"))
    policy = TPRLPolicy.from_spec(state["spec"])
    policy.load_state_dict({k[len("policy."):]: v for k, v in tensors.items() if k.startswith("policy.")})
    optimizer = make_optimizer(policy)
    entries = {}
    for idx in state["optimizer_entries"]:
        prefix = f"optim.{idx}."
        entries[idx] = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        entries[idx].update(state["optimizer_scalars"].get(str(idx), {}))
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in state["param_groups"]]
    optimizer.load_state_dict({"state": entries, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    return policy, optimizer, state


def _save_policy_atomic(policy, directory: str) -> None:
    with storage.staged_dir(directory) as tmp:
        policy.save_pretrained(tmp)
