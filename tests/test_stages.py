"""extract + teacher on real Ray with a tiny LLaVA: resume, corruption, mismatch, bad records, cached targets."""

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.workspace import make_config, make_workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("stages"))


def shard_bytes(uri: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(uri).glob("part-*"))}


def test_extract_writes_features_equal_to_the_vision_tower(workspace, ray_local):
    import numpy as np

    from compress.lvlm import load_adapter
    from pipeline.dialogues import load_dialogues
    from pipeline.shards import StageOutput
    from stages import extract

    config = make_config(workspace)
    report = extract.run(config, "train", progress=False)
    assert report.shards == 5 and report.computed == 5 and report.records == 20
    out = StageOutput(**extract.output_args(config, "train"))
    assert out.is_complete()
    adapter = load_adapter(config.model.path)
    dialogues = load_dialogues(config.data.train)
    rows = out.read_records(1)
    assert [r["dialogue_id"] for r in rows] == [d.dialogue_id for d in dialogues[4:8]]
    for row, dialogue in zip(rows, dialogues[4:8]):
        expected = adapter.encode(dialogue.image).tokens.half().numpy()
        assert row["n_tokens"] == expected.shape[0] == 64
        np.testing.assert_array_equal(row["features"], expected)

    again = extract.run(config, "train", progress=False)
    assert again.computed == 0  # a finished stage does no model work


def test_corrupt_shard_is_recomputed_byte_identically(workspace, ray_local):
    from stages import extract

    config = make_config(workspace)
    extract.run(config, "train", progress=False)
    uri = extract.output_uri(config, "train")
    before = shard_bytes(uri)
    victim = Path(uri) / "part-00002.parquet"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    (Path(uri) / "part-00003.parquet").unlink()
    report = extract.run(config, "train", progress=False)
    assert report.computed == 1  # a re-run checks sizes and sidecars: the flipped byte is left to its reader
    verified = dataclasses.replace(config, shards=dataclasses.replace(config.shards, verify=True))
    assert extract.run(verified, "train", progress=False).computed == 1  # `run --verify` hashes every shard
    assert shard_bytes(uri) == before


def test_teacher_targets_reproduce_the_full_model(workspace, ray_local):
    import torch

    from compress.lvlm import load_adapter
    from compress.lvlm.session import dialogue_ids
    from pipeline.dialogues import load_dialogues
    from pipeline.shards import StageOutput, bytes_per_answer_token
    from stages import extract, teacher

    config = make_config(workspace)
    extract.run(config, "train", progress=False)
    report = teacher.run(config, "train", progress=False)
    assert report.records == 20
    out = StageOutput(**teacher.output_args(config, "train"))
    row = out.read_records(0)[1]
    dialogue = load_dialogues(config.data.train)[1]
    adapter = load_adapter(config.model.path)
    encoded = adapter.encode(dialogue.image)
    answers = [list(a) for a in row["answer_ids"]]
    ids, positions, turn_of = dialogue_ids(adapter, encoded.tokens.shape[0], [t.question for t in dialogue.turns],
                                           answers)
    # independent reference: the model's own forward with pixel values (not the cached features)
    with torch.no_grad():
        full = adapter.full_forward_logits(torch.tensor([ids]), encoded)[0].float().log_softmax(-1)
    at = torch.tensor(positions) - 1
    full_at = full[at]
    top = torch.cat([torch.from_numpy(x.astype("float32")) for x in row["topk_logprobs"]])
    top_ids = torch.cat([torch.from_numpy(x.astype("int64")) for x in row["topk_ids"]])
    tail = torch.cat([torch.from_numpy(x) for x in row["tail_logmass"]])
    torch.testing.assert_close(top, full_at.gather(-1, top_ids), atol=2e-2, rtol=1e-2)  # float16 storage
    assert torch.equal(full_at.argmax(-1), torch.cat([torch.tensor(a, dtype=torch.long) for a in answers]))
    # KL(full || cached top-k + tail bucket) is bounded by the tail mass
    p = full_at.exp()
    tail_mass = tail.exp()
    kl_topk = (p.gather(-1, top_ids) * (full_at.gather(-1, top_ids) - top)).sum(-1)
    p_tail = 1 - p.gather(-1, top_ids).sum(-1)
    kl = kl_topk + p_tail * (p_tail.clamp_min(1e-12).log() - tail)
    assert (kl <= tail_mass + 1e-3).all()
    print(f"teacher cache: {bytes_per_answer_token(out, report.shards):.0f} bytes per answer token at k = 8")


