"""The tprl stage on real Ray with a tiny LLaVA and a SQLite MLflow store: prepare rows equal plain computations,
a crashed run resumes to the same policy as an uninterrupted one, tracking, evaluation of method "tprl" per turn,
and the prompt embedding a prompt-dependent reducer receives."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.workspace import make_config, make_workspace

TINY = {"enabled": True, "iterations": 4, "rollouts_per_iteration": 4, "rollout_batch_size": 2, "num_actors": 1,
        "d_latent": 16, "d_hidden": 32, "d_model": 32, "n_layers": 1, "n_heads": 4, "ae_epochs": 2,
        "bc_epochs": 2, "bc_batch_size": 32, "ppo_epochs": 2, "minibatch_size": 4, "checkpoint_every": 2,
        "actor_lr": 1e-3, "critic_lr": 1e-3, "b": 0.5, "teacher_layers": [0, 1]}


def tiny_config(root: Path, **tprl):
    from pipeline.config import TPRLConfig, TrackingConfig

    config = make_config(root)
    config.tprl = TPRLConfig(**{**TINY, **tprl})
    config.tracking = TrackingConfig(uri=f"sqlite:///{root}/mlflow.db")
    config.evaluate.max_new_tokens = 2
    config.data.max_eval_dialogues = 4
    config.shards.dialogues_per_shard = 4
    return config


def weights(directory: str | Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "model.safetensors"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("tprl"))


@pytest.fixture(scope="module")
def trained(workspace, ray_local):
    """extract, then tprl crashed after iteration 3, finished at 2 iterations, resumed to 4, and again from
    scratch without interruption. -> (config, reports, final weights of the resumed and uninterrupted runs)."""
    import os

    from stages import extract, tprl

    config = tiny_config(workspace)
    extract.run(config, "train", progress=False)
    reports = {}
    os.environ[tprl.CRASH_ENV] = "3"
    try:
        with pytest.raises(RuntimeError, match="injected failure after iteration 3"):
            tprl.run(config, progress=False)
    finally:
        del os.environ[tprl.CRASH_ENV]
    ckpt_dir = next(Path(tprl.stage_dir(config), "checkpoints").iterdir())
    reports["checkpoints_after_crash"] = sorted(p.name for p in ckpt_dir.glob("ckpt-*"))
    reports["short"] = tprl.run(tiny_config(workspace, iterations=2), progress=False)  # ends at the checkpoint
    reports["short_weights"] = weights(tprl.policy_dir(config))
    reports["resumed"] = tprl.run(config, progress=False)
    reports["again"] = tprl.run(config, progress=False)
    resumed = weights(tprl.policy_dir(config))
    for name in ("checkpoints", "policy", "_SUCCESS"):  # the prepared rows stay: they do not depend on the policy
        target = Path(tprl.stage_dir(config), name)
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    reports["fresh"] = tprl.run(config, progress=False)
    return config, reports, resumed, weights(tprl.policy_dir(config))


def test_crashed_run_resumes_to_the_uninterrupted_policy(trained):
    import torch

    config, reports, resumed, fresh = trained
    # after the failure in iteration 3 only the checkpoints after BC and after iteration 2 exist
    assert reports["checkpoints_after_crash"] == ["ckpt-000000", "ckpt-000002"]
    assert reports["short"].resumed_from == 2 and reports["short"].computed == 1
    assert reports["resumed"].resumed_from == 2 and reports["resumed"].iterations == 4
    assert reports["again"].computed == 0  # finished: nothing recomputed
    assert reports["fresh"].resumed_from is None
    assert resumed.keys() == fresh.keys()
    for key in fresh:
        assert torch.equal(resumed[key], fresh[key]), key
    # PPO moved the policy after iteration 2 (else the equality above would say little)
    changed = [k for k in fresh if not torch.equal(fresh[k], reports["short_weights"][k])]
    assert changed and all(not k.startswith("autoencoder.") for k in changed)
    # the saved policy loads and is the spec the stage trained
    policy = tprl_policy(config)
    assert policy.config.d_model == 32 and policy.autoencoder.d_latent == 16


def tprl_policy(config):
    from compress.tprl import TPRLPolicy
    from stages import tprl

    return TPRLPolicy.from_pretrained(tprl.policy_dir(config))


def test_prepared_rows_equal_plain_computations(trained):
    import json

    import torch

    from compress.analysis import prompt_attention
    from compress.layout import Layout
    from compress.lvlm import load_adapter
    from compress.lvlm.base import EncodedImage
    from compress.lvlm.session import ChatSession
    from pipeline.metrics import exact_match
    from pipeline.shards import StageOutput
    from stages import extract, tprl

    config, *_ = trained
    prep = StageOutput(**tprl.prepared_args(config, tprl.feature_args(config, "train")))
    rows = prep.read_records(1)
    records = tprl.load_records(config, "train")[4:8]
    adapter = load_adapter(config.model.path)
    table = adapter.model.get_input_embeddings().weight
    features = {r["dialogue_id"]: r for r in StageOutput(**extract.output_args(config, "train")).read_records(1)}
    assert [r["dialogue_id"] for r in rows] == [d["dialogue_id"] for d in records]
    for row, d in zip(rows, records):
        question = d["questions"][0]
        ids = adapter.tokenizer(question, add_special_tokens=False).input_ids
        torch.testing.assert_close(torch.from_numpy(row["query"].copy()), table[ids].mean(0).detach())
        x = torch.from_numpy(features[d["dialogue_id"]]["features"].copy()).float()
        att = prompt_attention(adapter, x, question, [0, 1])
        torch.testing.assert_close(torch.from_numpy(row["teacher"].copy()), att.prompt_scores(), rtol=1e-4,
                                   atol=1e-6)
        session = ChatSession(adapter, "full", max_new_tokens=2)
        layout = Layout.from_dict(json.loads(features[d["dialogue_id"]]["layout"]))
        session.set_image(EncodedImage(x, layout, None, (0, 0)))
        assert row["full_score"] == exact_match(session.ask(question).answer, d["answers"][0])


def test_tracking_logs_iterations_losses_and_the_policy(trained):
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    config, reports, *_ = trained
    client = MlflowClient(tracking_uri=tracking.tracking_uri(config))
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'tprl'", order_by=["attributes.start_time"])
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED", "FINISHED", "FINISHED"]
    crashed, short, resumed, fresh = runs
    steps = {r.info.run_id: [m.step for m in client.get_metric_history(r.info.run_id, "reward")] for r in runs}
    assert steps[crashed.info.run_id] == [1, 2, 3] and steps[short.info.run_id] == []
    assert steps[resumed.info.run_id] == [3, 4] and steps[fresh.info.run_id] == [1, 2, 3, 4]
    assert client.get_metric_history(fresh.info.run_id, "bc_loss") and \
        client.get_metric_history(fresh.info.run_id, "ae_loss")
    assert not client.get_metric_history(resumed.info.run_id, "bc_loss")  # resumed after BC
    assert resumed.data.tags["resumed_from"] == "2"
    for name in ("policy_loss", "value_loss", "kept_fraction", "entropy"):
        assert len(client.get_metric_history(fresh.info.run_id, name)) == 4
    # episode rewards sum to score_T - score_full + b * (1 - K_T / n): so do their means
    m = fresh.data.metrics
    assert m["reward"] == pytest.approx(m["score_final"] - m["score_full"] + config.tprl.b * (1 - m["kept_fraction"]))
    assert 0 < m["kept_fraction"] < 1
    artifacts = {a.path for a in client.list_artifacts(fresh.info.run_id, "tprl_policy")}
    assert artifacts == {"tprl_policy/model.safetensors", "tprl_policy/policy.json"}


def test_evaluate_tprl_per_turn_matches_a_fixed_selection(trained):
    import copy

    from compress.lvlm import load_adapter
    from compress.lvlm.methods import Method
    from compress.lvlm.session import ChatSession
    from compress.reduction import Reduction, num_keep
    from compress.tprl import top_k_sorted
    from pipeline.dialogues import load_dialogues
    from pipeline.shards import StageOutput
    from stages import evaluate

    config = copy.deepcopy(trained[0])
    config.evaluate.methods, config.evaluate.rates, config.evaluate.batch_size = ["tprl"], [0.5], 2
    report = evaluate.run(config, "test", progress=False)
    assert report.skipped == [] and report.errors == 0
    jobs, _ = evaluate.plan(config, "test")
    job = next(j for j in jobs if j.method == "tprl")
    rows = StageOutput(**job.out_args).read_records(0)  # 4 dialogues, 4 per shard
    dialogues = load_dialogues(config.data.test)[:4]
    assert [r["dialogue_id"] for r in rows] == [d.dialogue_id for d in dialogues]

    adapter = load_adapter(config.model.path)
    policy = tprl_policy(config)
    table = adapter.model.get_input_embeddings().weight
    for row, d in zip(rows, dialogues):
        assert len(row["answers"]) == len(row["scores"]) == len(d.turns) == 3
        assert list(row["visual_tokens"]) == [num_keep(64, 0.5)] * 3  # decided once, the pruned cache serves all
        x = adapter.encode(d.image).tokens
        ids = adapter.tokenizer(d.turns[0].question, add_special_tokens=False).input_ids
        keep = top_k_sorted(policy.keep_probs(x, table[ids].mean(0).detach()), num_keep(64, 0.5))
        fixed = Method("fixed", "feature", lambda x, m, layout: Reduction(x[keep], keep_indices=keep))
        session = ChatSession(adapter, fixed, 0.5, max_new_tokens=2)
        session.set_image(d.image)
        assert row["answers"] == [session.ask(t.question).answer for t in d.turns]
    assert any(s["method"] == "tprl" for s in report.summaries)

    # without a policy the method is skipped with a reason, not failed
    other = copy.deepcopy(config)
    other.work_dir = str(Path(config.work_dir).parent / "no-policy")
    other.evaluate.methods, other.evaluate.rates = ["tprl"], [0.5]
    _, skipped = evaluate.plan(other, "test")
    assert len(skipped) == 1 and skipped[0].startswith("tprl@0.5: no trained policy")


def test_prompt_dependent_reducer_gets_the_first_questions_embedding(workspace):
    import torch

    from compress.lvlm import load_adapter
    from compress.lvlm.methods import Method
    from compress.lvlm.session import BatchChatSession
    from compress.reduction import Reduction, num_keep
    from pipeline.dialogues import load_dialogues

    class Recorder:
        prompt_dependent = True

        def __init__(self):
            self.calls = []

        def __call__(self, x, m, layout=None, prompt_embedding=None):
            self.calls.append(prompt_embedding.clone())
            keep = torch.arange(m)
            return Reduction(x[keep], keep_indices=keep)

    adapter = load_adapter(workspace / "model")
    dialogues = load_dialogues(workspace / "data/test/dialogues.jsonl")[:2]
    fn = Recorder()
    session = BatchChatSession(adapter, Method("recorder", "feature", fn), 0.75, max_new_tokens=2)
    session.set_images([d.image for d in dialogues])
    assert fn.calls == []  # nothing decided before the first question
    first = session.ask([d.turns[0].question for d in dialogues])
    table = adapter.model.get_input_embeddings().weight.detach()
    assert len(fn.calls) == 2
    for call, d in zip(fn.calls, dialogues):
        ids = adapter.tokenizer(d.turns[0].question.strip(), add_special_tokens=False).input_ids
        expected = torch.stack([table[i] for i in ids]).sum(0) / len(ids)  # a plain mean of embedding rows
        torch.testing.assert_close(call, expected.float())
    session.ask([d.turns[1].question for d in dialogues])
    assert len(fn.calls) == 2  # later turns reuse the reduced image
    assert [r.stats.visual_tokens for r in first] == [num_keep(64, 0.75)] * 2
    assert all(r.stats.reduce_s > 0 for r in first)


def test_disabled_stage_is_skipped_and_selectable(workspace):
    from pipeline.commands.run import parse_stages
    from pipeline.config import TPRLConfig
    from stages import tprl

    config = tiny_config(workspace, enabled=False)
    config.work_dir = str(workspace / "disabled")
    report = tprl.run(config, progress=False)
    assert report.skipped and "skipped" in report.line() and not Path(config.work_dir).exists()
    assert parse_stages("tprl") == ["tprl"]
    assert parse_stages("evaluate,tprl,train") == ["train", "tprl", "evaluate"]
    assert TPRLConfig().enabled is False
