"""Stage `extract`: the vision tower (+ projector) over every dialogue's image -> feature shards (docs/design.md §3,
§6).

Shard ``i`` holds dialogues ``[i * N, (i + 1) * N)`` of the split: per dialogue its id, image, ``n_tokens``, the
layout (JSON) and ``features`` X_IMG (n, d) in the model dtype (float16 for float32 models, to halve storage).
With ``extract.cache: pre_projector`` the row of an image's first dialogue holds the tower's selected-layer output
before the projector instead ((crops * t, C_vision), 16-bit or int8 + per-token ``scale``), with ``image_size`` and
``crops``; later dialogues of that image hold an empty array and ``ref_shard``, the shard of that first row
(``stages.common.FeatureReader`` resolves and projects them).
Streaming (docs/design.md §6.1): images are decoded and preprocessed by ``extract.cpu_workers`` CPU actors
(``ImagePrep``) per model actor, whose pixel values stream to the model actor through Ray's object store, a batch of
``extract.batch_size`` images per request, requested ahead of the tower; the tower runs a batch at a time (LLaVA and
LLaVA-NeXT; other families one image at a time); each model actor works on two shards at once, so one shard's write
overlaps the next one's tower. ``cpu_workers: 0`` preprocesses on a thread of the model actor instead. An image of
several dialogues of a shard goes through the tower once.
Video dialogues (docs/design.md §5, video): the model actor holds the video adapter, which decodes each file into its
sampled frames (``data.video``) and runs the model's video path; a file that cannot be decoded is its record's error.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

from pipeline.config import PipelineConfig
from pipeline.shards import StageOutput
from pipeline.tensor_columns import quantize_int8
from stages.common import (StageReport, load_split, model_actor, per_split, run_sharded, shard_ranges, split_limit,
                           stage_actors, video_sampling)
from stages.outputs import EXTRACT as STAGE  # noqa: F401  (each stage module names itself)
from stages.outputs import extract_args as output_args
from stages.outputs import extract_uri as output_uri  # noqa: F401  (this stage's own output, for callers)
from stages.outputs import storage_dtype


BATCHED_FAMILIES = ("llava", "llava_next")  # a CLIP tower that ``stages.common.vision_hidden`` runs on a batch


def _load_image_prep(model_path: str):
    """The adapter's image processor without its weights: (family, processor)."""
    import importlib
    from pathlib import Path

    from transformers import AutoConfig

    from compress.lvlm import ADAPTERS, model_family

    family = model_family(model_path)
    module, name = ADAPTERS[family].split(":")
    cls = getattr(importlib.import_module(module), name)
    return cls.family, cls.load_processor(Path(model_path), AutoConfig.from_pretrained(model_path))


def prepare_images(family: str, processor, paths: list[str]) -> list:
    """Image paths -> per image (pixel_values float32 array (1, 3, h, w) or (1, K, 3, h, w), (height, width)) as
    ``adapter.prepare`` computes them (before its move to the device), or the error's text."""
    from compress.lvlm.base import load_image

    out = []
    for path in paths:
        try:
            pil = load_image(path)
            pixels = processor(images=[pil], return_tensors="pt")
        except (FileNotFoundError, ValueError, OSError) as err:
            out.append(str(err))
            continue
        size = tuple(int(v) for v in pixels["image_sizes"][0]) if family == "llava_next" else (pil.height, pil.width)
        out.append((pixels["pixel_values"].float().numpy(), size))
    return out


class ImagePrep:
    """A CPU worker (Ray actor): decodes and preprocesses batches of images for a model actor."""

    def __init__(self, model_path: str) -> None:
        from pipeline.env import apply_defaults

        apply_defaults()
        self.family, self.processor = _load_image_prep(model_path)

    def prepare(self, paths: list[str]) -> list:
        return prepare_images(self.family, self.processor, paths)


