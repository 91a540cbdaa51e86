"""The train stage for real: Ray Train + DeepSpeed (gloo, CPU) on a tiny LLaVA and cached MT-Shapes targets."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.tiny_models import save_tiny

RATE = 0.75


def build_cache(config, split: str) -> None:
    """extract + teacher for ``split`` in this process (the stages' own workers, without actor start-up)."""
    from pipeline.shards import StageOutput, read_completed
    from stages import extract, teacher
    from stages.common import load_split, shard_ranges

    records, _ = load_split(config, split, None)
    ranges = shard_ranges(len(records), config.shards.dialogues_per_shard)
    f_args = extract.output_args(config, split)
    StageOutput(**f_args).prepare(config.to_dict())
    worker = extract.FeatureExtractor(config.model.path, config.model.dtype, "cpu")
    for i, (a, b) in enumerate(ranges):
        worker.run_shard(f_args, i, [{"dialogue_id": r["dialogue_id"], "image": r["image"]} for r in records[a:b]])
    StageOutput(**f_args).finish(len(ranges))
    manifest = read_completed(f_args["uri"])
    t_args = teacher.output_args(config, split)
    StageOutput(**t_args).prepare(config.to_dict())
    tw = teacher.TeacherWorker(config.model.path, config.model.dtype, "cpu", teacher.worker_options(config))
    feature_args = dict(uri=f_args["uri"], stage=extract.STAGE, config_hash=manifest["config_hash"],
                        input_hash=manifest["input_hash"], fmt=config.shards.format)
    for i, (a, b) in enumerate(ranges):
        tw.run_shard(t_args, feature_args, i, records[a:b])
    StageOutput(**t_args).finish(len(ranges))


def make_config(root: Path, work: str, **train):
    from pipeline.config import config_from_dict, resolve_paths

    data = {"work_dir": str(root / work), "model": {"path": str(root / "model")},
            "data": {"train": str(root / "data/train/dialogues.jsonl"), "test": str(root / "data/test/dialogues.jsonl"),
                     "val": str(root / "data/test/dialogues.jsonl")},
            "shards": {"dialogues_per_shard": 4}, "teacher": {"top_k": 8, "max_new_tokens": 3},
            "evaluate": {"batch_size": 4},
            "train": {"rates": [RATE], "compress_dim": 16, "optimizer": "adamw", "lr": 0.003, "grad_clip": 1.0,
                      "epochs": 2, "batch_size": 4, "num_workers": 2, "checkpoint_every": 2, "zero_stage": 2,
                      **train}}
    return resolve_paths(config_from_dict(data), root)


def make_workspace(root: Path) -> Path:
    """The tiny LLaVA and cached MT-Shapes targets the train tests share (conftest's ``train_workspace``)."""
    from pipeline.datasets.mt_shapes import MTShapesConfig, generate

    generate(root / "data", total=24, seed=0, cfg=MTShapesConfig(image_size=32), val=0, test=8, progress=False)
    save_tiny(root / "model", "llava", num_layers=2)
    config = make_config(root, "base")
    build_cache(config, "train")  # 16 dialogues, 4 shards: 8 per worker, 2 steps per epoch at micro batch 2
    build_cache(config, "test")
    return root


def fresh_work(root: Path, work: str, **train):
    """A new work_dir holding copies of the base caches (so runs never see each other's checkpoints)."""
    config = make_config(root, work, **train)
    for stage in ("extract", "teacher"):
        shutil.copytree(root / "base" / stage, Path(config.work_dir) / stage)
    return config


def objective(config, directory=None) -> float:
    """The training objective over every training dialogue, computed here without DeepSpeed or Ray: with the
    trained compressor from ``directory``, or with the seeded initial one."""
    import torch

    from compress.lvlm import load_adapter
    from compress.metacompress import MetaCompress
    from stages.train import make_plan
    from stages.train.data import CachedSource
    from stages.train.student import build_student

    adapter = load_adapter(config.model.path)
    student = build_student(adapter, config.train, config.train.seed)
    if directory is not None:
        student.compressor.load_state_dict(MetaCompress.from_pretrained(directory).state_dict())
    plan = make_plan(config, "train")
    source = CachedSource(plan["feature_args"], plan["teacher_args"], plan["questions"])
    keys = [(s, r) for s, rows in enumerate(plan["shard_rows"]) for r in range(rows)]
    with torch.no_grad():
        return float(student(source.examples(keys), RATE)["loss"])


def load_state(directory):
    from compress.metacompress import MetaCompress

    return MetaCompress.from_pretrained(directory).state_dict()


def run_zero2(root: Path):
    """The uninterrupted ZeRO-2 run the others compare with (conftest's ``zero2_run``): (config, report)."""
    import ray

    from stages import train

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    config = fresh_work(root, "zero2", heldout_dialogues=5)  # of the 8 test dialogues (shards of 4 + 1)
    report = train.run(config, progress=False)
    return config, report


def test_zero2_two_workers_learn_identically_and_track(zero2_run):
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline import tracking
    from stages import train

    config, report = zero2_run
    result = report.results[RATE]
    assert result["step"] == result["total_steps"] == 8  # 16 dialogues / batch 4, 2 epochs
    assert result["replica_max_abs_diff"] == 0.0 and result["frozen_params_partitioned"] == 0
    directory = train.compressor_dir(config, RATE)
    assert objective(config, directory) < objective(config) - 1e-3
    assert 0 < result["heldout_kl"] and result["heldout_dialogues"] == 5  # train.heldout_dialogues bounds the pass
    # per-step terms reach MLflow from rank 0; the model is registered with the alias
    tracking.setup(config)
    client = MlflowClient()
    runs = mlflow.search_runs(filter_string=f"tags.mlflow.runName = 'train/rate-{RATE}'", output_format="list")
    assert len(runs) == 1
    for key in ("loss", "kl", "entropy", "collapse", "lr", "dialogues_per_second"):
        assert [m.step for m in client.get_metric_history(runs[0].info.run_id, key)] == list(range(1, 9))
    version = client.get_model_version_by_alias(config.tracking.registered_model, "candidate")
    assert int(version.version) == result["model_version"]
    # the registered model is the trained module: same weights, same reduction of cached features
    import torch

    from compress.metacompress import MetaCompress
    from stages.train import make_plan
    from stages.train.data import CachedSource

    registered = tracking.load_compressor(f"models:/{config.tracking.registered_model}@candidate")
    trained = MetaCompress.from_pretrained(directory)
    plan = make_plan(config, "test")
    example = CachedSource(plan["feature_args"], plan["teacher_args"], plan["questions"]).examples([(0, 0)])[0]
    x = example.features.float()
    got, want = registered(x, 16, example.layout), trained(x, 16, example.layout)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.matrix, want.matrix)
    again = train.run(config, progress=False)  # finished: nothing is trained again
    assert again.computed == 0


