"""The per-worker loop of the train stage under Ray Train: DeepSpeed engine, data order, checkpoints, the held-out
pass, the saved compressor."""

from __future__ import annotations

import os
import time

from stages.train.student import build_student
from stages.train.validation import EarlyStopping, kl_pass, load_weights, set_lr


def _make_source(plan: dict, adapter, keep: int = 2):
    """``keep``: shards held decoded at once (the loader's shuffle window, train.shuffle_shards)."""
    from stages.train.data import CachedSource, OnlineSource

    if plan["kind"] == "cached":
        return CachedSource(plan["feature_args"], plan["teacher_args"], plan["questions"], adapter, keep=keep)
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
    import math
    import tempfile

    import ray.train
    import torch
    import torch.distributed as dist

    from infra.deepspeed import batch_split, full_fp32_state, initialize
    from pipeline.config import TrainConfig
    from pipeline.env import apply_defaults
    from stages.train.data import batch_keys, planned_epochs, steps_per_epoch

    apply_defaults()
    started = time.perf_counter()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tc = TrainConfig(**cfg["train"])
    on_gpu = bool(cfg["use_gpu"]) and torch.cuda.is_available()
    device = f"cuda:{ctx.get_local_rank()}" if on_gpu else "cpu"
    if on_gpu:
        torch.cuda.set_device(device)
    dtype = getattr(torch, cfg["model_dtype"])  # on every device: evaluate runs the LVLM so (docs/design.md §6.3)
    adapter, _zero3_live = _load_lvlm(cfg["model_path"], device, dtype, tc, world, on_gpu, cfg.get("video"))
    lvlm_bytes = local_parameter_bytes(adapter.model)  # as loaded, before DeepSpeed's engine exists
    auto_share = None
    if tc.generator == "auto":  # decided on the first batch of every rank, averaged: the same on all of them
        import dataclasses

        from stages.train.student import initial_entropy_share, resolve_generator

        micro0 = math.prod(batch_split(tc, world))  # the first optimizer step's rows
        per_epoch0 = steps_per_epoch(cfg["plan"]["shard_rows"], world, micro0)
        first = _make_source(cfg["plan"], adapter).examples(
            batch_keys(cfg["plan"]["shard_rows"], tc.seed, 0, rank, world, micro0, per_epoch0, tc.shuffle_shards))
        share = torch.tensor([initial_entropy_share(adapter.text_config.hidden_size, tc, tc.seed,
                                                    [e.features for e in first], [e.layout for e in first],
                                                    cfg["rate"])], dtype=torch.float64)
        dist.all_reduce(share)
        auto_share = float(share) / world
        tc = dataclasses.replace(tc, generator=resolve_generator("auto", auto_share))
    student = build_student(adapter, tc, tc.seed)
    # ZeRO-3: vectors (norms, biases, omega) stay whole on every worker, matrices are partitioned.
    engine = initialize(student, tc, world, on_gpu, persist_numel=4 * adapter.text_config.hidden_size)
    micro, accumulation = batch_split(tc, world)
    rows = micro * accumulation  # a worker's rows per optimizer step: the data order of micro batch `rows`
    plan, rate = cfg["plan"], cfg["rate"]
    per_epoch = steps_per_epoch(plan["shard_rows"], world, rows)
    total = per_epoch * planned_epochs(per_epoch, tc.epochs, tc.min_steps)

    step, last = 0, {}
    # Resume from safetensors + JSON only (stages/train/checkpoints.py, docs/design.md §8): DeepSpeed's own
    # load_checkpoint unpickles, so it is never called; a damaged or foreign checkpoint restarts the rate from 0.
    from stages.train import checkpoints

    step, last, extra = checkpoints.resume(ray.train.get_checkpoint(), engine, student.compressor, rank, world,
                                           cfg["run_hash"])
    validation = cfg.get("validation") if tc.validate_every > 0 else None
    stopping = EarlyStopping.from_dict(tc.patience, extra.get("early_stopping"), tc.lr_decay_on_plateau)
    best_dir = f"{cfg['compressor_dir']}.best"
    has_best = stopping.best_kl < float("inf")  # the best may be the initial weights (step 0)
    best_state = _read_best(best_dir, extra.get("best_sha256")) if validation and has_best else None
    if validation and has_best and best_state is None:  # its file is gone or changed: start the search over
        stopping = EarlyStopping(tc.patience, decay=tc.lr_decay_on_plateau)
    set_lr(engine, tc.lr * stopping.lr_scale)  # a resumed run goes on at the rate it had reached

    def save_and_report(metrics: dict) -> None:
        # Every rank writes its own files; Ray merges the ranks' files into one checkpoint directory.
        with tempfile.TemporaryDirectory() as tmp:
            checkpoints.save(tmp, engine, student.compressor, rank, world, tc.zero_stage, step, cfg["run_hash"],
                             last, {"early_stopping": stopping.to_dict(), "best_sha256": best_sha})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    best_sha = extra.get("best_sha256") if best_state is not None else None
    source = _make_source(plan, adapter, max(2, tc.shuffle_shards))
    val_source = _make_source(validation, adapter) if validation else None
    metrics_log = _MetricLog(cfg["tracking_uri"], cfg["run_id"]) if rank == 0 else _MetricLog(None, None)
    crash_after = cfg.get("crash_after_step")
    setup_seconds, first_step = time.perf_counter() - started, step
    curve: list[dict] = []  # this attempt's steps, saved beside the compressor (analyze compressor plots them)

    def validate() -> None:
        # Early stopping on the validation split (docs/design.md §4.2): every rank gets the same all-reduced KL.
        nonlocal best_state, best_sha
        last["val_kl"] = kl_pass(engine, validation, val_source, rate, rank, world, micro)["metacompress"]
        improved = stopping.update(last["val_kl"], step, count=step > tc.plateau_start * total)
        set_lr(engine, tc.lr * stopping.lr_scale)
        if improved:
            best_state = full_fp32_state(student.compressor)  # a collective under ZeRO
            best_sha = _broadcast_text(_write_best(student.compressor.config, best_state, tc.compressor_dtype,
                                                   best_dir) if rank == 0 else None, rank)

    engine.train()
    if validation and step == 0:  # the start competes too: with a Spatial prior it is Spatial's pooling
        validate()
        metrics_log.add(last, 0)
        curve.append({"step": 0, **last})
    batches = _batches(source, plan, lambda s: batch_keys(plan["shard_rows"], tc.seed, s, rank, world, rows,
                                                          per_epoch, tc.shuffle_shards), step, total, tc.zero_stage)
    while step < total and not (validation and stopping.stop):  # a resumed run that had stopped stays stopped
        t0 = time.perf_counter()
        out = accumulate(engine, batches(step), micro, rate)
        step += 1
        seconds = time.perf_counter() - t0
        last = {**out, "lr": engine.get_lr()[0], "step_seconds": seconds,
                "dialogues_per_second": rows * world / seconds, "epoch": (step - 1) // per_epoch}
        if validation and (step % tc.validate_every == 0 or step == total):
            validate()
        metrics_log.add(last, step)
        curve.append({"step": step, **last})
        if validation and stopping.stop:
            break
        if step % 10 == 0:
            metrics_log.flush()
        if step % tc.checkpoint_every == 0 and step < total:  # the last one is saved with the result below
            metrics_log.flush()
            save_and_report({**last, "step": step})
        # the first attempt only: a retried one (train.max_failures) resumes before this step and gets past it
        if crash_after is not None and first_step == 0 and step == int(crash_after):
            metrics_log.flush()
            os._exit(1)  # a hard crash (test hook): no cleanup, no report

    train_seconds = time.perf_counter() - started - setup_seconds
    if best_state is not None:  # the weights kept are the best on the validation split, not the last ones
        load_weights(student.compressor, best_state)
        last = {**last, "val_kl_best": stopping.best_kl, "best_step": stopping.best_step, "stopped_at": step,
                "stopped_early": float(step < total)}
    # The result: the full fp32 weights (a collective), identical on every replica, saved by rank 0.
    state = best_state if best_state is not None else full_fp32_state(student.compressor)
    flat = torch.cat([t.flatten() for t in state.values()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    replica_diff = max(float((g - flat).abs().max()) for g in gathered)
    if rank == 0:
        _save_atomic(final_compressor(student.compressor.config, state, tc.compressor_dtype), cfg["compressor_dir"])
        _write_curve(curve, cfg["compressor_dir"])
    peak = torch.tensor([float(_peak_memory_bytes(on_gpu))])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if auto_share is not None:
        last = {**last, "auto_initial_entropy_share": auto_share, "auto_chose_normed": float(tc.generator == "normed")}
    result = {**last, "step": step, "total_steps": total, "replica_max_abs_diff": replica_diff,
              "setup_seconds": setup_seconds, "train_seconds": train_seconds,
              "steps_per_second": (step - first_step) / train_seconds if step > first_step else 0.0,
              "peak_memory_bytes_per_worker": float(peak),
              # the frozen LVLM's parameter bytes on one worker as loaded (ZeRO-3: its partitions) and in all
              "lvlm_param_bytes_per_worker": float(lvlm_bytes[0]), "lvlm_param_bytes": float(lvlm_bytes[1]),
              "frozen_params_partitioned": sum(1 for p in student.lvlm.parameters()
                                               if hasattr(p, "ds_id") and not getattr(p, "ds_persist", False))}
    if cfg.get("heldout"):
        held = kl_pass(engine, cfg["heldout"], _make_source(cfg["heldout"], adapter), rate, rank, world, micro,
                       ("metacompress", "sample"))
        result.update({"heldout_kl": held["metacompress"], "heldout_kl_sample": held["sample"],
                       "heldout_tokens": held["tokens"], "heldout_dialogues": held["dialogues"]})
    metrics_log.add({k: v for k, v in result.items() if k.startswith("heldout")}, step)
    metrics_log.flush()
    # Ray Train keeps the metrics of the latest checkpoint as the result: the final report carries one.
    save_and_report(result)


def accumulate(engine, examples: list, micro: int, rate: float) -> dict:
    """One optimizer step over a worker's ``examples``: ``len(examples) / micro`` forward/backward passes of ``micro``
    dialogues, DeepSpeed's gradient accumulation (its engine divides each loss by the count and steps the optimizer
    on the last); the mean of their loss terms."""
    sums: dict = {}
    chunks = [examples[i:i + micro] for i in range(0, len(examples), micro)]
    for chunk in chunks:
        out = engine(chunk, rate)
        engine.backward(out["loss"])
        engine.step()
        for key in ("loss", "kl", "entropy", "collapse"):
            sums[key] = sums.get(key, 0.0) + out[key].item() / len(chunks)
    return sums


def _load_lvlm(model_path: str, device: str, dtype, tc, world: int, on_gpu: bool, video: dict | None = None):
    """(adapter, the live ZeRO-3 config or None). Under ZeRO-3 the frozen LVLM is partitioned as it loads
    (docs/design.md §6.3): with transformers' ``HfDeepSpeedConfig`` alive, ``from_pretrained`` builds every parameter
    inside ``deepspeed.zero.Init`` and copies each checkpoint tensor into its partitions, so no worker holds the
    whole model; the engine later adopts those parameters as they are. transformers keeps only a weak reference to
    the config: the caller holds it for the worker's life. ``video`` (frame sampling): the video adapter around the
    same model (compress.lvlm.video), for video dialogues."""
    from compress.lvlm import load_adapter

    def load():
        adapter = load_adapter(model_path, device=device, dtype=dtype)
        if video is None:
            return adapter
        from compress.lvlm.video import video_adapter

        return video_adapter(adapter, **video)

    if tc.zero_stage != 3:
        return load(), None
    import deepspeed
    from transformers import AutoConfig
    from transformers.integrations import HfDeepSpeedConfig

    from infra.deepspeed import zero3_init_config
    from pipeline.env import disable_deepspeed_shm_build

    disable_deepspeed_shm_build()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    hidden = AutoConfig.from_pretrained(model_path).get_text_config().hidden_size
    live = HfDeepSpeedConfig(zero3_init_config(tc, world, dtype, persist_numel=4 * hidden))
    return load(), live


def local_parameter_bytes(module) -> tuple[int, int]:
    """(bytes of ``module``'s parameters held by this process, bytes of all of them): under ZeRO-3 a partitioned
    parameter holds its partition ``ds_tensor`` (its full size is ``ds_numel``), any other its whole tensor."""
    local = full = 0
    for p in module.parameters():
        part = getattr(p, "ds_tensor", None)
        size = p.element_size() if part is None else part.element_size()
        local += (p.numel() if part is None else part.numel()) * size
        full += getattr(p, "ds_numel", p.numel()) * size
    return local, full


def _batches(source, plan: dict, keys_of, start: int, stop: int, zero_stage: int):
    """step -> its examples: prefetched on a thread for the cached teacher (stages/train/data.py ``Prefetcher``);
    computed in the step for the online teacher and under ZeRO-3, whose model forwards are collectives."""
    from stages.train.data import Prefetcher

    if plan["kind"] != "cached" or zero_stage == 3:
        return lambda step: source.examples(keys_of(step))
    return Prefetcher(source, keys_of, start, stop).get


def _peak_memory_bytes(on_gpu: bool) -> int:
    """Peak accelerator memory on GPU; peak resident set size of the worker process on CPU."""
    import resource

    import torch

    if on_gpu:
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def final_compressor(config: dict, state: dict, compute_dtype: str):
    """The MetaCompress to save: the full fp32 ``state`` and the compute dtype of training in its config, which
    every loader restores (``MetaCompress.from_pretrained``), so evaluate's P is training's (docs/design.md §6.3)."""
    from compress.metacompress import MetaCompress

    final = MetaCompress(**MetaCompress.init_kwargs(config))
    final.load_state_dict(state)
    final.config["compute_dtype"] = compute_dtype
    return final


def _write_curve(curve: list[dict], directory: str) -> None:
    """``train_log.jsonl``: one JSON object per step of this attempt (steps before a resume live in MLflow)."""
    import json

    from pipeline import storage

    storage.write_bytes(f"{directory}/train_log.jsonl", "".join(json.dumps(row) + "\n" for row in curve).encode())


def _save_atomic(module, directory: str) -> None:
    from pipeline import storage

    with storage.staged_dir(directory) as tmp:  # any storage URI (docs/design.md §6.4)
        module.save_pretrained(tmp)


def _write_best(config: dict, state: dict, compute_dtype: str, directory: str) -> str:
    """The best weights so far, saved as the final compressor would be (for a resumed run); their sha256."""
    from pipeline.storage import file_sha256

    _save_atomic(final_compressor(config, state, compute_dtype), directory)
    return file_sha256(f"{directory}/model.safetensors")


def _read_best(directory: str, sha256: str | None) -> dict | None:
    """The best weights a resumed run recorded, or None when their file is missing or not the one recorded."""
    import hashlib

    from safetensors.torch import load

    from pipeline import storage

    path = f"{directory}/model.safetensors"
    data = storage.read_bytes(path) if sha256 and storage.is_file(path) else b""
    if not data or hashlib.sha256(data).hexdigest() != sha256:
        return None
    return load(data)


def _broadcast_text(text: str | None, rank: int) -> str | None:
    """Rank 0's ``text`` on every rank."""
    import torch.distributed as dist

    box = [text if rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]