class FeatureExtractor:
    """One per model actor: holds the model, writes whole shards (two at once: one's write overlaps the next one's
    tower, which a lock keeps to one batch at a time)."""

    def __init__(self, model_path: str, dtype: str, device: str, cache: str = "post_projector",
                 quantize: str = "none", batch_size: int = 1, cpu_workers: int = 0, video: dict | None = None) -> None:
        import torch

        from pipeline.env import apply_defaults
        from stages.common import stage_adapter

        apply_defaults()
        torch.set_num_threads(max(1, torch.get_num_threads()))
        # ``video`` (the frame sampling): the dialogues' files are videos, through the model's video path
        self.adapter = stage_adapter(model_path, device, dtype, video)
        self.video = video
        self.store_dtype = getattr(torch, storage_dtype(dtype))
        self.post_dtype, self.cache, self.quantize = storage_dtype(dtype), cache, quantize
        self.outs: dict[str, StageOutput] = {}  # per split (stages.common.per_split)
        self.batch_size = max(1, batch_size)
        self.batched = self.adapter.family in BATCHED_FAMILIES and \
            isinstance(self.adapter.model.config.vision_feature_layer, int)
        self.preps = self._start_preps(model_path, cpu_workers) if self.batched else []
        self.tower = threading.Lock()
        self.loader = ThreadPoolExecutor(max_workers=2)
        self._prep = _load_image_prep(model_path) if self.batched and not self.preps else None

    @staticmethod
    def _start_preps(model_path: str, count: int) -> list:
        """``count`` CPU actors on this actor's node (soft: elsewhere when it has no free CPU), owned by this actor:
        they end with it."""
        if count < 1:
            return []
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        cls = ray.remote(num_cpus=1, max_restarts=3, max_task_retries=3, scheduling_strategy=here)(ImagePrep)
        return [cls.remote(model_path) for _ in range(count)]

    # --- images -> prepared batches (CPU), in order -------------------------------------------------------------
    def _prepared_batches(self, images: list[str]):
        """Yields lists of (image, prepared (pixel_values, size) or error text), ``batch_size`` images at a time,
        requested up to two batches ahead (from the CPU actors round robin, else from a thread here)."""
        import ray

        chunks = [images[i:i + self.batch_size] for i in range(0, len(images), self.batch_size)]

        def request(k: int):
            if self.preps:
                return self.preps[k % len(self.preps)].prepare.remote(chunks[k])
            if self._prep is not None:
                return self.loader.submit(prepare_images, *self._prep, chunks[k])
            return self.loader.submit(lambda paths: [self._prepare_here(p) for p in paths], chunks[k])

        ahead = max(2, len(self.preps))
        pending = [request(k) for k in range(min(ahead, len(chunks)))]
        for k, chunk in enumerate(chunks):
            head = pending.pop(0)
            got = ray.get(head) if self.preps else head.result()
            if k + len(pending) + 1 < len(chunks):
                pending.append(request(k + len(pending) + 1))
            yield list(zip(chunk, got))

    def _prepare_here(self, image: str):
        try:
            return self.adapter.prepare(image)
        except (FileNotFoundError, ValueError, OSError) as err:
            return str(err)

    # --- the tower, a batch at a time ---------------------------------------------------------------------------
    def _encode(self, batch: list) -> dict:
        """[(image, prepared or error)] -> image -> (hidden (crops, t, C_vision) or None, X_IMG (n, d) or None,
        layout, image_size) or the error's text; hidden for the pre-projector cache, X_IMG for the other."""
        import torch

        from stages.common import project_hidden, vision_hidden

        ad = self.adapter
        out = {image: got for image, got in batch if isinstance(got, str)}
        good = [(image, got) for image, got in batch if not isinstance(got, str)]
        if not good:
            return out
        if not self.batched:  # one image at a time through the adapter's own path
            with self.tower:
                for image, prepared in good:
                    enc = ad.features(prepared)
                    out[image] = (None, enc.tokens, enc.layout, prepared.image_size)
            return out
        sizes = [tuple(size) for _, (_, size) in good]
        layouts = [ad.layout() if ad.family == "llava" else ad.layout(size) for size in sizes]
        crops = [torch.from_numpy(pv).flatten(0, pv.ndim - 4) for _, (pv, _) in good]  # (K, 3, h, w) each
        with self.tower, torch.no_grad():
            hidden = vision_hidden(ad, torch.cat(crops).to(ad.device)).split([c.shape[0] for c in crops])
            for (image, _), h, layout, size in zip(good, hidden, layouts, sizes):
                if self.cache == "pre_projector":
                    out[image] = (h, None, layout, size)
                    continue
                x = project_hidden(ad, h, size)
                if x.shape[0] != layout.num_tokens:
                    raise ValueError(f"{ad.model_dir}: {x.shape[0]} visual tokens but the layout gives "
                                     f"{layout.num_tokens} for an image of size {size}")
                out[image] = (None, x, layout, size)
        return out

    def _pre_projector_row(self, index: int, dialogue: dict, encoded: tuple, held: set) -> dict:
        """One row of the image-keyed cache: the tower output before the projector for the first dialogue of an
        image in this shard whose image is first seen here (``ref_shard == index``); an empty array (the row refers
        to ``ref_shard``) for every other dialogue of that image. ``extract.cache: none`` (teacher-only): no
        features anywhere, ``crops`` 0: the consumer encodes the image in its step (``FeatureReader``)."""
        import torch

        hidden, _, layout, size = encoded
        ref = index if self.cache == "none" else int(dialogue["ref_shard"])
        row = {"dialogue_id": dialogue["dialogue_id"], "image": dialogue["image"],
               "n_tokens": int(layout.num_tokens), "layout": json.dumps(layout.to_dict()), "image_size": list(size),
               "crops": 0 if self.cache == "none" else 1, "ref_shard": ref, "post_dtype": self.post_dtype}
        width = self.adapter.model.config.vision_config.hidden_size
        if self.cache == "pre_projector" and ref == index and dialogue["image"] not in held:
            held.add(dialogue["image"])
            row["crops"] = int(hidden.shape[0])
            x = hidden.reshape(-1, hidden.shape[-1]).detach().to("cpu", self.store_dtype)
        else:
            x = torch.zeros((0, width), dtype=self.store_dtype)
        if self.quantize == "int8":
            q, scale = quantize_int8(x.float().numpy())
            return {**row, "features": q, "scale": scale}
        return {**row, "features": x}

    def _tower_images(self, index: int, dialogues: list[dict]) -> list[str]:
        """The distinct images of the shard that need the tower: all of them for the per-dialogue cache; for the
        image-keyed one, those whose features this shard stores (the image's first dialogue is here); none for the
        teacher-only cache."""
        if self.cache == "none":
            return []
        if self.cache == "pre_projector":
            return list(dict.fromkeys(d["image"] for d in dialogues if int(d["ref_shard"]) == index))
        return list(dict.fromkeys(d["image"] for d in dialogues))

    def run_shard(self, out_args: dict, index: int, dialogues: list[dict]) -> dict:
        encoded: dict = {}
        for batch in self._prepared_batches(self._tower_images(index, dialogues)):
            encoded.update(self._encode(batch))
        rows, errors, held = [], [], set()
        for dialogue in dialogues:
            got = encoded.get(dialogue["image"])
            if isinstance(got, str):
                errors.append([dialogue["dialogue_id"], self._reason(dialogue, got)])
                continue
            if self.cache != "post_projector":
                if got is None:  # features in an earlier shard, or none stored: only the layout is needed here
                    got = self._layout_only(dialogue["image"])
                    if isinstance(got, str):
                        errors.append([dialogue["dialogue_id"], self._reason(dialogue, got)])
                        continue
                    encoded[dialogue["image"]] = got
                rows.append(self._pre_projector_row(index, dialogue, got, held))
                continue
            _, x, layout, _ = got
            rows.append({"dialogue_id": dialogue["dialogue_id"], "image": dialogue["image"],
                         "n_tokens": int(x.shape[0]), "layout": json.dumps(layout.to_dict()),
                         "features": x.detach().to("cpu", self.store_dtype)})
        per_split(self.outs, out_args, lambda: StageOutput(**out_args)).write_shard(index, rows)
        return {"records": len(rows), "errors": errors}

    def _reason(self, dialogue: dict, error: str) -> str:
        """A video's error names its dialogue's file:line (videos are decoded here, not checked when read)."""
        return f"{dialogue['where']}: {error}" if self.video is not None and "where" in dialogue else error

    def _layout_only(self, image: str):
        """(None, None, layout, size) of an image whose tower output another shard holds (its size from the file's
        header, nothing decoded), or the error's text."""
        from PIL import Image, UnidentifiedImageError

        ad = self.adapter
        if not self.batched:
            prepared = self._prepare_here(image)
            return prepared if isinstance(prepared, str) else (None, None, prepared.layout, prepared.image_size)
        try:
            with Image.open(image) as im:
                size = (im.height, im.width)
        except (UnidentifiedImageError, OSError) as err:
            return f"image file {image} cannot be read as an image ({err}); pass a JPEG/PNG file"
        return None, None, ad.layout() if ad.family == "llava" else ad.layout(size), size


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
    # Two shards in flight per actor: one is written while the next one's images go through the tower.
    actor_cls = model_actor(FeatureExtractor, gpus, getattr(config.resources, STAGE).num_cpus, max_concurrency=2)
    _check_cpus(config)
    first_shard: dict[str, int] = {}  # image -> the shard of its first dialogue, which stores its features
    for j, r in enumerate(records):
        first_shard.setdefault(r["image"], j // config.shards.dialogues_per_shard)
    slim = [{"dialogue_id": r["dialogue_id"], "image": r["image"], "ref_shard": first_shard[r["image"]],
             "where": r["where"]} for r in records]
    video = video_sampling(config)
    return run_sharded(
        out, len(ranges), len(records) + len(bad),
        actors=lambda n: stage_actors(STAGE, actor_cls, (config.model.path, config.model.dtype, device_for(gpus),
                                                          config.extract.cache, config.extract.quantize,
                                                          config.extract.batch_size, config.extract.cpu_workers,
                                                          video), n),
        num_actors=config.extract.num_actors, task_args=lambda i: (out_args, i, slim[ranges[i][0]:ranges[i][1]]),
        max_error_fraction=config.shards.max_error_fraction, progress=progress, tasks_per_actor=2)


def _check_cpus(config: PipelineConfig) -> None:
    """The CPU actors wait for free CPUs: say so when the cluster has fewer than the stage asks for now."""
    import logging

    import ray

    ex = config.extract
    wanted = ex.num_actors * (getattr(config.resources, STAGE).num_cpus + ex.cpu_workers)
    have = ray.cluster_resources().get("CPU", 0)
    if ex.cpu_workers and have < wanted:
        logging.getLogger("metacompress").warning(
            "extract: %d model actors with extract.cpu_workers = %d CPU actors each need %g CPUs, the cluster has %g "
            "now; the CPU actors wait for CPUs (lower extract.cpu_workers, 0: preprocess in the model actor)",
            ex.num_actors, ex.cpu_workers, wanted, have)