def steps_logged(directory) -> list[int]:
    """The steps of the last attempt that wrote ``directory`` (``train_log.jsonl``)."""
    import json

    return [json.loads(line)["step"] for line in open(f"{directory}/train_log.jsonl")]


def test_killed_run_resumes_and_planted_pickles_never_run(train_workspace, zero2_run, monkeypatch, tmp_path):
    """docs/design.md §8. Every worker dies after step 5 (last checkpoint: step 4). Pickles planted beside the
    checkpoints under DeepSpeed's file names never run, and the rerun resumes from a checkpoint to the uninterrupted
    run's weights, bit for bit. Then a pickle in place of one rank's tensors in every checkpoint and 8 flipped bytes in
    the finished compressor: the compressor is not reused, the damaged checkpoints are refused, nothing runs, and the
    rate is trained again from step 1 to the same weights."""
    import torch

    from stages import train
    from tests.test_integrity import flip_bytes, plant

    config = fresh_work(train_workspace, "crash")
    monkeypatch.setenv(train.CRASH_ENV, "5")
    with pytest.raises(Exception):
        train.run(config, progress=False)
    monkeypatch.delenv(train.CRASH_ENV)
    directory = Path(train.compressor_dir(config, RATE))
    assert not directory.exists()
    marker = tmp_path / "code-ran"
    tensors = sorted((Path(config.work_dir) / "train" / "ray").rglob("rank-1.safetensors"))
    assert tensors  # the crash left checkpoints in the safetensors + JSON format
    for path in tensors:
        for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "latest"):
            plant(path.parent / name, marker)
    resumed = train.run(config, progress=False).results[RATE]
    logged = steps_logged(directory)  # from the last checkpoint Ray Train registered before the crash (2 or 4)
    assert resumed["step"] == 8 and logged[0] in (3, 5) and logged == list(range(logged[0], 9))
    assert not marker.exists()
    expected = load_state(train.compressor_dir(zero2_run[0], RATE))
    for key, value in load_state(directory).items():
        assert torch.equal(expected[key], value), key

    for path in (Path(config.work_dir) / "train" / "ray").rglob("rank-1.safetensors"):
        plant(path, marker)
    flip_bytes(directory / "model.safetensors")
    again = train.run(config, progress=False)
    assert again.computed == 1 and steps_logged(directory)[0] == 1 and not marker.exists()
    for key, value in load_state(directory).items():
        assert torch.equal(expected[key], value), key


