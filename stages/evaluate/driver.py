"""The evaluate stage's driver: plan the (method, rate) outputs, compute the missing shards on a pool of actors,
aggregate, write the reports, log to MLflow and promote."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from pipeline.config import PipelineConfig
from pipeline.hashing import config_hash
from pipeline.reports import results_markdown
from pipeline.shards import StageOutput
from stages.common import (StageFailed, StageReport, load_split, model_actor, shard_ranges, stage_actors,
                           video_sampling)
from stages.evaluate.judging import check_judged, judge_rows
from stages.evaluate.planning import Job, plan
from stages.evaluate.promotion import track
from stages.evaluate.report_files import matrix_items, write_report_files
from stages.evaluate.summary import (compare_to_metacompress, full_token_answers, merge_seeds, per_turn_efficiency,
                                     read_rows, summarise)
from stages.evaluate.worker import EvalWorker
from stages.outputs import EVALUATE as STAGE
from stages.outputs import eval_feature_hash, eval_uri, extract_args, reports_dir

log = logging.getLogger("metacompress")


@dataclass
class EvaluationReport(StageReport):
    split: str = ""
    summaries: list[dict] = field(default_factory=list)
    reports_dir: str = ""
    agreement_reference: str = ""
    skipped: list[str] = field(default_factory=list)
    promotion: dict | None = None
    computed_outputs: list[str] = field(default_factory=list)


def _compute(config: PipelineConfig, jobs: list[Job], outs: dict[str, StageOutput], ranges: list[tuple[int, int]],
             records: list[dict], split: str, progress: bool) -> tuple[int, int, list[str]]:
    """Run the missing (job, shard) tasks on a pool of actors; returns (tasks run, records, keys computed)."""
    from ray.util import ActorPool
    from tqdm import tqdm

    from pipeline.cluster import actor_gpus, device_for

    todo = [(job, i) for job in jobs for i in outs[job.key].missing_shards(len(ranges))]
    if not todo:
        return 0, 0, []
    ev = config.evaluate
    from pipeline.datasets.common import generation_for

    sources = {d["source"] for d in records}
    generation = {src: generation_for(src, ev.generation, ev.max_new_tokens) for src in sources}
    options = {"max_new_tokens": ev.max_new_tokens, "history": ev.history, "batch_size": ev.batch_size,
               "generation": generation}
    feature_args = None
    if ev.cached_features:
        feature_args = {**extract_args(config, split), "config_hash": eval_feature_hash(config, split)}
    gpus = actor_gpus(config, STAGE)
    actor_cls = model_actor(EvalWorker, gpus, config.resources.evaluate.num_cpus)  # restarted when it dies
    video = video_sampling(config)
    pool = ActorPool(stage_actors(STAGE, actor_cls, (config.model.path, config.model.dtype, device_for(gpus), options,
                                                     video), min(ev.num_actors, len(todo))))
    slim = [{k: d[k] for k in ("dialogue_id", "image", "source", "questions", "answers", "where")} for d in records]

    def submit(actor, item):
        job, i = item
        payload = {"key": job.key, "method": job.method, "rate": job.rate, "compressor": job.compressor,
                   "out_args": job.out_args, "seed": job.run_seed, "features": feature_args}
        return actor.run_shard.remote(payload, i, slim[ranges[i][0]:ranges[i][1]])

    done = 0
    for result in tqdm(pool.map_unordered(submit, todo), total=len(todo), desc=STAGE, unit="shard",
                       disable=not progress):
        done += result["records"]
        for record_id, reason in result["errors"]:
            outs[result["key"]].record_error(record_id, reason)
    return len(todo), done, list(dict.fromkeys(job.key for job, _ in todo))


def run(config: PipelineConfig, split: str = "test", progress: bool = True) -> EvaluationReport:
    """Evaluate every configured (method, rate) on ``split`` (only what is not cached), then write the reports,
    log to MLflow and apply the registry promotion rule."""
    import ray

    from pipeline.cluster import init_ray

    start = time.perf_counter()
    records, bad = load_split(config, split, config.data.max_eval_dialogues)
    if not records:
        raise StageFailed(f"evaluate: {getattr(config.data, split)} has no valid dialogue to evaluate")
    check_judged(config, split, records)  # free-form dialogues need a judge (docs/design.md §3.5)
    if not ray.is_initialized():
        init_ray(config)
    jobs, skipped = plan(config, split)
    ranges = shard_ranges(len(records), config.shards.dialogues_per_shard)
    outs = {}
    for job in jobs:
        out = outs[job.key] = StageOutput(**job.out_args)
        out.prepare({"method": job.method, "rate": job.rate, "compressor": job.compressor, **config.to_dict()},
                    overwrite=config.shards.overwrite)
        known = {e["record_id"] for e in out.errors()}
        for record_id, reason in bad:
            if record_id not in known:  # a re-run does not append the same bad line again
                out.record_error(record_id, reason)
    tasks, computed_records, computed = _compute(config, jobs, outs, ranges, records, split, progress)
    total = len(records) + len(bad)
    errors = 0
    for job in jobs:
        out = outs[job.key]
        errors = max(errors, len(out.errors()))
        if len(out.errors()) / total > config.shards.max_error_fraction:
            raise StageFailed(f"evaluate {job.key}: {len(out.errors())} of {total} records failed (more than "
                              f"shards.max_error_fraction = {config.shards.max_error_fraction}); see "
                              f"{out.uri}/_errors.jsonl")
        out.finish(len(ranges))

    rows = {job.key: read_rows(outs[job.key], len(ranges)) for job in jobs}
    judged = judge_rows(config, split, jobs, rows)  # judged dialogues' scores: per turn against the full model
    reference, ref_source = full_token_answers(config, split, rows["full"])
    summaries = [summarise(job.method, job.rate, rows[job.key], reference) for job in jobs]
    for job, summary in zip(jobs, summaries):
        if judged.get(job.key):  # ConvBench's names: S1..S_T per turn, S0 the whole conversation
            summary.update({f"S{k[4:]}": v for k, v in summary.items() if k.startswith("Acc_")}, **judged[job.key])
    summaries = merge_seeds(jobs, summaries)
    compare_to_metacompress(jobs, rows, summaries)
    first = {}
    for job in jobs:  # efficiency per turn: a stochastic method's first seed stands for all
        first.setdefault(job.base_key, job)
    per_turn = [e for job in first.values() for e in per_turn_efficiency(job.method, job.rate, rows[job.key])]
    target = reports_dir(config, split)
    render_key = config_hash({"outputs": [j.out_args["config_hash"] for j in jobs], "summaries": summaries,
                              "matrix_images": config.evaluate.matrix_images, "reference": ref_source})
    paths = write_report_files(summaries, per_turn, lambda: matrix_items(config, split, jobs, records), target,
                               config.evaluate.batch_size, render_key)

    report = EvaluationReport(STAGE, eval_uri(config, split), len(jobs) * len(ranges), tasks,
                              computed_records, errors, time.perf_counter() - start, split=split, summaries=summaries,
                              reports_dir=target, agreement_reference=ref_source, skipped=skipped,
                              computed_outputs=computed)
    report.promotion = track(config, split, jobs, summaries, paths, ref_source, skipped)

    log.info("%s", results_markdown(summaries))
    log.info(report.line())
    return report
