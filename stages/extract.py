"""Stage `extract`: the vision tower + projector over every dialogue's image -> feature shards (DESIGN 3, 6).

Shard ``i`` holds dialogues ``[i * N, (i + 1) * N)`` of the split: per dialogue its id, image, ``n_tokens``, the
layout (JSON) and ``features`` X_IMG (n, d) in the model dtype (float16 for float32 models, to halve storage).
Images are decoded and preprocessed on a CPU thread that runs ahead of the model (overlap inside each actor).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from pipeline.config import PipelineConfig
from pipeline.shards import StageOutput, file_sha256
from stages.common import StageReport, model_actor, model_identity, run_sharded, shard_ranges

STAGE = "extract"


def stage_hash(config: PipelineConfig) -> str:
    from pipeline.shards import config_hash

    return config_hash({"model": model_identity(config.model.path), "dtype": config.model.dtype,
                        "format": config.shards.format})


def output_uri(config: PipelineConfig, split: str) -> str:
    return f"{config.work_dir}/{STAGE}/{split}"


def output_args(config: PipelineConfig, split: str) -> dict:
    from pipeline.shards import config_hash

    # What goes into which shard depends on the file, how much of it is used and how it is cut.
    inputs = {"dialogues": file_sha256(getattr(config.data, split)), "limit": split_limit(config, split),
              "dialogues_per_shard": config.shards.dialogues_per_shard}
    return dict(uri=output_uri(config, split), stage=STAGE, config_hash=stage_hash(config),
                input_hash=config_hash(inputs), fmt=config.shards.format)


def storage_dtype(model_dtype: str) -> str:
    return "float16" if model_dtype == "float32" else model_dtype


class FeatureExtractor:
    """One per actor: holds the model, writes whole shards."""

    def __init__(self, model_path: str, dtype: str, device: str, out_args: dict) -> None:
        import torch

        from compress.lvlm import load_adapter
        from pipeline.env import apply_defaults

        apply_defaults()
        torch.set_num_threads(max(1, torch.get_num_threads()))
        self.adapter = load_adapter(model_path, device=device, dtype=getattr(torch, dtype))
        self.store_dtype = getattr(torch, storage_dtype(dtype))
        self.out = StageOutput(**out_args)
        self.loader = ThreadPoolExecutor(max_workers=1)

    def _prepare(self, dialogue: dict):
        try:
            return self.adapter.prepare(dialogue["image"]), None
        except (FileNotFoundError, ValueError, OSError) as err:
            return None, str(err)

    def run_shard(self, index: int, dialogues: list[dict]) -> dict:
        rows, errors = [], []
        pending = [self.loader.submit(self._prepare, d) for d in dialogues[:2]]
        for k, dialogue in enumerate(dialogues):
            prepared, error = pending.pop(0).result()
            if k + 2 < len(dialogues):  # keep the CPU step two images ahead of the model
                pending.append(self.loader.submit(self._prepare, dialogues[k + 2]))
            if error:
                errors.append([dialogue["dialogue_id"], error])
                continue
            encoded = self.adapter.features(prepared)
            rows.append({"dialogue_id": dialogue["dialogue_id"], "image": dialogue["image"],
                         "n_tokens": int(encoded.tokens.shape[0]), "layout": json.dumps(encoded.layout.to_dict()),
                         "features": encoded.tokens.detach().to("cpu", self.store_dtype)})
        self.out.write_shard(index, rows)
        return {"records": len(rows), "errors": errors}


def load_split(config: PipelineConfig, split: str, limit: int | None) -> tuple[list[dict], list[list[str]]]:
    """Records of a split as plain dicts (id, image, questions, answers); bad lines become errors, not failures."""
    from pipeline.dialogues import iter_dialogues

    path = getattr(config.data, split)
    bad: list[list[str]] = []
    records = []
    for d in iter_dialogues(path, check_images=False,
                            on_error=lambda e: bad.append([e.dialogue_id or f"{e.path}:{e.line}", e.reason])):
        records.append({"dialogue_id": d.dialogue_id, "image": str(d.image),
                        "questions": [t.question for t in d.turns], "answers": [list(t.answers) for t in d.turns]})
        if limit is not None and len(records) >= limit:
            break
    return records, bad


def split_limit(config: PipelineConfig, split: str) -> int | None:
    return config.data.max_train_dialogues if split == "train" else config.data.max_eval_dialogues


def run(config: PipelineConfig, split: str = "train", progress: bool = True) -> StageReport:
    from pipeline.cluster import device_for, gpus_per_actor

    records, bad = load_split(config, split, split_limit(config, split))
    out_args = output_args(config, split)
    out = StageOutput(**out_args)
    out.prepare(config.to_dict(), overwrite=config.shards.overwrite)
    for record_id, reason in bad:
        out.record_error(record_id, reason)
    ranges = shard_ranges(len(records), config.shards.dialogues_per_shard)
    gpus = gpus_per_actor()
    actor_cls = model_actor(FeatureExtractor, gpus)
    slim = [{"dialogue_id": r["dialogue_id"], "image": r["image"]} for r in records]
    return run_sharded(
        out, len(ranges), len(records) + len(bad),
        make_actor=lambda: actor_cls.remote(config.model.path, config.model.dtype, device_for(gpus), out_args),
        num_actors=config.extract.num_actors, task_args=lambda i: (i, slim[ranges[i][0]:ranges[i][1]]),
        max_error_fraction=config.shards.max_error_fraction, progress=progress)
