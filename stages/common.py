"""What the stages share, below all of them: model identity, reading a split, decoding cached feature rows, dialogue
shards and the driver loop over a pool of Ray actors (docs/design.md §6)."""

from __future__ import annotations

import functools
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.shards import StageOutput

log = logging.getLogger("metacompress")


def model_identity(model_dir: str) -> dict:
    """What outputs made with a model depend on: its config and the names and sizes of its weight files
    (hashing multi-GB weights on every run would cost more than the stage)."""
    path = Path(model_dir)
    config = json.loads((path / "config.json").read_text())
    weights = sorted((p.name, p.stat().st_size) for p in path.glob("*.safetensors"))
    return {"config": config, "weights": weights}


def split_limit(config: PipelineConfig, split: str) -> int | None:
    return config.data.max_train_dialogues if split == "train" else config.data.max_eval_dialogues


def load_split(config: PipelineConfig, split: str, limit: int | None) -> tuple[list[dict], list[list[str]]]:
    """The split's first ``limit`` dialogues as plain dicts (id, image, source, questions, answers); bad records
    become ``[record_id, reason]`` errors, not failures."""
    from pipeline.dialogues import iter_dialogues

    path = getattr(config.data, split)
    bad: list[list[str]] = []
    records: list[dict] = []
    lines = dialogue_kinds(path).lines
    for d in iter_dialogues(path, check_images=False,
                            on_error=lambda e: bad.append([e.dialogue_id or f"{e.path}:{e.line}",
                                                             f"{e.path}:{e.line}: {e.reason}"])):
        records.append({"dialogue_id": d.dialogue_id, "image": str(d.image), "source": d.source,
                        "questions": [t.question for t in d.turns], "answers": [list(t.answers) for t in d.turns],
                        "where": f"{path}:{lines.get(d.dialogue_id, '?')}"})
        if limit is not None and len(records) >= limit:
            break
    return records, bad


def reference_answer(answers: list[str]) -> str:
    """The reference answer fed as history (``history: reference``): the most frequent one, the first on ties."""
    return Counter(answers).most_common(1)[0][0]


# --- video dialogues (docs/design.md §5, video) ----------------------------------------------------------------------
VIDEO_FAMILIES = ("qwen2_5_vl", "qwen2_vl")  # the families with a video path (compress.lvlm.video)


@dataclass(frozen=True)
class Kinds:
    """What a dialogue file holds: the first line of each kind ("image", "video") and each dialogue id's line."""

    first: dict
    lines: dict


