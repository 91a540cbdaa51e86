"""PPO for the TPRL policy: GAE, a rollout buffer of variable-size steps, and the clipped-ratio update.

Differences from the public TPRL code (docs/design.md §4.5.5) on purpose:
- the new log-probabilities come from the same ``joint_log_prob`` with the same per-step discount as when sampling,
  so the ratio is exactly 1 before the first optimiser step;
- minibatches mix steps with different token counts through padding and masks;
- actor and critic losses are summed and back-propagated once, then one optimiser step (with separate learning
  rates per parameter group): nothing is modified in place between two backward passes through the shared encoder.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from compress.tprl.policy import Episode, TPRLPolicy, mean_entropy, pad_states, token_log_probs


@dataclass
class PPOConfig:
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    epochs: int = 4
    minibatch_size: int = 16
    max_grad_norm: float = 0.5
    normalise_advantages: bool = True
    max_log_ratio: float = 20.0  # the joint ratio over hundreds of tokens can overflow exp(); clamp before it
    # "joint": one ratio per step on the joint log-probability of all its token actions (TPRL's formulation).
    # "per_token": one clipped ratio per token action, sharing the step's advantage (factorised PPO); the joint
    # ratio of K tokens leaves the clip range after per-token changes of only about clip / K.
    ratio: str = "joint"

    def validate(self) -> None:
        if self.ratio not in ("joint", "per_token"):
            raise ValueError(f"PPOConfig.ratio must be 'joint' or 'per_token', got {self.ratio!r}")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation for episodes that end (terminal, no bootstrap) at their last valid step.

    rewards, values (B, T); mask (B, T) bool, True on the episode's steps (a prefix of each row)
    -> (advantages (B, T), returns = advantages + values (B, T)), both 0 at padding.
    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``, with V and A = 0 after the end."""
    maskf = mask.to(rewards.dtype)
    values = values * maskf
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * maskf[:, t]
        next_value, next_advantage = values[:, t], advantages[:, t]
    return advantages, (advantages + values) * maskf


@dataclass
class Batch:
    """A padded minibatch of steps: states (B, K, d_latent), mask/actions (B, K) bool, query (B, d_query),
    old_token_log_prob (B, K), the rest (B,)."""

    states: torch.Tensor
    mask: torch.Tensor
    actions: torch.Tensor
    query: torch.Tensor
    step: torch.Tensor
    kept_fraction: torch.Tensor
    old_log_prob: torch.Tensor
    old_token_log_prob: torch.Tensor
    old_value: torch.Tensor
    advantage: torch.Tensor
    returns: torch.Tensor

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(**{k: v.to(device) for k, v in self.__dict__.items()})


class RolloutBuffer:
    """Steps of finished episodes with their GAE advantages and returns (computed when the episode is added)."""

    def __init__(self, gamma: float = 0.99, gae_lambda: float = 0.95) -> None:
        self.gamma, self.gae_lambda = gamma, gae_lambda
        self.states: list[torch.Tensor] = []
        self.actions: list[torch.Tensor] = []
        self.token_log_probs: list[torch.Tensor] = []
        self.rows: list[tuple] = []  # (query, step, kept_fraction, old_log_prob, old_value)
        self.advantages: list[float] = []
        self.returns: list[float] = []

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, episode: Episode) -> None:
        if not episode.steps:
            raise ValueError("RolloutBuffer.add: episode has no steps")
        rewards = torch.tensor([[s.reward for s in episode.steps]], dtype=torch.float64)
        values = torch.tensor([[s.value for s in episode.steps]], dtype=torch.float64)
        adv, ret = gae(rewards, values, torch.ones_like(rewards, dtype=torch.bool), self.gamma, self.gae_lambda)
        for s, a, r in zip(episode.steps, adv[0].tolist(), ret[0].tolist()):
            self.states.append(s.state)
            self.actions.append(s.actions)
            if s.token_log_probs is None:
                raise ValueError("RolloutBuffer.add: a step has no token_log_probs; "
                                 "sample episodes with sample_episodes")
            self.token_log_probs.append(s.token_log_probs)
            self.rows.append((episode.query, s.step, s.kept_fraction, s.log_prob, s.value))
            self.advantages.append(a)
            self.returns.append(r)

    def batch(self, idx: list[int], advantages: torch.Tensor) -> Batch:
        states, mask = pad_states([self.states[i] for i in idx])
        actions, _ = pad_states([self.actions[i][:, None] for i in idx])
        old_token, _ = pad_states([self.token_log_probs[i][:, None].double() for i in idx])
        rows = [self.rows[i] for i in idx]
        return Batch(states=states, mask=mask, actions=actions[..., 0].bool(),
                     query=torch.stack([r[0] for r in rows]),
                     step=torch.tensor([r[1] for r in rows], dtype=torch.long),
                     kept_fraction=torch.tensor([r[2] for r in rows]),
                     old_log_prob=torch.tensor([r[3] for r in rows], dtype=torch.float64),
                     old_token_log_prob=old_token[..., 0],
                     old_value=torch.tensor([r[4] for r in rows]),
                     advantage=advantages[idx], returns=torch.tensor([self.returns[i] for i in idx]))

    def minibatches(self, size: int, generator: torch.Generator | None = None,
                    normalise_advantages: bool = True) -> Iterator[Batch]:
        """One shuffled pass over the buffer in padded minibatches of ``size`` steps."""
        adv = torch.tensor(self.advantages)
        if normalise_advantages and len(adv) > 1:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        order = torch.randperm(len(self), generator=generator).tolist()
        for start in range(0, len(order), size):
            yield self.batch(order[start:start + size], adv)

    def clear(self) -> None:
        self.__init__(self.gamma, self.gae_lambda)


