"""The evaluate stage's report files: tables and plots (pipeline.reports), and the P matrices of the trained
compressors on the first images (paper figures 6-7)."""

from __future__ import annotations

import json
import logging

from pipeline.config import PipelineConfig
from stages.common import feature_row, video_sampling
from stages.evaluate.planning import Job
from stages.outputs import complete_output, extract_args

log = logging.getLogger("metacompress")


def _cached_features(config: PipelineConfig, split: str, ids: list[str]) -> dict:
    """dialogue_id -> (X_IMG (n, d) float32 tensor, Layout) from the extract stage's finished output of ``split``
    (empty when it has none: the caller encodes the images itself)."""
    out = complete_output(extract_args(config, split))
    if out is None:
        return {}
    found, wanted = {}, set(ids)
    for i in range(out.manifest()["num_shards"]):
        for r in out.read_records(i):
            if "ref_shard" in r:  # a pre-projector cache (docs/design.md §3.3): the caller encodes the images
                return {}
            if r["dialogue_id"] in wanted:
                x, layout = feature_row(r)
                found[r["dialogue_id"]] = (x.float(), layout)
        if len(found) == len(wanted):
            break
    return found


def _encode_on_actor(config: PipelineConfig, paths: list[str]) -> list:
    """``EvalWorker.encode_images`` on one of the stage's kept actors, else on a new evaluate actor (the stage's
    resources) that is then ended: the driver never loads the LVLM (docs/design.md §6.4)."""
    import ray

    from pipeline.cluster import actor_gpus, device_for
    from stages.common import kept_actor, model_actor
    from stages.evaluate.worker import EvalWorker
    from stages.outputs import EVALUATE

    kept = kept_actor(EVALUATE)
    if kept is not None:
        return ray.get(kept.encode_images.remote(paths))
    gpus = actor_gpus(config, EVALUATE)
    actor = model_actor(EvalWorker, gpus, config.resources.evaluate.num_cpus).remote(
        config.model.path, config.model.dtype, device_for(gpus), {})
    try:
        return ray.get(actor.encode_images.remote(paths))
    finally:
        ray.kill(actor)


def matrix_items(config: PipelineConfig, split: str, jobs: list[Job], records: list[dict]) -> list[dict]:
    """P of each evaluated MetaCompress rate for the first ``evaluate.matrix_images`` images (paper figures 6-7),
    from the extract stage's cached features (else an evaluate actor encodes the images; Ray must be running)."""
    import numpy as np
    import torch

    from compress.lvlm.base import load_image
    from compress.metacompress import MetaCompress
    from compress.reduction import num_keep
    from pipeline import storage

    mc = [j for j in jobs if j.method == "metacompress"]
    chosen = records[:min(config.evaluate.matrix_images, len(records))]
    if not mc or not chosen or video_sampling(config) is not None:  # the plots draw P over one image's grid
        return []
    features = _cached_features(config, split, [d["dialogue_id"] for d in chosen])
    missing = [d for d in chosen if d["dialogue_id"] not in features]
    errors = {}
    for d, got in zip(missing, _encode_on_actor(config, [d["image"] for d in missing]) if missing else []):
        if isinstance(got, str):
            errors[d["dialogue_id"]] = got
        else:
            features[d["dialogue_id"]] = got
    encoded = []
    with torch.no_grad():
        for d in chosen:
            try:
                image = np.asarray(load_image(d["image"]))
            except (FileNotFoundError, ValueError, OSError) as err:
                errors[d["dialogue_id"]] = str(err)
            if d["dialogue_id"] in errors:
                log.warning("evaluate: no P plot for %s (%s)", d["dialogue_id"], errors[d["dialogue_id"]])
                continue
            encoded.append((d, *features[d["dialogue_id"]], image))
        items = []
        for job in mc:
            with storage.local_copy(job.compressor) as local:  # any storage URI (docs/design.md §6.4)
                module = MetaCompress.from_pretrained(local).eval()
            for d, x, layout, image in encoded:
                p = module(x.to(module.w_key.dtype), num_keep(x.shape[0], job.rate), layout).matrix
                seg = layout.segments[0]
                items.append({"title": f"{d['dialogue_id']}, rate {job.rate:g}", "matrix": p.float().numpy(),
                              "grid": (seg.height, seg.width), "indices": seg.indices(), "image": image})
    return items


def write_report_files(summaries, per_turn, matrices, target: str, batch_size: int, render_key: str) -> str:
    """Reports into ``target`` (a local path, or any storage URI: drawn in a local mirror, then uploaded);
    ``matrices()`` makes the P plot items. A ``target`` already rendered from the same outputs (``_render.json``
    holds ``render_key`` and each file's sha256) and unchanged since is left as it is, so a re-run does not redraw.
    Returns the local directory holding them."""
    import shutil
    from pathlib import Path

    from pipeline import storage
    from pipeline.hashing import file_sha256
    from pipeline.reports import write_reports

    local = target
    if storage.is_remote(target):  # the mirror starts as the store's copy, so the reuse check below is the store's
        local = storage.local_cache(target)
        shutil.rmtree(local, ignore_errors=True)
        if storage.listdir(target):
            storage.copy_dir(target, local)
    stamp = Path(local, "_render.json")
    try:
        done = json.loads(stamp.read_text())
    except (FileNotFoundError, ValueError):
        done = {}
    files = done.get("files") if isinstance(done, dict) else None
    # Reused only when rendered from the same outputs and every file still has the sha256 it was written with (the
    # integrity chain of docs/design.md §8): an edited or damaged report is drawn again, never served.
    if done.get("key") == render_key and isinstance(files, dict) and files and \
            all(Path(local, n).is_file() and file_sha256(str(Path(local, n))) == h for n, h in files.items()):
        return local
    if done:
        log.warning("evaluate: reports in %s are out of date or changed since they were written; drawing them again",
                    local)
    written = write_reports(summaries, per_turn, local, matrices(), batch_size)
    Path(local, "summaries.json").write_text(json.dumps(summaries, indent=1) + "\n")
    names = [p.name for p in written] + ["summaries.json"]
    stamp.write_text(json.dumps({"key": render_key, "files": {n: file_sha256(str(Path(local, n))) for n in names}})
                     + "\n")
    if local != target:
        storage.copy_dir(local, target)
    return local