def dialogue_kinds(path: str) -> Kinds:
    """A light scan of a dialogue file (JSON only, no validation: ``iter_dialogues`` reports bad lines)."""
    import os

    try:
        st = os.stat(path)
    except OSError:
        return Kinds({}, {})
    return _scan_kinds(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _scan_kinds(path: str, mtime_ns: int, size: int) -> Kinds:
    first: dict[str, int] = {}
    lines: dict[str, int] = {}
    with open(path, "rb") as f:
        for lineno, data in enumerate(f, start=1):
            try:
                obj = json.loads(data)
            except ValueError:
                continue
            if not isinstance(obj, dict):
                continue
            first.setdefault("video" if "video" in obj else "image", lineno)
            if isinstance(obj.get("dialogue_id"), str):
                lines.setdefault(obj["dialogue_id"], lineno)
    return Kinds(first, lines)


def video_sampling(config: PipelineConfig) -> dict | None:
    """The frame sampling (``data.video``: {"num_frames", "fps"}) when the run's dialogues are videos, None when they
    are images. Refused in one line naming the file: a run mixing images and videos (the stages hold one adapter per
    run), videos on a family without a video path, and the pre-projector cache (its rows are CLIP-tower outputs)."""
    from compress.lvlm import model_family

    found = {}
    for split in ("train", "val", "test") if config.data.mt_video is None else ():  # MT-Video: videos only
        path = getattr(config.data, split)
        for kind, line in dialogue_kinds(path).first.items():
            found.setdefault(kind, (f"data.{split}", path, line))
    if "video" not in found and config.data.mt_video is None:
        return None
    where = "data.mt_video" if "video" not in found else f"{found['video'][0]}: {found['video'][1]}:{found['video'][2]}"
    if "image" in found:
        key, path, line = found["image"]
        raise ValueError(f"{where} is a video dialogue and {key}: {path}:{line} an image one; a run holds one kind: "
                         "put images and videos in separate runs (work_dir)")
    family = model_family(config.model.path)
    if family not in VIDEO_FAMILIES:
        raise ValueError(f"{where} is a video dialogue, but model.path {config.model.path} is a {family} model; "
                         f"video runs on the {' and '.join(VIDEO_FAMILIES)} families (docs/design.md §5)")
    if config.extract.cache == "pre_projector":
        raise ValueError(f"{where} is a video dialogue: extract.cache pre_projector holds CLIP-tower outputs; use "
                         "extract.cache post_projector or none")
    return config.data.video_sampling()


def stage_adapter(model_path: str, device: str, dtype: str, video: dict | None = None):
    """The stage's LVLM adapter: the image adapter, or with ``video`` ({"num_frames", "fps"}) its video adapter
    (compress.lvlm.video), which takes a video file where the image adapter takes an image."""
    import torch

    from compress.lvlm import load_adapter

    adapter = load_adapter(model_path, device=device, dtype=getattr(torch, dtype))
    if video is None:
        return adapter
    from compress.lvlm.video import video_adapter

    return video_adapter(adapter, **video)


def features_tensor(array):
    """A stored feature array (float16, float32, or bfloat16 kept as uint16) -> a CPU tensor of that dtype
    (a tensor, as ``FeatureReader`` gives, passes through)."""
    import numpy as np
    import torch

    from pipeline.tensor_columns import bf16_to_torch

    if isinstance(array, torch.Tensor):
        return array
    return bf16_to_torch(array) if array.dtype == np.uint16 else torch.from_numpy(np.array(array))


# --- the image-keyed, pre-projector feature cache (extract.cache: pre_projector; docs/design.md §3) ----------------
def vision_hidden(adapter, pixel_values):
    """pixel_values (1, 3, h, w) or (1, K, 3, h, w) -> the vision tower's selected-layer output (K, t, C_vision)
    before the projector: the CLIP layers up to the feature layer and the select strategy, as the model's own
    ``get_image_features`` computes them before projecting."""
    import torch

    from compress.lvlm.image_ops import _transformer

    pv = pixel_values[0] if pixel_values.dim() == 5 else pixel_values
    vt = _transformer(adapter.model.model.vision_tower)
    depth = adapter.feature_layer % (len(vt.encoder.layers) + 1)  # hidden_states[i] = the output of i layers
    with torch.no_grad():
        hidden = vt.pre_layrnorm(vt.embeddings(pv.to(adapter.dtype)))
        for block in vt.encoder.layers[:depth]:
            hidden = block(hidden, None)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden[:, 1:] if adapter.select_strategy == "default" else hidden


def project_hidden(adapter, hidden, image_size: tuple[int, int]):
    """(K, t, C_vision) tower outputs -> X_IMG (n, d) on the adapter's device: the frozen projector, then (LLaVA-NeXT)
    the anyres packing of base tile, unpadded crops and row newlines."""
    import torch

    from compress.lvlm.image_ops import pack_index

    with torch.no_grad():
        feats = adapter.project(hidden.to(adapter.device, adapter.dtype))
        if adapter.family != "llava_next":
            return feats[0]
        flat = feats.reshape(-1, feats.shape[-1])
        newline = adapter.model.model.image_newline.to(flat.dtype)[None]
        index = pack_index(adapter, tuple(image_size), feats.shape[0], feats.shape[1])
        return torch.cat([flat, newline], 0).index_select(0, index)


PRE_PROJECTOR_COLUMNS = ("ref_shard", "crops", "image_size", "post_dtype", "scale")


class FeatureReader:
    """Reads the extract stage's shards as per-dialogue rows of post-projector features, whatever the cache keeps.
    ``pre_projector`` rows hold the tower output once per distinct image (later dialogues of an image refer to its
    first row by ``ref_shard``), 16-bit or int8 with a per-token scale; they are resolved, dequantised and projected
    with ``adapter`` here, in the consumer's step. ``none`` rows (teacher-only, ``crops`` 0) hold no features: the
    image is encoded with ``adapter`` here and rounded to the cache's 16-bit dtype, as the post-projector cache would
    store it. Every shard is hashed as it is read (``StageOutput.read_records``)."""

    def __init__(self, feature_args: dict, adapter=None, keep: int = 4):
        self.out = StageOutput(**feature_args)
        self.adapter, self.keep = adapter, keep
        self._images: dict[int, dict[str, dict]] = {}  # shard -> image -> its row holding the tower output

    def _remember(self, shard: int, rows: list[dict]) -> dict[str, dict]:
        self._images.pop(shard, None)
        while len(self._images) >= self.keep:
            self._images.pop(next(iter(self._images)))
        self._images[shard] = {r["image"]: r for r in rows if r["ref_shard"] == shard and len(r["features"])}
        return self._images[shard]

    def _image_rows(self, shard: int) -> dict[str, dict]:
        if shard in self._images:
            return self._images[shard]
        return self._remember(shard, self.out.read_records(shard))

    def read_records(self, index: int) -> list[dict]:
        rows = self.out.read_records(index)
        if not rows or "ref_shard" not in rows[0]:
            return rows  # a post-projector cache: rows hold X_IMG
        if self.adapter is None:
            raise ValueError(f"{self.out.uri} holds pre-projector features or none (extract.cache: pre_projector "
                             "or none); its reader needs the model to project or compute them: pass the adapter")
        self._remember(index, rows)
        out = []
        for r in rows:
            if int(r["crops"]) == 0:  # extract.cache: none
                plain = {k: v for k, v in r.items() if k not in PRE_PROJECTOR_COLUMNS}
                out.append({**plain, "features": self._encode(r)})
                continue
            source = self._image_rows(int(r["ref_shard"])).get(r["image"])
            if source is None:  # the image failed in extract; its error is recorded there
                continue
            plain = {k: v for k, v in r.items() if k not in PRE_PROJECTOR_COLUMNS}
            out.append({**plain, "features": self._project(source)})
        return out

    def _encode(self, row: dict):
        import torch

        with torch.no_grad():
            x = self.adapter.encode(row["image"]).tokens
        if x.shape[0] != int(row["n_tokens"]):
            raise ValueError(f"dialogue {row['dialogue_id']!r}: its image {row['image']} gives {x.shape[0]} visual "
                             f"tokens, the extract stage recorded {row['n_tokens']}; the image changed since: re-run "
                             "extract with --overwrite")
        return x.to("cpu", getattr(torch, row["post_dtype"]))

    def _project(self, row: dict):
        import numpy as np
        import torch

        from pipeline.tensor_columns import dequantize_int8

        x = row["features"]
        if x.dtype == np.int8:
            x = torch.from_numpy(dequantize_int8(x, row["scale"]))
        else:
            x = features_tensor(x)
        hidden = x.reshape(int(row["crops"]), -1, x.shape[-1])
        projected = project_hidden(self.adapter, hidden, tuple(row["image_size"]))
        return projected.to("cpu", getattr(torch, row["post_dtype"]))


def feature_row(row: dict):
    """A row of the extract stage's shards (or of ``FeatureReader``) -> (X_IMG (n, d) CPU tensor in its stored
    dtype, Layout)."""
    from compress.layout import Layout

    if "ref_shard" in row:
        raise ValueError(f"dialogue {row['dialogue_id']!r}: the feature cache holds the tower output before the "
                         "projector (extract.cache: pre_projector); read it with stages.common.FeatureReader and "
                         "the model, or run extract with extract.cache: post_projector")
    return features_tensor(row["features"]), Layout.from_dict(json.loads(row["layout"]))


def encoded_image(row: dict, device, dtype):
    """A row of the extract stage's shards as the chat session's image input (no pixels, nothing to re-encode)."""
    from compress.lvlm.base import EncodedImage

    x, layout = feature_row(row)
    return EncodedImage(x.to(device, dtype), layout, None, (0, 0))


def shard_ranges(count: int, per_shard: int) -> list[tuple[int, int]]:
    return [(start, min(start + per_shard, count)) for start in range(0, count, per_shard)]


def model_actor(cls, num_gpus: float, num_cpus: float = 1, max_concurrency: int = 1):
    """A Ray actor class for a model worker: one GPU when there are GPUs, spread over the nodes, restarted on
    another node (with its in-flight shard retried) when its node dies. Shard writes are atomic and idempotent.
    ``max_concurrency`` > 1: that many shards at once on threads (the class keeps its model work in order)."""
    import ray

    return ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=3, max_task_retries=3,
                      scheduling_strategy="SPREAD", max_concurrency=max_concurrency)(cls)


