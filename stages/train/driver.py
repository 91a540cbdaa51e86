"""The train stage's driver: which data each rate trains on, what a trained compressor depends on, one Ray Train
run per rate, MLflow logging and registration."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import PipelineConfig
from stages.common import load_split, shard_ranges, split_limit, video_sampling
from stages.outputs import TRAIN as STAGE
from stages.outputs import compressor_dir, rate_dir, write_trained_marker
from stages.train.data import heldout_plan
from stages.train.worker import train_loop

log = logging.getLogger("metacompress")

CRASH_ENV = "METACOMPRESS_TRAIN_CRASH_AFTER_STEP"


def _cached_plan(config: PipelineConfig, split: str) -> dict | None:
    """Shard arguments and rows of a split's feature + teacher caches; None when the teacher cache is missing."""
    from pipeline.shards import read_completed
    from stages.outputs import EXTRACT, TEACHER, extract_args, teacher_args, teacher_uri

    expected_features = extract_args(config, split)
    feature_uri, teacher_uri = expected_features["uri"], teacher_uri(config, split)
    try:
        features, targets = read_completed(feature_uri), read_completed(teacher_uri)
    except FileNotFoundError:
        return None
    if [features["config_hash"], features["input_hash"]] != [expected_features["config_hash"],
                                                             expected_features["input_hash"]]:
        raise ValueError(f"{feature_uri} was extracted with another model, dtype, format or dialogue file than this "
                         "config; run the extract stage for this config first")
    expected = teacher_args(config, split)
    if [targets["config_hash"], targets["input_hash"]] != [expected["config_hash"], expected["input_hash"]]:
        raise ValueError(f"{teacher_uri} was computed with another teacher config or other features; re-run the "
                         "teacher stage for this config")
    records, _ = load_split(config, split, split_limit(config, split))
    return {"kind": "cached", "shard_rows": [s["rows"] for s in targets["shards"]],
            "feature_args": dict(uri=feature_uri, stage=EXTRACT, config_hash=features["config_hash"],
                                 input_hash=features["input_hash"], fmt=config.shards.format),
            "teacher_args": dict(uri=teacher_uri, stage=TEACHER, config_hash=targets["config_hash"],
                                 input_hash=targets["input_hash"], fmt=config.shards.format),
            "questions": {r["dialogue_id"]: r["questions"] for r in records},
            "identity": [features["config_hash"], features["input_hash"], targets["config_hash"],
                         targets["input_hash"]]}


def _online_plan(config: PipelineConfig, split: str) -> dict | None:
    from pipeline.hashing import file_sha256
    from stages.outputs import extract_hash, storage_dtype

    if not Path(getattr(config.data, split)).is_file():
        return None
    records, _ = load_split(config, split, split_limit(config, split))
    ranges = shard_ranges(len(records), config.shards.dialogues_per_shard)
    shards = [[{k: r[k] for k in ("dialogue_id", "image", "questions")} for r in records[a:b]] for a, b in ranges]
    return {"kind": "online", "shard_rows": [len(s) for s in shards], "shards": shards,
            "top_k": config.teacher.top_k, "max_new_tokens": config.teacher.max_new_tokens,
            "storage_dtype": storage_dtype(config.model.dtype),
            "identity": [extract_hash(config), config.teacher.top_k, config.teacher.max_new_tokens,
                         file_sha256(getattr(config.data, split))] + _video_identity(config)}


def _video_identity(config: PipelineConfig) -> list:
    """The frame sampling, for video dialogues (image runs keep the identity they had)."""
    video = video_sampling(config)
    return [] if video is None else [video]


def make_plan(config: PipelineConfig, split: str) -> dict | None:
    return (_online_plan if config.train.online_teacher else _cached_plan)(config, split)


def run_hash(config: PipelineConfig, rate: float, plan: dict) -> str:
    """What a trained compressor depends on: the train section (less the other rates and the knobs that do not
    change the result), the rate, the data it was trained on."""
    from pipeline.hashing import config_hash

    train = {k: v for k, v in config.to_dict()["train"].items()
             if k not in ("rates", "checkpoint_every", "max_failures", "heldout_dialogues", "activation_checkpointing")}
    # later options: unset they change nothing, so earlier runs stay reusable
    for key in ("plateau_start", "locality", "spatial_prior"):
        if not train[key]:
            del train[key]
    train["candidates"] = [{k: v for k, v in c.items() if not (k in ("locality", "spatial_prior") and v is None)}
                           for c in train["candidates"]]
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


