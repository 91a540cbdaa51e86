"""Video dialogues through the stages (docs/design.md §5, video) on a tiny random Qwen2.5-VL and tiny MT-Video clips
(48 px, 4 frames: 2 temporal steps of 6 x 6 merged tokens): the teacher's targets are the model's own forward on the
video's pixels, the student with P = identity reproduces them, ``metacompress run`` goes through extract, teacher,
train and evaluate on real Ray, DeepSpeed and MLflow, a corrupt video is one record's error, and what cannot run is
refused in one line before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("av")

from test_qwen2_5_vl import tiny_processor, tiny_qwen, tiny_tokenizer  # noqa: E402
from test_video import VIDEO_ID, VIDEO_TEMPLATE  # noqa: E402

FRAMES = 4  # per file, all sampled: 2 temporal steps
TOKENS = 2 * 6 * 6  # 48 px frames, 4 px patches merged 2 x 2
RATE = 0.75


def tiny_video_qwen(seed: int = 3):
    from compress.lvlm.qwen2_5_vl import Qwen25VLAdapter

    tok = tiny_tokenizer()
    tok.chat_template = VIDEO_TEMPLATE
    return Qwen25VLAdapter(tiny_qwen(seed=seed), tok, tiny_processor(), "<tiny-qwen2.5-vl>")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Two MT-Video clips (a train split) and the tiny model saved as a checkpoint directory."""
    from pipeline.datasets import mt_video

    root = tmp_path_factory.mktemp("video_stages")
    mt_video.generate_split(root / "data", "train", 2, seed=5, cfg=mt_video.MTVideoConfig(image_size=48, frames=FRAMES))
    ad = tiny_video_qwen()
    for part in (ad.model, ad.tokenizer, ad.image_processor):
        part.save_pretrained(str(root / "model"))
    return root


@pytest.fixture(scope="module")
def video_rows(workspace):
    """The teacher stage's per-batch function on two clips, with the video adapter's own (float32) features."""
    from compress.lvlm.video import video_adapter
    from pipeline.dialogues import load_dialogues
    from stages.teacher import TeacherWorker

    ad = video_adapter(tiny_video_qwen(), num_frames=FRAMES)
    dialogues = load_dialogues(workspace / "data/train/dialogues.jsonl")[:2]
    encoded = [ad.encode(d.image) for d in dialogues]
    assert [e.layout.num_tokens for e in encoded] == [TOKENS, TOKENS]
    worker = object.__new__(TeacherWorker)  # without Ray or shards
    worker.adapter, worker.teacher = ad, {"top_k": 8, "max_new_tokens": 3, "history": "own"}
    records = [{"dialogue_id": d.dialogue_id, "questions": [t.question for t in d.turns]} for d in dialogues]
    return ad, encoded, records, worker._dialogue_batch(encoded, records)


def test_teacher_topk_on_a_video_is_the_models_own_forward(video_rows):
    """Reference: transformers' forward with ``pixel_values_videos`` (its tower, merger and get_rope_index over
    (t, h, w)), not the features the stage holds."""
    from compress.lvlm.session import dialogue_ids

    ad, encoded, records, rows = video_rows
    for enc, rec, row in zip(encoded, records, rows):
        answers = [a.tolist() for a in row["answer_ids"]]
        ids, positions, _ = dialogue_ids(ad, TOKENS, rec["questions"], answers)
        assert ids.count(VIDEO_ID) == TOKENS
        with torch.no_grad():
            ref = ad.full_forward_logits(torch.tensor([ids]), enc)[0].float().log_softmax(-1)
        at = torch.tensor(positions) - 1
        top_ids = torch.cat(row["topk_ids"]).long()
        got = torch.cat(row["topk_logprobs"]).float()
        assert got.shape == (len(positions), 8) and torch.allclose(got, ref[at].gather(1, top_ids), atol=2e-3)
        assert bool((ref[at].gather(1, top_ids) >= ref[at].topk(8).values[:, -1:] - 1e-4).all())  # its best k
        assert torch.equal(ref[at].argmax(-1), torch.tensor([i for a in answers for i in a]))  # greedy answers


