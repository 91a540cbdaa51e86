"""Stage `train`: one MetaCompress per rate in ``train.rates``, distilled from the cached teacher (DESIGN 4.2, 6).

A Ray Train ``TorchTrainer`` runs ``train.num_workers`` workers; each wraps :class:`Student` (the compressor plus the
frozen LVLM) in a DeepSpeed engine (``infra.deepspeed``): only the compressor trains, gradients flow through the
frozen LLM. Each step a worker takes its micro batch (``stages.train_data``), reduces the cached features to
``m = num_keep(n, rate)`` tokens, runs the student over the whole dialogue teacher-forced on the teacher's answers
and minimises ``topk_kl + a_entropy * entropy(P) + a_collapse * collapse(P)``.

Resume: a DeepSpeed checkpoint every ``train.checkpoint_every`` steps (and at the end) is reported to Ray Train
under a run name that hashes everything the result depends on; a re-run with the same config finds it through
``ray.train.get_checkpoint()`` and continues from its step (the data order is a function of the step). A finished
rate leaves ``_SUCCESS`` next to its compressor and is skipped. Fault injection for tests: the driver environment
variable ``METACOMPRESS_TRAIN_CRASH_AFTER_STEP=N`` makes every worker exit abruptly after step N.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import PipelineConfig

log = logging.getLogger("metacompress")

STAGE = "train"
CRASH_ENV = "METACOMPRESS_TRAIN_CRASH_AFTER_STEP"


def rate_dir(config: PipelineConfig, rate: float) -> str:
    return f"{config.work_dir}/{STAGE}/rate-{rate}"


def compressor_dir(config: PipelineConfig, rate: float) -> str:
    """Where the trained compressor of ``rate`` is saved (``MetaCompress.save_pretrained``)."""
    return f"{rate_dir(config, rate)}/compressor"


# --- the module DeepSpeed wraps ----------------------------------------------------------------------------------
@functools.cache
def _student_module():
    import torch
    from torch import nn

    from compress.losses import collapse_loss, entropy_loss, topk_kl
    from compress.reduction import num_keep

    class Student(nn.Module):
        """The compressor (trainable) and the LVLM (frozen, always in eval mode). ``forward(examples, rate,
        method)`` -> {"loss", "kl", "entropy", "collapse", "tokens"} for a batch of :class:`Example`;
        ``method="sample"`` replaces the compressor by equidistant sampling (a reference for held-out KL)."""

        def __init__(self, compressor: nn.Module, adapter, entropy_weight: float, collapse_weight: float):
            super().__init__()
            self.compressor = compressor
            self.lvlm = adapter.model
            for p in self.lvlm.parameters():
                p.requires_grad_(False)
            self.adapter = adapter
            self.weights = (entropy_weight, collapse_weight)

        def train(self, mode: bool = True):
            self.training = mode
            self.compressor.train(mode)
            self.lvlm.eval()  # frozen: no dropout, whatever DeepSpeed asks
            return self

        def forward(self, examples: list, rate: float, method: str = "metacompress") -> dict:
            from compress.baselines import FEATURE_REDUCERS
            from compress.lvlm.session import answer_logits_batch

            ad = self.adapter
            xs = [e.features.to(ad.device, ad.dtype) for e in examples]
            keeps = [num_keep(x.shape[0], rate) for x in xs]
            layouts = [e.layout for e in examples]
            if method == "metacompress":
                tokens, matrices = self.compressor(xs, keeps, layouts)
            else:
                reduced = [FEATURE_REDUCERS[method](x, m, lay) for x, m, lay in zip(xs, keeps, layouts)]
                tokens, matrices = [r.tokens for r in reduced], []
            tokens = [t.to(ad.dtype) for t in tokens]
            outs = answer_logits_batch(ad, tokens, [e.questions for e in examples],
                                       [e.answer_ids for e in examples])
            for e, o in zip(examples, outs):
                if o.logits.shape[0] != e.topk_ids.shape[0]:
                    raise ValueError(f"dialogue {e.dialogue_id!r}: {o.logits.shape[0]} answer tokens in the student "
                                     f"pass but {e.topk_ids.shape[0]} teacher targets; the teacher cache is stale")
            logits = torch.cat([o.logits for o in outs])
            dev = logits.device
            count = logits.shape[0]
            if count:
                kl = topk_kl(logits, torch.cat([e.topk_logprobs for e in examples]).to(dev),
                             torch.cat([e.topk_ids for e in examples]).to(dev),
                             teacher_tail_logmass=torch.cat([e.tail_logmass for e in examples]).to(dev))
            else:  # every answer empty: nothing to distil, keep the graph connected
                kl = logits.float().sum() * 0.0
            zero = kl.new_zeros(())
            entropy = collapse = zero
            if method == "metacompress":
                p, row_mask = _pad_matrices(list(matrices))
                entropy, collapse = entropy_loss(p, row_mask), collapse_loss(p)
            loss = kl + self.weights[0] * entropy + self.weights[1] * collapse
            return {"loss": loss, "kl": kl, "entropy": entropy, "collapse": collapse, "tokens": count}

    return Student


def _pad_matrices(mats: list):
    """P_b (m_b, n_b) -> (B, m_max, n_max) zero-padded and the row mask (B, m_max)."""
    import torch

    m_max, n_max = max(p.shape[0] for p in mats), max(p.shape[1] for p in mats)
    out = mats[0].new_zeros(len(mats), m_max, n_max)
    mask = torch.zeros(len(mats), m_max, dtype=torch.bool, device=mats[0].device)
    for b, p in enumerate(mats):
        out[b, : p.shape[0], : p.shape[1]] = p
        mask[b, : p.shape[0]] = True
    return out, mask


@functools.cache
def _tensor_output_class():
    from compress.metacompress import MetaCompress

    class TensorOutput(MetaCompress):
        """MetaCompress whose batched call returns (tokens tuple, matrices tuple) instead of Reductions: ZeRO-3
        re-gathers a module's partitioned weights for backward through hooks on the tensors its forward returns,
        and those hooks do not look inside dataclasses. Same weights and state dict as MetaCompress."""

        def forward(self, xs, keeps, layouts):
            reductions = super().forward(list(xs), list(keeps), list(layouts))
            return tuple(r.tokens for r in reductions), tuple(r.matrix for r in reductions)

    return TensorOutput


def build_student(adapter, train_cfg, seed: int):
    """A fresh compressor (seeded: identical on every worker) around ``adapter``'s frozen model."""
    import torch

    vc = adapter.model.config.vision_config
    side = vc.image_size // vc.patch_size  # the position table at the vision tower's own grid (24 x 24 for 336 px)
    torch.manual_seed(seed)
    compressor = _tensor_output_class()(adapter.text_config.hidden_size, train_cfg.compress_dim,
                                         train_cfg.kernel_size, reference_grid=(side, side)).to(adapter.device)
    return _student_module()(compressor, adapter, train_cfg.entropy_weight, train_cfg.collapse_weight)