def _loop_config(config: PipelineConfig, rate: float, plan: dict, heldout: dict | None, validation: dict | None,
                 use_gpu: bool, rhash: str, tracking: tuple[str | None, str | None], out_dir: str) -> dict:
    import dataclasses

    return {"train": dataclasses.asdict(config.train), "model_path": config.model.path,
            "model_dtype": config.model.dtype, "use_gpu": use_gpu, "rate": rate, "plan": plan, "heldout": heldout,
            "validation": validation, "run_hash": rhash, "compressor_dir": out_dir, "tracking_uri": tracking[0],
            "run_id": tracking[1], "crash_after_step": os.environ.get(CRASH_ENV), "video": video_sampling(config)}


def train_rate(config: PipelineConfig, rate: float, plan: dict, heldout: dict | None,
               tracking_run_id: str | None, validation: dict | None = None, out_dir: str | None = None) -> dict:
    """Fit one compressor with Ray Train into ``out_dir`` (default: the rate's compressor directory); returns the
    last metrics reported by rank 0."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.cluster import actor_gpus
    from pipeline.tracking import tracking_uri

    if config.train.zero_stage == 3 and config.train.online_teacher:
        raise ValueError("train.online_teacher with train.zero_stage 3 is not supported: the teacher's greedy "
                         "generation runs a data-dependent number of forwards per worker, which ZeRO-3's collective "
                         "weight gathers cannot match; use zero_stage 0 or 2 for the online teacher")
    rhash = run_hash(config, rate, plan)
    cpus, gpus = config.resources.train.num_cpus, actor_gpus(config, STAGE)
    scaling = ScalingConfig(num_workers=config.train.num_workers, use_gpu=gpus >= 1,
                            resources_per_worker={"CPU": cpus, "GPU": gpus} if gpus >= 1 else {"CPU": cpus})
    run_config = RunConfig(name=f"rate-{rate}-{rhash}", storage_path=f"{config.work_dir}/{STAGE}/ray",
                           failure_config=FailureConfig(max_failures=config.train.max_failures),
                           checkpoint_config=CheckpointConfig(num_to_keep=2))
    trainer = TorchTrainer(train_loop, train_loop_config=_loop_config(
        config, rate, plan, heldout, validation, gpus >= 1, rhash, (tracking_uri(config), tracking_run_id),
        out_dir or compressor_dir(config, rate)),
        scaling_config=scaling, run_config=run_config)
    result = trainer.fit()
    return dict(result.metrics or {})


def _validation_plan(config: PipelineConfig) -> dict:
    """The validation split's first ``train.validation_dialogues`` dialogues (features and teacher targets)."""
    try:
        found = make_plan(config, "val")
    except FileNotFoundError:
        found = None
    if found is None:
        raise FileNotFoundError(f"train: train.validate_every = {config.train.validate_every} needs the validation "
                                f"split's features and teacher targets ({config.data.val}); run the extract and teacher "
                                "stages (they cover data.val) first, or set train.validate_every: 0")
    return heldout_plan(found, config.train.validation_dialogues)


def candidate_configs(config: PipelineConfig) -> list[PipelineConfig]:
    """The train section itself, then each of ``train.candidates`` applied to it (duplicates dropped)."""
    import dataclasses

    out: list[PipelineConfig] = []
    for overrides in [{}] + [c.overrides() for c in config.train.candidates]:
        # candidates=[]: a candidate's hash is that of a plain run with its settings
        variant = dataclasses.replace(config, train=dataclasses.replace(config.train, candidates=[], **overrides))
        if all(v.train != variant.train for v in out):
            out.append(variant)
    return out


def choose(results: list[dict]) -> int:
    """Index of the candidate with the lowest best validation KL (the first on ties)."""
    return min(range(len(results)), key=lambda i: (results[i]["val_kl_best"], i))


