"""Stage `tprl`: the TPRL baseline (notes/baselines.md 2, DESIGN 4.5) trained on the train split's cached features.

1. prepare (Ray actors holding the LVLM, one task per extract shard, cached as the stage output
   ``<work_dir>/tprl/prepared/<hash>``): per dialogue the query ``q`` (``session.prompt_embedding`` of the FIRST
   turn's question, as at evaluation, DESIGN 5), the teacher's token scores (the attention the first prompt's text
   gives each visual token, mean over heads, text queries and ``tprl.teacher_layers``: ``analysis.prompt_attention``)
   and the full-token correctness of the greedy answer to the first question.
2. driver: the token autoencoder on the cached features, then behaviour cloning on the teacher's trajectories.
3. PPO: iteration ``i`` draws ``rollouts_per_iteration`` dialogues and cuts them into tasks of ``rollout_batch_size``
   episodes; rollout actors sample the episodes with the current policy, the LVLM answering the first question from
   the kept tokens (``BatchChatSession``, greedy), and return them as tensors (``episode_to_tensors``); reward per
   step = change in correctness + ``b`` * share removed (``policy.step_reward``), so an episode's rewards sum to
   correctness(kept) - correctness(full) + b * share removed. The driver runs the PPO update.

Every random draw is seeded by (``tprl.seed``, iteration, task), never by which actor ran what, so a run is a pure
function of the config. A checkpoint (policy, optimizer, iteration, RNG state; safetensors + JSON, written to a
temporary directory and renamed) is kept after BC, every ``checkpoint_every`` iterations and at the end, under a
directory named by the hash of everything the trajectory depends on (``iterations`` excluded: a longer run continues
a shorter one). A re-run resumes from the newest; a finished run leaves ``_SUCCESS`` (result hash) and the policy in
``<work_dir>/tprl/policy`` (``TPRLPolicy.save_pretrained``) and a re-run does nothing. Fault injection for tests:
``METACOMPRESS_TPRL_CRASH_AFTER_ITERATION=N`` makes the driver fail right after iteration N.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.shards import StageOutput

log = logging.getLogger("metacompress")

STAGE = "tprl"
CRASH_ENV = "METACOMPRESS_TPRL_CRASH_AFTER_ITERATION"
KEEP_CHECKPOINTS = 2
CACHED_SHARDS = 8  # feature shards a rollout actor keeps in memory


def stage_dir(config: PipelineConfig) -> str:
    return f"{config.work_dir}/{STAGE}"


def policy_dir(config: PipelineConfig) -> str:
    """Where the trained policy is saved (``TPRLPolicy.save_pretrained``); the evaluate stage reads it."""
    return f"{stage_dir(config)}/policy"


def derived_seed(*parts) -> int:
    """A seed for one random draw, from the config seed and where the draw happens (stable across runs)."""
    return int(hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12], 16)


# --- inputs --------------------------------------------------------------------------------------------------------
def load_records(config: PipelineConfig, split: str) -> list[dict]:
    """The split's dialogues as the extract stage cut them (same file, limit and order), with their source."""
    from pipeline.dialogues import iter_dialogues
    from stages import extract

    limit = extract.split_limit(config, split)
    records = []
    for d in iter_dialogues(getattr(config.data, split), check_images=False, on_error=lambda e: None):
        records.append({"dialogue_id": d.dialogue_id, "source": d.source,
                        "questions": [t.question for t in d.turns], "answers": [list(t.answers) for t in d.turns]})
        if limit is not None and len(records) >= limit:
            break
    return records


def feature_args(config: PipelineConfig, split: str) -> dict:
    """The extract stage's finished output of ``split`` for this config (its StageOutput arguments)."""
    from stages import extract

    args = extract.output_args(config, split)
    try:
        complete = StageOutput(**args).is_complete()
    except FileNotFoundError:
        complete = False
    if not complete:
        raise FileNotFoundError(f"tprl: no finished extract output at {args['uri']} for this config; run the extract "
                                "stage first (`metacompress run --stages extract,tprl`)")
    return args