# --- the worker loop ---------------------------------------------------------------------------------------------
def _make_source(plan: dict, adapter):
    from stages.train_data import CachedSource, OnlineSource

    if plan["kind"] == "cached":
        return CachedSource(plan["feature_args"], plan["teacher_args"], plan["questions"])
    return OnlineSource(adapter, plan["shards"], plan["top_k"], plan["max_new_tokens"], plan["storage_dtype"])


class _MetricLog:
    """Rank 0's step metrics, sent to the MLflow run in batches (one SQLite transaction per flush)."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.client = None
        if uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client, self.run_id = MlflowClient(tracking_uri=uri), run_id
        self.pending: list = []

    def add(self, metrics: dict, step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]

    def flush(self) -> None:
        if self.client is not None and self.pending:
            self.client.log_batch(self.run_id, metrics=self.pending)
            self.pending = []


def train_loop(cfg: dict) -> None:
    """Per worker (Ray Train). ``cfg``: see ``_loop_config``."""
    import tempfile

    import ray.train
    import torch
    import torch.distributed as dist

    from compress.lvlm import load_adapter
    from compress.metacompress import MetaCompress
    from infra.deepspeed import full_fp32_state, initialize, micro_batch_size
    from pipeline.config import TrainConfig
    from pipeline.env import apply_defaults
    from stages.train_data import batch_keys, steps_per_epoch

    apply_defaults()
    started = time.perf_counter()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tc = TrainConfig(**cfg["train"])
    on_gpu = bool(cfg["use_gpu"]) and torch.cuda.is_available()
    device = f"cuda:{ctx.get_local_rank()}" if on_gpu else "cpu"
    if on_gpu:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if on_gpu else getattr(torch, cfg["model_dtype"])
    adapter = load_adapter(cfg["model_path"], device=device, dtype=dtype)
    student = build_student(adapter, tc, tc.seed)
    # ZeRO-3: vectors (norms, biases, omega) stay whole on every worker, matrices are partitioned.
    engine = initialize(student, tc, world, on_gpu, persist_numel=4 * adapter.text_config.hidden_size)
    micro = micro_batch_size(tc, world)
    plan, rate = cfg["plan"], cfg["rate"]
    per_epoch = steps_per_epoch(plan["shard_rows"], world, micro)
    total = per_epoch * tc.epochs

    step, last = 0, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            path, client = engine.load_checkpoint(ckpt_dir, load_module_strict=False)
        if path is None or client.get("run_hash") != cfg["run_hash"]:
            raise RuntimeError(f"checkpoint {checkpoint.path} does not belong to this run ({cfg['run_hash']}); "
                               "delete it or change work_dir")
        step, last = int(client["step"]), dict(client.get("metrics", {}))

    def save_and_report(metrics: dict) -> None:
        # Every rank writes its ZeRO partition; Ray merges the ranks' files into one checkpoint directory.
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=f"step-{step}", exclude_frozen_parameters=True,
                                   client_state={"step": step, "run_hash": cfg["run_hash"], "metrics": last})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    source = _make_source(plan, adapter)
    metrics_log = _MetricLog(cfg["tracking_uri"], cfg["run_id"]) if rank == 0 else _MetricLog(None, None)
    crash_after = cfg.get("crash_after_step")
    setup_seconds, first_step = time.perf_counter() - started, step
    engine.train()
    while step < total:
        t0 = time.perf_counter()
        keys = batch_keys(plan["shard_rows"], tc.seed, step, rank, world, micro, per_epoch)
        out = engine(source.examples(keys), rate)
        engine.backward(out["loss"])
        engine.step()
        step += 1
        seconds = time.perf_counter() - t0
        last = {"loss": out["loss"].item(), "kl": out["kl"].item(), "entropy": out["entropy"].item(),
                "collapse": out["collapse"].item(), "lr": engine.get_lr()[0], "step_seconds": seconds,
                "dialogues_per_second": micro * world / seconds, "epoch": (step - 1) // per_epoch}
        metrics_log.add(last, step)
        if step % 10 == 0:
            metrics_log.flush()
        if step % tc.checkpoint_every == 0 and step < total:  # the last one is saved with the result below
            metrics_log.flush()
            save_and_report({**last, "step": step})
        if crash_after is not None and step == int(crash_after):
            metrics_log.flush()
            os._exit(1)  # a hard crash (test hook): no cleanup, no report

    train_seconds = time.perf_counter() - started - setup_seconds
    # The result: the full fp32 weights (a collective), identical on every replica, saved by rank 0.
    state = full_fp32_state(student.compressor)
    flat = torch.cat([t.flatten() for t in state.values()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    replica_diff = max(float((g - flat).abs().max()) for g in gathered)
    if rank == 0:
        final = MetaCompress(**_init_kwargs(student.compressor.config))
        final.load_state_dict(state)
        _save_atomic(final, cfg["compressor_dir"])
    peak = torch.tensor([float(_peak_memory_bytes(on_gpu))])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    result = {**last, "step": step, "total_steps": total, "replica_max_abs_diff": replica_diff,
              "setup_seconds": setup_seconds, "train_seconds": train_seconds,
              "steps_per_second": (step - first_step) / train_seconds if step > first_step else 0.0,
              "peak_memory_bytes_per_worker": float(peak),
              "frozen_params_partitioned": sum(1 for p in student.lvlm.parameters()
                                               if hasattr(p, "ds_id") and not getattr(p, "ds_persist", False))}
    result.update(_heldout(engine, cfg, rate, rank, world, micro, adapter))
    metrics_log.add({k: v for k, v in result.items() if k.startswith("heldout")}, step)
    metrics_log.flush()
    # Ray Train keeps the metrics of the latest checkpoint as the result: the final report carries one.
    save_and_report(result)


def _peak_memory_bytes(on_gpu: bool) -> int:
    """Peak accelerator memory on GPU; peak resident set size of the worker process on CPU."""
    import resource

    import torch

    if on_gpu:
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _init_kwargs(config: dict) -> dict:
    return {"hidden_size": config["hidden_size"], "compress_dim": config["compress_dim"],
            "kernel_size": config["kernel_size"], "reference_grid": tuple(config["reference_grid"]),
            "pooling": config.get("pooling", "avg")}


def _save_atomic(module, directory: str) -> None:
    import shutil

    target = Path(directory)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    module.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _heldout(engine, cfg: dict, rate: float, rank: int, world: int, micro: int, adapter) -> dict:
    """Mean KL per answer token on the held-out split (MetaCompress and, for reference, Sample). Every worker
    runs the same number of forwards (ZeRO-3 gathers are collectives); padding batches get weight 0."""
    import torch
    import torch.distributed as dist

    from stages.train_data import rank_shards

    plan = cfg.get("heldout")
    if not plan:
        return {}
    rows = plan["shard_rows"]
    per_rank = [[(s, r) for s in rank_shards(len(rows), k, world) for r in range(rows[s])] for k in range(world)]
    batches = max(-(-len(keys) // micro) for keys in per_rank)
    mine = per_rank[rank]
    source = _make_source(plan, adapter)
    sums = torch.zeros(4, dtype=torch.float64)  # kl*tokens (metacompress), kl*tokens (sample), tokens, dialogues
    engine.eval()
    with torch.no_grad():
        for b in range(batches):
            keys = mine[b * micro:(b + 1) * micro]
            weight = 1.0 if keys else 0.0
            keys = keys or [(0, 0)]  # a dummy batch keeps the forwards in step
            examples = source.examples(keys)
            ours, sample = engine(examples, rate), engine(examples, rate, method="sample")
            sums += torch.tensor([ours["kl"].item() * ours["tokens"], sample["kl"].item() * sample["tokens"],
                                  ours["tokens"], len(keys)], dtype=torch.float64) * weight
    dist.all_reduce(sums)
    tokens = max(float(sums[2]), 1.0)
    return {"heldout_kl": float(sums[0]) / tokens, "heldout_kl_sample": float(sums[1]) / tokens,
            "heldout_tokens": float(sums[2]), "heldout_dialogues": float(sums[3])}


# --- the driver --------------------------------------------------------------------------------------------------
def _cached_plan(config: PipelineConfig, split: str) -> dict | None:
    """Shard arguments and rows of a split's feature + teacher caches; None when the teacher cache is missing."""
    from pipeline.shards import read_completed
    from stages import extract, teacher

    feature_uri, teacher_uri = extract.output_uri(config, split), teacher.output_uri(config, split)
    try:
        features, targets = read_completed(feature_uri), read_completed(teacher_uri)
    except FileNotFoundError:
        return None
    if [features["config_hash"], features["input_hash"]] != [extract.stage_hash(config),
                                                             extract.output_args(config, split)["input_hash"]]:
        raise ValueError(f"{feature_uri} was extracted with another model, dtype, format or dialogue file than this "
                         "config; run the extract stage for this config first")
    expected = teacher.output_args(config, split)
    if [targets["config_hash"], targets["input_hash"]] != [expected["config_hash"], expected["input_hash"]]:
        raise ValueError(f"{teacher_uri} was computed with another teacher config or other features; re-run the "
                         "teacher stage for this config")
    records, _ = extract.load_split(config, split, extract.split_limit(config, split))
    return {"kind": "cached", "shard_rows": [s["rows"] for s in targets["shards"]],
            "feature_args": dict(uri=feature_uri, stage=extract.STAGE, config_hash=features["config_hash"],
                                 input_hash=features["input_hash"], fmt=config.shards.format),
            "teacher_args": dict(uri=teacher_uri, stage=teacher.STAGE, config_hash=targets["config_hash"],
                                 input_hash=targets["input_hash"], fmt=config.shards.format),
            "questions": {r["dialogue_id"]: r["questions"] for r in records},
            "identity": [features["config_hash"], features["input_hash"], targets["config_hash"],
                         targets["input_hash"]]}


