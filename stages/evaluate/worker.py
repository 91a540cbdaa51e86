"""The evaluate stage's Ray actor: holds the LVLM and the compressors it was asked for, runs a shard of dialogues
through the multi-turn chat session of one (method, rate) and writes its rows."""

from __future__ import annotations

from pipeline.datasets.common import cut_at_stop
from pipeline.metrics import JUDGED_SOURCES, score
from pipeline.shards import StageOutput
from stages.common import FeatureReader, encoded_image, per_split, reference_answer, stage_adapter

STAT_FIELDS = ("vision_s", "reduce_s", "prefill_s", "decode_s", "ttft_s", "total_s", "peak_memory_bytes",
               "prefill_tokens", "prefill_flops", "kv_cache_len", "visual_tokens", "new_tokens")


class EvalWorker:
    """One per actor: holds the LVLM (and the compressors it was asked for), writes whole shards."""

    def __init__(self, model_path: str, dtype: str, device: str, options: dict, video: dict | None = None) -> None:
        from pipeline.env import apply_defaults

        apply_defaults()
        self.adapter = stage_adapter(model_path, device, dtype, video)  # ``video``: the dialogues hold videos
        self.video = video
        self.options = options
        self.readers: dict[str, FeatureReader] = {}  # per split (stages.common.per_split)
        self.compressors: dict[str, object] = {}

    def _compressor(self, directory: str | None, method: str = "metacompress"):
        from pipeline import storage

        if directory is None:
            return None
        if directory not in self.compressors:
            if method == "tprl":
                from compress.tprl import TPRLPolicy, TPRLReducer

                with storage.local_copy(directory) as local:  # any storage URI (docs/design.md §6.4)
                    self.compressors[directory] = TPRLReducer(TPRLPolicy.from_pretrained(local, self.adapter.device))
            else:
                from compress.metacompress import MetaCompress

                with storage.local_copy(directory) as local:
                    self.compressors[directory] = MetaCompress.from_pretrained(local).to(self.adapter.device).eval()
        return self.compressors[directory]

    def encode_images(self, paths: list[str]) -> list:
        """Per image its X_IMG (n, d) as a float32 CPU tensor and its Layout, or the error text: the P plots of the
        report when the extract stage cached no features, so that the driver never loads the LVLM
        (docs/design.md §6.4)."""
        out = []
        for path in paths:
            try:
                enc = self.adapter.encode(path)
                out.append((enc.tokens.float().cpu(), enc.layout))
            except (FileNotFoundError, ValueError, OSError) as err:
                out.append(str(err))
        return out

    def _inputs(self, feature_args: dict | None, index: int, dialogues: list[dict],
                vision: bool) -> tuple[list, list[list[str]]]:
        """Per dialogue the image input of the session (an EncodedImage of cached features, or the decoded image),
        None for a dialogue whose image cannot be read; and the errors."""
        from compress.lvlm.base import load_image

        inputs, errors = [], []
        cached = {}
        if feature_args is not None and not vision:
            reader = per_split(self.readers, feature_args, lambda: FeatureReader(feature_args, self.adapter))
            cached = {r["dialogue_id"]: r for r in reader.read_records(index)}
        for d in dialogues:
            if d["dialogue_id"] in cached:
                inputs.append(encoded_image(cached[d["dialogue_id"]], self.adapter.device, self.adapter.dtype))
                continue
            if cached:  # the extract stage could not read this record
                inputs.append(None)
                errors.append([d["dialogue_id"], "no cached features (failed in the extract stage)"])
                continue
            try:  # a video is decoded into its sampled frames here, so a bad file is this record's error
                inputs.append(self.adapter.load_video(d["image"]) if self.video is not None else load_image(d["image"]))
            except (FileNotFoundError, ValueError, OSError) as err:
                inputs.append(None)
                errors.append([d["dialogue_id"], f"{d['where']}: {err}" if self.video is not None else str(err)])
        return inputs, errors

    def _batch(self, session, images: list, dialogues: list[dict], gen: dict) -> list[dict]:
        """One batch of dialogues of one source through ``session``; ``gen``: the source's answer settings
        (pipeline.datasets.common.generation_for). Judged (free-form) sources get score 0 here: the driver scores
        them with the judge (docs/design.md §3.5)."""
        from pathlib import Path

        if hasattr(session.method.fn, "for_images"):  # a per-image seeded method (Random)
            session.method.fn.for_images([Path(d["image"]).name for d in dialogues])
        session.set_images(images)
        rows = [{"dialogue_id": d["dialogue_id"], "source": d["source"], "questions": list(d["questions"]),
                 "references": d["answers"], "answers": [], "scores": [], **{f: [] for f in STAT_FIELDS}}
                for d in dialogues]
        suffix = f"\n{gen['instruction']}" if gen["instruction"] else ""
        for t in range(len(dialogues[0]["questions"])):
            refs = [reference_answer(d["answers"][t]) for d in dialogues]
            results = session.ask([d["questions"][t] + suffix for d in dialogues], refs)
            for row, d, result in zip(rows, dialogues, results):
                answer = cut_at_stop(result.answer, gen["stop"]) if gen["stop"] else result.answer
                row["answers"].append(answer)
                row["scores"].append(0.0 if d["source"] in JUDGED_SOURCES else
                                     score(d["source"], answer, d["answers"][t], gen["metric"]))
                stats = result.stats.to_dict()
                for f in STAT_FIELDS:
                    row[f].append(stats[f])
        return rows

    def run_shard(self, job: dict, index: int, dialogues: list[dict]) -> dict:
        from compress.lvlm.methods import STOCHASTIC_METHODS, get_method, seeded_method
        from compress.lvlm.session import BatchChatSession

        opts = self.options
        # dialogues of the same source (answer settings) and number of turns go through a session together
        by_group: dict[tuple[str, int], list[int]] = {}
        inputs, errors = None, []
        rows = []
        for source in dict.fromkeys(d["source"] for d in dialogues):
            gen = opts["generation"][source]
            method = (seeded_method(job["method"], job["seed"]) if job["method"] in STOCHASTIC_METHODS else
                      get_method(job["method"], self._compressor(job["compressor"], job["method"])))
            if inputs is None:
                inputs, errors = self._inputs(job["features"], index, dialogues, method.kind == "vision")
                for j, x in enumerate(inputs):
                    if x is not None:
                        by_group.setdefault((dialogues[j]["source"], len(dialogues[j]["questions"])), []).append(j)
            session = BatchChatSession(self.adapter, method, job["rate"], max_new_tokens=gen["max_new_tokens"],
                                       history="model" if opts["history"] == "own" else "reference",
                                       vqa=gen["style"] == "short" and gen["instruction"] is None)
            for (group_source, _), group in by_group.items():
                if group_source != source:
                    continue
                for start in range(0, len(group), opts["batch_size"]):
                    chunk = group[start:start + opts["batch_size"]]
                    rows += self._batch(session, [inputs[j] for j in chunk], [dialogues[j] for j in chunk], gen)
        order = {d["dialogue_id"]: j for j, d in enumerate(dialogues)}
        rows.sort(key=lambda r: order[r["dialogue_id"]])
        StageOutput(**job["out_args"]).write_shard(index, rows)
        return {"key": job["key"], "records": len(rows), "errors": errors}
