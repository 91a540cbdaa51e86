"""Stage `evaluate`: every (method x reduction rate) over the split's dialogues, multi-turn, on Ray actors (one GPU
each when the cluster has them) -> per-dialogue answers, scores and efficiency figures; then tables, plots, MLflow
logging and registry promotion (DESIGN 5, 6).

Each (method, rate) is its own cached stage output, ``<work_dir>/evaluate/<split>/<method>[/rate-R]/<hash>``, whose
directory name carries the hash of everything its numbers depend on (model, method, rate, compressor weights, chat
protocol: history, answer length and batch size, since times are those of batched calls; data and its sharding).
Adding a method or a rate, or retraining one compressor, computes only the new outputs; old ones stay on disk
untouched. ``full`` (the Base row) always runs, once, without a rate.

Shard ``i`` holds dialogues ``[i * N, (i + 1) * N)`` of the split; per dialogue: ``dialogue_id``, ``source``,
``questions``, ``references`` (per turn the reference answers), ``answers`` (the model's), ``scores`` (per turn in
[0, 1]: VQA soft accuracy for VQA-v2 sources, exact match after normalisation otherwise) and per turn the figures
of ``compress.lvlm.efficiency.TurnStats``. Teacher agreement is computed at aggregation against the teacher stage's
answers of this split when they were made under the same protocol, else against the ``full`` method's answers.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

from pipeline.config import PipelineConfig
from pipeline.shards import StageOutput, file_sha256
from stages.common import StageFailed, StageReport, model_identity, shard_ranges

STAGE = "evaluate"
log = logging.getLogger("metacompress")

# dialogue source -> scorer name in pipeline.metrics.METRICS; sources not listed (own data) use exact match.
SCORERS = {"vqa_v2": "vqa", "gqa": "exact", "mt_shapes": "exact"}
JUDGED_SOURCES = {"convbench"}  # free-form answers: scored by pipeline.datasets.convbench's judge instead
STAT_FIELDS = ("vision_s", "reduce_s", "prefill_s", "decode_s", "ttft_s", "total_s", "peak_memory_bytes",
               "prefill_tokens", "prefill_flops", "kv_cache_len", "visual_tokens", "new_tokens")
COMPRESSOR_WEIGHTS = "model.safetensors"


def score(source: str, prediction: str, references: list[str]) -> float:
    """Score in [0, 1] of one answer, by the dialogue's source (DESIGN 5)."""
    from pipeline.metrics import METRICS

    return METRICS[SCORERS.get(source, "exact")](prediction, references)


def same_answer(a: str, b: str) -> bool:
    """Two answers agree when equal after the VQA normalisation (case, punctuation, articles, number words)."""
    from pipeline.metrics import normalize_vqa_answer

    return normalize_vqa_answer(a) == normalize_vqa_answer(b)


def reference_answer(answers: list[str]) -> str:
    """The reference answer fed as history (``history: reference``): the most frequent one, the first on ties."""
    return Counter(answers).most_common(1)[0][0]


def compressor_dir(config: PipelineConfig, rate: float) -> str:
    """Where the train stage saves the compressor for ``rate``."""
    from stages.train import compressor_dir as train_dir

    return train_dir(config, rate)


# --- planning ------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One (method, rate) output. ``rate`` None for ``full``; ``compressor``: MetaCompress directory, the TPRL policy
    directory (method ``tprl``) or None."""

    method: str
    rate: float | None
    compressor: str | None
    out_args: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.method if self.rate is None else f"{self.method}@{self.rate:g}"


def load_split(config: PipelineConfig, split: str) -> tuple[list[dict], list[list[str]]]:
    """The split's dialogues (up to ``data.max_eval_dialogues``) as plain dicts; bad records become errors."""
    from pipeline.dialogues import iter_dialogues

    path, limit = getattr(config.data, split), config.data.max_eval_dialogues
    bad: list[list[str]] = []
    records: list[dict] = []
    for d in iter_dialogues(path, check_images=False,
                            on_error=lambda e: bad.append([e.dialogue_id or f"{e.path}:{e.line}", e.reason])):
        records.append({"dialogue_id": d.dialogue_id, "image": str(d.image), "source": d.source,
                        "questions": [t.question for t in d.turns], "answers": [list(t.answers) for t in d.turns]})
        if limit is not None and len(records) >= limit:
            break
    return records, bad


