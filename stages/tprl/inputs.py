"""What the tprl stage reads and what its outputs are keyed by: the split, the extract stage's features, the prepare
output, the hash of a training trajectory."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

from pipeline.config import PipelineConfig
from stages.common import load_split, model_identity, split_limit
from stages.outputs import TPRL as STAGE
from stages.outputs import finished_extract_args, tprl_dir


def derived_seed(*parts) -> int:
    """A seed for one random draw, from the config seed and where the draw happens (stable across runs)."""
    return int(hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12], 16)


def load_records(config: PipelineConfig, split: str) -> list[dict]:
    """The split's dialogues as the extract stage cut them (same file, limit and order), with their source."""
    return load_split(config, split, split_limit(config, split))[0]


def feature_args(config: PipelineConfig, split: str) -> dict:
    """The extract stage's finished output of ``split`` for this config (its StageOutput arguments)."""
    return finished_extract_args(config, split, STAGE)


def shard_features(reader, index: int) -> list[tuple[str, object]]:
    """(dialogue_id, X_IMG (n, d) float32 CPU tensor) of each row of feature shard ``index``, read by a
    ``stages.common.FeatureReader`` (which projects a pre-projector cache when it holds the model)."""
    from stages.common import features_tensor

    return [(r["dialogue_id"], features_tensor(r["features"]).float()) for r in reader.read_records(index)]


def driver_features(config: PipelineConfig, feats: dict, num_shards: int, actors) -> list[tuple[str, object]]:
    """``shard_features`` of every shard, for the driver's autoencoder and behaviour cloning. A pre-projector cache
    needs the model's projector and the driver loads no LVLM (docs/design.md §6.4): the stage's actors
    (``actors()``, started on first need) read and project it, a shard each."""
    from stages.common import FeatureReader

    if config.extract.cache == "post_projector":
        reader = FeatureReader(feats)
        return [row for i in range(num_shards) for row in shard_features(reader, i)]
    import ray

    pool = actors()
    refs = [pool[i % len(pool)].shard_features.remote(i) for i in range(num_shards)]
    return [row for ref in refs for row in ray.get(ref)]


def prepared_args(config: PipelineConfig, feats: dict) -> dict:
    from pipeline.hashing import config_hash

    digest = config_hash({"features": [feats["config_hash"], feats["input_hash"]],
                          "teacher_layers": config.tprl.teacher_layers,
                          "max_new_tokens": config.evaluate.max_new_tokens})
    return dict(uri=f"{tprl_dir(config)}/prepared/{digest[:12]}", stage=f"{STAGE}-prepare", config_hash=digest,
                input_hash=feats["input_hash"], fmt=config.shards.format)


def trajectory_hash(config: PipelineConfig, prepared: dict) -> str:
    """What the policy after any number of iterations depends on (not how many, nor how many actors)."""
    from pipeline.hashing import config_hash

    tprl = {k: v for k, v in asdict(config.tprl).items()
            if k not in ("enabled", "iterations", "num_actors", "checkpoint_every")}
    return config_hash({"tprl": tprl, "model": model_identity(config.model.path), "dtype": config.model.dtype,
                        "max_new_tokens": config.evaluate.max_new_tokens, "prepared": prepared["config_hash"],
                        "data": prepared["input_hash"]})[:16]
