"""Stage `teacher`: full-token multi-turn generation on the cached features -> teacher-target shards (docs/design.md §3).

Per dialogue: the teacher's own greedy answers (text and token ids per turn, the history holding its own answers)
and, at every answer token, the top-k log-probabilities and ids (float16 + int32) and the log of the remaining tail
mass (float32). The targets come from one teacher-forced pass over the whole dialogue with the generated answers,
which is the same computation as the generation (checked by a test). With ``teacher.history: reference`` the forced
answers are the dialogue's reference answers instead (each followed by the end-of-turn token the teacher stopped
with): ``answer_ids`` are then those, the targets the teacher's distributions along them, and ``answers`` the
teacher's own greedy answers with the references as history (docs/design.md §3.3).
"""

from __future__ import annotations

from pipeline.config import PipelineConfig
from pipeline.shards import StageOutput
from stages.common import (FeatureReader, StageReport, encoded_image, load_split, model_actor, per_split,
                           reference_answer, run_sharded, shard_ranges, split_limit, stage_actors, stage_adapter,
                           video_sampling)
from stages.outputs import TEACHER as STAGE
from stages.outputs import finished_extract_args
from stages.outputs import teacher_args as output_args


class TeacherWorker:
    def __init__(self, model_path: str, dtype: str, device: str, teacher: dict, video: dict | None = None) -> None:
        from pipeline.env import apply_defaults

        apply_defaults()
        # ``video``: the cached tokens are a video's, prompted with the model's video placeholder (docs/design.md §5)
        self.adapter = stage_adapter(model_path, device, dtype, video)
        self.teacher = teacher
        self.per_split: dict[str, object] = {}  # outputs and feature readers (stages.common.per_split)

    def _dialogue_batch(self, features: list, dialogues: list[dict]) -> list[dict]:
        import torch

        from compress.losses import topk_targets
        from compress.lvlm.session import BatchChatSession, answer_logits_batch

        ad = self.adapter
        reference = self.teacher["history"] == "reference"
        session = BatchChatSession(ad, "full", max_new_tokens=self.teacher["max_new_tokens"],
                                   history="reference" if reference else "model")
        session.set_images(features)
        turns = len(dialogues[0]["questions"])
        answer_ids: list[list[list[int]]] = [[] for _ in dialogues]  # the forced answers
        own: list[list[list[int]]] = [[] for _ in dialogues]  # the teacher's greedy answers
        for t in range(turns):
            refs = [reference_answer(d["answers"][t]) for d in dialogues] if reference else None
            for b, result in enumerate(session.ask([d["questions"][t] for d in dialogues], refs)):
                own[b].append(result.target_ids)  # with the end-of-turn token (docs/design.md §5)
                answer_ids[b].append(result.target_ids if not reference else
                                     ad.answer_ids(refs[b]) + ([result.stop_id] if result.stop_id is not None else []))
        with torch.no_grad():
            forced = answer_logits_batch(ad, [f.tokens for f in features], [d["questions"] for d in dialogues],
                                         answer_ids, image_positions=[ad.positions_after(f.layout) for f in features])
        rows = []
        for d, ids_per_turn, own_per_turn, out in zip(dialogues, answer_ids, own, forced):
            top, ids, tail = topk_targets(out.logits, self.teacher["top_k"])
            per_turn = [out.turn_index == t for t in range(turns)]
            rows.append({"dialogue_id": d["dialogue_id"], "answers": [ad.decode(a) for a in own_per_turn],
                         "answer_ids": [torch.tensor(a, dtype=torch.int32) for a in ids_per_turn],
                         "topk_logprobs": [top[m].half() for m in per_turn],
                         "topk_ids": [ids[m].int() for m in per_turn],
                         "tail_logmass": [tail[m].float() for m in per_turn]})
        return rows

    def run_shard(self, out_args: dict, feature_args: dict, index: int, dialogues: list[dict]) -> dict:
        # the reader projects a pre-projector cache
        features = per_split(self.per_split, feature_args, lambda: FeatureReader(feature_args, self.adapter))
        cached = {r["dialogue_id"]: r for r in features.read_records(index)}
        present = [d for d in dialogues if d["dialogue_id"] in cached]  # the rest failed in extract
        encoded = [encoded_image(cached[d["dialogue_id"]], self.adapter.device, self.adapter.dtype) for d in present]
        rows = []
        # Dialogues with the same number of turns go through the session together.
        by_turns: dict[int, list[int]] = {}
        for j, d in enumerate(present):
            by_turns.setdefault(len(d["questions"]), []).append(j)
        batch = self.teacher["batch_size"]
        for group in by_turns.values():
            for start in range(0, len(group), batch):
                chunk = group[start:start + batch]
                rows += self._dialogue_batch([encoded[j] for j in chunk], [present[j] for j in chunk])
        order = {d["dialogue_id"]: j for j, d in enumerate(present)}
        rows.sort(key=lambda r: order[r["dialogue_id"]])
        per_split(self.per_split, out_args, lambda: StageOutput(**out_args)).write_shard(index, rows)
        return {"records": len(rows), "errors": []}  # dialogues extract could not read are recorded there


def worker_options(config: PipelineConfig) -> dict:
    """The teacher settings a ``TeacherWorker`` reads."""
    return {"top_k": config.teacher.top_k, "max_new_tokens": config.teacher.max_new_tokens,
            "batch_size": config.evaluate.batch_size, "history": config.teacher.history}


def run(config: PipelineConfig, split: str = "train", progress: bool = True) -> StageReport:
    from pipeline.cluster import actor_gpus, device_for

    feature_args = finished_extract_args(config, split, STAGE)
    records, _ = load_split(config, split, split_limit(config, split))
    out_args = output_args(config, split)
    out = StageOutput(**out_args)
    out.prepare(config.to_dict(), overwrite=config.shards.overwrite)
    ranges = shard_ranges(len(records), config.shards.dialogues_per_shard)
    gpus = actor_gpus(config, STAGE)
    teacher = worker_options(config)
    actor_cls = model_actor(TeacherWorker, gpus, getattr(config.resources, STAGE).num_cpus)
    video = video_sampling(config)
    return run_sharded(
        out, len(ranges), len(records),
        actors=lambda n: stage_actors(STAGE, actor_cls, (config.model.path, config.model.dtype, device_for(gpus),
                                                          teacher, video), n),
        num_actors=config.extract.num_actors,
        task_args=lambda i: (out_args, feature_args, i, records[ranges[i][0]:ranges[i][1]]),
        max_error_fraction=config.shards.max_error_fraction, progress=progress)
