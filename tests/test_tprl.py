"""TPRL core: autoencoder, policy log-probabilities, GAE, PPO, behaviour cloning and the reducer on toy problems."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from compress.tprl import (Demonstration, PolicyConfig, PPOConfig, RolloutBuffer, TokenAutoencoder, TPRLPolicy,
                           TPRLReducer, behaviour_cloning, episode_from_tensors, episode_to_tensors, fit_autoencoder,
                           gae, joint_log_prob, make_optimizer, ppo_update, progressive_counts, sample_episode,
                           sample_episodes, teacher_trajectory)

D, N = 8, 16  # toy token width and tokens per image


def toy_image(generator: torch.Generator, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, D) tokens and a query (D,) whose first entry is +-1: it says whether large or small x[:, 0] matter."""
    x = torch.randn(n, D, generator=generator)
    query = torch.randn(D, generator=generator)
    query[0] = 1.0 if torch.rand(1, generator=generator).item() < 0.5 else -1.0
    return x, query


def relevance(x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Toy importance relative to the query: x[:, 0] signed by the query's first entry (n,)."""
    return x[:, 0] * query[0]


@pytest.fixture(scope="module")
def toy_autoencoder() -> TokenAutoencoder:
    g = torch.Generator().manual_seed(1)
    feats = [toy_image(g)[0] for _ in range(64)]
    ae, _ = fit_autoencoder(feats, d_latent=D, d_hidden=64, epochs=40, lr=1e-2, batch_tokens=128, seed=0)
    return ae


def make_policy(ae: TokenAutoencoder, max_steps: int = 3, dtype: torch.dtype = torch.float32) -> TPRLPolicy:
    torch.manual_seed(0)
    cfg = PolicyConfig(d_query=D, d_model=32, n_layers=1, n_heads=4, max_steps=max_steps)
    return TPRLPolicy(cfg, copy.deepcopy(ae)).to(dtype)  # a copy: .to() and freezing act in place


# ---- autoencoder --------------------------------------------------------------------------------------------------

def test_autoencoder_beats_mean_predictor_on_held_out_low_rank_features():
    g = torch.Generator().manual_seed(0)
    d, rank = 32, 4
    basis = torch.randn(rank, d, generator=g) * 3.0
    offset = torch.randn(d, generator=g) * 5.0

    def image() -> torch.Tensor:
        return torch.randn(24, rank, generator=g) @ basis + offset + 0.05 * torch.randn(24, d, generator=g)

    train, held_out = [image() for _ in range(60)], torch.cat([image() for _ in range(10)])
    ae, history = fit_autoencoder(train, d_latent=8, d_hidden=64, epochs=12, lr=3e-3, batch_tokens=128, seed=0)
    with torch.no_grad():
        recon, z = ae(held_out)
    mean_prediction = torch.cat(train).mean(0)
    mse_ae = (recon - held_out).pow(2).mean().item()
    mse_mean = (mean_prediction - held_out).pow(2).mean().item()
    assert z.shape == (held_out.shape[0], 8)
    assert history[-1] < history[0]
    assert mse_ae < 0.1 * mse_mean, (mse_ae, mse_mean)


def test_fit_autoencoder_rejects_one_shot_iterators():
    with pytest.raises(ValueError, match="one-shot iterator"):
        fit_autoencoder(iter([torch.randn(4, 3)]), d_latent=2, d_hidden=4)


# ---- action distribution and PPO ----------------------------------------------------------------------------------

def test_joint_log_prob_matches_naive_discounted_bernoulli():
    g = torch.Generator().manual_seed(0)
    logits, actions = torch.randn(3, 5, generator=g) * 3, torch.rand(3, 5, generator=g) < 0.5
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    step = torch.tensor([0, 1, 2])
    got = joint_log_prob(logits.double(), actions, mask, step, 0.5)
    for b in range(3):
        q = 0.5 ** b * torch.sigmoid(logits[b].double())
        ref = sum(math.log(q[i] if actions[b, i] else 1 - q[i]) for i in range(5) if mask[b, i])
        assert got[b].item() == pytest.approx(ref, abs=1e-10)


def fill_buffer(policy: TPRLPolicy, episodes: int, seed: int, b: float = 0.5,
                n: int = N) -> tuple[RolloutBuffer, list[float]]:
    """Toy rollouts: score = share of the query-relevant tokens still kept."""
    g = torch.Generator().manual_seed(seed)
    images = [toy_image(g, n) for _ in range(episodes)]
    relevant = [relevance(x, q) > 0 for x, q in images]

    def score(items):
        return [relevant[i][kept].sum().item() / max(1, relevant[i].sum().item()) for i, kept in items]

    rollouts = sample_episodes(policy, [x for x, _ in images], [q for _, q in images], score, b=b,
                               score_full=[1.0] * episodes, generator=g)
    buffer = RolloutBuffer()
    for episode in rollouts:
        buffer.add(episode)
    return buffer, [e.total_reward for e in rollouts]


@pytest.mark.parametrize("dtype,ratio", [(torch.float32, "joint"), (torch.float64, "joint"),
                                         (torch.float32, "per_token")])
def test_ppo_ratio_is_one_on_first_update_epoch(toy_autoencoder, dtype, ratio):
    policy = make_policy(toy_autoencoder, dtype=dtype)
    buffer, _ = fill_buffer(policy, 12, seed=3)
    steps = [row[1] for row in buffer.rows]
    sizes = {s.shape[0] for s in buffer.states}
    assert {0, 1, 2} <= set(steps) and len(sizes) > 3  # later steps and mixed token counts in the minibatches

    # Later steps were sampled with lambda^t: evaluating them without the discount (the public code's bug) differs.
    i = steps.index(2)
    logits, _ = policy(buffer.states[i][None].to(dtype), buffer.rows[i][0][None].to(dtype),
                       torch.ones(1, len(buffer.actions[i]), dtype=torch.bool), torch.tensor([2]),
                       torch.tensor([buffer.rows[i][2]], dtype=dtype))
    undiscounted = joint_log_prob(logits, buffer.actions[i][None], torch.ones_like(buffer.actions[i][None]),
                                  torch.tensor([2]), 1.0)
    assert abs(undiscounted.item() - buffer.rows[i][3]) > 1e-2

    tol = 1e-5 if dtype == torch.float32 else 1e-9
    cfg = PPOConfig(epochs=2, minibatch_size=8, ratio=ratio)
    frozen = ppo_update(policy, make_optimizer(policy, 0.0, 0.0), buffer, cfg, torch.Generator().manual_seed(0))
    assert max(frozen["ratio_max_dev_per_epoch"]) < tol  # no parameter change: every minibatch, every step t
    moving = ppo_update(policy, make_optimizer(policy, 1e-2, 1e-2), buffer, cfg, torch.Generator().manual_seed(0))
    assert moving["first_minibatch_ratio_max_dev"] < tol
    assert moving["ratio_max_dev_per_epoch"][-1] > 1e-3  # the parameters did move


def test_gae_matches_hand_computation():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[1.0, 0.5, -1.0], [2.0, 7.0, 7.0]], dtype=torch.float64)
    values = torch.tensor([[0.2, 0.4, 0.1], [0.5, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    adv, ret = gae(rewards, values, mask, gamma, lam)
    # Row 0 by hand: delta2 = -1 - 0.1 = -1.1; delta1 = 0.5 + 0.9 * 0.1 - 0.4 = 0.19;
    # delta0 = 1 + 0.9 * 0.4 - 0.2 = 1.16;
    # A2 = -1.1; A1 = 0.19 + 0.72 * -1.1 = -0.602; A0 = 1.16 + 0.72 * -0.602 = 0.72656. Row 1 ends at t = 0: 2 - 0.5.
    assert adv[0].tolist() == pytest.approx([0.72656, -0.602, -1.1], abs=1e-12)
    assert adv[1].tolist() == pytest.approx([1.5, 0.0, 0.0], abs=1e-12)
    assert ret[0].tolist() == pytest.approx([0.92656, -0.202, -1.0], abs=1e-12)
    assert ret[1, 0].item() == pytest.approx(2.0)


def test_episode_rewards_telescope(toy_autoencoder):
    """With share_of="original" the rewards sum to score_T - score_0 + b * (share of all tokens removed)."""
    policy = make_policy(toy_autoencoder)
    g = torch.Generator().manual_seed(5)
    x, q = toy_image(g, n=30)
    episode = sample_episode(policy, x, q, lambda kept: float(len(kept) % 3), b=0.3, generator=g)
    assert [s.step for s in episode.steps] == list(range(len(episode.steps)))
    for before, after in zip(episode.steps, episode.steps[1:]):  # each state holds exactly what the last step kept
        assert torch.equal(after.indices, before.indices[before.actions])
    expected = episode.scores[-1] - episode.scores[0] + 0.3 * (1 - len(episode.kept) / 30)
    assert episode.total_reward == pytest.approx(expected, abs=1e-12)
    assert episode.scores[0] == 0.0  # score_fn was called with all 30 tokens


def test_episode_round_trips_through_safetensors(toy_autoencoder, tmp_path):
    from safetensors.torch import load_file, save_file

    policy = make_policy(toy_autoencoder)
    g = torch.Generator().manual_seed(6)
    x, q = toy_image(g)
    episode = sample_episode(policy, x, q, lambda kept: len(kept) / N, generator=g)
    save_file(episode_to_tensors(episode), tmp_path / "episode.safetensors")
    restored = episode_from_tensors(load_file(tmp_path / "episode.safetensors"))
    assert restored.n == episode.n and restored.scores == episode.scores and torch.equal(restored.kept, episode.kept)
    for a, b in zip(episode.steps, restored.steps, strict=True):
        assert (a.step, a.kept_fraction, a.log_prob, a.value, a.reward) == (b.step, b.kept_fraction, b.log_prob,
                                                                            b.value, b.reward)
        for name in ("indices", "state", "actions", "token_log_probs"):
            assert torch.equal(getattr(a, name), getattr(b, name))


def test_ppo_raises_toy_reward(toy_autoencoder):
    """Reward: change in the share of query-relevant tokens kept + 0.5 * share removed; keeping the relevant tokens
    and dropping the others is optimal, the initial p = 0.5 policy is not."""
    policy = make_policy(toy_autoencoder, max_steps=2)
    optimizer = make_optimizer(policy, 2e-3, 2e-3)
    cfg = PPOConfig(epochs=4, minibatch_size=16, gamma=1.0, entropy_coef=0.0)
    _, before = fill_buffer(policy, 128, seed=100)
    for it in range(12):
        buffer, _ = fill_buffer(policy, 32, seed=it)
        ppo_update(policy, optimizer, buffer, cfg, torch.Generator().manual_seed(it))
    _, after = fill_buffer(policy, 128, seed=100)  # the same images and random numbers as before training
    mean_before, mean_after = sum(before) / len(before), sum(after) / len(after)
    assert mean_after > mean_before + 0.05, (mean_before, mean_after)


# ---- demonstrations -----------------------------------------------------------------------------------------------

def test_teacher_trajectory_is_nested_top_k():
    scores = torch.tensor([5.0, 1.0, 4.0, 0.0, 3.0, 2.0])
    steps = teacher_trajectory(scores, (0.5, 1 / 3))
    assert steps[0][0].tolist() == list(range(6)) and steps[0][1].tolist() == [True, False, True, False, True, False]
    assert steps[1][0].tolist() == [0, 2, 4] and steps[1][1].tolist() == [True, True, False]


def test_behaviour_cloning_reaches_teacher_choices(toy_autoencoder):
    """Teacher: keep the half of the tokens with the largest x[:, 0] * sign(query[0]), then a quarter."""
    policy = make_policy(toy_autoencoder)
    g = torch.Generator().manual_seed(7)
    demos = [Demonstration(x, q, relevance(x, q)) for x, q in (toy_image(g) for _ in range(256))]
    history = behaviour_cloning(policy, demos, epochs=10, lr=1e-2, weight_decay=0.0, batch_size=128,
                                keep_fractions=(0.5, 0.25))
    assert history[-1] < 0.6 * history[0]
    k = N // 2
    overlap = flipped = 0.0
    for _ in range(100):
        x, q = toy_image(g)
        chosen = set(torch.topk(policy.keep_probs(x, q), k).indices.tolist())
        overlap += len(chosen & set(torch.topk(relevance(x, q), k).indices.tolist())) / k / 100
        flipped += len(chosen & set(torch.topk(-relevance(x, q), k).indices.tolist())) / k / 100
    assert overlap > 0.85, overlap  # chance and a query-blind policy: 1/2
    assert flipped < 0.15, flipped  # it follows the query, not a fixed direction


# ---- inference ----------------------------------------------------------------------------------------------------

def test_reducer_keeps_num_keep_tokens_in_spatial_order(toy_autoencoder):
    policy = make_policy(toy_autoencoder)
    torch.nn.init.normal_(policy.policy_head[-1].weight)  # non-constant keep probabilities
    g = torch.Generator().manual_seed(11)
    x, q = toy_image(g, n=40)
    one_shot, progressive = TPRLReducer(policy), TPRLReducer(policy, schedule="progressive")
    for m in (1, 7, 40):
        for reducer in (one_shot, progressive):
            out = reducer(x, m, prompt_embedding=q)
            assert out.keep_indices.shape == (m,) and torch.all(out.keep_indices[1:] > out.keep_indices[:-1])
            assert torch.equal(out.tokens, x[out.keep_indices])
        # Plain references: rank by p with Python's sort, step by step for the progressive schedule.
        probs = policy.keep_probs(x, q)
        assert one_shot(x, m, prompt_embedding=q).keep_indices.tolist() == sorted(
            sorted(range(40), key=lambda i: -probs[i].item())[:m])
        left = list(range(40))
        for t, count in enumerate(progressive_counts(40, m, 3)):
            p = policy.keep_probs(x[left], q, step=t, kept_fraction=len(left) / 40)
            left = sorted(left[j] for j in sorted(range(len(left)), key=lambda j: -p[j].item())[:count])
        assert progressive(x, m, prompt_embedding=q).keep_indices.tolist() == left
    with pytest.raises(ValueError, match="prompt_embedding"):
        one_shot(x, 3)
    with pytest.raises(ValueError, match="num_keep"):
        progressive(x, 41, prompt_embedding=q)


def test_progressive_counts_shrink_to_num_keep():
    assert progressive_counts(576, 192, 3) == [399, 277, 192]  # 576 * (1/3)^(1/3), ^(2/3): 399.4, 276.9
    assert progressive_counts(10, 10, 3) == [10, 10, 10]
    assert progressive_counts(10, 1, 1) == [1]


def test_policy_rebuilds_from_spec(toy_autoencoder):
    policy = make_policy(toy_autoencoder)
    clone = TPRLPolicy.from_spec(policy.spec())
    clone.load_state_dict(policy.state_dict())
    x, q = toy_image(torch.Generator().manual_seed(2))
    assert torch.equal(clone.keep_probs(x, q), policy.keep_probs(x, q))
    with pytest.raises(ValueError, match="spec"):
        TPRLPolicy.from_spec({"policy": {}})
