"""The tprl stage's driver: prepare on Ray actors, the autoencoder and behaviour cloning, PPO iterations with
rollouts on the actors, checkpoints and resume, the saved policy, MLflow."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

from pipeline import storage
from pipeline.config import PipelineConfig
from pipeline.shards import StageOutput
from stages.common import model_actor, run_sharded, shard_ranges
from stages.outputs import TPRL as STAGE
from stages.outputs import policy_dir, tprl_dir, trained_files_problem, write_trained_marker
from stages.tprl.checkpoints import _save_policy_atomic, latest_checkpoint, load_checkpoint, save_checkpoint
from stages.tprl.inputs import (derived_seed, driver_features, feature_args, load_records, prepared_args,
                               trajectory_hash)
from stages.tprl.worker import TPRLWorker

log = logging.getLogger("metacompress")

CRASH_ENV = "METACOMPRESS_TPRL_CRASH_AFTER_ITERATION"


@dataclass
class TPRLReport:
    stage: str
    uri: str
    computed: int
    seconds: float
    iterations: int = 0
    resumed_from: int | None = None
    skipped: str = ""
    metrics: dict = field(default_factory=dict)

    def line(self) -> str:
        if self.skipped:
            return f"tprl: skipped ({self.skipped})"
        if not self.computed:
            return f"tprl: reused the trained policy ({self.iterations} PPO iterations) -> {self.uri}"
        start = "from scratch" if self.resumed_from is None else f"resumed at iteration {self.resumed_from}"
        reward = self.metrics.get("reward")
        return (f"tprl: {self.iterations} PPO iterations ({start}), {self.seconds:.1f} s"
                + (f", last mean reward {reward:.4f}" if reward is not None else "") + f" -> {self.uri}")


def _log_series(name: str, values: list[float]) -> None:
    """Per-step values of one metric in a few batched calls (one SQLite transaction each)."""
    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(name, float(v), now, step) for step, v in enumerate(values, 1)]
    client, run_id = mlflow.tracking.MlflowClient(), mlflow.active_run().info.run_id
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start:start + 1000])


def _read_prepared(out: StageOutput, num_shards: int) -> dict[str, dict]:
    import torch

    rows = {}
    for i in range(num_shards):
        for r in out.read_records(i):
            rows[r["dialogue_id"]] = {"shard": i, "query": torch.from_numpy(r["query"].copy()),
                                      "teacher": torch.from_numpy(r["teacher"].copy()),
                                      "full_score": float(r["full_score"])}
    return rows


def _initial_policy(config: PipelineConfig, rows: list, prepared: dict[str, dict]):
    """Autoencoder on every cached feature (``rows``: ``stages.tprl.inputs.driver_features``), then the policy cloned
    from the teacher -> (policy, BC losses)."""
    import torch

    from compress.tprl import Demonstration, PolicyConfig, TPRLPolicy, behaviour_cloning, fit_autoencoder

    tc = config.tprl

    def features():
        for _, x in rows:
            yield x

    autoencoder, ae_history = fit_autoencoder(features, d_latent=tc.d_latent, d_hidden=tc.d_hidden,
                                              epochs=tc.ae_epochs, lr=tc.ae_lr, seed=tc.seed)
    demos = [Demonstration(x, prepared[did]["query"], prepared[did]["teacher"]) for did, x in rows if did in prepared]
    torch.manual_seed(tc.seed)
    policy = TPRLPolicy(PolicyConfig(d_query=demos[0].query.shape[0], d_model=tc.d_model, n_layers=tc.n_layers,
                                     n_heads=tc.n_heads, step_discount=tc.step_discount, max_steps=tc.max_steps),
                        autoencoder)
    bc_history = behaviour_cloning(policy, demos, epochs=tc.bc_epochs, lr=tc.bc_lr, batch_size=tc.bc_batch_size,
                                   keep_fractions=tc.keep_fractions, seed=tc.seed) if tc.bc_epochs else []
    return policy, ae_history, bc_history


def _tasks(config: PipelineConfig, records: list[dict], prepared: dict[str, dict], iteration: int) -> list[dict]:
    """Iteration ``iteration``'s rollouts: dialogues drawn without replacement (cycling when more rollouts than
    dialogues), cut into tasks of ``rollout_batch_size`` episodes, each with its own seed."""
    import torch

    tc = config.tprl
    usable = [r for r in records if r["dialogue_id"] in prepared]
    order = torch.randperm(len(usable), generator=torch.Generator().manual_seed(
        derived_seed(tc.seed, "rollouts", iteration))).tolist()
    chosen = [usable[order[k % len(order)]] for k in range(tc.rollouts_per_iteration)]
    items = [{"dialogue_id": r["dialogue_id"], "shard": prepared[r["dialogue_id"]]["shard"],
              "question": r["questions"][0], "answers": r["answers"][0], "source": r["source"],
              "query": prepared[r["dialogue_id"]]["query"], "full_score": prepared[r["dialogue_id"]]["full_score"]}
             for r in chosen]
    size = tc.rollout_batch_size
    return [{"items": items[s:s + size], "seed": derived_seed(tc.seed, "episodes", iteration, s // size)}
            for s in range(0, len(items), size)]


def _ppo(config: PipelineConfig, records, prepared, actors, policy, optimizer, start: int, ckpt_dir: str,
         meta: dict, progress: bool) -> dict:
    """PPO iterations ``start`` .. ``tprl.iterations``; returns the last iteration's metrics."""
    import mlflow
    import ray
    import torch
    from ray.util import ActorPool
    from tqdm import tqdm

    from compress.tprl import PPOConfig, RolloutBuffer, episode_from_tensors, ppo_update

    tc = config.tprl
    ppo_cfg = PPOConfig(gamma=tc.gamma, gae_lambda=tc.gae_lambda, clip=tc.clip, value_coef=tc.value_coef,
                        entropy_coef=tc.entropy_coef, epochs=tc.ppo_epochs, minibatch_size=tc.minibatch_size,
                        max_grad_norm=tc.max_grad_norm, ratio=tc.ratio)
    crash_after = os.environ.get(CRASH_ENV)
    pool = ActorPool(actors)
    last: dict = {}
    for iteration in tqdm(range(start, tc.iterations), desc=STAGE, unit="iteration", disable=not progress):
        t0 = time.perf_counter()
        state = ray.put({k: v.detach().cpu() for k, v in policy.state_dict().items()})
        tasks = [{**task, "spec": policy.spec()} for task in _tasks(config, records, prepared, iteration)]
        # pool.map keeps the task order: the buffer (and so every minibatch) does not depend on scheduling
        results = list(pool.map(lambda actor, task: actor.rollout.remote(task, state), tasks))
        episodes = [episode_from_tensors(t) for result in results for t in result]
        buffer = RolloutBuffer(tc.gamma, tc.gae_lambda)
        for episode in episodes:
            buffer.add(episode)
        rollout_s = time.perf_counter() - t0
        stats = ppo_update(policy, optimizer, buffer, ppo_cfg,
                           generator=torch.Generator().manual_seed(derived_seed(tc.seed, "ppo", iteration)))
        done = iteration + 1
        last = {"reward": sum(e.total_reward for e in episodes) / len(episodes),
                "score_full": sum(e.scores[0] for e in episodes) / len(episodes),
                "score_final": sum(e.scores[-1] for e in episodes) / len(episodes),
                "kept_fraction": sum(len(e.kept) / e.n for e in episodes) / len(episodes),
                "episodes": float(len(episodes)), "steps": float(len(buffer)), "rollout_seconds": rollout_s,
                "iteration_seconds": time.perf_counter() - t0,
                **{k: float(v) for k, v in stats.items() if isinstance(v, (int, float))}}
        mlflow.log_metrics(last, step=done)
        if done % tc.checkpoint_every == 0 or done == tc.iterations:
            save_checkpoint(ckpt_dir, done, policy, optimizer, {**meta, "metrics": last})
        if crash_after is not None and done == int(crash_after):
            raise RuntimeError(f"tprl: injected failure after iteration {done} ({CRASH_ENV})")
    return last