def test_teacher_with_reference_history_distils_along_the_references(workspace, ray_local):
    import torch

    from compress.lvlm import load_adapter
    from compress.lvlm.session import dialogue_ids
    from pipeline.dialogues import load_dialogues
    from pipeline.shards import StageOutput
    from stages import extract, teacher

    config = make_config(workspace, work="work_reference", history="reference")
    extract.run(config, "train", progress=False)
    teacher.run(config, "train", progress=False)
    out = StageOutput(**teacher.output_args(config, "train"))
    adapter = load_adapter(config.model.path)
    for row, dialogue in zip(out.read_records(0), load_dialogues(config.data.train)[:4]):
        forced = [list(a) for a in row["answer_ids"]]
        for turn, ids in zip(dialogue.turns, forced):
            ref = adapter.answer_ids(Counter(turn.answers).most_common(1)[0][0])  # the most frequent reference
            assert ids[:len(ref)] == ref and (ids[len(ref):] == [] or
                                              (len(ids) == len(ref) + 1 and ids[-1] in adapter.stop_ids))
        encoded = adapter.encode(dialogue.image)
        seq, positions, _ = dialogue_ids(adapter, encoded.tokens.shape[0], [t.question for t in dialogue.turns],
                                         forced)
        with torch.no_grad():  # the model's own forward along the references, from the pixels
            full = adapter.full_forward_logits(torch.tensor([seq]), encoded)[0].float().log_softmax(-1)
        full_at = full[torch.tensor(positions) - 1]
        top = torch.cat([torch.from_numpy(x.astype("float32")) for x in row["topk_logprobs"]])
        top_ids = torch.cat([torch.from_numpy(x.astype("int64")) for x in row["topk_ids"]])
        torch.testing.assert_close(top, full_at.gather(-1, top_ids), atol=2e-2, rtol=1e-2)  # float16 storage


def test_outputs_of_another_config_are_refused(workspace, ray_local):
    from pipeline.shards import IncompatibleOutput
    from stages import extract, teacher

    config = make_config(workspace)
    extract.run(config, "train", progress=False)
    teacher.run(config, "train", progress=False)
    other = make_config(workspace, top_k=4)
    with pytest.raises(IncompatibleOutput, match="overwrite"):
        teacher.run(other, "train", progress=False)
    other.shards.overwrite = True
    assert teacher.run(other, "train", progress=False).computed == 5


def test_bad_records_go_to_errors_and_fail_past_the_fraction(workspace, ray_local):
    from pipeline.dialogues import load_dialogues, write_dialogues
    from stages import extract
    from stages.common import StageFailed

    dialogues = load_dialogues(workspace / "data/train/dialogues.jsonl")[:8]
    bad_dir = workspace / "bad"
    bad_dir.mkdir(exist_ok=True)
    dialogues[3] = dataclasses.replace(dialogues[3], image=str(bad_dir / "missing.png"))
    write_dialogues(bad_dir / "dialogues.jsonl", dialogues)
    config = make_config(workspace, work="work_bad")
    config.data.train = str(bad_dir / "dialogues.jsonl")
    config.shards.max_error_fraction = 0.2
    report = extract.run(config, "train", progress=False)
    assert report.records == 7 and report.errors == 1
    errors = [json.loads(line) for line in (Path(extract.output_uri(config, "train")) / "_errors.jsonl").open()]
    assert errors[0]["record_id"] == dialogues[3].dialogue_id and "missing.png" in errors[0]["reason"]
    config.work_dir = str(workspace / "work_bad2")
    config.shards.max_error_fraction = 0.1
    with pytest.raises(StageFailed, match="_errors.jsonl"):
        extract.run(config, "train", progress=False)


