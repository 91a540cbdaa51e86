"""TPRL policy: per-token keep/drop decisions over the autoencoded visual tokens and the prompt, with a value head.

MDP (seed abstract; docs/design.md §4.5.2). State ``s_t = (Z_t, q, t)``: the latents of the tokens still kept, the
prompt query ``q`` (the mean input embedding of the prompt's text tokens, one vector of the LLM width) and the step.
Action: ``a_{t,i} ~ Bernoulli(lambda^t * p_{t,i})`` per token, ``p = sigmoid(logit)``, ``lambda`` = step discount
(0.5), so later steps prune harder. Kept tokens form the next state; at most ``max_steps`` (3) steps.

The log-probability of a step's actions is computed by ``joint_log_prob`` only, both when sampling and when updating
(the public code re-evaluated it with ``lambda = 1``, making the PPO ratio wrong for every step after the first).
At inference the decision is one-shot: the top-``m`` tokens by ``p`` at step 0, returned in their original order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from compress.layout import Layout
from compress.reduction import Reduction
from compress.tprl.autoencoder import TokenAutoencoder


POLICY_SPEC, POLICY_WEIGHTS = "policy.json", "model.safetensors"


@dataclass
class PolicyConfig:
    d_query: int                # width of the prompt embedding (the LLM hidden size)
    d_model: int = 256
    n_layers: int = 2
    n_heads: int = 8
    ffn_mult: int = 2
    dropout: float = 0.0        # > 0 makes sampling and update log-probs differ; keep 0 for PPO
    step_discount: float = 0.5  # lambda in Bernoulli(lambda^t p)
    max_steps: int = 3

    def validate(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"PolicyConfig: d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if not 0.0 < self.step_discount <= 1.0:
            raise ValueError(f"PolicyConfig: step_discount must be in (0, 1], got {self.step_discount}")
        if self.max_steps < 1:
            raise ValueError(f"PolicyConfig: max_steps must be >= 1, got {self.max_steps}")


class _Block(nn.Module):
    """Pre-norm transformer encoder layer with a key-padding mask (written out so that training and inference
    run the same arithmetic; torch's TransformerEncoder takes a different fast path in eval mode)."""

    def __init__(self, d: int, heads: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_mult * d), nn.GELU(), nn.Linear(ffn_mult * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """h (B, L, d), valid (B, L) bool: keys that may be attended to -> (B, L, d)."""
        b, length, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :],
                                           dropout_p=self.dropout if self.training else 0.0)
        h = h + self.drop(self.out(a.transpose(1, 2).reshape(b, length, d)))
        return h + self.drop(self.ffn(self.norm2(h)))


