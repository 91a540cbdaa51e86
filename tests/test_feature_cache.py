"""The image-keyed, pre-projector feature cache (extract.cache: pre_projector; docs/design.md §3): one record per
distinct image, every dialogue of it trains on it, the same student loss as the post-projector cache, int8 bounds."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from tests.workspace import make_config, make_workspace

K, IMAGES = 3, 5  # dialogue j uses image j % IMAGES: the dialogues of an image sit in different shards


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = make_workspace(tmp_path_factory.mktemp("cache"))
    train = root / "data/train/dialogues.jsonl"
    lines = [json.loads(x) for x in train.read_text().splitlines()][:IMAGES]
    out = []
    for j in range(K * IMAGES):
        d = dict(lines[j % IMAGES])
        out.append(json.dumps({**d, "dialogue_id": f"shared-{j:03d}"}))
    (root / "data/train/shared.jsonl").write_text("\n".join(out) + "\n")
    return root


def _config(root: Path, work: str, **extract):
    config = make_config(root, work)
    config.data.train = str(root / "data/train/shared.jsonl")
    return dataclasses.replace(config, extract=dataclasses.replace(config.extract, **extract))


def test_int8_round_trip_error_is_at_most_half_a_step_per_token():
    from pipeline.tensor_columns import dequantize_int8, quantize_int8

    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 64)).astype(np.float32) * rng.uniform(0.01, 30, (50, 1)).astype(np.float32)
    x[3] = 0.0  # an all-zero token: scale 0, exact
    q, scale = quantize_int8(x)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and q.shape == x.shape
    step = np.abs(x).max(axis=1) / 127  # the bound, computed independently of the code's scale
    err = np.abs(dequantize_int8(q, scale) - x)
    assert np.all(err <= step[:, None] / 2 * (1 + 1e-5) + 1e-12)
    assert np.all(dequantize_int8(q, scale)[3] == 0)
    assert np.abs(q).max() == 127  # the largest value of each token uses the whole range


def test_one_record_per_image_and_every_dialogue_trains_on_it(shared, ray_local):
    import torch

    from compress.lvlm import load_adapter
    from pipeline.dialogues import load_dialogues
    from pipeline.shards import StageOutput
    from stages import extract, teacher
    from stages.common import FeatureReader
    from stages.outputs import extract_args, teacher_args
    from stages.train.data import CachedSource

    config = _config(shared, "pre", cache="pre_projector")
    report = extract.run(config, "train", progress=False)
    assert report.records == K * IMAGES and report.shards == 4  # 15 dialogues, 4 per shard
    out = StageOutput(**extract_args(config, "train"))
    rows = [r for i in range(4) for r in out.read_records(i)]
    holding = [r for r in rows if len(r["features"])]
    assert len(holding) == IMAGES and len({r["image"] for r in holding}) == IMAGES  # one record per distinct image
    adapter = load_adapter(config.model.path)
    width = adapter.model.config.vision_config.hidden_size
    assert all(r["features"].shape[1] == width for r in holding)  # before the projector: the tower's width
    teacher.run(config, "train", progress=False)
    dialogues = load_dialogues(config.data.train)
    source = CachedSource(extract_args(config, "train"), teacher_args(config, "train"),
                          {d.dialogue_id: [t.question for t in d.turns] for d in dialogues}, adapter)
    examples = source.examples([(s, r) for s in range(4) for r in range(4 if s < 3 else 3)])
    assert [e.dialogue_id for e in examples] == [d.dialogue_id for d in dialogues]
    for j, e in enumerate(examples):  # every dialogue gets its image's features, as the model computes them
        expected = adapter.encode(dialogues[j].image).tokens.half()
        assert e.features.dtype == torch.float16 and e.layout.num_tokens == expected.shape[0]
        torch.testing.assert_close(e.features.float(), expected.float(), rtol=2e-2, atol=2e-3)
        assert torch.equal(e.features, examples[j % IMAGES].features)
    assert len(FeatureReader(extract_args(config, "train"), adapter).read_records(3)) == 3


def test_pre_projector_cache_gives_the_post_projector_loss(shared, ray_local):
    import torch

    from compress.lvlm import load_adapter
    from pipeline.dialogues import load_dialogues
    from stages import extract, teacher
    from stages.outputs import extract_args, teacher_args
    from stages.train.data import CachedSource
    from stages.train.student import build_student

    adapter = load_adapter(str(shared / "model"))
    losses, sizes = {}, {}
    for work, extra in [("post", {}), ("pre", {"cache": "pre_projector"}),
                        ("int8", {"cache": "pre_projector", "quantize": "int8"})]:
        config = _config(shared, work, **extra)
        extract.run(config, "train", progress=False)
        teacher.run(config, "train", progress=False)
        manifest = json.loads(Path(extract_args(config, "train")["uri"], "_manifest.json").read_text())
        sizes[work] = sum(s["size"] for s in manifest["shards"])
        if work == "post":  # the teacher targets of one cache for all: only the features differ below
            targets = teacher_args(config, "train")
        questions = {d.dialogue_id: [t.question for t in d.turns] for d in load_dialogues(config.data.train)}
        source = CachedSource(extract_args(config, "train"), targets, questions, adapter)
        student = build_student(adapter, config.train, config.train.seed)
        keys = [(0, 0), (1, 2), (2, 1), (3, 0)]
        with torch.no_grad():
            losses[work] = {k: float(v) for k, v in student(source.examples(keys), 0.7).items()
                            if k in ("loss", "kl")}
    for term in ("loss", "kl"):
        assert losses["pre"][term] == pytest.approx(losses["post"][term], rel=1e-3, abs=1e-4)
        assert losses["int8"][term] == pytest.approx(losses["post"][term], rel=5e-2, abs=1e-3)
    assert sizes["int8"] < sizes["pre"] < sizes["post"]


@pytest.mark.parametrize("family, size", [("llava", (40, 40)), ("llava_next", (48, 80)), ("llava_next", (80, 40))])
def test_projecting_the_tower_output_reproduces_the_models_features(family, size):
    """The projector (and LLaVA-NeXT's anyres packing, unpadding included) applied to the cached tower output gives
    the model's own ``get_image_features`` output."""
    import torch
    from PIL import Image

    from stages.common import project_hidden, vision_hidden
    from tests.tiny_models import tiny_adapter

    adapter = tiny_adapter(family)
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    prepared = adapter.prepare(image)
    expected = adapter.features(prepared).tokens
    hidden = vision_hidden(adapter, prepared.pixel_values)
    assert hidden.shape[-1] == adapter.model.config.vision_config.hidden_size
    assert hidden.shape[0] == (1 if family == "llava" else prepared.pixel_values.shape[1])
    got = project_hidden(adapter, hidden, prepared.image_size)
    assert got.shape == expected.shape == (prepared.layout.num_tokens, expected.shape[1])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_streamed_batched_extract_gives_each_images_own_features(shared, ray_local):
    """CPU actors preprocess, the tower runs 2 images at a time, 2 shards in flight: every dialogue's features are
    the model's own for its image, as one image at a time computes them (adapter.encode)."""
    import torch

    from compress.lvlm import load_adapter
    from pipeline.dialogues import load_dialogues
    from pipeline.shards import StageOutput
    from stages import extract
    from stages.outputs import extract_args

    config = _config(shared, "stream", cpu_workers=1, batch_size=2)
    report = extract.run(config, "train", progress=False)
    assert report.records == K * IMAGES and report.computed == 4
    adapter = load_adapter(config.model.path)
    out = StageOutput(**extract_args(config, "train"))
    rows = [r for i in range(4) for r in out.read_records(i)]
    dialogues = load_dialogues(config.data.train)
    assert [r["dialogue_id"] for r in rows] == [d.dialogue_id for d in dialogues]
    for row, dialogue in zip(rows, dialogues):
        expected = adapter.encode(dialogue.image).tokens.half()
        got = torch.from_numpy(np.array(row["features"]))
        assert got.shape == expected.shape and row["n_tokens"] == expected.shape[0]
        torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-3)


