"""Learning from demonstrations: behaviour cloning of the TPRL policy on a heuristic teacher's trajectories.

The teacher is a per-token importance score supplied by the caller (the per-image oracle's column weights, the
attention a token receives from the prompt, ...). The public code used random scores, from which a policy can
only learn a constant keep rate; scores that depend on the image and prompt give the policy something to learn.

A demonstration is a multi-step trajectory: at step t the teacher keeps the highest-scored tokens among those still
present, down to ``keep_fractions[t]`` of the original count. The BC loss is the negative log-likelihood of the
teacher's actions under the policy's own action distribution (``joint_log_prob``, i.e. binary cross-entropy on the
discounted keep probability ``lambda^t p``), averaged per token, so that BC and PPO optimise the same distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from compress.tprl.policy import TPRLPolicy, joint_log_prob, pad_states


@dataclass
class Demonstration:
    """One image and prompt: x (n, d) features, query (d_query,), scores (n,) teacher importance (higher = keep)."""

    x: torch.Tensor
    query: torch.Tensor
    scores: torch.Tensor


def teacher_trajectory(scores: torch.Tensor, keep_fractions: Sequence[float] = (0.75, 0.5, 1 / 3),
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """scores (n,) -> per step (indices (K_t,) sorted original positions in the state, keep (K_t,) bool).

    ``keep_fractions``: decreasing shares of the original n kept after each step (default ends at 66.7 % removed,
    TPRL's headline rate). Every step keeps at least one token."""
    if any(not 0.0 < f <= 1.0 for f in keep_fractions) or list(keep_fractions) != sorted(keep_fractions, reverse=True):
        raise ValueError(f"teacher_trajectory: keep_fractions must be decreasing values in (0, 1], "
                         f"got {keep_fractions}")
    n = scores.shape[0]
    indices = torch.arange(n)
    steps = []
    for f in keep_fractions:
        k = max(1, round(n * f))
        local = torch.topk(scores[indices], min(k, len(indices))).indices
        keep = torch.zeros(len(indices), dtype=torch.bool)
        keep[local] = True
        steps.append((indices, keep))
        indices = indices[keep]
    return steps


def demonstration_steps(policy: TPRLPolicy, demos: Sequence[Demonstration],
                        keep_fractions: Sequence[float] = (0.75, 0.5, 1 / 3)) -> list[tuple]:
    """Flatten demonstrations into training steps (state (K, d_latent), query, step, kept_fraction, labels (K,))."""
    if len(keep_fractions) > policy.config.max_steps:
        raise ValueError(f"demonstrations: {len(keep_fractions)} teacher steps exceed PolicyConfig.max_steps="
                         f"{policy.config.max_steps}")
    rows = []
    for i, demo in enumerate(demos):
        if demo.scores.shape != demo.x.shape[:1]:
            raise ValueError(f"demonstration {i}: scores shape {tuple(demo.scores.shape)} does not match "
                             f"{demo.x.shape[0]} tokens")
        z = policy.encode(demo.x.to(policy.norm.weight.device)).cpu()
        n = demo.x.shape[0]
        for t, (indices, keep) in enumerate(teacher_trajectory(demo.scores.cpu(), keep_fractions)):
            rows.append((z[indices], demo.query.cpu(), t, len(indices) / n, keep))
    return rows


def bc_loss(policy: TPRLPolicy, rows: Sequence[tuple]) -> torch.Tensor:
    """Mean per-token negative log-likelihood of the teacher's actions over a list of demonstration steps."""
    device = policy.norm.weight.device
    states, mask = pad_states([r[0] for r in rows])
    labels, _ = pad_states([r[4][:, None] for r in rows])
    step = torch.tensor([r[2] for r in rows], dtype=torch.long, device=device)
    mask = mask.to(device)
    logits, _ = policy(states.to(device), torch.stack([r[1] for r in rows]).to(device), mask, step,
                       torch.tensor([r[3] for r in rows], device=device))
    log_lik = joint_log_prob(logits, labels[..., 0].bool().to(device), mask, step, policy.config.step_discount)
    return -log_lik.sum() / mask.sum()


def behaviour_cloning(policy: TPRLPolicy, demos: Sequence[Demonstration], epochs: int = 5, lr: float = 5e-5,
                      weight_decay: float = 0.01, batch_size: int = 128, max_grad_norm: float = 1.0,
                      keep_fractions: Sequence[float] = (0.75, 0.5, 1 / 3), seed: int = 0,
                      on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Fit the policy head and shared encoder to the teacher (AdamW, grad-clip); returns the loss per step."""
    rows = demonstration_steps(policy, demos, keep_fractions)
    _, actor = policy.actor_critic_parameters()
    optimizer = torch.optim.AdamW(actor, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    history: list[float] = []
    policy.train()
    for _ in range(epochs):
        order = torch.randperm(len(rows), generator=generator).tolist()
        for start in range(0, len(rows), batch_size):
            loss = bc_loss(policy, [rows[i] for i in order[start:start + batch_size]])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(actor, max_grad_norm)
            optimizer.step()
            history.append(loss.item())
            if on_step is not None:
                on_step(len(history), history[-1])
    policy.eval()
    return history