def row_features(row: dict):
    """A cached feature row -> (X_IMG (n, d) float32 CPU tensor, Layout)."""
    import torch

    from compress.layout import Layout
    from pipeline.shards import bf16_to_torch

    x = row["features"]
    x = bf16_to_torch(x).float() if x.dtype.name == "uint16" else torch.from_numpy(x.copy()).float()
    return x, Layout.from_dict(json.loads(row["layout"]))


def prepared_args(config: PipelineConfig, feats: dict) -> dict:
    from pipeline.shards import config_hash

    digest = config_hash({"features": [feats["config_hash"], feats["input_hash"]],
                          "teacher_layers": config.tprl.teacher_layers,
                          "max_new_tokens": config.evaluate.max_new_tokens})
    return dict(uri=f"{stage_dir(config)}/prepared/{digest[:12]}", stage=f"{STAGE}-prepare", config_hash=digest,
                input_hash=feats["input_hash"], fmt=config.shards.format)


def trajectory_hash(config: PipelineConfig, prepared: dict) -> str:
    """What the policy after any number of iterations depends on (not how many, nor how many actors)."""
    from pipeline.shards import config_hash
    from stages.common import model_identity

    tprl = {k: v for k, v in asdict(config.tprl).items()
            if k not in ("enabled", "iterations", "num_actors", "checkpoint_every")}
    return config_hash({"tprl": tprl, "model": model_identity(config.model.path), "dtype": config.model.dtype,
                        "max_new_tokens": config.evaluate.max_new_tokens, "prepared": prepared["config_hash"],
                        "data": prepared["input_hash"]})[:16]


# --- the actor -----------------------------------------------------------------------------------------------------
class TPRLWorker:
    """One per actor: the LVLM, a cache of feature shards, the policy of the current iteration.
    ``run_shard`` computes the prepare rows of one shard; ``rollout`` samples a task's episodes."""

    def __init__(self, model_path: str, dtype: str, device: str, feats: dict, prepared: dict, options: dict) -> None:
        import torch

        from compress.lvlm import load_adapter
        from pipeline.env import apply_defaults

        apply_defaults()
        self.adapter = load_adapter(model_path, device=device, dtype=getattr(torch, dtype))
        self.features = StageOutput(**feats)
        self.prepared = StageOutput(**prepared)
        self.options = options
        self.shards: OrderedDict[int, dict] = OrderedDict()
        self.policy = None

    def _shard(self, index: int) -> dict:
        """dialogue_id -> (X_IMG (n, d) float32, Layout) of one feature shard (least recently used evicted)."""
        if index not in self.shards:
            self.shards[index] = {r["dialogue_id"]: row_features(r) for r in self.features.read_records(index)}
            while len(self.shards) > CACHED_SHARDS:
                self.shards.popitem(last=False)
        self.shards.move_to_end(index)
        return self.shards[index]

    def answers(self, images: list, questions: list[str]) -> list[str]:
        """Greedy answers to one question per image; images[b] = (visual tokens (k, d), Layout), k may be 0."""
        from compress.lvlm.base import EncodedImage
        from compress.lvlm.session import BatchChatSession

        ad = self.adapter
        session = BatchChatSession(ad, "full", max_new_tokens=self.options["max_new_tokens"])
        session.set_images([EncodedImage(x.to(ad.device, ad.dtype), layout, None, (0, 0)) for x, layout in images])
        return [r.answer for r in session.ask(questions)]

    def run_shard(self, index: int, dialogues: list[dict]) -> dict:
        import torch

        from compress.analysis import prompt_attention
        from compress.lvlm.session import prompt_embedding
        from stages.evaluate import score

        ad = self.adapter
        cached = self._shard(index)
        layers = self.options["teacher_layers"]
        layers = list(range(ad.text_config.num_hidden_layers)) if layers is None else layers
        ok = [d for d in dialogues if d["dialogue_id"] in cached]
        errors = [[d["dialogue_id"], "no cached features (failed in the extract stage)"]
                  for d in dialogues if d["dialogue_id"] not in cached]
        rows = []
        with torch.no_grad():
            full = self.answers([cached[d["dialogue_id"]] for d in ok], [d["questions"][0] for d in ok]) if ok else []
            for d, answer in zip(ok, full):
                x, _ = cached[d["dialogue_id"]]
                question = d["questions"][0]
                attention = prompt_attention(ad, x.to(ad.device, ad.dtype), question, layers)
                rows.append({"dialogue_id": d["dialogue_id"], "query": prompt_embedding(ad, question).cpu(),
                             "teacher": attention.prompt_scores().float().cpu(),
                             "full_score": float(score(d["source"], answer, d["answers"][0]))})
        self.prepared.write_shard(index, rows)
        return {"records": len(rows), "errors": errors}

    def rollout(self, task: dict, state: dict) -> list[dict]:
        """Sample ``task["items"]``'s episodes with the policy (``task["spec"]``, weights ``state``)
        -> ``episode_to_tensors`` dicts."""
        import torch

        from compress.tprl import TPRLPolicy, episode_to_tensors, sample_episodes
        from stages.evaluate import score

        if self.policy is None or self.policy.spec() != task["spec"]:
            self.policy = TPRLPolicy.from_spec(task["spec"]).to(self.adapter.device)
        self.policy.load_state_dict(state)
        self.policy.eval()
        items = task["items"]
        images = [self._shard(it["shard"])[it["dialogue_id"]] for it in items]

        def score_fn(batch: list[tuple[int, torch.Tensor]]) -> list[float]:
            answers = self.answers([(images[i][0][kept], images[i][1]) for i, kept in batch],
                                   [items[i]["question"] for i, _ in batch])
            return [score(items[i]["source"], a, items[i]["answers"]) for (i, _), a in zip(batch, answers)]

        o = self.options
        episodes = sample_episodes(self.policy, [x for x, _ in images], [it["query"] for it in items], score_fn,
                                   b=o["b"], score_full=[it["full_score"] for it in items], share_of=o["share_of"],
                                   generator=torch.Generator().manual_seed(task["seed"]))
        return [episode_to_tensors(e) for e in episodes]