# The running stage's model actors by (stage, constructor arguments), while ``actors_kept_for_stage`` is active.
_kept: dict[tuple[str, str], list] | None = None


@contextmanager
def actors_kept_for_stage():
    """Within the block a stage's model actors serve each of its splits: a model loads once per stage, not once per
    split (docs/design.md §6.1). On exit they end, which frees their GPUs for the next stage."""
    global _kept
    _kept = {}
    try:
        yield
    finally:
        _end_kept()
        _kept = None


def _end_kept() -> None:
    import ray

    for actor in [a for actors in _kept.values() for a in actors]:
        ray.kill(actor)
    _kept.clear()


def stage_actors(stage: str, actor_cls, args: tuple, count: int) -> list:
    """``count`` handles of ``actor_cls.remote(*args)``: the running stage's kept actors made with the same
    arguments first, new ones for the rest. Outside ``actors_kept_for_stage`` all are new (they end with their
    handles). Arguments must be the same for every split: per-split paths go with each call."""
    if _kept is None:
        return [actor_cls.remote(*args) for _ in range(count)]
    key = (stage, json.dumps(args, sort_keys=True, default=str))
    if key not in _kept:
        _end_kept()  # another stage, or other settings: their actors would only hold CPUs and GPUs
        _kept[key] = []
    actors = _kept[key]
    actors += [actor_cls.remote(*args) for _ in range(count - len(actors))]
    return actors[:count]