class Identity(torch.nn.Module):
    """P = I: every token kept where it was."""

    def forward(self, xs, keeps, layouts):
        return tuple(xs), tuple(torch.eye(x.shape[0], dtype=x.dtype) for x in xs)


def test_student_with_identity_p_matches_the_teacher_on_video(video_rows):
    from stages.train.data import Example
    from stages.train.student import _student_module

    ad, encoded, records, rows = video_rows
    examples = [Example(r["dialogue_id"], e.tokens.float(), e.layout, rec["questions"],
                        [a.tolist() for a in r["answer_ids"]], torch.cat(r["topk_logprobs"]).float(),
                        torch.cat(r["topk_ids"]).long(), torch.cat(r["tail_logmass"]).float())
                for e, rec, r in zip(encoded, records, rows)]
    student = _student_module()(Identity(), ad, 0.0, 0.0)
    with torch.no_grad():
        same = student(examples, rate=0.5)  # the budget is ignored: P = I
        sampled = student(examples, rate=RATE, method="sample")
    assert abs(float(same["kl"])) < 1e-3
    assert float(sampled["kl"]) > 1e-3  # a reduction moves the distributions: the check above can fail


def run_config(root: Path, work: str, **data):
    from pipeline.config import config_from_dict, resolve_paths

    cfg = {"work_dir": str(root / work), "model": {"path": str(root / "model")},
           "data": {"video": {"num_frames": FRAMES}, **data},
           "shards": {"dialogues_per_shard": 2}, "teacher": {"top_k": 8, "max_new_tokens": 2},
           "train": {"rates": [RATE], "compress_dim": 16, "optimizer": "adamw", "lr": 0.003, "grad_clip": 1.0,
                     "epochs": 1, "batch_size": 2, "num_workers": 1, "checkpoint_every": 2, "zero_stage": 2,
                     "heldout_dialogues": 0},
           "evaluate": {"methods": ["random", "sample", "spatial", "fastv", "metacompress"], "rates": [RATE],
                        "max_new_tokens": 2, "batch_size": 2, "matrix_images": 0},
           "tracking": {"uri": f"sqlite:///{root}/{work}-mlflow.db"}}
    return resolve_paths(config_from_dict(cfg), root)