def validation_kl(config, directory) -> float:
    """KL per answer token of the compressor in ``directory`` over the whole validation split, in one plain pass."""
    import torch

    from compress.lvlm import load_adapter
    from compress.metacompress import MetaCompress
    from stages.train import make_plan
    from stages.train.data import CachedSource
    from stages.train.student import build_student

    student = build_student(load_adapter(config.model.path), config.train, config.train.seed)
    student.compressor.load_state_dict(MetaCompress.from_pretrained(directory).state_dict())
    plan = make_plan(config, "val")
    source = CachedSource(plan["feature_args"], plan["teacher_args"], plan["questions"])
    with torch.no_grad():
        return float(student(source.examples([(s, r) for s, n in enumerate(plan["shard_rows"]) for r in range(n)]),
                             RATE)["kl"])


def test_a_crashed_worker_is_retried_from_its_checkpoint_within_the_run(train_workspace, zero2_run, monkeypatch):
    """train.max_failures: Ray Train restarts the worker group after a worker dies, from the last checkpoint it
    registered, inside the same ``train.run``; the weights equal the uninterrupted run's."""
    import torch

    from stages import train

    config = fresh_work(train_workspace, "retry", max_failures=1)
    monkeypatch.setenv(train.CRASH_ENV, "5")
    report = train.run(config, progress=False)
    directory = Path(train.compressor_dir(config, RATE))
    logged = steps_logged(directory)  # the retried attempt's steps, from the checkpoint at step 2 or 4
    assert report.results[RATE]["step"] == 8 and logged[0] in (3, 5) and logged == list(range(logged[0], 9))
    expected = load_state(train.compressor_dir(zero2_run[0], RATE))
    for key, value in load_state(directory).items():
        assert torch.equal(expected[key], value), key


def test_early_stopping_and_candidates_keep_the_lowest_validation_kl(train_workspace, ray_local):
    import json

    from stages import train
    from stages.outputs import rate_dir

    config = fresh_work(train_workspace, "candidates", epochs=4, validate_every=2, patience=1, heldout_dialogues=0,
                        validation_dialogues=None, candidates=[{"lr": 1e-7}], plateau_start=0.5)
    build_cache(config, "val")
    result = train.run(config, progress=False).results[RATE]
    kls = [result["candidate_0_val_kl"], result["candidate_1_val_kl"]]
    assert result["candidate"] == kls.index(min(kls)) and result["val_kl_best"] == min(kls)
    kept = train.compressor_dir(config, RATE)
    chosen = f"{rate_dir(config, RATE)}/candidate-{result['candidate']}/compressor"
    assert all((load_state(kept)[k] == v).all() for k, v in load_state(chosen).items())
    for i in range(2):  # each candidate kept its best validation weights, not its last ones
        directory = f"{rate_dir(config, RATE)}/candidate-{i}/compressor"
        log = [json.loads(line) for line in open(f"{directory}/train_log.jsonl")]
        validated = [(row["val_kl"], row["step"]) for row in log if "val_kl" in row]
        # the initial weights are validated too (step 0), then every 2 steps
        assert [step for _, step in validated] == list(range(0, 2 * len(validated), 2))
        assert min(validated)[0] == pytest.approx(kls[i])
        assert validation_kl(config, directory) == pytest.approx(kls[i], rel=1e-4)
        # patience 1 from step 8 on (plateau_start 0.5 of 16 steps): stops at the first validation after step 8
        # that is not a new best, else runs all 16 steps
        first_worse = next((s for kl, s in validated[1:] if s > 8 and kl >= min(
            k for k, t in validated if t < s)), None)
        assert log[-1]["step"] == (first_worse or 16)