# --- checkpoints ---------------------------------------------------------------------------------------------------
def save_checkpoint(directory: Path, iteration: int, policy, optimizer, meta: dict) -> Path:
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
    final = directory / f"ckpt-{iteration:06d}"
    tmp = directory / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "tensors.safetensors"))
    state = {**meta, "iteration": iteration, "spec": policy.spec(), "param_groups": opt["param_groups"],
             "optimizer_scalars": scalars, "optimizer_entries": sorted(int(i) for i in opt["state"])}
    (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(directory.glob("ckpt-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    found = sorted(p for p in directory.glob("ckpt-*") if (p / "state.json").is_file()) if directory.is_dir() else []
    return found[-1] if found else None


def load_checkpoint(path: Path, make_optimizer) -> tuple[object, object, dict]:
    """-> (policy, optimizer built by ``make_optimizer(policy)`` with its saved state, state.json). Restores the
    torch RNG state."""
    import torch
    from safetensors.torch import load_file

    from compress.tprl import TPRLPolicy

    tensors = load_file(str(path / "tensors.safetensors"))
    state = json.loads((path / "state.json").read_text())
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


# --- the driver ----------------------------------------------------------------------------------------------------
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


def _initial_policy(config: PipelineConfig, feats: StageOutput, num_shards: int, prepared: dict[str, dict]):
    """Autoencoder on every cached feature, then the policy cloned from the teacher -> (policy, BC losses)."""
    import torch

    from compress.tprl import Demonstration, PolicyConfig, TPRLPolicy, behaviour_cloning, fit_autoencoder

    tc = config.tprl

    def features():
        for i in range(num_shards):
            for r in feats.read_records(i):
                yield row_features(r)[0]

    autoencoder, ae_history = fit_autoencoder(features, d_latent=tc.d_latent, d_hidden=tc.d_hidden,
                                              epochs=tc.ae_epochs, lr=tc.ae_lr, seed=tc.seed)
    demos = [Demonstration(row_features(r)[0], prepared[r["dialogue_id"]]["query"],
                           prepared[r["dialogue_id"]]["teacher"])
             for i in range(num_shards) for r in feats.read_records(i) if r["dialogue_id"] in prepared]
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


def _ppo(config: PipelineConfig, records, prepared, actors, policy, optimizer, start: int, ckpt_dir: Path,
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


def _save_policy_atomic(policy, directory: str) -> None:
    target = Path(directory)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    policy.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def run(config: PipelineConfig, split: str = "train", progress: bool = True) -> TPRLReport:
    """Train (or resume, or reuse) the TPRL policy on ``split``; skipped unless ``tprl.enabled``."""
    import ray

    from pipeline import tracking
    from pipeline.cluster import device_for, gpus_per_actor, init_ray
    from pipeline.shards import config_hash
    from stages.common import model_actor, run_sharded, shard_ranges

    start = time.perf_counter()
    tc = config.tprl
    if not tc.enabled:
        return TPRLReport(STAGE, stage_dir(config), 0, 0.0, skipped="tprl.enabled is false")
    feats = feature_args(config, split)
    prep = prepared_args(config, feats)
    traj = trajectory_hash(config, prep)
    result_hash = config_hash({"trajectory": traj, "iterations": tc.iterations})[:16]
    marker = Path(stage_dir(config)) / "_SUCCESS"
    if marker.is_file() and json.loads(marker.read_text()).get("run_hash") == result_hash \
            and Path(policy_dir(config), "model.safetensors").is_file():
        done = json.loads(marker.read_text())
        return TPRLReport(STAGE, policy_dir(config), 0, time.perf_counter() - start, tc.iterations,
                          metrics=done.get("metrics", {}))

    if not ray.is_initialized():
        init_ray(config)
    records = load_records(config, split)
    ranges = shard_ranges(len(records), config.shards.dialogues_per_shard)
    feature_out = StageOutput(**feats)
    gpus = gpus_per_actor()
    options = {"max_new_tokens": config.evaluate.max_new_tokens, "teacher_layers": tc.teacher_layers, "b": tc.b,
               "share_of": tc.share_of}
    ckpt_dir = Path(stage_dir(config)) / "checkpoints" / traj
    report = TPRLReport(STAGE, policy_dir(config), 1, 0.0, tc.iterations)
    with tracking.stage_run(config, STAGE, params=tracking.flatten({"tprl": asdict(tc)})):
        import mlflow

        mlflow.set_tags({"run_hash": result_hash, "trajectory_hash": traj})
        actor_cls = model_actor(TPRLWorker, gpus)
        actors: list = []

        def get_actors() -> list:  # started once, on first need, for both the prepare pass and the rollouts
            if not actors:
                actors.extend(actor_cls.remote(config.model.path, config.model.dtype, device_for(gpus), feats, prep,
                                               options) for _ in range(tc.num_actors))
            return actors

        try:
            out = StageOutput(**prep)
            if not out.is_complete():
                pool = iter(get_actors() * len(ranges))
                out.prepare({"tprl": asdict(tc), "model": config.model.path}, overwrite=config.shards.overwrite)
                slim = [{k: r[k] for k in ("dialogue_id", "source", "questions", "answers")} for r in records]
                run_sharded(out, len(ranges), len(records), make_actor=lambda: next(pool), num_actors=tc.num_actors,
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
                policy, ae_history, bc_history = _initial_policy(config, feature_out, len(ranges), prepared)
                _log_series("ae_loss", ae_history)
                _log_series("bc_loss", bc_history)
                optimizer, iteration = new_optimizer(policy), 0
                save_checkpoint(ckpt_dir, 0, policy, optimizer, meta)
            if iteration < tc.iterations:
                report.metrics = _ppo(config, records, prepared, get_actors(), policy, optimizer, iteration, ckpt_dir,
                                      meta, progress)
            else:
                report.metrics = json.loads((found / "state.json").read_text()).get("metrics", {})
        finally:  # also after a failure: the actors hold an LVLM each
            for actor in actors:
                ray.kill(actor)
        _save_policy_atomic(policy, policy_dir(config))
        mlflow.log_artifacts(policy_dir(config), artifact_path="tprl_policy")
    marker.write_text(json.dumps({"run_hash": result_hash, "trajectory_hash": traj, "iterations": tc.iterations,
                                  "metrics": report.metrics}, indent=2) + "\n")
    report.seconds = time.perf_counter() - start
    log.info(report.line())
    return report