def input_hash(config: PipelineConfig, split: str) -> str:
    """The dialogues and how they are cut into shards (a different cut changes what shard ``i`` holds)."""
    from pipeline.shards import config_hash

    return config_hash({"dialogues": file_sha256(getattr(config.data, split)),
                        "limit": config.data.max_eval_dialogues, "per_shard": config.shards.dialogues_per_shard})


def feature_hash(config: PipelineConfig, split: str) -> str | None:
    """The extract output's config hash when ``evaluate.cached_features`` is on (None otherwise)."""
    if not config.evaluate.cached_features:
        return None
    from pipeline.shards import read_completed
    from stages import extract

    uri = extract.output_uri(config, split)
    found = read_completed(uri)["config_hash"]
    if found != extract.stage_hash(config):
        raise ValueError(f"{uri} was extracted with another model, dtype or format than this config; run the extract "
                         "stage for this config first (or set evaluate.cached_features: false)")
    return found


def protocol(config: PipelineConfig) -> dict:
    """What every evaluation number depends on besides the method, rate and compressor."""
    ev = config.evaluate
    return {"model": model_identity(config.model.path), "dtype": config.model.dtype, "history": ev.history,
            "max_new_tokens": ev.max_new_tokens, "batch_size": ev.batch_size, "format": config.shards.format}


def plan(config: PipelineConfig, split: str) -> tuple[list[Job], list[str]]:
    """The (method, rate) outputs to evaluate and the reasons for those skipped (metacompress at a rate without a
    trained compressor, tprl without a trained policy). Unknown method names raise ValueError listing the known
    ones."""
    from pathlib import Path

    from compress.lvlm.methods import available_methods
    from pipeline.shards import config_hash

    known = available_methods()
    methods = ["full"] + [m for m in dict.fromkeys(config.evaluate.methods) if m != "full"]
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"evaluate.methods: unknown method {unknown[0]!r}; known methods: {', '.join(sorted(known))}")
    base = {**protocol(config), "features": feature_hash(config, split)}
    data_hash = input_hash(config, split)
    jobs, skipped = [], []
    for method in methods:
        for rate in ([None] if method == "full" else config.evaluate.rates):
            compressor, weights = None, None
            if method == "tprl":  # one policy for every rate: it ranks tokens, the rate sets how many stay
                from compress.tprl.policy import POLICY_WEIGHTS
                from stages.tprl import policy_dir

                compressor = policy_dir(config)
                if not Path(compressor, POLICY_WEIGHTS).is_file():
                    skipped.append(f"tprl@{rate:g}: no trained policy at {compressor} (enable tprl and run the tprl "
                                   "stage)")
                    continue
                weights = file_sha256(f"{compressor}/{POLICY_WEIGHTS}")
            if method == "metacompress":
                compressor = compressor_dir(config, rate)
                if not Path(compressor, COMPRESSOR_WEIGHTS).is_file():
                    skipped.append(f"metacompress@{rate:g}: no trained compressor at {compressor} (add {rate} to "
                                   "train.rates and run the train stage)")
                    continue
                weights = file_sha256(f"{compressor}/{COMPRESSOR_WEIGHTS}")
            digest = config_hash({**base, "method": method, "rate": rate, "compressor": weights,
                                  "features": base["features"] if known[method].kind != "vision" else None})
            uri = f"{config.work_dir}/{STAGE}/{split}/{method}" + ("" if rate is None else f"/rate-{rate:g}")
            jobs.append(Job(method, rate, compressor, dict(uri=f"{uri}/{digest[:12]}", stage=STAGE, config_hash=digest,
                                                           input_hash=data_hash, fmt=config.shards.format)))
    for reason in skipped:
        log.warning("evaluate: skipped %s", reason)
    return jobs, skipped


