"""What the stages share, below all of them: model identity, reading a split, decoding cached feature rows, dialogue
shards and the driver loop over a pool of Ray actors (docs/design.md §6)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
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
    for d in iter_dialogues(path, check_images=False,
                            on_error=lambda e: bad.append([e.dialogue_id or f"{e.path}:{e.line}",
                                                             f"{e.path}:{e.line}: {e.reason}"])):
        records.append({"dialogue_id": d.dialogue_id, "image": str(d.image), "source": d.source,
                        "questions": [t.question for t in d.turns], "answers": [list(t.answers) for t in d.turns]})
        if limit is not None and len(records) >= limit:
            break
    return records, bad


def features_tensor(array):
    """A stored feature array (float16, float32, or bfloat16 kept as uint16) -> a CPU tensor of that dtype."""
    import numpy as np
    import torch

    from pipeline.tensor_columns import bf16_to_torch

    return bf16_to_torch(array) if array.dtype == np.uint16 else torch.from_numpy(np.array(array))


def feature_row(row: dict):
    """A row of the extract stage's shards -> (X_IMG (n, d) CPU tensor in its stored dtype, Layout)."""
    from compress.layout import Layout

    return features_tensor(row["features"]), Layout.from_dict(json.loads(row["layout"]))


def encoded_image(row: dict, device, dtype):
    """A row of the extract stage's shards as the chat session's image input (no pixels, nothing to re-encode)."""
    from compress.lvlm.base import EncodedImage

    x, layout = feature_row(row)
    return EncodedImage(x.to(device, dtype), layout, None, (0, 0))


def shard_ranges(count: int, per_shard: int) -> list[tuple[int, int]]:
    return [(start, min(start + per_shard, count)) for start in range(0, count, per_shard)]


def model_actor(cls, num_gpus: float, num_cpus: float = 1):
    """A Ray actor class for a model worker: one GPU when there are GPUs, spread over the nodes, restarted on
    another node (with its in-flight shard retried) when its node dies. Shard writes are atomic and idempotent."""
    import ray

    return ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=3, max_task_retries=3,
                      scheduling_strategy="SPREAD")(cls)


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


def run_sharded(out: StageOutput, num_shards: int, total_records: int, make_actor: Callable[[], object],
                num_actors: int, task_args: Callable[[int], tuple], max_error_fraction: float,
                progress: bool = True) -> StageReport:
    """Compute the missing (or corrupt) shards of a prepared ``out`` on a pool of actors, record per-record errors,
    finish.

    ``make_actor()`` returns a Ray actor handle with a ``run_shard(*task_args(i))`` method that writes shard ``i``
    itself and returns ``{"records": int, "errors": [[record_id, reason], ...]}``.
    """
    from ray.util import ActorPool
    from tqdm import tqdm

    start = time.perf_counter()
    todo = out.missing_shards(num_shards)
    records = 0
    if todo:
        pool = ActorPool([make_actor() for _ in range(min(num_actors, len(todo)))])
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
