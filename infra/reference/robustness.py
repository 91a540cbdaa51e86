"""How much a reference LLaVA loses when visual tokens are removed before its LLM, even when the right ones are kept.

    python -m infra.reference.robustness --model infra/reference/llava \\
        --dialogues work/tprl/data/mt-shapes/test/dialogues.jsonl --keep 48 --limit 150

For each dialogue's first question it keeps ``--keep`` of the visual tokens chosen five ways: the object oracle
(the patches of the objects the answer depends on, read from the MT-Shapes or MT-Focus scene, then those of the other
objects, then evenly spaced ones), the asked objects' patches topped up with evenly spaced ones only, TPRL's teacher
(the attention the question gives each token, mean over heads, text tokens and layers), Sample (evenly spaced) and a
seeded random subset. On data without scenes only the last three run (issue 16, item 4: any data). The
kept tokens are compacted, as every reducer before the LLM does, and the model answers greedily. The oracles' accuracy
per question type is the ceiling that any pre-LLM pruner (TPRL, Sample, MetaCompress) has on that model at that
budget.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np


def rankings(objects: np.ndarray | None, asked: list[int], keep: int, n: int | None = None,
             seed: int = 0) -> dict[str, np.ndarray]:
    """Priorities over the n patches (higher = kept first; ties keep the lower index). ``objects`` (n,): object index
    under each patch (-1: none), or None on data without scenes (then only the scene-free rankings: Sample and a
    seeded uniformly random subset); ``asked``: the objects the answer depends on."""
    from compress.baselines.sample import sample_indices

    n = len(objects) if objects is not None else n
    sample = np.zeros(n)
    sample[sample_indices(n, min(keep, n)).numpy()] = 0.5  # the tokens the Sample baseline keeps
    out = {}
    if objects is not None:
        mine = np.isin(objects, asked)
        out = {"object oracle": np.where(mine, 3.0, np.where(objects >= 0, 2.0, 0.0)) + sample,
               "asked objects only": np.where(mine, 3.0, 0.0) + sample}
    return out | {"sample": sample, "random": np.random.default_rng(seed).random(n)}


def object_grids(dialogues_path: str | Path):
    """A function (dialogue, grid_h, grid_w) -> (grid_h * grid_w,) object index per patch, from the scenes beside the
    dialogue file (MT-Shapes ``scenes.jsonl`` or MT-Focus ``focus_scenes.jsonl``), or None when there are none."""
    from infra.reference.targets import scenes_for
    from pipeline.datasets import mt_focus
    from pipeline.datasets.mt_shapes import patch_labels

    scenes = scenes_for(dialogues_path)
    if scenes:
        return lambda d, h, w: patch_labels(scenes[d.meta.get("scene_id", d.dialogue_id)], h, w)["object"].reshape(-1)
    focus = Path(dialogues_path).parent / mt_focus.SCENES_FILE
    if focus.is_file():
        found = mt_focus.load_scenes(focus)
        return lambda d, h, w: mt_focus.patch_objects(found[d.meta.get("focus_scene", d.dialogue_id)], h, w).reshape(-1)
    return None


def first_turn_accuracy(model_dir: str | Path, dialogues_path: str | Path, keep: int, limit: int | None = None
                        ) -> dict[str, dict[str, float]]:
    """{ranking: {question type or "all": accuracy in percent}} on the first turn of each dialogue."""
    import torch

    from compress.analysis import prompt_attention
    from compress.lvlm import load_adapter
    from compress.lvlm.base import EncodedImage
    from compress.lvlm.session import BatchChatSession
    from pipeline.dialogues import load_dialogues
    from pipeline.metrics import exact_match

    adapter = load_adapter(model_dir)
    if adapter.family != "llava":
        raise ValueError(f"{model_dir}: the object oracle maps scenes onto a LLaVA patch grid; got {adapter.family}")
    grids = object_grids(dialogues_path)  # None: no scenes, only the scene-free rankings
    hits: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for i, d in enumerate(load_dialogues(dialogues_path)[:limit]):
        turn = d.turns[0]
        with torch.no_grad():
            encoded = adapter.features(adapter.prepare(d.image))
            segment = encoded.layout.segments[0]
            objects = grids(d, segment.height, segment.width) if grids else None
            images = {"all tokens": encoded.tokens}
            layers = list(range(adapter.text_config.num_hidden_layers))
            teacher = prompt_attention(adapter, encoded.tokens, turn.question, layers).prompt_scores()
            priorities = rankings(objects, list(turn.meta.get("objects", [])), keep, len(encoded.tokens), seed=i)
            priorities["prompt attention (TPRL's teacher)"] = teacher.float().cpu().numpy()
            for name, priority in priorities.items():
                kept = torch.from_numpy(np.argsort(-priority, kind="stable")[:keep]).sort().values
                images[name] = encoded.tokens[kept]
            session = BatchChatSession(adapter, "full", max_new_tokens=4)
            session.set_images([EncodedImage(x, encoded.layout, None, (0, 0)) for x in images.values()])
            replies = session.ask([turn.question] * len(images))
        for name, reply in zip(images, replies):
            ok = exact_match(reply.answer, list(turn.answers))
            hits[name]["all"].append(ok)
            hits[name][str(turn.meta.get("type", "?"))].append(ok)
    return {name: {k: 100.0 * sum(v) / len(v) for k, v in sorted(by.items())} for name, by in hits.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.reference.robustness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="infra/reference/llava")
    p.add_argument("--dialogues", required=True,
                   help="dialogues.jsonl; with MT-Shapes scenes.jsonl or MT-Focus focus_scenes.jsonl beside it the "
                        "object oracles run too")
    p.add_argument("--keep", type=int, default=48, help="visual tokens kept (48 of 144 = 66.7 %% removed)")
    p.add_argument("--limit", type=int, default=None, help="first N dialogues only")
    args = p.parse_args(argv)
    table = first_turn_accuracy(args.model, args.dialogues, args.keep, args.limit)
    types = list(next(iter(table.values())))
    print("| kept tokens | " + " | ".join(types) + " |")
    print("|---|" + "---:|" * len(types))
    for name, by in table.items():
        print(f"| {name} | " + " | ".join(f"{by.get(t, float('nan')):.1f}" for t in types) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