class TPRLPolicy(nn.Module):
    """Actor-critic over autoencoded tokens. The autoencoder is frozen (trained beforehand by ``fit_autoencoder``)."""

    def __init__(self, config: PolicyConfig, autoencoder: TokenAutoencoder) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        d = config.d_model
        self.state_in = nn.Sequential(nn.LayerNorm(autoencoder.d_latent), nn.Linear(autoencoder.d_latent, d))
        self.query_in = nn.Sequential(nn.LayerNorm(config.d_query), nn.Linear(config.d_query, d))
        # The query token also carries the step and the share of tokens left: the value of a state depends on both.
        self.step_embedding = nn.Embedding(config.max_steps, d)
        self.fraction_in = nn.Linear(1, d)
        self.blocks = nn.ModuleList(_Block(d, config.n_heads, config.ffn_mult, config.dropout)
                                    for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(d)
        # Each token's head also sees the query token's output, so keep/drop can depend on the prompt directly
        # rather than only through what attention mixed into the token.
        self.policy_head = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, 1))
        self.value_head = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, 1))
        # Start from p = 0.5 for every token and V = 0.
        for head in (self.policy_head, self.value_head):
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)

    def train(self, mode: bool = True) -> "TPRLPolicy":
        super().train(mode)
        self.autoencoder.eval()  # frozen
        return self

    def actor_critic_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(value-head parameters, every other trainable parameter), e.g. for separate learning rates."""
        critic = list(self.value_head.parameters())
        ids = {id(p) for p in critic}
        actor = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return critic, actor

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Visual features x (..., d) -> compact states z (..., d_latent) with the frozen autoencoder."""
        return self.autoencoder.encode(x)

    def forward(self, states: torch.Tensor, query: torch.Tensor, mask: torch.Tensor, step: torch.Tensor,
                kept_fraction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """states (B, K, d_latent) padded, query (B, d_query), mask (B, K) bool (True = real token), step (B,) long,
        kept_fraction (B,) = K_t / n -> (logits (B, K), 0 at padding; values (B,))."""
        dtype = self.norm.weight.dtype
        tokens = self.state_in(states.to(dtype))
        q = (self.query_in(query.to(dtype)) + self.step_embedding(step)
             + self.fraction_in(kept_fraction.to(dtype)[:, None]))
        h = torch.cat([q[:, None], tokens], 1)
        valid = torch.cat([torch.ones_like(mask[:, :1]), mask], 1)
        for block in self.blocks:
            h = block(h, valid)
        h = self.norm(h)
        tokens, q = h[:, 1:], h[:, 0]
        logits = self.policy_head(torch.cat([tokens, q[:, None].expand_as(tokens)], -1)).squeeze(-1)
        logits = logits.masked_fill(~mask, 0.0)
        weights = mask.to(dtype)[..., None]
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        values = self.value_head(torch.cat([q, pooled], -1)).squeeze(-1)
        return logits, values

    @torch.no_grad()
    def keep_probs(self, x: torch.Tensor, query: torch.Tensor, step: int = 0, kept_fraction: float = 1.0,
                   states: torch.Tensor | None = None) -> torch.Tensor:
        """Undiscounted keep probabilities p of the tokens x (k, d) (or their latents ``states`` (k, d_latent)) at
        ``step`` with ``kept_fraction`` = k / n of the image's tokens left, query (d_query,) -> p (k,)."""
        states = (self.encode(x) if states is None else states)[None]
        mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        logits, _ = self(states, query[None], mask, torch.tensor([step], device=states.device),
                         torch.tensor([kept_fraction], device=states.device))
        return torch.sigmoid(logits[0])

    def spec(self) -> dict:
        """Everything but the weights needed to rebuild this module (``from_spec``) and load a state dict into it."""
        return {"policy": asdict(self.config), "autoencoder": self.autoencoder.config()}

    def save_pretrained(self, directory) -> None:
        """``directory``/policy.json (the spec) and ``model.safetensors`` (every weight and buffer, float32)."""
        import json
        from pathlib import Path

        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(path / POLICY_WEIGHTS))
        (path / POLICY_SPEC).write_text(json.dumps(self.spec(), indent=1) + "\n")

    @classmethod
    def from_pretrained(cls, directory, map_location: str | torch.device = "cpu") -> "TPRLPolicy":
        """The policy saved by ``save_pretrained`` (safetensors only, nothing unpickled), in eval mode."""
        import json
        from pathlib import Path

        from safetensors.torch import load_file

        path = Path(directory)
        if not (path / POLICY_SPEC).is_file() or not (path / POLICY_WEIGHTS).is_file():
            raise FileNotFoundError(f"{path}: not a TPRL policy directory ({POLICY_SPEC} + {POLICY_WEIGHTS}); "
                                    "run the tprl stage or save one with TPRLPolicy.save_pretrained")
        policy = cls.from_spec(json.loads((path / POLICY_SPEC).read_text()))
        policy.load_state_dict(load_file(str(path / POLICY_WEIGHTS)))
        return policy.to(map_location).eval()

    @classmethod
    def from_spec(cls, spec: dict) -> "TPRLPolicy":
        try:
            return cls(PolicyConfig(**spec["policy"]), TokenAutoencoder(**spec["autoencoder"]))
        except (KeyError, TypeError) as error:
            raise ValueError(f"TPRLPolicy.from_spec: bad spec {spec!r} ({error}); expected the dict of "
                             "TPRLPolicy.spec()") from None


# ---- action distribution: the one place where log-probabilities are computed ------------------------------------