# --- the worker ----------------------------------------------------------------------------------------------------
class EvalWorker:
    """One per actor: holds the LVLM (and the compressors it was asked for), writes whole shards."""

    def __init__(self, model_path: str, dtype: str, device: str, options: dict, feature_args: dict | None) -> None:
        import torch

        from compress.lvlm import load_adapter
        from pipeline.env import apply_defaults

        apply_defaults()
        self.adapter = load_adapter(model_path, device=device, dtype=getattr(torch, dtype))
        self.options = options
        self.features = StageOutput(**feature_args) if feature_args else None
        self.compressors: dict[str, object] = {}

    def _compressor(self, directory: str | None, method: str = "metacompress"):
        if directory is None:
            return None
        if directory not in self.compressors:
            if method == "tprl":
                from compress.tprl import TPRLPolicy, TPRLReducer

                self.compressors[directory] = TPRLReducer(TPRLPolicy.from_pretrained(directory, self.adapter.device))
            else:
                from compress.metacompress import MetaCompress

                self.compressors[directory] = MetaCompress.from_pretrained(directory).to(self.adapter.device).eval()
        return self.compressors[directory]

    def _inputs(self, index: int, dialogues: list[dict], vision: bool) -> tuple[list, list[list[str]]]:
        """Per dialogue the image input of the session (an EncodedImage of cached features, or the decoded image),
        None for a dialogue whose image cannot be read; and the errors."""
        from compress.lvlm.base import load_image

        inputs, errors = [], []
        cached = {}
        if self.features is not None and not vision:
            cached = {r["dialogue_id"]: r for r in self.features.read_records(index)}
        for d in dialogues:
            if d["dialogue_id"] in cached:
                inputs.append(self._encoded(cached[d["dialogue_id"]]))
                continue
            if cached:  # the extract stage could not read this record
                inputs.append(None)
                errors.append([d["dialogue_id"], "no cached features (failed in the extract stage)"])
                continue
            try:
                inputs.append(load_image(d["image"]))
            except (FileNotFoundError, ValueError, OSError) as err:
                inputs.append(None)
                errors.append([d["dialogue_id"], str(err)])
        return inputs, errors

    def _encoded(self, row: dict):
        import torch

        from compress.layout import Layout
        from compress.lvlm.base import EncodedImage
        from pipeline.shards import bf16_to_torch

        x = row["features"]
        x = bf16_to_torch(x) if x.dtype.name == "uint16" else torch.from_numpy(x.copy())
        return EncodedImage(x.to(self.adapter.device, self.adapter.dtype),
                            Layout.from_dict(json.loads(row["layout"])), None, (0, 0))

    def _batch(self, session, images: list, dialogues: list[dict]) -> list[dict]:
        session.set_images(images)
        rows = [{"dialogue_id": d["dialogue_id"], "source": d["source"], "questions": list(d["questions"]),
                 "references": d["answers"], "answers": [], "scores": [], **{f: [] for f in STAT_FIELDS}}
                for d in dialogues]
        for t in range(len(dialogues[0]["questions"])):
            refs = [reference_answer(d["answers"][t]) for d in dialogues]
            results = session.ask([d["questions"][t] for d in dialogues], refs)
            for row, d, result in zip(rows, dialogues, results):
                row["answers"].append(result.answer)
                row["scores"].append(score(d["source"], result.answer, d["answers"][t]))
                stats = result.stats.to_dict()
                for f in STAT_FIELDS:
                    row[f].append(stats[f])
        return rows

    def run_shard(self, job: dict, index: int, dialogues: list[dict]) -> dict:
        from compress.lvlm.methods import get_method
        from compress.lvlm.session import BatchChatSession

        method = get_method(job["method"], self._compressor(job["compressor"], job["method"]))
        opts = self.options
        session = BatchChatSession(self.adapter, method, job["rate"], max_new_tokens=opts["max_new_tokens"],
                                   history="model" if opts["history"] == "own" else "reference")
        inputs, errors = self._inputs(index, dialogues, method.kind == "vision")
        ok = [j for j, x in enumerate(inputs) if x is not None]
        by_turns: dict[int, list[int]] = {}  # dialogues with the same number of turns go through a session together
        for j in ok:
            by_turns.setdefault(len(dialogues[j]["questions"]), []).append(j)
        rows = []
        for group in by_turns.values():
            for start in range(0, len(group), opts["batch_size"]):
                chunk = group[start:start + opts["batch_size"]]
                rows += self._batch(session, [inputs[j] for j in chunk], [dialogues[j] for j in chunk])
        order = {d["dialogue_id"]: j for j, d in enumerate(dialogues)}
        rows.sort(key=lambda r: order[r["dialogue_id"]])
        StageOutput(**job["out_args"]).write_shard(index, rows)
        return {"key": job["key"], "records": len(rows), "errors": errors}