def alive(name: str) -> set[str]:
    """IDs of the live actors of class ``name``, from the GCS's actor table (ray.util.state needs the dashboard)."""
    from ray._private.state import actors

    return {k for k, a in actors().items() if a["ActorClassName"] == name and a["State"] == "ALIVE"}


def wait_until_dead(actor_ids: set[str], name: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while alive(name) & actor_ids and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(name) & actor_ids, f"{name} actors still alive after {seconds} s"


def test_driver_killed_mid_stage_then_rerun_matches_uninterrupted(workspace, ray_local):
    from stages import extract

    reference = make_config(workspace, work="work_ref", per_shard=2)
    extract.run(reference, "train", progress=False)
    config = make_config(workspace, work="work_kill", per_shard=2)
    config_file = workspace / "kill.yaml"
    config.save(config_file)
    # the driver joins the running cluster as a job would; killing it takes its actors down with it
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    out_dir = Path(extract.output_uri(config, "train"))
    log = open(workspace / "kill.log", "w")
    before = alive("FeatureExtractor")
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.commands.cli", "run", str(config_file), "--stages", "extract"],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(out_dir.glob("part-*.parquet")) and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.05)
    started = alive("FeatureExtractor") - before
    os.killpg(driver.pid, 9)  # the driver and everything it started
    driver.wait()
    log.close()
    # the GCS ends the dead driver's actors asynchronously; one may still finish a shard until it is gone
    wait_until_dead(started, "FeatureExtractor")
    written = len(list(out_dir.glob("part-*.parquet")))
    assert 1 <= written < 10, f"the kill came at the wrong time ({written} shards written); driver output:\n" + \
        (workspace / "kill.log").read_text()[-3000:]
    assert not (out_dir / "_SUCCESS").exists()
    report = extract.run(config, "train", progress=False)
    assert report.computed == 10 - written
    assert shard_bytes(str(out_dir)) == shard_bytes(extract.output_uri(reference, "train"))


def test_a_stage_keeps_its_model_actors_across_splits_and_ends_them(workspace, ray_local):
    from stages import extract, teacher
    from stages.common import actors_kept_for_stage

    plain, kept = make_config(workspace, work="kept_plain"), make_config(workspace, work="kept")
    for name, stage in (("FeatureExtractor", extract), ("TeacherWorker", teacher)):
        before = alive(name)
        with actors_kept_for_stage():
            seen = []
            for split in ("train", "test"):
                assert stage.run(kept, split, progress=False).computed > 0
                seen.append(alive(name) - before)
            assert seen[0] and seen[0] == seen[1]  # the model loaded once for both splits
        wait_until_dead(seen[0], name)  # ended with the stage: their CPUs and GPUs are free for the next one
    for split in ("train", "test"):  # each split read and wrote its own shards, as one actor per split does
        extract.run(plain, split, progress=False)
        teacher.run(plain, split, progress=False)
        assert shard_bytes(teacher.output_args(kept, split)["uri"]) == \
            shard_bytes(teacher.output_args(plain, split)["uri"])


def test_report_images_go_to_the_stages_kept_actor_not_a_new_one(workspace, ray_local):
    """With the evaluate stage's kept actors holding every CPU, the report's image encoding must not wait for one."""
    import threading

    import torch

    from compress.lvlm import load_adapter
    from pipeline.dialogues import load_dialogues
    from stages.common import actors_kept_for_stage, model_actor, stage_actors
    from stages.evaluate.report_files import _encode_on_actor
    from stages.evaluate.worker import EvalWorker
    from stages.outputs import EVALUATE

    config = make_config(workspace)
    image = load_dialogues(config.data.test)[0].image
    cpus = int(ray_local.cluster_resources()["CPU"])
    got: list = []
    with actors_kept_for_stage():
        stage_actors(EVALUATE, model_actor(EvalWorker, 0, 1), (config.model.path, config.model.dtype, "cpu", {}, None),
                     cpus)
        worker = threading.Thread(target=lambda: got.extend(_encode_on_actor(config, [image])), daemon=True)
        worker.start()
        worker.join(timeout=180)
    assert got, "the encoding waited for a CPU held by the stage's own actors"
    expected = load_adapter(config.model.path).encode(image).tokens.float()
    torch.testing.assert_close(got[0][0], expected)