def _log_probs(logits: torch.Tensor, step: torch.Tensor, step_discount: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, K), step (B,) -> (log q, log(1 - q)), each (B, K), with q = lambda^t * sigmoid(logit).

    log(1 - lambda^t s(l)) = logaddexp(log(1 - lambda^t), -l) - softplus(-l): exact and stable for every t
    (at t = 0 the first term is -inf and this is logsigmoid(-l))."""
    log_discount = step.to(logits.dtype) * math.log(step_discount)
    log_q = F.logsigmoid(logits) + log_discount[:, None]
    log_1m_discount = torch.log1p(-torch.exp(log_discount))
    log_1mq = torch.logaddexp(log_1m_discount[:, None].expand_as(logits), -logits) - F.softplus(-logits)
    return log_q, log_1mq


def token_log_probs(logits: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor, step: torch.Tensor,
                    step_discount: float) -> torch.Tensor:
    """Per-token log-probability of the keep/drop actions: logits, actions (bool), mask (B, K); step (B,) -> (B, K),
    0 at padding. The one place where action log-probabilities are computed (sampling, PPO, BC)."""
    log_q, log_1mq = _log_probs(logits, step, step_discount)
    per_token = torch.where(actions, log_q, log_1mq)
    return torch.where(mask, per_token, torch.zeros_like(per_token))


def joint_log_prob(logits: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor, step: torch.Tensor,
                   step_discount: float) -> torch.Tensor:
    """Log-probability of all the keep/drop actions of a step (the joint Bernoulli action): -> (B,)."""
    return token_log_probs(logits, actions, mask, step, step_discount).sum(-1)


def mean_entropy(logits: torch.Tensor, mask: torch.Tensor, step: torch.Tensor, step_discount: float) -> torch.Tensor:
    """Mean Bernoulli entropy per real token of a step's action distribution: (B, K) -> (B,)."""
    log_q, log_1mq = _log_probs(logits, step, step_discount)
    q = log_q.exp()
    h = -(q * log_q + (1 - q) * log_1mq)
    h = torch.where(mask, h, torch.zeros_like(h))
    return h.sum(-1) / mask.sum(-1).clamp_min(1)