def _online_plan(config: PipelineConfig, split: str) -> dict | None:
    from stages import extract
    from pipeline.shards import file_sha256
    from stages.common import shard_ranges

    if not Path(getattr(config.data, split)).is_file():
        return None
    records, _ = extract.load_split(config, split, extract.split_limit(config, split))
    ranges = shard_ranges(len(records), config.shards.dialogues_per_shard)
    shards = [[{k: r[k] for k in ("dialogue_id", "image", "questions")} for r in records[a:b]] for a, b in ranges]
    return {"kind": "online", "shard_rows": [len(s) for s in shards], "shards": shards,
            "top_k": config.teacher.top_k, "max_new_tokens": config.teacher.max_new_tokens,
            "storage_dtype": extract.storage_dtype(config.model.dtype),
            "identity": [extract.stage_hash(config), config.teacher.top_k, config.teacher.max_new_tokens,
                         file_sha256(getattr(config.data, split))]}


def make_plan(config: PipelineConfig, split: str) -> dict | None:
    return (_online_plan if config.train.online_teacher else _cached_plan)(config, split)


def run_hash(config: PipelineConfig, rate: float, plan: dict) -> str:
    """What a trained compressor depends on: the train section (less the other rates and the knobs that do not
    change the result), the rate, the data it was trained on."""
    from pipeline.shards import config_hash

    train = {k: v for k, v in config.to_dict()["train"].items()
             if k not in ("rates", "checkpoint_every", "max_failures")}
    return config_hash({"train": train, "rate": rate, "data": plan["identity"]})[:16]