# --- aggregation ---------------------------------------------------------------------------------------------------
def read_rows(out: StageOutput, num_shards: int) -> list[dict]:
    return [r for i in range(num_shards) for r in out.read_records(i)]


def full_token_answers(config: PipelineConfig, split: str, full_rows: list[dict]) -> tuple[dict[str, list[str]], str]:
    """dialogue_id -> the full-token model's answer per turn, and where they come from: the teacher stage's own
    answers when that stage finished for this split under the same protocol (own history, same answer length),
    else the ``full`` method's evaluation answers."""
    from stages import teacher

    if config.evaluate.history == "own" and config.teacher.max_new_tokens == config.evaluate.max_new_tokens:
        try:
            out = StageOutput(**teacher.output_args(config, split))
            if out.is_complete():
                rows = [r for i in range(out.manifest()["num_shards"]) for r in out.read_records(i)]
                return {r["dialogue_id"]: list(r["answers"]) for r in rows}, "teacher"
        except FileNotFoundError:  # extract or teacher did not run on this split
            pass
    return {r["dialogue_id"]: list(r["answers"]) for r in full_rows}, "full"


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _std(xs: list[float]) -> float | None:
    return statistics.stdev(xs) if len(xs) > 1 else (0.0 if xs else None)


def summarise(job_method: str, rate: float | None, rows: list[dict], reference: dict[str, list[str]]) -> dict:
    """One (method, rate): per-turn accuracy (pipeline.metrics.per_turn_accuracy of the stored scores), teacher
    agreement and dialogue-level efficiency (see pipeline.reports for the keys)."""
    from pipeline.metrics import per_turn_accuracy

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


def _cached_features(config: PipelineConfig, split: str, ids: list[str]) -> dict:
    """dialogue_id -> (X_IMG (n, d) float32 tensor, Layout) from the extract stage's finished output of ``split``
    (empty when it has none: the caller encodes the images itself)."""
    import torch

    from compress.layout import Layout
    from pipeline.shards import bf16_to_torch
    from stages import extract

    try:
        out = StageOutput(**extract.output_args(config, split))
        complete = out.is_complete()
    except FileNotFoundError:
        return {}
    if not complete:
        return {}
    found, wanted = {}, set(ids)
    for i in range(out.manifest()["num_shards"]):
        for r in out.read_records(i):
            if r["dialogue_id"] in wanted:
                x = r["features"]
                x = bf16_to_torch(x) if x.dtype.name == "uint16" else torch.from_numpy(x.copy())
                found[r["dialogue_id"]] = (x.float(), Layout.from_dict(json.loads(r["layout"])))
        if len(found) == len(wanted):
            break
    return found


