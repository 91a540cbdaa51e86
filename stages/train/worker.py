"""The per-worker loop of the train stage under Ray Train: DeepSpeed engine, data order, checkpoints, the held-out
pass, the saved compressor."""

from __future__ import annotations

import os
import time
from pathlib import Path

from stages.train.student import build_student


def _make_source(plan: dict, adapter):
    from stages.train.data import CachedSource, OnlineSource

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
    from stages.train.data import batch_keys, steps_per_epoch

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

    from stages.train.data import rank_shards

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


