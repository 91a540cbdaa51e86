"""What every sharded stage shares: model identity, dialogue shards, the driver loop over a pool of Ray actors."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.shards import StageOutput

log = logging.getLogger("metacompress")


def model_identity(model_dir: str) -> dict:
    """What outputs made with a model depend on: its config and the names and sizes of its weight files
    (hashing multi-GB weights on every run would cost more than the stage)."""
    path = Path(model_dir)
    config = json.loads((path / "config.json").read_text())
    weights = sorted((p.name, p.stat().st_size) for p in path.glob("*.safetensors"))
    return {"config": config, "weights": weights}


def shard_ranges(count: int, per_shard: int) -> list[tuple[int, int]]:
    return [(start, min(start + per_shard, count)) for start in range(0, count, per_shard)]


def model_actor(cls, num_gpus: float):
    """A Ray actor class for a model worker: one GPU when there are GPUs, spread over the nodes, restarted on
    another node (with its in-flight shard retried) when its node dies. Shard writes are atomic and idempotent."""
    import ray

    return ray.remote(num_gpus=num_gpus, num_cpus=1, max_restarts=3, max_task_retries=3,
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