def test_stages_run_on_mt_video_and_bad_videos_are_records_errors(workspace, ray_local):
    """The data step of `metacompress run` generates MT-Video (data.mt_video); two bad records are appended to its
    train split (a file that is not a video, a missing file: both pass the dialogue check, which does not decode).
    extract, teacher and train (Ray Train + DeepSpeed, MLflow) run on the train split, the bad videos become records'
    errors naming their file:line and the rest goes on; evaluate scores every method that applies, over the (t, h, w)
    layout, on the test split. Each stage is called as `metacompress run` calls it."""
    import numpy as np

    from compress.layout import Layout
    from pipeline.commands.run import STAGES, prepare_data, preflight, run_stage
    from pipeline.shards import StageOutput
    from stages import extract

    config = run_config(workspace, "run", mt_video={"dialogues": 6, "val": 2, "test": 2, "image_size": 48,
                                                     "frames": FRAMES, "seed": 1})
    config.shards.max_error_fraction = 0.5
    preflight(config, list(STAGES))
    prepare_data(config)
    train = Path(config.data.train)
    assert train.parent.parent == Path(config.work_dir) / "data" / "mt-video"
    good = json.loads(train.read_text().splitlines()[0])
    (train.parent / "broken.mp4").write_bytes(b"not a video at all")
    with train.open("a") as f:  # lines 3 and 4
        for did, video in (("broken", "broken.mp4"), ("gone", "gone.mp4")):
            f.write(json.dumps({**good, "dialogue_id": did, "video": video}) + "\n")
    reports = {name: run_stage(config, name, split, progress=False)
               for name, split in (("extract", "train"), ("teacher", "train"), ("train", "train"),
                                   ("evaluate", "test"))}
    assert (reports["extract"].records, reports["extract"].errors, reports["teacher"].records) == (2, 2, 2)
    logged = Path(reports["extract"].uri, "_errors.jsonl").read_text().splitlines()
    errors = {e["record_id"]: e["reason"] for e in map(json.loads, logged)}
    assert errors["broken"].startswith(f"{train}:3: video file {train.parent / 'broken.mp4'} cannot be decoded")
    assert errors["gone"].startswith(f"{train}:4: video file {train.parent / 'gone.mp4'} does not exist")
    assert len(errors) == 2 and all("\n" not in reason for reason in errors.values())
    row = StageOutput(**extract.output_args(config, "train")).read_records(0)[0]
    layout = Layout.from_dict(json.loads(row["layout"]))
    # 4 of 4 frames at 4 fps: 2 steps of 0.5 s, the config's 4 tokens per second -> times 0 and 2
    assert row["n_tokens"] == TOKENS and [s.time for s in layout.segments] == [0, 2]
    assert np.isfinite(reports["train"].results[RATE]["loss"]) and reports["train"].results[RATE]["step"] >= 1
    test = reports["evaluate"]
    assert {s["method"] for s in test.summaries} == {"full", "random", "sample", "spatial", "fastv", "metacompress"}
    assert not test.skipped and test.errors == 0
    for s in test.summaries:  # both test videos; the reduced methods keep a quarter of the 72 tokens
        assert s["dialogues"] == 2 and s["visual_tokens"] == (TOKENS if s["method"] == "full" else TOKENS // 4), s


def test_what_cannot_run_is_refused_in_one_line(workspace, tmp_path):
    from pipeline.commands.run import preflight
    from pipeline.config import ConfigError, config_from_dict
    from tiny_models import save_tiny

    clips = str(workspace / "data/train/dialogues.jsonl")
    with pytest.raises(ConfigError, match=r"data.video: give exactly one of num_frames and fps"):
        config_from_dict({"data": {"video": {"num_frames": 4, "fps": 2.0}}})
    with pytest.raises(ConfigError, match=r"data.video.fps = -1.0: must be > 0"):
        config_from_dict({"data": {"video": {"fps": -1}}})
    save_tiny(tmp_path / "llava", "llava", num_layers=1)
    config = run_config(workspace, "refused", train=clips, val=clips, test=clips)
    config.model.path = str(tmp_path / "llava")
    with pytest.raises(ConfigError) as err:
        preflight(config, ["extract"])
    assert f"data.train: {clips}:1 is a video dialogue, but model.path {tmp_path / 'llava'} is a llava model" \
        in str(err.value) and "\n" not in str(err.value)
    from pipeline.datasets import mt_shapes

    mt_shapes.generate_split(tmp_path / "shapes", "test", 1, seed=0, cfg=mt_shapes.MTShapesConfig(image_size=32),
                             progress=False)
    mixed = run_config(workspace, "mixed", train=clips, val=clips, test=str(tmp_path / "shapes/test/dialogues.jsonl"))
    with pytest.raises(ConfigError, match=r"is a video dialogue and data.test: .*:1 an image one; a run holds one "
                                          r"kind"):
        preflight(mixed, ["extract"])
    # Qwen merges inside its vision tower: there is no pre-projector output to cache, for images or videos
    shapes = str(tmp_path / "shapes/test/dialogues.jsonl")
    config = run_config(workspace, "pre", train=shapes, val=shapes, test=shapes)
    config.extract.cache = "pre_projector"
    with pytest.raises(ConfigError, match=r"^extract.cache: pre_projector .* qwen2_5_vl merges inside its vision "
                                          r"tower: use post_projector or none$"):
        preflight(config, ["extract"])
