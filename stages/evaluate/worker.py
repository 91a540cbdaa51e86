"""The evaluate stage's Ray actor: holds the LVLM and the compressors it was asked for, runs a shard of dialogues
through the multi-turn chat session of one (method, rate) and writes its rows."""

from __future__ import annotations

from collections import Counter

from pipeline.metrics import score
from pipeline.shards import StageOutput
from stages.common import encoded_image

STAT_FIELDS = ("vision_s", "reduce_s", "prefill_s", "decode_s", "ttft_s", "total_s", "peak_memory_bytes",
               "prefill_tokens", "prefill_flops", "kv_cache_len", "visual_tokens", "new_tokens")


def reference_answer(answers: list[str]) -> str:
    """The reference answer fed as history (``history: reference``): the most frequent one, the first on ties."""
    return Counter(answers).most_common(1)[0][0]


class EvalWorker:
    """One per actor: holds the LVLM (and the compressors it was asked for), writes whole shards."""

    def __init__(self, model_path: str, dtype: str, device: str, options: dict, feature_args: dict | None) -> None:
        import torch

        from compress.lvlm import load_adapter
        from pipeline.env import apply_defaults

        apply_defaults()
        self.adapter = load_adapter(model_path, device=device, dtype=getattr(torch, dtype))
        self.options = options
        self.features = StageOutput(**feature_args) if feature_args else None
        self.compressors: dict[str, object] = {}

    def _compressor(self, directory: str | None, method: str = "metacompress"):
        if directory is None:
            return None
        if directory not in self.compressors:
            if method == "tprl":
                from compress.tprl import TPRLPolicy, TPRLReducer

                self.compressors[directory] = TPRLReducer(TPRLPolicy.from_pretrained(directory, self.adapter.device))
            else:
                from compress.metacompress import MetaCompress

                self.compressors[directory] = MetaCompress.from_pretrained(directory).to(self.adapter.device).eval()
        return self.compressors[directory]

    def _inputs(self, index: int, dialogues: list[dict], vision: bool) -> tuple[list, list[list[str]]]:
        """Per dialogue the image input of the session (an EncodedImage of cached features, or the decoded image),
        None for a dialogue whose image cannot be read; and the errors."""
        from compress.lvlm.base import load_image

        inputs, errors = [], []
        cached = {}
        if self.features is not None and not vision:
            cached = {r["dialogue_id"]: r for r in self.features.read_records(index)}
        for d in dialogues:
            if d["dialogue_id"] in cached:
                inputs.append(encoded_image(cached[d["dialogue_id"]], self.adapter.device, self.adapter.dtype))
                continue
            if cached:  # the extract stage could not read this record
                inputs.append(None)
                errors.append([d["dialogue_id"], "no cached features (failed in the extract stage)"])
                continue
            try:
                inputs.append(load_image(d["image"]))
            except (FileNotFoundError, ValueError, OSError) as err:
                inputs.append(None)
                errors.append([d["dialogue_id"], str(err)])
        return inputs, errors

    def _batch(self, session, images: list, dialogues: list[dict]) -> list[dict]:
        session.set_images(images)
        rows = [{"dialogue_id": d["dialogue_id"], "source": d["source"], "questions": list(d["questions"]),
                 "references": d["answers"], "answers": [], "scores": [], **{f: [] for f in STAT_FIELDS}}
                for d in dialogues]
        for t in range(len(dialogues[0]["questions"])):
            refs = [reference_answer(d["answers"][t]) for d in dialogues]
            results = session.ask([d["questions"][t] for d in dialogues], refs)
            for row, d, result in zip(rows, dialogues, results):
                row["answers"].append(result.answer)
                row["scores"].append(score(d["source"], result.answer, d["answers"][t]))
                stats = result.stats.to_dict()
                for f in STAT_FIELDS:
                    row[f].append(stats[f])
        return rows

    def run_shard(self, job: dict, index: int, dialogues: list[dict]) -> dict:
        from compress.lvlm.methods import get_method
        from compress.lvlm.session import BatchChatSession

        method = get_method(job["method"], self._compressor(job["compressor"], job["method"]))
        opts = self.options
        session = BatchChatSession(self.adapter, method, job["rate"], max_new_tokens=opts["max_new_tokens"],
                                   history="model" if opts["history"] == "own" else "reference")
        inputs, errors = self._inputs(index, dialogues, method.kind == "vision")
        ok = [j for j, x in enumerate(inputs) if x is not None]
        by_turns: dict[int, list[int]] = {}  # dialogues with the same number of turns go through a session together
        for j in ok:
            by_turns.setdefault(len(dialogues[j]["questions"]), []).append(j)
        rows = []
        for group in by_turns.values():
            for start in range(0, len(group), opts["batch_size"]):
                chunk = group[start:start + opts["batch_size"]]
                rows += self._batch(session, [inputs[j] for j in chunk], [dialogues[j] for j in chunk])
        order = {d["dialogue_id"]: j for j, d in enumerate(dialogues)}
        rows.sort(key=lambda r: order[r["dialogue_id"]])
        StageOutput(**job["out_args"]).write_shard(index, rows)
        return {"key": job["key"], "records": len(rows), "errors": errors}
