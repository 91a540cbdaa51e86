"""TPRL (language-guided token pruning learned with RL): autoencoded state, policy, demonstrations, PPO.

Pure PyTorch; the LVLM that scores answers is reached only through the ``score_fn`` callback of ``sample_episodes``.
"""

from __future__ import annotations

from compress.tprl.autoencoder import TokenAutoencoder, fit_autoencoder
from compress.tprl.demonstrations import Demonstration, behaviour_cloning, bc_loss, teacher_trajectory
from compress.tprl.policy import (Episode, PolicyConfig, Step, TPRLPolicy, TPRLReducer, episode_from_tensors,
                                  episode_to_tensors, joint_log_prob, mean_entropy, progressive_counts, sample_episode,
                                  sample_episodes, step_reward, token_log_probs, top_k_sorted)
from compress.tprl.ppo import PPOConfig, RolloutBuffer, gae, make_optimizer, ppo_update

__all__ = ["TokenAutoencoder", "fit_autoencoder", "Demonstration", "behaviour_cloning", "bc_loss", "teacher_trajectory",
           "Episode", "PolicyConfig", "Step", "TPRLPolicy", "TPRLReducer", "episode_from_tensors", "episode_to_tensors",
           "joint_log_prob", "mean_entropy", "progressive_counts", "sample_episode", "sample_episodes", "step_reward",
           "token_log_probs", "top_k_sorted", "PPOConfig", "RolloutBuffer", "gae", "make_optimizer", "ppo_update"]