def _train_candidates(config: PipelineConfig, rate: float, plan: dict, heldout: dict | None, validation: dict,
                      tracking_run_id: str | None) -> dict:
    """Train every candidate of ``rate`` (each reused when already finished), keep the one with the lowest
    validation KL as the rate's compressor; its metrics plus every candidate's validation KL."""
    from pipeline import storage

    results, dirs = [], []
    for i, variant in enumerate(candidate_configs(config)):
        out = f"{rate_dir(config, rate)}/candidate-{i}"
        rhash = run_hash(variant, rate, plan)
        marker = f"{out}/_SUCCESS"
        done = _finished(marker, rhash, f"{out}/compressor")
        if done is None:
            t = variant.train
            log.info("train: rate %s, candidate %d: optimizer %s, lr %g, generator %s, locality %g, spatial prior %g, "
                     "entropy/collapse weights %g/%g", rate, i, t.optimizer, t.lr, t.generator, t.locality,
                     t.spatial_prior, t.entropy_weight, t.collapse_weight)
            metrics = train_rate(variant, rate, plan, heldout, tracking_run_id, validation, f"{out}/compressor")
            write_trained_marker(str(marker), f"{out}/compressor", {"run_hash": rhash, "metrics": metrics})
            done = {"metrics": metrics}
        results.append(done["metrics"])
        dirs.append(f"{out}/compressor")
    best = choose(results)
    storage.delete(compressor_dir(config, rate))
    storage.copy_dir(dirs[best], compressor_dir(config, rate))
    summary = {f"candidate_{i}_val_kl": r["val_kl_best"] for i, r in enumerate(results)}
    log.info("train: rate %s: candidate %d kept (validation KL %s)", rate, best,
             ", ".join(f"{v:.4f}" for v in summary.values()))
    return {**results[best], **summary, "candidate": best}


def _finished(marker: str, rhash: str, directory: str) -> dict | None:
    """The ``_SUCCESS`` record of a finished rate whose compressor is intact, or None (train it, or rebuild it from
    its last checkpoint). A compressor whose bytes changed is never reused: a warning names the file."""
    from pipeline import storage
    from stages.outputs import trained_files_problem

    try:
        done = json.loads(storage.read_bytes(marker))
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(done, dict) or done.get("run_hash") != rhash:
        return None
    problem = trained_files_problem(str(marker), directory)
    if problem:
        log.warning("train: %s; recomputing it", problem)
        storage.delete(marker)
        return None
    return done


def run(config: PipelineConfig, split: str = "train", progress: bool = True) -> TrainReport:
    """Train (or reuse) one compressor per rate; log and register each in MLflow with the alias ``candidate``.
    (``progress``: accepted for the stage interface; Ray Train reports progress itself.)"""
    from pipeline import tracking

    start = time.perf_counter()
    plan = make_plan(config, split)
    if plan is None:
        raise FileNotFoundError(f"train: no teacher cache for split {split!r} under {config.work_dir}; run the "
                                "extract and teacher stages first (or set train.online_teacher: true)")
    heldout = heldout_plan(make_plan(config, "test"), config.train.heldout_dialogues) if split != "test" else None
    validation = _validation_plan(config) if config.train.validate_every > 0 else None
    report = TrainReport(STAGE, f"{config.work_dir}/{STAGE}", list(config.train.rates), 0, 0.0)
    with tracking.stage_run(config, STAGE, params=tracking.flatten({"train": config.to_dict()["train"]})):
        for rate in config.train.rates:
            rhash = run_hash(config, rate, plan)
            marker = f"{rate_dir(config, rate)}/_SUCCESS"
            done = _finished(marker, rhash, compressor_dir(config, rate))
            if done is not None:
                report.results[rate] = done["metrics"]
                continue
            with tracking.nested_run(f"{STAGE}/rate-{rate}", params={"rate": rate, "run_hash": rhash}) as run_:
                if config.train.candidates:
                    metrics = _train_candidates(config, rate, plan, heldout, validation, run_.info.run_id)
                else:
                    metrics = train_rate(config, rate, plan, heldout, run_.info.run_id, validation)
                version = tracking.log_compressor(compressor_dir(config, rate), config,
                                                  tags={"rate": str(rate), "run_hash": rhash})
                metrics = {**metrics, "model_version": int(version.version)}
            # the integrity chain (docs/design.md §8): the weights' sha256, checked before any reuse
            write_trained_marker(str(marker), compressor_dir(config, rate), {"run_hash": rhash, "metrics": metrics})
            report.results[rate] = metrics
            report.computed += 1
    report.seconds = time.perf_counter() - start
    log.info(report.line())
    return report

