"""The evaluate stage's MLflow logging and the registry's promotion of the trained compressors."""

from __future__ import annotations

import logging

from pipeline.config import PipelineConfig
from pipeline.hashing import config_hash
from pipeline.storage import file_sha256  # the compressor may be on any storage URI (docs/design.md §6.4)
from stages.evaluate.planning import COMPRESSOR_WEIGHTS, Job, protocol
from stages.outputs import EVALUATE as STAGE

log = logging.getLogger("metacompress")

# The split the registry decides on: choosing by the test split would make its numbers a selection, not a measurement.
PROMOTION_SPLIT = "val"


def _metric_prefix(method: str, rate: float | None) -> str:
    return method if rate is None else f"{method}/r{rate:g}"


def evaluated_compressors(config: PipelineConfig, jobs: list[Job], summaries: list[dict]):
    """registry.Evaluated for each MetaCompress rate: its score, its weights' sha256 and every baseline at its rate."""
    from pipeline.registry import Evaluated

    out = []
    for job in jobs:
        if job.method != "metacompress":
            continue
        avg = {s["method"]: s["Avg"] for s in summaries if s["rate"] == job.rate}
        baselines = {m: a for m, a in avg.items() if m != "metacompress"}
        key = config_hash({**protocol(config), "rate": job.rate, "data": job.out_args["input_hash"]})
        out.append(Evaluated(job.rate, file_sha256(f"{job.compressor}/{COMPRESSOR_WEIGHTS}"), avg["metacompress"],
                             baselines, key))
    return out


def closest_gap(summaries: list[dict], rate: float | None) -> str:
    """"; closest: <method>, gap +x ± y over N dialogues" for the best other method at ``rate`` (the paired gap of
    stages.evaluate.summary.compare_to_metacompress), so that a promotion decided on a small validation split says
    how little it may mean; empty where there is no such comparison."""
    from pipeline.reports import gap_text

    others = [s for s in summaries if s["rate"] == rate and s.get("vs_metacompress") is not None]
    if not others:
        return ""
    best = max(others, key=lambda s: s["Avg"])
    return (f"; closest: {best['method']}, gap {gap_text(best, '')} over {best['vs_metacompress_dialogues']} "
            f"{PROMOTION_SPLIT} dialogues")


def track(config: PipelineConfig, split: str, jobs: list[Job], summaries: list[dict], reports_path: str,
          agreement_reference: str, skipped: list[str]) -> dict | None:
    """Log params, metrics and report files to the stage's MLflow run; on the validation split, promote the candidate.
    Returns the decision (None on other splits, or when no compressor was evaluated)."""
    import mlflow

    from pipeline import tracking
    from pipeline.registry import promote

    ev = config.evaluate
    params = {"split": split, "methods": ",".join(j.key for j in jobs), "history": ev.history,
              "max_new_tokens": ev.max_new_tokens, "batch_size": ev.batch_size, "cached_features": ev.cached_features,
              "dialogues": summaries[0]["dialogues"], "agreement_reference": agreement_reference}
    with tracking.stage_run(config, STAGE, params=params):
        metrics = {}
        for s in summaries:
            prefix = _metric_prefix(s["method"], s["rate"])
            for k, v in s.items():
                if k not in ("method", "rate", "dialogues") and v is not None:
                    metrics[f"{prefix}/{k}"] = float(v)
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(reports_path, artifact_path=f"reports/{split}")
        if skipped:
            mlflow.log_dict({"skipped": skipped}, f"reports/{split}/skipped.json")
        evaluated = evaluated_compressors(config, jobs, summaries)
        if not evaluated or split != PROMOTION_SPLIT:  # the test split only reports (docs/design.md §6)
            return None
        decision = promote(tracking.tracking_uri(config), config.tracking.registered_model, evaluated).to_dict()
        decision["reason"] += closest_gap(summaries, decision["rate"])
        mlflow.log_dict(decision, "promotion.json")
        mlflow.log_metric("promoted", float(decision["promoted"]))
        mlflow.set_tag("promotion", decision["reason"])
        log.info("evaluate: promotion: %s", decision["reason"])
        return decision
