"""Stage `extract`: the vision tower (+ projector) over every dialogue's image -> feature shards (docs/design.md §3,
§6).

Shard ``i`` holds dialogues ``[i * N, (i + 1) * N)`` of the split: per dialogue its id, image, ``n_tokens``, the
layout (JSON) and ``features`` X_IMG (n, d) in the model dtype (float16 for float32 models, to halve storage).
With ``extract.cache: pre_projector`` the row of an image's first dialogue holds the tower's selected-layer output
before the projector instead ((crops * t, C_vision), 16-bit or int8 + per-token ``scale``), with ``image_size`` and
``crops``; later dialogues of that image hold an empty array and ``ref_shard``, the shard of that first row
(``stages.common.FeatureReader`` resolves and projects them).
Images are decoded and preprocessed on a CPU thread that runs ahead of the model (overlap inside each actor).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from pipeline.config import PipelineConfig
from pipeline.shards import StageOutput
from pipeline.tensor_columns import quantize_int8
from stages.common import StageReport, load_split, model_actor, run_sharded, shard_ranges, split_limit
from stages.outputs import EXTRACT as STAGE  # noqa: F401  (each stage module names itself)
from stages.outputs import extract_args as output_args
from stages.outputs import extract_uri as output_uri  # noqa: F401  (this stage's own output, for callers)
from stages.outputs import storage_dtype


class FeatureExtractor:
    """One per actor: holds the model, writes whole shards."""

    def __init__(self, model_path: str, dtype: str, device: str, out_args: dict, cache: str = "post_projector",
                 quantize: str = "none") -> None:
        import torch

        from compress.lvlm import load_adapter
        from pipeline.env import apply_defaults

        apply_defaults()
        torch.set_num_threads(max(1, torch.get_num_threads()))
        self.adapter = load_adapter(model_path, device=device, dtype=getattr(torch, dtype))
        self.store_dtype = getattr(torch, storage_dtype(dtype))
        self.post_dtype, self.cache, self.quantize = storage_dtype(dtype), cache, quantize
        self.out = StageOutput(**out_args)
        self.loader = ThreadPoolExecutor(max_workers=1)

    def _prepare(self, dialogue: dict):
        try:
            return self.adapter.prepare(dialogue["image"]), None
        except (FileNotFoundError, ValueError, OSError) as err:
            return None, str(err)

    def _pre_projector_row(self, index: int, dialogue: dict, prepared, held: set) -> dict:
        """One row of the image-keyed cache: the tower output before the projector for the first dialogue of an
        image in this shard whose image is first seen here (``ref_shard == index``); an empty array (the row refers
        to ``ref_shard``) for every other dialogue of that image."""
        import torch

        from stages.common import vision_hidden

        ref = int(dialogue["ref_shard"])
        row = {"dialogue_id": dialogue["dialogue_id"], "image": dialogue["image"],
               "n_tokens": int(prepared.layout.num_tokens), "layout": json.dumps(prepared.layout.to_dict()),
               "image_size": list(prepared.image_size), "crops": 1, "ref_shard": ref, "post_dtype": self.post_dtype}
        width = self.adapter.model.config.vision_config.hidden_size
        if ref == index and dialogue["image"] not in held:
            hidden = vision_hidden(self.adapter, prepared.pixel_values)
            held.add(dialogue["image"])
            row["crops"] = int(hidden.shape[0])
            x = hidden.reshape(-1, hidden.shape[-1]).detach().to("cpu", self.store_dtype)
        else:
            x = torch.zeros((0, width), dtype=self.store_dtype)
        if self.quantize == "int8":
            q, scale = quantize_int8(x.float().numpy())
            return {**row, "features": q, "scale": scale}
        return {**row, "features": x}

    def run_shard(self, index: int, dialogues: list[dict]) -> dict:
        rows, errors, held = [], [], set()
        pending = [self.loader.submit(self._prepare, d) for d in dialogues[:2]]
        for k, dialogue in enumerate(dialogues):
            prepared, error = pending.pop(0).result()
            if k + 2 < len(dialogues):  # keep the CPU step two images ahead of the model
                pending.append(self.loader.submit(self._prepare, dialogues[k + 2]))
            if error:
                errors.append([dialogue["dialogue_id"], error])
                continue
            if self.cache == "pre_projector":
                rows.append(self._pre_projector_row(index, dialogue, prepared, held))
                continue
            encoded = self.adapter.features(prepared)
            rows.append({"dialogue_id": dialogue["dialogue_id"], "image": dialogue["image"],
                         "n_tokens": int(encoded.tokens.shape[0]), "layout": json.dumps(encoded.layout.to_dict()),
                         "features": encoded.tokens.detach().to("cpu", self.store_dtype)})
        self.out.write_shard(index, rows)
        return {"records": len(rows), "errors": errors}


def run(config: PipelineConfig, split: str = "train", progress: bool = True) -> StageReport:
    from pipeline.cluster import actor_gpus, device_for

    records, bad = load_split(config, split, split_limit(config, split))
    out_args = output_args(config, split)
    out = StageOutput(**out_args)
    out.prepare(config.to_dict(), overwrite=config.shards.overwrite)
    for record_id, reason in bad:
        out.record_error(record_id, reason)
    ranges = shard_ranges(len(records), config.shards.dialogues_per_shard)
    gpus = actor_gpus(config, STAGE)
    actor_cls = model_actor(FeatureExtractor, gpus, getattr(config.resources, STAGE).num_cpus)
    first_shard: dict[str, int] = {}  # image -> the shard of its first dialogue, which stores its features
    for j, r in enumerate(records):
        first_shard.setdefault(r["image"], j // config.shards.dialogues_per_shard)
    slim = [{"dialogue_id": r["dialogue_id"], "image": r["image"], "ref_shard": first_shard[r["image"]]}
            for r in records]
    return run_sharded(
        out, len(ranges), len(records) + len(bad),
        make_actor=lambda: actor_cls.remote(config.model.path, config.model.dtype, device_for(gpus), out_args,
                                            config.extract.cache, config.extract.quantize),
        num_actors=config.extract.num_actors, task_args=lambda i: (i, slim[ranges[i][0]:ranges[i][1]]),
        max_error_fraction=config.shards.max_error_fraction, progress=progress)
