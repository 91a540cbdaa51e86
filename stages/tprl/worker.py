"""The tprl stage's Ray actor: the LVLM, a cache of feature shards, the policy of the current iteration; it
computes the prepare rows of a shard and samples the episodes of a PPO task."""

from __future__ import annotations

from collections import OrderedDict

from pipeline.metrics import score
from pipeline.shards import StageOutput
from stages.common import FeatureReader, feature_row

CACHED_SHARDS = 8  # feature shards a rollout actor keeps in memory


def _float_features(row: dict):
    """A cached feature row -> (X_IMG (n, d) float32 CPU tensor, Layout)."""
    x, layout = feature_row(row)
    return x.float(), layout


class TPRLWorker:
    """One per actor: the LVLM, a cache of feature shards, the policy of the current iteration.
    ``run_shard`` computes the prepare rows of one shard; ``rollout`` samples a task's episodes."""

    def __init__(self, model_path: str, dtype: str, device: str, feats: dict, prepared: dict, options: dict) -> None:
        import torch

        from compress.lvlm import load_adapter
        from pipeline.env import apply_defaults

        apply_defaults()
        self.adapter = load_adapter(model_path, device=device, dtype=getattr(torch, dtype))
        self.features = FeatureReader(feats, self.adapter)  # projects a pre-projector cache
        self.prepared = StageOutput(**prepared)
        self.options = options
        self.shards: OrderedDict[int, dict] = OrderedDict()
        self.policy = None

    def _shard(self, index: int) -> dict:
        """dialogue_id -> (X_IMG (n, d) float32, Layout) of one feature shard (least recently used evicted)."""
        if index not in self.shards:
            self.shards[index] = {r["dialogue_id"]: _float_features(r) for r in self.features.read_records(index)}
            while len(self.shards) > CACHED_SHARDS:
                self.shards.popitem(last=False)
        self.shards.move_to_end(index)
        return self.shards[index]

    def shard_features(self, index: int) -> list:
        """(dialogue_id, X_IMG float32) of one feature shard, projected here: for the driver's behaviour cloning
        on a pre-projector cache (``stages.tprl.inputs.driver_features``)."""
        from stages.tprl.inputs import shard_features

        return shard_features(self.features, index)

    def answers(self, images: list, questions: list[str]) -> list[str]:
        """Greedy answers to one question per image; images[b] = (visual tokens (k, d), Layout), k may be 0."""
        from compress.lvlm.base import EncodedImage
        from compress.lvlm.session import BatchChatSession

        ad = self.adapter
        session = BatchChatSession(ad, "full", max_new_tokens=self.options["max_new_tokens"])
        session.set_images([EncodedImage(x.to(ad.device, ad.dtype), layout, None, (0, 0)) for x, layout in images])
        return [r.answer for r in session.ask(questions)]

    def run_shard(self, index: int, dialogues: list[dict]) -> dict:
        import torch

        from compress.analysis import prompt_attention
        from compress.lvlm.session import prompt_embedding

        ad = self.adapter
        cached = self._shard(index)
        layers = self.options["teacher_layers"]
        layers = list(range(ad.text_config.num_hidden_layers)) if layers is None else layers
        ok = [d for d in dialogues if d["dialogue_id"] in cached]
        errors = [[d["dialogue_id"], "no cached features (failed in the extract stage)"]
                  for d in dialogues if d["dialogue_id"] not in cached]
        rows = []
        with torch.no_grad():
            full = self.answers([cached[d["dialogue_id"]] for d in ok], [d["questions"][0] for d in ok]) if ok else []
            for d, answer in zip(ok, full):
                x, _ = cached[d["dialogue_id"]]
                question = d["questions"][0]
                attention = prompt_attention(ad, x.to(ad.device, ad.dtype), question, layers)
                rows.append({"dialogue_id": d["dialogue_id"], "query": prompt_embedding(ad, question).cpu(),
                             "teacher": attention.prompt_scores().float().cpu(),
                             "full_score": float(score(d["source"], answer, d["answers"][0]))})
        self.prepared.write_shard(index, rows)
        return {"records": len(rows), "errors": errors}

    def rollout(self, task: dict, state: dict) -> list[dict]:
        """Sample ``task["items"]``'s episodes with the policy (``task["spec"]``, weights ``state``)
        -> ``episode_to_tensors`` dicts."""
        import torch

        from compress.tprl import TPRLPolicy, episode_to_tensors, sample_episodes

        if self.policy is None or self.policy.spec() != task["spec"]:
            self.policy = TPRLPolicy.from_spec(task["spec"]).to(self.adapter.device)
        self.policy.load_state_dict(state)
        self.policy.eval()
        items = task["items"]
        images = [self._shard(it["shard"])[it["dialogue_id"]] for it in items]

        def score_fn(batch: list[tuple[int, torch.Tensor]]) -> list[float]:
            answers = self.answers([(images[i][0][kept], images[i][1]) for i, kept in batch],
                                   [items[i]["question"] for i, _ in batch])
            return [score(items[i]["source"], a, items[i]["answers"]) for (i, _), a in zip(batch, answers)]

        o = self.options
        episodes = sample_episodes(self.policy, [x for x, _ in images], [it["query"] for it in items], score_fn,
                                   b=o["b"], score_full=[it["full_score"] for it in items], share_of=o["share_of"],
                                   generator=torch.Generator().manual_seed(task["seed"]))
        return [episode_to_tensors(e) for e in episodes]