def matrix_items(config: PipelineConfig, split: str, jobs: list[Job], records: list[dict]) -> list[dict]:
    """P of each evaluated MetaCompress rate for the first ``evaluate.matrix_images`` images (paper figures 6-7),
    from the extract stage's cached features (else the images are encoded here, on the driver's CPU)."""
    import numpy as np
    import torch

    from compress.lvlm.base import load_image
    from compress.metacompress import MetaCompress
    from compress.reduction import num_keep

    mc = [j for j in jobs if j.method == "metacompress"]
    chosen = records[:min(config.evaluate.matrix_images, len(records))]
    if not mc or not chosen:
        return []
    features = _cached_features(config, split, [d["dialogue_id"] for d in chosen])
    adapter = None
    encoded = []
    with torch.no_grad():
        for d in chosen:
            try:
                image = np.asarray(load_image(d["image"]))
                if d["dialogue_id"] not in features:
                    if adapter is None:
                        from compress.lvlm import load_adapter

                        adapter = load_adapter(config.model.path, dtype=getattr(torch, config.model.dtype))
                    enc = adapter.encode(d["image"])
                    features[d["dialogue_id"]] = (enc.tokens.float(), enc.layout)
            except (FileNotFoundError, ValueError, OSError) as err:
                log.warning("evaluate: no P plot for %s (%s)", d["dialogue_id"], err)
                continue
            encoded.append((d, *features[d["dialogue_id"]], image))
        items = []
        for job in mc:
            module = MetaCompress.from_pretrained(job.compressor).eval()
            for d, x, layout, image in encoded:
                p = module(x.to(module.w_key.dtype), num_keep(x.shape[0], job.rate), layout).matrix
                seg = layout.segments[0]
                items.append({"title": f"{d['dialogue_id']}, rate {job.rate:g}", "matrix": p.float().numpy(),
                              "grid": (seg.height, seg.width), "indices": seg.indices(), "image": image})
    return items


# --- the stage -----------------------------------------------------------------------------------------------------
@dataclass
class EvaluationReport(StageReport):
    summaries: list[dict] = field(default_factory=list)
    reports_dir: str = ""
    agreement_reference: str = ""
    skipped: list[str] = field(default_factory=list)
    promotion: dict | None = None
    computed_outputs: list[str] = field(default_factory=list)


def reports_dir(config: PipelineConfig, split: str) -> str:
    return f"{config.work_dir}/reports/{split}"


def _compute(config: PipelineConfig, jobs: list[Job], outs: dict[str, StageOutput], ranges: list[tuple[int, int]],
             records: list[dict], split: str, progress: bool) -> tuple[int, int, list[str]]:
    """Run the missing (job, shard) tasks on a pool of actors; returns (tasks run, records, keys computed)."""
    import ray
    from ray.util import ActorPool
    from tqdm import tqdm

    from pipeline.cluster import device_for, gpus_per_actor

    todo = [(job, i) for job in jobs for i in outs[job.key].missing_shards(len(ranges))]
    if not todo:
        return 0, 0, []
    ev = config.evaluate
    options = {"max_new_tokens": ev.max_new_tokens, "history": ev.history, "batch_size": ev.batch_size}
    feature_args = None
    if ev.cached_features:
        from stages import extract

        feature_args = {**extract.output_args(config, split), "config_hash": feature_hash(config, split)}
    gpus = gpus_per_actor()
    actor_cls = ray.remote(num_gpus=gpus, num_cpus=1)(EvalWorker)
    pool = ActorPool([actor_cls.remote(config.model.path, config.model.dtype, device_for(gpus), options, feature_args)
                      for _ in range(min(ev.num_actors, len(todo)))])
    slim = [{k: d[k] for k in ("dialogue_id", "image", "source", "questions", "answers")} for d in records]

    def submit(actor, item):
        job, i = item
        payload = {"key": job.key, "method": job.method, "rate": job.rate, "compressor": job.compressor,
                   "out_args": job.out_args}
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
    records, bad = load_split(config, split)
    if not records:
        raise StageFailed(f"evaluate: {getattr(config.data, split)} has no valid dialogue to evaluate")
    judged = sorted({d["source"] for d in records} & JUDGED_SOURCES)
    if judged:
        raise ValueError(f"{getattr(config.data, split)}: {judged[0]} dialogues are scored by a judge model "
                         "(pipeline.datasets.convbench), not by answer matching; evaluate them with that judge and "
                         "point data." + split + " at VQA-v2, GQA, MT-Shapes or exact-answer dialogues")
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
    reference, ref_source = full_token_answers(config, split, rows["full"])
    summaries = [summarise(job.method, job.rate, rows[job.key], reference) for job in jobs]
    per_turn = [e for job in jobs for e in per_turn_efficiency(job.method, job.rate, rows[job.key])]
    from pipeline.shards import config_hash

    target = reports_dir(config, split)
    render_key = config_hash({"outputs": [j.out_args["config_hash"] for j in jobs], "summaries": summaries,
                              "matrix_images": config.evaluate.matrix_images, "reference": ref_source})
    paths = write_report_files(summaries, per_turn, lambda: matrix_items(config, split, jobs, records), target,
                               config.evaluate.batch_size, render_key)

    report = EvaluationReport(STAGE, f"{config.work_dir}/{STAGE}/{split}", len(jobs) * len(ranges), tasks,
                              computed_records, errors, time.perf_counter() - start, summaries=summaries,
                              reports_dir=target, agreement_reference=ref_source, skipped=skipped,
                              computed_outputs=computed)
    report.promotion = track(config, split, jobs, summaries, paths, report)
    from pipeline.reports import results_markdown

    log.info("%s", results_markdown(summaries))
    log.info(report.line())
    return report