def test_tprl_behaviour_cloning_reads_a_pre_projector_cache(shared, ray_local):
    """The driver's features for the autoencoder and behaviour cloning (stages.tprl.inputs.driver_features): from a
    pre-projector cache, projected on the stage's actor, the same as the post-projector cache's rows."""
    import ray
    import torch

    from pipeline.shards import StageOutput
    from stages import extract
    from stages.outputs import extract_args
    from stages.tprl.inputs import driver_features, prepared_args
    from stages.tprl.worker import TPRLWorker

    post, pre = _config(shared, "post"), _config(shared, "pre", cache="pre_projector")
    for config in (post, pre):
        extract.run(config, "train", progress=False)
    post_rows = driver_features(post, extract_args(post, "train"), 4, actors=lambda: [])
    plain = StageOutput(**extract_args(post, "train"))
    assert [(d, x.shape) for d, x in post_rows] == [(r["dialogue_id"], r["features"].shape)
                                                     for i in range(4) for r in plain.read_records(i)]
    feats = extract_args(pre, "train")
    worker = ray.remote(TPRLWorker).remote(pre.model.path, "float32", "cpu", feats, prepared_args(pre, feats),
                                           {"max_new_tokens": 2})
    pre_rows = driver_features(pre, feats, 4, actors=lambda: [worker])
    ray.kill(worker)
    assert [d for d, _ in pre_rows] == [d for d, _ in post_rows]
    for (_, a), (_, b) in zip(pre_rows, post_rows):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_teacher_only_cache_gives_the_cached_features_loss(shared, ray_local):
    """extract.cache: none (teacher-only) stores no features; the teacher and the train step encode the images: the
    same teacher answers and student loss as with the post-projector cache."""
    import torch

    from compress.lvlm import load_adapter
    from pipeline.dialogues import load_dialogues
    from pipeline.shards import StageOutput
    from stages import extract, teacher
    from stages.outputs import extract_args, teacher_args
    from stages.train.data import CachedSource
    from stages.train.student import build_student

    adapter = load_adapter(str(shared / "model"))
    post, none = _config(shared, "post"), _config(shared, "none", cache="none")
    for config in (post, none):
        extract.run(config, "train", progress=False)
        teacher.run(config, "train", progress=False)
    stored = [r for i in range(4) for r in StageOutput(**extract_args(none, "train")).read_records(i)]
    assert len(stored) == K * IMAGES and all(len(r["features"]) == 0 for r in stored)
    targets = {w: [r for i in range(4) for r in StageOutput(**teacher_args(c, "train")).read_records(i)]
               for w, c in (("post", post), ("none", none))}
    assert [r["answers"] for r in targets["none"]] == [r["answers"] for r in targets["post"]]
    questions = {d.dialogue_id: [t.question for t in d.turns] for d in load_dialogues(post.data.train)}
    keys = [(0, 0), (1, 2), (2, 1), (3, 0)]
    losses = {}
    for work, config in (("post", post), ("none", none)):
        source = CachedSource(extract_args(config, "train"), teacher_args(post, "train"), questions, adapter)
        student = build_student(adapter, config.train, config.train.seed)
        with torch.no_grad():
            losses[work] = {k: float(v) for k, v in student(source.examples(keys), 0.7).items() if k in ("loss", "kl")}
    for term in ("loss", "kl"):
        assert losses["none"][term] == pytest.approx(losses["post"][term], rel=1e-3, abs=1e-4)
