"""Per-benchmark settings (docs/design.md §3.5): generation per source, Random's per-image seeds, evaluate.seeds and
the judge's configuration, merged seed summaries."""

from __future__ import annotations

import hashlib
import statistics

import pytest
import torch

from compress.baselines.random import PerImageRandom, image_seed, random_reduce
from pipeline.config import ConfigError, GenerationSpec, config_from_dict
from pipeline.datasets.common import cut_at_stop, generation_for


def test_generation_defaults_and_overrides() -> None:
    assert generation_for("vqa_v2", (), 8) == {"style": "short", "instruction": None, "max_new_tokens": 8, "stop": [],
                                               "metric": None}
    assert generation_for("convbench", (), 8)["style"] == "free"
    assert generation_for("convbench", (), 8)["max_new_tokens"] == 512
    specs = [GenerationSpec("convbench", max_new_tokens=64, stop=["USER:"]), GenerationSpec("gqa", instruction="")]
    assert generation_for("convbench", specs, 8) == {"style": "free", "instruction": None, "max_new_tokens": 64,
                                                     "stop": ["USER:"], "metric": None}
    assert generation_for("gqa", specs, 8)["instruction"] == ""  # "" is an explicit "no instruction"
    assert cut_at_stop("a red car. USER: more", ["USER:", "\n"]) == "a red car."
    assert cut_at_stop("line one\nline two", ["USER:", "\n"]) == "line one"
    assert cut_at_stop("nothing to cut", ["###"]) == "nothing to cut"


def test_random_seed_per_image() -> None:
    x = torch.arange(40.0).reshape(20, 2)
    # the seed is sha256(seed, image id), read as 63 bits: recomputed by hand
    digest = hashlib.sha256(b"3:COCO_1.jpg").digest()
    assert image_seed("COCO_1.jpg", 3) == int.from_bytes(digest[:8], "little") & (2**63 - 1)
    fn = PerImageRandom(seed=3)
    fn.for_images(["COCO_1.jpg", "COCO_2.jpg", "COCO_1.jpg"])
    kept = [fn(x, 5).keep_indices.tolist() for _ in range(3)]
    assert kept[0] == random_reduce(x, 5, seed=image_seed("COCO_1.jpg", 3)).keep_indices.tolist()
    assert kept[0] == kept[2] and kept[0] != kept[1]  # same image, same tokens; another image, another draw
    assert kept[0] == sorted(kept[0]) and len(set(kept[0])) == 5
    other = PerImageRandom(seed=4)
    other.for_images(["COCO_1.jpg"])
    assert other(x, 5).keep_indices.tolist() != kept[0]
    with pytest.raises(RuntimeError, match="for_images"):
        fn(x, 5)  # no image named: no silent shared seed


def test_evaluate_seeds_and_judge_config() -> None:
    cfg = config_from_dict({"evaluate": {"seeds": [0, 1, 2], "judge": {"url": "http://127.0.0.1:1/v1", "model": "m"},
                                         "generation": [{"source": "convbench", "max_new_tokens": 32}]}})
    assert cfg.evaluate.seeds == [0, 1, 2] and cfg.evaluate.judge.model == "m"
    assert cfg.evaluate.generation[0].max_new_tokens == 32
    for bad, match in (({"seeds": []}, "evaluate.seeds"), ({"seeds": [1, 1]}, "evaluate.seeds"),
                       ({"generation": [{"source": "x", "max_new_tokens": 0}]}, "max_new_tokens"),
                       ({"judge": {"urll": "x"}}, "unknown key evaluate.judge.urll"),
                       ({"generation": [{"source": "x", "style": "long"}]}, "style")):
        with pytest.raises(ConfigError, match=match):
            config_from_dict({"evaluate": bad})


def test_merge_seeds_mean_and_spread() -> None:
    from stages.evaluate.planning import Job
    from stages.evaluate.summary import merge_seeds

    jobs = [Job("full", None, None), Job("random", 0.5, None, seed=0), Job("random", 0.5, None, seed=1),
            Job("random", 0.5, None, seed=2)]
    assert [j.key for j in jobs] == ["full", "random@0.5/seed0", "random@0.5/seed1", "random@0.5/seed2"]
    avgs = [40.0, 50.0, 66.0]
    summaries = [{"method": "full", "rate": None, "dialogues": 4, "Acc_1": 90.0, "Avg": 90.0, "ttft_ms": 1.0}] + [
        {"method": "random", "rate": 0.5, "dialogues": 4, "Acc_1": a, "Avg": a, "ttft_ms": 2.0, "agreement": None}
        for a in avgs]
    merged = merge_seeds(jobs, summaries)
    assert merged[0] == summaries[0]
    assert merged[1]["Avg"] == pytest.approx(52.0) and merged[1]["seeds"] == 3 and merged[1]["dialogues"] == 4
    assert merged[1]["Avg_std"] == pytest.approx(statistics.stdev(avgs))
    assert merged[1]["Acc_1_std"] == pytest.approx(statistics.stdev(avgs)) and "ttft_ms_std" not in merged[1]