@dataclass
class TrainReport:
    stage: str
    uri: str
    rates: list[float]
    computed: int
    seconds: float
    results: dict[float, dict] = field(default_factory=dict)

    def line(self) -> str:
        parts = []
        for rate, r in self.results.items():
            text = f"rate {rate}: loss {r.get('loss', float('nan')):.4f} after {r.get('step', 0)} steps"
            if "heldout_kl" in r:
                text += f", held-out KL {r['heldout_kl']:.4f} (sample {r['heldout_kl_sample']:.4f})"
            parts.append(text)
        return (f"train: {len(self.rates)} rates ({self.computed} trained, {len(self.rates) - self.computed} reused), "
                f"{self.seconds:.1f} s; " + "; ".join(parts) + f" -> {self.uri}")


def _loop_config(config: PipelineConfig, rate: float, plan: dict, heldout: dict | None, use_gpu: bool,
                 rhash: str, tracking: tuple[str | None, str | None]) -> dict:
    import dataclasses

    return {"train": dataclasses.asdict(config.train), "model_path": config.model.path,
            "model_dtype": config.model.dtype, "use_gpu": use_gpu, "rate": rate, "plan": plan, "heldout": heldout,
            "run_hash": rhash, "compressor_dir": compressor_dir(config, rate), "tracking_uri": tracking[0],
            "run_id": tracking[1], "crash_after_step": os.environ.get(CRASH_ENV)}