def test_cached_and_online_teacher_give_the_same_loss(train_workspace):
    import torch

    from compress.lvlm import load_adapter
    from stages.train import make_plan
    from stages.train.data import CachedSource, OnlineSource
    from stages.train.student import build_student

    config = make_config(train_workspace, "base")
    adapter = load_adapter(config.model.path)
    student = build_student(adapter, config.train, config.train.seed)
    cached_plan = make_plan(config, "train")
    config.train.online_teacher = True
    online_plan = make_plan(config, "train")
    assert online_plan["shard_rows"] == cached_plan["shard_rows"]
    keys = [(1, 2), (0, 0), (3, 1)]
    cached = CachedSource(cached_plan["feature_args"], cached_plan["teacher_args"],
                          cached_plan["questions"]).examples(keys)
    online = OnlineSource(adapter, online_plan["shards"], online_plan["top_k"], online_plan["max_new_tokens"],
                          online_plan["storage_dtype"]).examples(keys)
    assert [e.dialogue_id for e in cached] == [e.dialogue_id for e in online]
    assert [e.answer_ids for e in cached] == [e.answer_ids for e in online]
    a, b = student(cached, RATE), student(online, RATE)
    assert a["tokens"] == b["tokens"] > 0
    for term in ("loss", "kl", "entropy", "collapse"):
        torch.testing.assert_close(a[term], b[term], rtol=1e-4, atol=1e-5)
    a["loss"].backward()  # and the gradient reaches the compressor through the frozen LLM
    grads = dict(student.compressor.named_parameters())
    for name in ("w_query", "w_key", "omega", "position_table"):  # layout_token: LLaVA-1.5 has no newlines
        assert grads[name].grad is not None and float(grads[name].grad.abs().sum()) > 0, name
    assert all(p.grad is None for p in student.lvlm.parameters())