def make_optimizer(policy: TPRLPolicy, actor_lr: float = 1e-5, critic_lr: float = 3e-5,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW with two parameter groups: the value head at ``critic_lr``, everything else (shared encoder and policy
    head) at ``actor_lr``. The frozen autoencoder is left out."""
    critic, actor = policy.actor_critic_parameters()
    return torch.optim.AdamW([{"params": actor, "lr": actor_lr}, {"params": critic, "lr": critic_lr}],
                             weight_decay=weight_decay)


def ppo_loss(policy: TPRLPolicy, batch: Batch, cfg: PPOConfig) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """Total loss = clipped policy loss + value_coef * value MSE - entropy_coef * entropy
    -> (loss, stats, ratios: (B,) joint or the real tokens' (sum K,) per token)."""
    logits, values = policy(batch.states, batch.query, batch.mask, batch.step, batch.kept_fraction)
    step_discount = policy.config.step_discount
    new_token = token_log_probs(logits, batch.actions, batch.mask, batch.step, step_discount)
    if cfg.ratio == "joint":
        log_ratio = new_token.double().sum(-1) - batch.old_log_prob  # (B,)
        adv = batch.advantage
    else:
        log_ratio = (new_token.double() - batch.old_token_log_prob)[batch.mask]  # (real tokens,)
        adv = batch.advantage[:, None].expand_as(batch.mask)[batch.mask]
    log_ratio = log_ratio.clamp(-cfg.max_log_ratio, cfg.max_log_ratio)
    ratio = log_ratio.exp().to(logits.dtype)
    adv = adv.to(logits.dtype)
    policy_loss = -torch.min(ratio * adv, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv).mean()
    value_loss = (values - batch.returns.to(values.dtype)).pow(2).mean()
    entropy = mean_entropy(logits, batch.mask, batch.step, step_discount).mean()
    loss = policy_loss + cfg.value_coef * value_loss - cfg.entropy_coef * entropy
    with torch.no_grad():
        stats = {"policy_loss": policy_loss.item(), "value_loss": value_loss.item(), "entropy": entropy.item(),
                 "approx_kl": ((ratio - 1) - log_ratio.to(ratio.dtype)).mean().item(),
                 "clip_fraction": ((ratio - 1).abs() > cfg.clip).float().mean().item()}
    return loss, stats, ratio.detach()


def ppo_update(policy: TPRLPolicy, optimizer: torch.optim.Optimizer, buffer: RolloutBuffer, cfg: PPOConfig,
               generator: torch.Generator | None = None) -> dict[str, float | list[float]]:
    """``cfg.epochs`` passes over the buffer. Returns the mean of each loss statistic, and
    ``ratio_max_dev_per_epoch``: max |ratio - 1| in each epoch (0 up to rounding before the first optimiser step)."""
    cfg.validate()
    if len(buffer) == 0:
        raise ValueError("ppo_update: the rollout buffer is empty; add episodes first")
    device = policy.norm.weight.device
    policy.train()
    totals: dict[str, float] = {}
    count = 0
    ratio_dev: list[float] = []
    first_minibatch_dev = None
    for _ in range(cfg.epochs):
        epoch_dev = 0.0
        for batch in buffer.minibatches(cfg.minibatch_size, generator, cfg.normalise_advantages):
            loss, stats, ratio = ppo_loss(policy, batch.to(device), cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.max_grad_norm)
            optimizer.step()
            dev = (ratio - 1).abs().max().item()
            first_minibatch_dev = dev if first_minibatch_dev is None else first_minibatch_dev
            epoch_dev = max(epoch_dev, dev)
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
            count += 1
        ratio_dev.append(epoch_dev)
    policy.eval()
    out: dict[str, float | list[float]] = {k: v / count for k, v in totals.items()}
    out["ratio_max_dev_per_epoch"] = ratio_dev
    out["first_minibatch_ratio_max_dev"] = first_minibatch_dev
    return out
