"""The evaluate stage's aggregation: per (method, rate) accuracy per turn, agreement with the full-token model, and
the efficiency figures (docs/design.md §5)."""

from __future__ import annotations

import statistics

from pipeline.config import PipelineConfig
from pipeline.metrics import paired_avg_difference, per_turn_accuracy, same_answer
from pipeline.shards import StageOutput
from stages.common import StageFailed
from stages.outputs import complete_output, teacher_args


def read_rows(out: StageOutput, num_shards: int) -> list[dict]:
    return [r for i in range(num_shards) for r in out.read_records(i)]


def full_token_answers(config: PipelineConfig, split: str, full_rows: list[dict]) -> tuple[dict[str, list[str]], str]:
    """dialogue_id -> the full-token model's answer per turn, and where they come from: the teacher stage's own
    answers when that stage finished for this split under the same protocol (same history, same answer length),
    else the ``full`` method's evaluation answers."""
    if (config.evaluate.history == config.teacher.history
            and config.teacher.max_new_tokens == config.evaluate.max_new_tokens):
        try:
            out = complete_output(teacher_args(config, split))
        except FileNotFoundError:  # extract did not run on this split
            out = None
        if out is not None:
            rows = read_rows(out, out.manifest()["num_shards"])
            return {r["dialogue_id"]: list(r["answers"]) for r in rows}, "teacher"
    return {r["dialogue_id"]: list(r["answers"]) for r in full_rows}, "full"


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _std(xs: list[float]) -> float | None:
    return statistics.stdev(xs) if len(xs) > 1 else (0.0 if xs else None)


def summarise(job_method: str, rate: float | None, rows: list[dict], reference: dict[str, list[str]]) -> dict:
    """One (method, rate): per-turn accuracy (pipeline.metrics.per_turn_accuracy of the stored scores), teacher
    agreement and dialogue-level efficiency (see pipeline.reports for the keys)."""
    if not rows:
        raise StageFailed(f"evaluate: method {job_method} at rate {rate} has no evaluated dialogue")
    out: dict = {"method": job_method, "rate": rate, "dialogues": len(rows)}
    out.update(per_turn_accuracy([r["scores"] for r in rows]))
    same = [same_answer(a, ref[t]) for r in rows if (ref := reference.get(r["dialogue_id"]))
            for t, a in enumerate(r["answers"]) if t < len(ref)]
    out["agreement"] = 100.0 * sum(same) / len(same) if same else None
    ttft = [1e3 * r["ttft_s"][0] for r in rows]
    e2e = [1e3 * sum(r["total_s"]) for r in rows]
    out.update(ttft_ms=_mean(ttft), ttft_ms_std=_std(ttft), e2e_ms=_mean(e2e), e2e_ms_std=_std(e2e),
               peak_mem_gb=max(max(r["peak_memory_bytes"]) for r in rows) / 1e9,
               tflops=_mean([sum(r["prefill_flops"]) / 1e12 for r in rows]),
               kv_cache_len=_mean([r["kv_cache_len"][-1] for r in rows]),
               visual_tokens=_mean([r["visual_tokens"][0] for r in rows]))
    return out


def per_turn_efficiency(method: str, rate: float | None, rows: list[dict]) -> list[dict]:
    turns = max(len(r["scores"]) for r in rows)
    out = []
    for t in range(turns):
        at = [r for r in rows if len(r["scores"]) > t]
        out.append({"method": method, "rate": rate, "turn": t + 1,
                    "ttft_ms": _mean([1e3 * r["ttft_s"][t] for r in at]),
                    "decode_ms": _mean([1e3 * r["decode_s"][t] for r in at]),
                    "total_ms": _mean([1e3 * r["total_s"][t] for r in at]),
                    "peak_mem_mb": max(r["peak_memory_bytes"][t] for r in at) / 2**20,
                    "prefill_gflops": _mean([r["prefill_flops"][t] / 1e9 for r in at]),
                    "kv_cache_len": _mean([r["kv_cache_len"][t] for r in at]),
                    "visual_tokens": _mean([r["visual_tokens"][t] for r in at])})
    return out


SPREAD_KEYS = ("Acc_", "Avg", "S", "agreement")  # summary keys whose spread over seeds is reported (key + "_std")


def merge_seeds(jobs: list, summaries: list[dict]) -> list[dict]:
    """One summary per (method, rate): a stochastic method evaluated with several seeds (evaluate.seeds) gets the
    mean of every figure over its seeds, ``seeds`` (how many) and, for the accuracy and judge scores, ``<key>_std``
    (sample standard deviation over the seeds), as the paper averages Random over three seeds."""
    groups: dict[str, list[dict]] = {}
    for job, s in zip(jobs, summaries):
        groups.setdefault(job.base_key, []).append(s)
    out = []
    for group in groups.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        merged = dict(group[0])
        for k, v in group[0].items():
            if k in ("method", "rate") or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            values = [s[k] for s in group if s.get(k) is not None]
            merged[k] = _mean(values)
            if k.startswith(SPREAD_KEYS) and not k.endswith("_std") and k != "dialogues":
                merged[f"{k}_std"] = _std(values)
        merged["dialogues"] = group[0]["dialogues"]
        merged["seeds"] = len(group)
        out.append(merged)
    return out


def compare_to_metacompress(jobs: list, rows: dict[str, list[dict]], summaries: list[dict]) -> None:
    """Adds to every other summary at a rate where MetaCompress ran ``vs_metacompress`` (MetaCompress's Avg minus its
    own, points, paired over the dialogues both evaluated), ``vs_metacompress_se`` (its standard error,
    pipeline.metrics.paired_avg_difference) and ``vs_metacompress_dialogues``. ``summaries`` are merge_seeds's, one
    per job base key in the jobs' order; a stochastic method's scores are averaged over its seeds first."""
    runs: dict[str, dict[str, list[list[float]]]] = {}
    for job in jobs:
        for r in rows[job.key]:
            runs.setdefault(job.base_key, {}).setdefault(r["dialogue_id"], []).append(r["scores"])
    scores = {key: {d: [sum(turn) / len(turn) for turn in zip(*seeds)] for d, seeds in per.items()}
              for key, per in runs.items()}
    keys = list(dict.fromkeys(job.base_key for job in jobs))
    ours = {s["rate"]: key for key, s in zip(keys, summaries) if s["method"] == "metacompress"}
    for key, s in zip(keys, summaries):
        if s["method"] == "metacompress" or s["rate"] not in ours:
            continue
        diff, se, n = paired_avg_difference(scores[ours[s["rate"]]], scores[key])
        s.update(vs_metacompress=diff, vs_metacompress_se=se, vs_metacompress_dialogues=n)