def reference_order(rows, seed, epoch, rank, world, window):
    """The loader's documented order (docs/design.md §6.3), written out plainly: shards and their rows drawn from
    default_rng([seed, epoch]), the stream cut into world equal parts, each part's shard runs shuffled `window` at a
    time with default_rng([seed, epoch, rank])."""
    rng = np.random.default_rng([seed, epoch])
    stream = []
    for s in rng.permutation(len(rows)):
        stream += [(int(s), int(r)) for r in rng.permutation(rows[s])]
    total = len(stream)
    part = stream[rank * total // world:(rank + 1) * total // world]
    runs = []
    for key in part:
        if runs and runs[-1][-1][0] == key[0]:
            runs[-1].append(key)
        else:
            runs.append([key])
    rng = np.random.default_rng([seed, epoch, rank])
    out = []
    for i in range(0, len(runs), window):
        buffer = [k for run in runs[i:i + window] for k in run]
        out += [buffer[j] for j in rng.permutation(len(buffer))]
    return out


def test_epoch_order_deals_shards_afresh_and_covers_every_row_once():
    from stages.train.data import epoch_order, steps_per_epoch

    rows = [4, 4, 3, 4, 2, 4, 4]
    everything = sorted((s, i) for s, n in enumerate(rows) for i in range(n))
    orders = {(e, r): epoch_order(rows, 7, e, r, 2, 2) for e in (0, 1, 2) for r in (0, 1)}
    for e in (0, 1, 2):
        assert sorted(orders[e, 0] + orders[e, 1]) == everything  # each dialogue once per epoch, on one worker
        assert {len(orders[e, 0]), len(orders[e, 1])} == {12, 13}  # equal parts (+-1)
    shards = {(e, r): {s for s, _ in orders[e, r]} for e in (0, 1, 2) for r in (0, 1)}
    assert len({frozenset(shards[e, 0]) for e in (0, 1, 2)}) > 1  # dealt afresh each epoch
    assert orders[0, 0] == epoch_order(rows, 7, 0, 0, 2, 2) and orders[0, 0] != epoch_order(rows, 8, 0, 0, 2, 2)
    for (e, r), order in orders.items():
        assert order == reference_order(rows, 7, e, r, 2, 2)
    # The buffer mixes shards: some run of 3 keys of a worker holds two shards before its first shard is used up.
    assert any(len({s for s, _ in orders[0, 0][i:i + 3]}) > 1 for i in range(4))
    assert steps_per_epoch(rows, 2, 3) == 4  # 25 rows: parts of 12 and 13
    with pytest.raises(ValueError, match="each of the 2 workers gets 12 of the 25 dialogues"):
        steps_per_epoch(rows, 2, 13)


def test_a_resumed_run_continues_the_uninterrupted_order():
    from stages.train.data import Prefetcher, batch_keys, steps_per_epoch

    rows, seed, world, micro, window = [5, 3, 4, 4, 2, 5], 3, 2, 2, 3
    per_epoch = steps_per_epoch(rows, world, micro)
    steps = 3 * per_epoch

    def uninterrupted(rank):  # the reference order, cut into micro batches, epoch after epoch
        out = []
        for step in range(steps):
            epoch, pos = divmod(step, per_epoch)
            out.append(reference_order(rows, seed, epoch, rank, world, window)[pos * micro:(pos + 1) * micro])
        return out

    class Recording:  # a source whose examples are its keys
        def examples(self, keys):
            return list(keys)

    for rank in range(world):
        expected = uninterrupted(rank)

        def keys_of(step, rank=rank):
            return batch_keys(rows, seed, step, rank, world, micro, per_epoch, window)

        first = Prefetcher(Recording(), keys_of, 0, steps)
        before = [first.get(s) for s in range(per_epoch + 2)]  # killed mid-epoch 1 after these steps
        resumed = Prefetcher(Recording(), keys_of, per_epoch + 2, steps)  # a fresh process from the checkpoint
        after = [resumed.get(s) for s in range(per_epoch + 2, steps)]
        assert before + after == expected


def test_prefetcher_gives_the_steps_batches_in_order_and_resumes_exactly():
    from stages.train.data import Prefetcher, batch_keys, steps_per_epoch

    rows = [4, 4, 3, 4, 2]
    per_epoch = steps_per_epoch(rows, 2, 2)

    class Recording:  # a source whose examples are its keys: what the loop would get, in order
        def examples(self, keys):
            return list(keys)

    def keys_of(step):
        return batch_keys(rows, 5, step, 1, 2, 2, per_epoch)

    direct = [keys_of(s) for s in range(3 * per_epoch)]
    fetched = Prefetcher(Recording(), keys_of, 0, len(direct))
    assert [fetched.get(s) for s in range(len(direct))] == direct
    resumed = Prefetcher(Recording(), keys_of, 5, len(direct), depth=1)  # a resume from step 5's checkpoint
    assert [resumed.get(s) for s in range(5, len(direct))] == direct[5:]
    with pytest.raises(ValueError, match="asked for step 3, the next one is 0"):
        Prefetcher(Recording(), keys_of, 0, 4).get(3)

    class Failing:
        def examples(self, keys):
            raise OSError("shard unreadable")

    with pytest.raises(OSError, match="shard unreadable"):  # a read error reaches the loop
        Prefetcher(Failing(), keys_of, 0, 4).get(0)


def test_heldout_plan_takes_the_first_dialogues_in_shard_order():
    from stages.train.data import heldout_plan

    plan = {"kind": "cached", "shard_rows": [4, 4, 3, 4], "identity": ["x"]}
    assert heldout_plan(plan, 6)["shard_rows"] == [4, 2, 0, 0]
    assert heldout_plan(plan, 100)["shard_rows"] == [4, 4, 3, 4]
    assert heldout_plan(plan, None) is plan and heldout_plan(plan, 0) is None and heldout_plan(None, 6) is None
    assert plan["shard_rows"] == [4, 4, 3, 4] and heldout_plan(plan, 6)["identity"] == ["x"]


def test_deepspeed_config():
    from infra.deepspeed import ds_config
    from pipeline.config import TrainConfig

    cpu = ds_config(TrainConfig(batch_size=36, zero_stage=3, grad_clip=0.01), world_size=4, persist_numel=512)
    assert (cpu["train_batch_size"], cpu["train_micro_batch_size_per_gpu"]) == (36, 9)
    assert cpu["bf16"]["enabled"] is False and cpu["gradient_clipping"] == 0.01
    assert cpu["zero_optimization"]["stage"] == 3
    assert cpu["zero_optimization"]["stage3_param_persistence_threshold"] == 512
    assert "optimizer" not in cpu and cpu["zero_allow_untested_optimizer"]  # client torch optimizer: no JIT op
    # bf16 mode follows the compressor's dtype, never the device (docs/design.md §6.3)
    assert ds_config(TrainConfig(zero_stage=2, compressor_dtype="bfloat16"), 1)["bf16"]["enabled"] is True
    with pytest.raises(ValueError, match=r"train.num_workers \(5\); set train.batch_size: 35"):
        ds_config(TrainConfig(batch_size=36), world_size=5)