def write_report_files(summaries, per_turn, matrices, target: str, batch_size: int, render_key: str) -> str:
    """Reports into ``target`` (a local path, or any pyarrow.fs URI: written locally, then copied); ``matrices()``
    makes the P plot items. A local ``target`` already rendered from the same outputs (``_render.json`` holds
    ``render_key``) is left as it is, so a re-run does not redraw. Returns the local directory holding them."""
    import tempfile
    from pathlib import Path

    from pipeline.reports import write_reports

    local = target if "://" not in target else tempfile.mkdtemp(prefix="metacompress-reports-")
    stamp = Path(local, "_render.json")
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == render_key and \
            all(Path(local, name).is_file() for name in json.loads(stamp.read_text())["files"]):
        return local
    written = write_reports(summaries, per_turn, local, matrices(), batch_size)
    Path(local, "summaries.json").write_text(json.dumps(summaries, indent=1) + "\n")
    stamp.write_text(json.dumps({"key": render_key, "files": [p.name for p in written] + ["summaries.json"]}) + "\n")
    if local != target:
        import pyarrow.fs as pafs

        fs, root = pafs.FileSystem.from_uri(target)
        fs.create_dir(root, recursive=True)
        pafs.copy_files(local, root, destination_filesystem=fs)
    return local


# --- tracking and promotion ----------------------------------------------------------------------------------------
def _metric_prefix(method: str, rate: float | None) -> str:
    return method if rate is None else f"{method}/r{rate:g}"


def evaluated_compressors(config: PipelineConfig, jobs: list[Job], summaries: list[dict]):
    """registry.Evaluated for each MetaCompress rate: its score, its weights' sha256 and every baseline at its rate."""
    from pipeline.registry import Evaluated
    from pipeline.shards import config_hash

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


def track(config: PipelineConfig, split: str, jobs: list[Job], summaries: list[dict], reports_path: str,
          report: EvaluationReport) -> dict | None:
    """Log params, metrics and report files to the stage's MLflow run; promote the candidate. Returns the decision."""
    import mlflow

    from pipeline import tracking
    from pipeline.registry import promote

    ev = config.evaluate
    params = {"split": split, "methods": ",".join(j.key for j in jobs), "history": ev.history,
              "max_new_tokens": ev.max_new_tokens, "batch_size": ev.batch_size, "cached_features": ev.cached_features,
              "dialogues": summaries[0]["dialogues"], "agreement_reference": report.agreement_reference}
    with tracking.stage_run(config, STAGE, params=params):
        metrics = {}
        for s in summaries:
            prefix = _metric_prefix(s["method"], s["rate"])
            for k, v in s.items():
                if k not in ("method", "rate", "dialogues") and v is not None:
                    metrics[f"{prefix}/{k}"] = float(v)
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(reports_path, artifact_path=f"reports/{split}")
        if report.skipped:
            mlflow.log_dict({"skipped": report.skipped}, f"reports/{split}/skipped.json")
        evaluated = evaluated_compressors(config, jobs, summaries)
        if not evaluated:
            return None
        decision = promote(tracking.tracking_uri(config), config.tracking.registered_model, evaluated).to_dict()
        mlflow.log_dict(decision, "promotion.json")
        mlflow.log_metric("promoted", float(decision["promoted"]))
        mlflow.set_tag("promotion", decision["reason"])
        log.info("evaluate: promotion: %s", decision["reason"])
        return decision