def train_rate(config: PipelineConfig, rate: float, plan: dict, heldout: dict | None,
               tracking_run_id: str | None) -> dict:
    """Fit one compressor with Ray Train; returns the last metrics reported by rank 0."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.cluster import gpus_per_actor
    from pipeline.tracking import tracking_uri

    if config.train.zero_stage == 3 and config.train.online_teacher:
        raise ValueError("train.online_teacher with train.zero_stage 3 is not supported: the teacher's greedy "
                         "generation runs a data-dependent number of forwards per worker, which ZeRO-3's collective "
                         "weight gathers cannot match; use zero_stage 0 or 2 for the online teacher")
    use_gpu = gpus_per_actor() >= 1
    rhash = run_hash(config, rate, plan)
    scaling = ScalingConfig(num_workers=config.train.num_workers, use_gpu=use_gpu,
                            resources_per_worker={"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1})
    run_config = RunConfig(name=f"rate-{rate}-{rhash}", storage_path=f"{config.work_dir}/{STAGE}/ray",
                           failure_config=FailureConfig(max_failures=config.train.max_failures),
                           checkpoint_config=CheckpointConfig(num_to_keep=2))
    trainer = TorchTrainer(train_loop, train_loop_config=_loop_config(
        config, rate, plan, heldout, use_gpu, rhash, (tracking_uri(config), tracking_run_id)),
        scaling_config=scaling, run_config=run_config)
    result = trainer.fit()
    return dict(result.metrics or {})


def run(config: PipelineConfig, split: str = "train", progress: bool = True) -> TrainReport:
    """Train (or reuse) one compressor per rate; log and register each in MLflow with the alias ``candidate``.
    (``progress``: accepted for the stage interface; Ray Train reports progress itself.)"""
    from pipeline import tracking

    start = time.perf_counter()
    plan = make_plan(config, split)
    if plan is None:
        raise FileNotFoundError(f"train: no teacher cache for split {split!r} under {config.work_dir}; run the "
                                "extract and teacher stages first (or set train.online_teacher: true)")
    heldout = make_plan(config, "test") if split != "test" else None
    report = TrainReport(STAGE, f"{config.work_dir}/{STAGE}", list(config.train.rates), 0, 0.0)
    with tracking.stage_run(config, STAGE, params=tracking.flatten({"train": config.to_dict()["train"]})):
        for rate in config.train.rates:
            rhash = run_hash(config, rate, plan)
            marker = Path(rate_dir(config, rate)) / "_SUCCESS"
            if marker.is_file() and json.loads(marker.read_text()).get("run_hash") == rhash \
                    and Path(compressor_dir(config, rate)).is_dir():
                report.results[rate] = json.loads(marker.read_text())["metrics"]
                continue
            with tracking.nested_run(f"{STAGE}/rate-{rate}", params={"rate": rate, "run_hash": rhash}) as run_:
                metrics = train_rate(config, rate, plan, heldout, run_.info.run_id)
                version = tracking.log_compressor(compressor_dir(config, rate), config,
                                                  tags={"rate": str(rate), "run_hash": rhash})
                metrics = {**metrics, "model_version": int(version.version)}
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"run_hash": rhash, "metrics": metrics}, indent=2))
            report.results[rate] = metrics
            report.computed += 1
    report.seconds = time.perf_counter() - start
    log.info(report.line())
    return report