def pad_states(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Different token counts per step: [(K_i, d)] -> (padded (B, K_max, d), mask (B, K_max) bool)."""
    k_max = max(s.shape[0] for s in states)
    out = states[0].new_zeros(len(states), k_max, states[0].shape[1])
    mask = torch.zeros(len(states), k_max, dtype=torch.bool, device=states[0].device)
    for i, s in enumerate(states):
        out[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = True
    return out, mask


# ---- reward and episodes ------------------------------------------------------------------------------------------

def step_reward(correct_after: float, correct_before: float, share_removed: float, b: float = 0.1) -> float:
    """TPRL reward of one step: change in answer correctness plus ``b`` times the share of tokens removed."""
    return (correct_after - correct_before) + b * share_removed


@dataclass
class Step:
    """One decision. ``indices`` (K_t,): original positions of the tokens in the state; ``state`` (K_t, d_latent);
    ``actions`` (K_t,) bool keep; ``log_prob`` (joint) / ``token_log_probs`` / ``value`` as computed when sampling."""

    step: int
    indices: torch.Tensor
    state: torch.Tensor
    actions: torch.Tensor
    kept_fraction: float
    log_prob: float
    value: float
    reward: float = 0.0
    token_log_probs: torch.Tensor | None = None  # (K_t,), sums to log_prob


@dataclass
class Episode:
    """A multi-step pruning trajectory of one image and prompt. ``scores[t]``: correctness with the tokens kept after
    ``t`` steps (``scores[0]``: all tokens). ``kept`` (K_T,): sorted original indices kept at the end."""

    n: int
    query: torch.Tensor
    steps: list[Step] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    kept: torch.Tensor | None = None

    @property
    def total_reward(self) -> float:
        return sum(s.reward for s in self.steps)


def episode_to_tensors(episode: Episode) -> dict[str, torch.Tensor]:
    """Flat tensors (for safetensors / Arrow, never pickles) with the steps' variable-size parts concatenated:
    ``sizes`` (T,) = K_t; ``indices``, ``actions``, ``token_log_probs`` (sum K_t,); ``states`` (sum K_t, d_latent)."""
    steps = episode.steps
    cat = (lambda name: torch.cat([getattr(s, name) for s in steps])) if steps else None
    return {
        "n": torch.tensor([episode.n]), "query": episode.query,
        "scores": torch.tensor(episode.scores, dtype=torch.float64),
        "kept": episode.kept if episode.kept is not None else torch.arange(episode.n),
        "sizes": torch.tensor([len(s.indices) for s in steps], dtype=torch.long),
        "step": torch.tensor([s.step for s in steps], dtype=torch.long),
        "kept_fraction": torch.tensor([s.kept_fraction for s in steps], dtype=torch.float64),
        "log_prob": torch.tensor([s.log_prob for s in steps], dtype=torch.float64),
        "value": torch.tensor([s.value for s in steps], dtype=torch.float64),
        "reward": torch.tensor([s.reward for s in steps], dtype=torch.float64),
        "indices": cat("indices") if steps else torch.zeros(0, dtype=torch.long),
        "actions": cat("actions") if steps else torch.zeros(0, dtype=torch.bool),
        "token_log_probs": cat("token_log_probs") if steps else torch.zeros(0),
        "states": cat("state") if steps else torch.zeros(0, 0),
    }


def episode_from_tensors(t: dict[str, torch.Tensor]) -> Episode:
    """Inverse of ``episode_to_tensors``."""
    missing = {"n", "query", "scores", "kept", "sizes", "step", "kept_fraction", "log_prob", "value", "reward",
               "indices", "actions", "token_log_probs", "states"} - set(t)
    if missing:
        raise ValueError(f"episode_from_tensors: missing keys {sorted(missing)}; write them with episode_to_tensors")
    sizes = t["sizes"].tolist()
    parts = {k: torch.split(t[k], sizes) for k in ("indices", "actions", "token_log_probs", "states")}
    steps = [Step(int(t["step"][i]), parts["indices"][i], parts["states"][i], parts["actions"][i].bool(),
                  float(t["kept_fraction"][i]), float(t["log_prob"][i]), float(t["value"][i]), float(t["reward"][i]),
                  parts["token_log_probs"][i]) for i in range(len(sizes))]
    return Episode(n=int(t["n"][0]), query=t["query"], steps=steps, scores=t["scores"].tolist(), kept=t["kept"])


ScoreFn = Callable[[torch.Tensor], float]
BatchScoreFn = Callable[[list[tuple[int, torch.Tensor]]], Sequence[float]]


def sample_episode(policy: TPRLPolicy, x: torch.Tensor, query: torch.Tensor, score_fn: ScoreFn, b: float = 0.1,
                   score_full: float | None = None, share_of: str = "original", max_steps: int | None = None,
                   generator: torch.Generator | None = None) -> Episode:
    """One image: x (n, d), query (d_query,), ``score_fn(kept (k,) sorted long) -> float``. See ``sample_episodes``."""
    return sample_episodes(policy, [x], [query], lambda items: [score_fn(kept) for _, kept in items], b,
                           None if score_full is None else [score_full], share_of, max_steps, generator)[0]


@torch.no_grad()
def sample_episodes(policy: TPRLPolicy, xs: Sequence[torch.Tensor], queries: Sequence[torch.Tensor],
                    score_fn: BatchScoreFn, b: float = 0.1, score_full: Sequence[float] | None = None,
                    share_of: str = "original", max_steps: int | None = None,
                    generator: torch.Generator | None = None) -> list[Episode]:
    """Roll out the pruning MDP on a batch of images; the policy runs once per step on all unfinished episodes.

    xs: [(n_i, d)] features, queries: [(d_query,)]. ``score_fn([(i, kept (k,) sorted long), ...]) -> [float]`` answers
    episode i's prompt with only the ``kept`` tokens and scores the answer (1/0 correct, or a soft accuracy); a batch
    so that the LVLM can generate for several pruned images at once. ``score_full``: the all-token scores if known.
    ``share_of``: "original" measures the removed share against n, so an episode's rewards sum to
    ``score_T - score_0 + b * (1 - K_T / n)``; "previous" uses ``1 - K_t / K_{t-1}`` (the public code's choice).
    An episode ends after ``max_steps`` steps or when no token is left (``score_fn`` must accept an empty set).
    """
    if share_of not in ("original", "previous"):
        raise ValueError(f"sample_episodes: share_of must be 'original' or 'previous', got {share_of!r}")
    if len(xs) != len(queries) or (score_full is not None and len(score_full) != len(xs)):
        raise ValueError(f"sample_episodes: {len(xs)} images, {len(queries)} queries"
                         + ("" if score_full is None else f", {len(score_full)} full scores") + "; one each expected")
    cfg = policy.config
    max_steps = cfg.max_steps if max_steps is None else max_steps
    if not 1 <= max_steps <= cfg.max_steps:
        raise ValueError(f"sample_episodes: max_steps={max_steps} outside 1..{cfg.max_steps} (PolicyConfig.max_steps)")
    device = policy.norm.weight.device
    latents = [policy.encode(x.to(device)) for x in xs]
    episodes = [Episode(n=x.shape[0], query=q.detach().cpu()) for x, q in zip(xs, queries)]
    current = [torch.arange(x.shape[0]) for x in xs]
    full = score_fn([(i, c) for i, c in enumerate(current)]) if score_full is None else score_full
    for episode, s in zip(episodes, full):
        episode.scores.append(float(s))
    active = list(range(len(xs)))
    for t in range(max_steps):
        states, mask = pad_states([latents[i][current[i].to(device)] for i in active])
        step = torch.full((len(active),), t, dtype=torch.long, device=device)
        fraction = torch.tensor([len(current[i]) / episodes[i].n for i in active], device=device)
        query = torch.stack([queries[i] for i in active]).to(device)
        logits, values = policy(states, query, mask, step, fraction)
        log_q, _ = _log_probs(logits, step, cfg.step_discount)
        uniform = torch.rand(log_q.shape, generator=generator).to(device=device, dtype=log_q.dtype)
        actions = (uniform < log_q.exp()) & mask
        per_token = token_log_probs(logits, actions, mask, step, cfg.step_discount)
        log_probs = per_token.sum(-1).tolist()
        kept = {i: current[i][actions[j, : len(current[i])].cpu()] for j, i in enumerate(active)}
        scores = score_fn([(i, kept[i]) for i in active])
        for j, i in enumerate(active):
            episode, k_before, k_after = episodes[i], len(current[i]), len(kept[i])
            episode.scores.append(float(scores[j]))
            removed = (k_before - k_after) / (episode.n if share_of == "original" else k_before)
            episode.steps.append(Step(t, current[i], states[j, :k_before].cpu(), actions[j, :k_before].cpu(),
                                      k_before / episode.n, log_probs[j], values[j].item(),
                                      step_reward(episode.scores[-1], episode.scores[-2], removed, b),
                                      per_token[j, :k_before].cpu()))
            current[i] = kept[i]
        active = [i for i in active if len(current[i]) > 0]
        if not active:
            break
    for episode, c in zip(episodes, current):
        episode.kept = c
    return episodes


# ---- inference ----------------------------------------------------------------------------------------------------

def top_k_sorted(probs: torch.Tensor, num_keep: int) -> torch.Tensor:
    """probs (n,) -> the indices (num_keep,) of the largest probabilities, in increasing (spatial) order."""
    if not 1 <= num_keep <= probs.shape[0]:
        raise ValueError(f"num_keep={num_keep} must be in 1..{probs.shape[0]} (the number of tokens)")
    return torch.topk(probs, num_keep).indices.sort().values


def progressive_counts(n: int, num_keep: int, steps: int) -> list[int]:
    """Tokens left after each of ``steps`` steps, shrinking geometrically from n to exactly ``num_keep``."""
    ratio = num_keep / n
    counts = [max(num_keep, round(n * ratio ** ((t + 1) / steps))) for t in range(steps)]
    counts[-1] = num_keep
    return counts


class TPRLReducer:
    """The trained policy as a feature reducer: ``fn(x (n, d), num_keep, layout=None, prompt_embedding=(d_query,))``
    -> Reduction with ``num_keep`` tokens kept in their original order. Prompt-dependent: in multi-turn dialogues the
    caller passes the first turn's prompt embedding (docs/design.md §5). The layout is not used (TPRL scores tokens only).

    ``schedule``: "one_shot" keeps the top ``num_keep`` by p at step 0 (the public code's inference); "progressive"
    replays the policy's own steps, each keeping the top tokens by that step's p down to ``progressive_counts``.
    One-shot ranks with step 0 only, which a teacher keeping most tokens at step 0 trains to separate just its
    first cut; the progressive schedule also uses what the later steps learned."""

    prompt_dependent = True

    def __init__(self, policy: TPRLPolicy, schedule: str = "one_shot") -> None:
        if schedule not in ("one_shot", "progressive"):
            raise ValueError(f"TPRLReducer: schedule must be 'one_shot' or 'progressive', got {schedule!r}")
        self.policy, self.schedule = policy.eval(), schedule

    def __call__(self, x: torch.Tensor, num_keep: int, layout: Layout | None = None,
                 prompt_embedding: torch.Tensor | None = None) -> Reduction:
        if prompt_embedding is None:
            raise ValueError("TPRLReducer needs prompt_embedding (d_query,): the mean input embedding of the prompt's "
                             "text tokens; TPRL is prompt-dependent")
        if prompt_embedding.dim() != 1 or prompt_embedding.shape[0] != self.policy.config.d_query:
            raise ValueError(f"TPRLReducer: prompt_embedding has shape {tuple(prompt_embedding.shape)}, expected "
                             f"({self.policy.config.d_query},)")
        device = self.policy.norm.weight.device
        query = prompt_embedding.to(device)
        n = x.shape[0]
        if self.schedule == "one_shot":
            keep = top_k_sorted(self.policy.keep_probs(x.to(device), query), num_keep)
        else:
            top_k_sorted(torch.zeros(n), num_keep)  # validates num_keep
            latents = self.policy.encode(x.to(device))
            keep = torch.arange(n, device=device)
            for t, count in enumerate(progressive_counts(n, num_keep, self.policy.config.max_steps)):
                probs = self.policy.keep_probs(None, query, t, len(keep) / n, states=latents[keep])
                keep = keep[top_k_sorted(probs, count)]
        keep = keep.to(x.device)
        return Reduction(tokens=x[keep], keep_indices=keep)
