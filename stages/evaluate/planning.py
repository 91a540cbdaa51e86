"""Which (method, rate) outputs the evaluate stage computes, and what each output's numbers depend on."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pipeline.config import PipelineConfig
from pipeline.storage import file_sha256, is_file, read_bytes
from stages.common import model_identity
from stages.outputs import EVALUATE as STAGE
from stages.outputs import (compressor_dir, eval_feature_hash, eval_input_hash, eval_uri, policy_dir, rate_dir,
                            tprl_dir, verified_trained_dir)

log = logging.getLogger("metacompress")

COMPRESSOR_WEIGHTS = "model.safetensors"


@dataclass
class Job:
    """One (method, rate) output. ``rate`` None for ``full``; ``compressor``: MetaCompress directory, the TPRL policy
    directory (method ``tprl``) or None."""

    method: str
    rate: float | None
    compressor: str | None
    out_args: dict = field(default_factory=dict)
    seed: int | None = None  # a stochastic method's seed when evaluate.seeds has several (one job per seed)
    run_seed: int = 0  # the seed the worker uses (stochastic methods)

    @property
    def base_key(self) -> str:
        return self.method if self.rate is None else f"{self.method}@{self.rate:g}"

    @property
    def key(self) -> str:
        return self.base_key if self.seed is None else f"{self.base_key}/seed{self.seed}"


def protocol(config: PipelineConfig) -> dict:
    """What every evaluation number depends on besides the method, rate and compressor."""
    ev = config.evaluate
    from dataclasses import asdict

    from pipeline.datasets.common import GENERATION_DEFAULTS

    return {"model": model_identity(config.model.path), "dtype": config.model.dtype, "history": ev.history,
            "max_new_tokens": ev.max_new_tokens, "batch_size": ev.batch_size, "format": config.shards.format,
            "generation": [asdict(g) for g in ev.generation], "generation_defaults": GENERATION_DEFAULTS}


def _compute_dtype(directory: str) -> str:
    """The compute dtype recorded with a trained compressor (config.json ``compute_dtype``, float32 when absent)."""
    import json

    from compress.metacompress import CONFIG_NAME

    path = f"{directory}/{CONFIG_NAME}"
    try:
        return json.loads(read_bytes(path)).get("compute_dtype", "float32")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{path}: not a readable MetaCompress config ({err}); retrain this rate") from None


def plan(config: PipelineConfig, split: str) -> tuple[list[Job], list[str]]:
    """The (method, rate) outputs to evaluate and the reasons for those skipped (metacompress at a rate without a
    trained compressor, tprl without a trained policy). Unknown method names raise ValueError listing the known
    ones."""
    from compress.lvlm.methods import STOCHASTIC_METHODS, available_methods
    from pipeline.hashing import config_hash

    known = available_methods()
    methods = ["full"] + [m for m in dict.fromkeys(config.evaluate.methods) if m != "full"]
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"evaluate.methods: unknown method {unknown[0]!r}; known methods: {', '.join(sorted(known))}")
    base = {**protocol(config), "features": eval_feature_hash(config, split)}
    data_hash = eval_input_hash(config, split)
    jobs, skipped = [], []
    for method in methods:
        for rate in ([None] if method == "full" else config.evaluate.rates):
            compressor, weights = None, None
            if method == "tprl":  # one policy for every rate: it ranks tokens, the rate sets how many stay
                from compress.tprl.policy import POLICY_WEIGHTS

                compressor = policy_dir(config)
                if not is_file(f"{compressor}/{POLICY_WEIGHTS}"):
                    skipped.append(f"tprl@{rate:g}: no trained policy at {compressor} (enable tprl and run the tprl "
                                   "stage)")
                    continue
                verified_trained_dir(f"{tprl_dir(config)}/_SUCCESS", compressor, "tprl")  # docs/design.md §8
                weights = file_sha256(f"{compressor}/{POLICY_WEIGHTS}")
            if method == "metacompress":
                compressor = compressor_dir(config, rate)
                if not is_file(f"{compressor}/{COMPRESSOR_WEIGHTS}"):
                    skipped.append(f"metacompress@{rate:g}: no trained compressor at {compressor} (add {rate} to "
                                   "train.rates and run the train stage)")
                    continue
                verified_trained_dir(f"{rate_dir(config, rate)}/_SUCCESS", compressor, "train")  # docs/design.md §8
                weights = file_sha256(f"{compressor}/{COMPRESSOR_WEIGHTS}")
                dtype = _compute_dtype(compressor)
                if dtype != "float32":  # the dtype it runs in changes P; absent from older hashes (float32)
                    weights = f"{weights}/{dtype}"
            seeds = config.evaluate.seeds if method in STOCHASTIC_METHODS else [None]
            for seed in seeds:  # a stochastic method: one output per seed (docs/design.md §5)
                extra = {} if seed is None else {"seed": seed, "seeding": "per-image"}
                digest = config_hash({**base, "method": method, "rate": rate, "compressor": weights, **extra,
                                      "features": base["features"] if known[method].kind != "vision" else None})
                uri = f"{eval_uri(config, split)}/{method}" + ("" if rate is None else f"/rate-{rate:g}")
                jobs.append(Job(method, rate, compressor,
                                dict(uri=f"{uri}/{digest[:12]}", stage=STAGE, config_hash=digest,
                                     input_hash=data_hash, fmt=config.shards.format),
                                seed=seed if len(seeds) > 1 else None, run_seed=seed or 0))
    for reason in skipped:
        log.warning("evaluate: skipped %s", reason)
    return jobs, skipped
