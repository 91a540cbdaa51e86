"""The evaluate stage's judge (docs/design.md §3.5): free-form dialogues (ConvBench) are scored at aggregation by
ConvBench's pairwise judge against the full-token model's answers, per turn (S1..S3) and overall (S0)."""

from __future__ import annotations

import logging

from pipeline.config import PipelineConfig
from pipeline.metrics import JUDGED_SOURCES
from stages.evaluate.planning import Job

log = logging.getLogger("metacompress")


def judged_ids(records: list[dict]) -> set[str]:
    return {d["dialogue_id"] for d in records if d["source"] in JUDGED_SOURCES}


def check_judged(config: PipelineConfig, split: str, records: list[dict]) -> None:
    """Refuse, before any model work, a split with judged dialogues that the configuration cannot score."""
    judged = sorted({d["source"] for d in records} & JUDGED_SOURCES)
    if not judged:
        return
    where = getattr(config.data, split)
    jc = config.evaluate.judge
    if jc is None or bool(jc.url) == bool(jc.model_dir) or (jc.url and not jc.model):
        raise ValueError(f"{where}: {judged[0]} dialogues are scored by a judge model: set evaluate.judge.url and "
                         "evaluate.judge.model (an OpenAI-compatible endpoint, key in the environment variable "
                         "evaluate.judge.api_key_env) or evaluate.judge.model_dir (a local transformers model)")
    if config.evaluate.history == "reference":
        raise ValueError(f"{where}: {judged[0]} dialogues have no per-turn reference answers to feed as history; "
                         "set evaluate.history: own")


def judge_rows(config: PipelineConfig, split: str, jobs: list[Job], rows: dict[str, list[dict]]) -> dict[str, dict]:
    """Replace the scores of judged dialogues in ``rows`` (job key -> rows) with the judge's per-turn scores (1: the
    judge prefers the method's answer to the full-token model's, 0: not, 0.5: identical answers; ``full`` itself
    scores 0.5). Returns per job key ``{"S0": overall score in percent}``; empty when nothing is judged."""
    from pipeline.dialogues import iter_dialogues
    from pipeline.judge import JudgedDialogue, judge_dialogue, load_positions, make_judge, model_is_a

    wanted = judged_ids(rows["full"])
    if not wanted:
        return {}
    jc = config.evaluate.judge
    assert jc is not None  # check_judged ran first
    meta = {d.dialogue_id: d for d in iter_dialogues(getattr(config.data, split), check_images=False)
            if d.dialogue_id in wanted}
    cache = jc.cache or (f"{config.work_dir}/judge_cache.jsonl" if "://" not in config.work_dir else None)
    judge = make_judge(url=jc.url, model=jc.model, model_dir=jc.model_dir, api_key_env=jc.api_key_env,
                       max_tokens=jc.max_tokens, timeout_s=jc.timeout_s, retries=jc.retries, backoff_s=jc.backoff_s,
                       cache=cache)
    positions = load_positions(jc.positions) if jc.positions else None
    baseline = {r["dialogue_id"]: list(r["answers"]) for r in rows["full"]}
    def one(job: Job, r: dict) -> tuple[list[float], float]:
        d = meta[r["dialogue_id"]]
        m = d.meta or {}
        jd = JudgedDialogue(d.dialogue_id, tuple(t.question for t in d.turns), str(m.get("caption", "")),
                            str(m.get("third_turn_demands", "")), int(m["row"]) if "row" in m else None)
        if job.method == "full":
            return [0.5] * len(jd.questions), 0.5
        turns, ov, _ = judge_dialogue(judge, jd, r["answers"], baseline[r["dialogue_id"]],
                                      model_first=model_is_a(jd.dialogue_id, jd.row, positions, jc.seed))
        return turns, ov

    from concurrent.futures import ThreadPoolExecutor

    out = {}
    with ThreadPoolExecutor(max_workers=jc.concurrency if jc.url else 1) as pool:
        for job in jobs:
            judged = [r for r in rows[job.key] if r["dialogue_id"] in wanted]
            results = list(pool.map(lambda r, job=job: one(job, r), judged))  # in order
            for r, (turns, _) in zip(judged, results):
                r["scores"] = turns
            out[job.key] = {"S0": 100.0 * sum(ov for _, ov in results) / len(results)} if results else {}
    log.info("evaluate: judge %s: %d calls, %d answered from the cache %s", judge.identity, judge.calls, judge.hits,
             cache)
    return out