def kept_actor(stage: str):
    """One of ``stage``'s kept actors, or None: work besides the shards (the report's images) goes to it, since a new
    actor could wait forever for the CPUs and GPUs the kept ones hold."""
    for (name, _), actors in (_kept or {}).items():
        if name == stage and actors:
            return actors[0]
    return None


def per_split(cache: dict, args: dict, make: Callable[[], object]):
    """An actor's object for one split's arguments (its output, its feature reader), made on first use: one actor
    serves every split of its stage."""
    key = json.dumps(args, sort_keys=True, default=str)
    if key not in cache:
        cache[key] = make()
    return cache[key]


class StageFailed(RuntimeError):
    pass


@dataclass
class StageReport:
    stage: str
    uri: str
    shards: int
    computed: int
    records: int
    errors: int
    seconds: float

    def line(self) -> str:
        rate = self.records / self.seconds if self.seconds and self.computed else 0.0
        return (f"{self.stage}: {self.shards} shards ({self.computed} computed, {self.shards - self.computed} "
                f"reused), {self.records} records, {self.errors} errors, {self.seconds:.1f} s"
                + (f", {rate:.2f} records/s" if self.computed else "") + f" -> {self.uri}")


def run_sharded(out: StageOutput, num_shards: int, total_records: int, actors: Callable[[int], list],
                num_actors: int, task_args: Callable[[int], tuple], max_error_fraction: float,
                progress: bool = True, tasks_per_actor: int = 1) -> StageReport:
    """Compute the missing (or corrupt) shards of a prepared ``out`` on a pool of actors, record per-record errors,
    finish.

    ``actors(n)`` returns n Ray actor handles (``stage_actors``) with a ``run_shard(*task_args(i))`` method that
    writes shard ``i`` itself and returns ``{"records": int, "errors": [[record_id, reason], ...]}``.
    ``tasks_per_actor``: shards given to each actor at once (its class made with that ``max_concurrency``).
    """
    from ray.util import ActorPool
    from tqdm import tqdm

    start = time.perf_counter()
    todo = out.missing_shards(num_shards)
    records = 0
    if todo:
        pool = ActorPool([a for a in actors(min(num_actors, len(todo))) for _ in range(tasks_per_actor)])
        results = pool.map_unordered(lambda actor, i: actor.run_shard.remote(*task_args(i)), todo)
        for result in tqdm(results, total=len(todo), desc=out.stage, unit="shard", disable=not progress):
            records += result["records"]
            for record_id, reason in result["errors"]:
                out.record_error(record_id, reason)
    errors = len(out.errors())
    if total_records and errors / total_records > max_error_fraction:
        raise StageFailed(f"{out.stage}: {errors} of {total_records} records failed (more than "
                          f"shards.max_error_fraction = {max_error_fraction}); see {out.uri}/_errors.jsonl")
    out.finish(num_shards)
    report = StageReport(out.stage, out.uri, num_shards, len(todo), records, errors, time.perf_counter() - start)
    log.info(report.line())
    return report
