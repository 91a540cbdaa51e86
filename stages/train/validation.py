"""Held-out KL passes of the train stage: the periodic one on the validation split that picks the weights to keep
(early stopping, docs/design.md §4.2), and the one after training that reports them on the test split.

Both are collectives: every worker runs the same number of forwards (ZeRO-3 gathers weights in every forward), and
the sums are all-reduced, so every worker sees the same KL and takes the same decision.
"""

from __future__ import annotations

from dataclasses import dataclass


def kl_pass(engine, plan: dict, source, rate: float, rank: int, world: int, micro: int,
            methods: tuple[str, ...] = ("metacompress",)) -> dict:
    """Mean KL per answer token of each method over ``plan``'s dialogues, read from ``source`` (its examples) ->
    {method: kl, "tokens", "dialogues"}. Padding batches (a worker with fewer rows) run with weight 0."""
    import torch
    import torch.distributed as dist

    from stages.train.data import rank_shards

    rows = plan["shard_rows"]
    per_rank = [[(s, r) for s in rank_shards(len(rows), k, world) for r in range(rows[s])] for k in range(world)]
    batches = max(-(-len(keys) // micro) for keys in per_rank)
    mine = per_rank[rank]
    sums = torch.zeros(len(methods) + 2, dtype=torch.float64)  # kl*tokens per method, tokens, dialogues
    was_training = engine.training
    engine.eval()
    with torch.no_grad():
        for b in range(batches):
            keys = mine[b * micro:(b + 1) * micro]
            weight = 1.0 if keys else 0.0
            keys = keys or [(0, 0)]  # a dummy batch keeps the forwards in step
            examples = source.examples(keys)
            outs = [engine(examples, rate, method=m) for m in methods]
            tokens = outs[0]["tokens"]
            sums += torch.tensor([o["kl"].item() * tokens for o in outs] + [tokens, len(keys)],
                                 dtype=torch.float64) * weight
    if was_training:
        engine.train()
    if dist.is_initialized():
        dist.all_reduce(sums)
    tokens = max(float(sums[-2]), 1.0)
    return {**{m: float(sums[i]) / tokens for i, m in enumerate(methods)}, "tokens": float(sums[-2]),
            "dialogues": float(sums[-1])}


@dataclass
class EarlyStopping:
    """The best validation KL so far, the step it was reached at, and how many validations since then did not
    improve on it. ``patience`` 0 never stops (the best weights are still the ones kept). Each validation without a
    new best also multiplies ``lr_scale`` by ``decay`` (1: the learning rate never changes), as torch's
    ReduceLROnPlateau with patience 0 does. A validation that does not ``count`` (the warm-up share of the planned
    steps, Keras's ``start_from_epoch``) still records a new best but neither adds to ``stale`` nor decays."""

    patience: int = 0
    best_kl: float = float("inf")
    best_step: int = 0
    stale: int = 0
    decay: float = 1.0
    lr_scale: float = 1.0

    def update(self, kl: float, step: int, count: bool = True) -> bool:
        """Record one validation; True when it is a new best (strictly lower KL)."""
        if kl < self.best_kl:
            self.best_kl, self.best_step, self.stale = kl, step, 0
            return True
        if not count:
            return False
        self.stale += 1
        self.lr_scale *= self.decay
        return False

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.stale >= self.patience

    def to_dict(self) -> dict:
        return {"best_kl": self.best_kl, "best_step": self.best_step, "stale": self.stale, "lr_scale": self.lr_scale}

    @classmethod
    def from_dict(cls, patience: int, saved: dict | None, decay: float = 1.0) -> "EarlyStopping":
        saved = saved or {}
        return cls(patience, float(saved.get("best_kl", float("inf"))), int(saved.get("best_step", 0)),
                   int(saved.get("stale", 0)), decay, float(saved.get("lr_scale", 1.0)))


def set_lr(engine, lr: float) -> None:
    """Set the learning rate of every parameter group of the engine's optimizer (ZeRO's wrappers share the client
    optimizer's groups)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def load_weights(module, state: dict) -> None:
    """Copy the full ``state`` into ``module``'s parameters on every rank (gathered under ZeRO-3)."""
    import deepspeed
    import torch

    named = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(named.values()), modifier_rank=0):
        with torch.no_grad():
            for key, param in named.items():
                param.data.copy_(state[key].to(param.device, param.dtype))