def _damaged(marker: str, directory: str) -> bool:
    """True (with a warning naming the file) when the policy's bytes are not those its _SUCCESS recorded: it is
    then rebuilt from the last checkpoint (docs/design.md §8)."""
    problem = trained_files_problem(marker, directory)
    if problem:
        log.warning("tprl: %s; recomputing it", problem)
    return problem is not None


def run(config: PipelineConfig, split: str = "train", progress: bool = True) -> TPRLReport:
    """Train (or resume, or reuse) the TPRL policy on ``split``; skipped unless ``tprl.enabled``."""
    import ray

    from pipeline import tracking
    from pipeline.cluster import actor_gpus, device_for, init_ray
    from pipeline.hashing import config_hash

    start = time.perf_counter()
    tc = config.tprl
    if not tc.enabled:
        return TPRLReport(STAGE, tprl_dir(config), 0, 0.0, skipped="tprl.enabled is false")
    feats = feature_args(config, split)
    prep = prepared_args(config, feats)
    traj = trajectory_hash(config, prep)
    result_hash = config_hash({"trajectory": traj, "iterations": tc.iterations})[:16]
    marker = f"{tprl_dir(config)}/_SUCCESS"  # any storage URI (pipeline.storage, docs/design.md §6.4)
    if storage.is_file(marker) and json.loads(storage.read_bytes(marker)).get("run_hash") == result_hash \
            and storage.is_file(f"{policy_dir(config)}/model.safetensors") \
            and not _damaged(marker, policy_dir(config)):
        done = json.loads(storage.read_bytes(marker))
        return TPRLReport(STAGE, policy_dir(config), 0, time.perf_counter() - start, tc.iterations,
                          metrics=done.get("metrics", {}))

    if not ray.is_initialized():
        init_ray(config)
    records = load_records(config, split)
    ranges = shard_ranges(len(records), config.shards.dialogues_per_shard)
    gpus = actor_gpus(config, STAGE)
    options = {"max_new_tokens": config.evaluate.max_new_tokens, "teacher_layers": tc.teacher_layers, "b": tc.b,
               "share_of": tc.share_of}
    ckpt_dir = f"{tprl_dir(config)}/checkpoints/{traj}"
    report = TPRLReport(STAGE, policy_dir(config), 1, 0.0, tc.iterations)
    with tracking.stage_run(config, STAGE, params=tracking.flatten({"tprl": asdict(tc)})):
        import mlflow

        mlflow.set_tags({"run_hash": result_hash, "trajectory_hash": traj})
        actor_cls = model_actor(TPRLWorker, gpus, getattr(config.resources, STAGE).num_cpus)
        actors: list = []

        def get_actors() -> list:  # started once, on first need, for both the prepare pass and the rollouts
            if not actors:
                actors.extend(actor_cls.remote(config.model.path, config.model.dtype, device_for(gpus), feats, prep,
                                               options) for _ in range(tc.num_actors))
            return actors

        try:
            out = StageOutput(**prep)
            if not out.is_complete():
                out.prepare({"tprl": asdict(tc), "model": config.model.path}, overwrite=config.shards.overwrite)
                slim = [{k: r[k] for k in ("dialogue_id", "source", "questions", "answers")} for r in records]
                run_sharded(out, len(ranges), len(records), actors=lambda n: get_actors()[:n], num_actors=tc.num_actors,
                            task_args=lambda i: (i, slim[ranges[i][0]:ranges[i][1]]),
                            max_error_fraction=config.shards.max_error_fraction, progress=progress)
            prepared = _read_prepared(out, len(ranges))
            if not prepared:
                raise RuntimeError(f"tprl: no usable dialogue in {feats['uri']} (see {out.uri}/_errors.jsonl)")

            from compress.tprl import make_optimizer

            def new_optimizer(p):
                return make_optimizer(p, tc.actor_lr, tc.critic_lr)

            meta = {"trajectory_hash": traj}
            found = latest_checkpoint(ckpt_dir)
            if found is not None:
                policy, optimizer, state = load_checkpoint(found, new_optimizer)
                report.resumed_from = iteration = int(state["iteration"])
                mlflow.set_tag("resumed_from", str(iteration))
            else:
                rows = driver_features(config, feats, len(ranges), get_actors)
                policy, ae_history, bc_history = _initial_policy(config, rows, prepared)
                _log_series("ae_loss", ae_history)
                _log_series("bc_loss", bc_history)
                optimizer, iteration = new_optimizer(policy), 0
                save_checkpoint(ckpt_dir, 0, policy, optimizer, meta)
            if iteration < tc.iterations:
                report.metrics = _ppo(config, records, prepared, get_actors(), policy, optimizer, iteration, ckpt_dir,
                                      meta, progress)
            else:
                report.metrics = json.loads(storage.read_bytes(f"{found}/state.json")).get("metrics", {})
        finally:  # also after a failure: the actors hold an LVLM each
            for actor in actors:
                ray.kill(actor)
        _save_policy_atomic(policy, policy_dir(config))
        with storage.local_copy(policy_dir(config)) as local:
            mlflow.log_artifacts(local, artifact_path="tprl_policy")
    write_trained_marker(str(marker), policy_dir(config), {"run_hash": result_hash, "trajectory_hash": traj,
                                                           "iterations": tc.iterations, "metrics": report.metrics})
    report.seconds = time.perf_counter() - start
    log.info(report.line())
    return report
