"""evaluate on real Ray with a tiny LLaVA: every method and turn in the tables, scores and table cells equal a plain
recomputation from the stored answers, caching per (method, rate); reports; registry promotion on a real SQLite
MLflow store."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.tiny_models import save_tiny

METHODS = ["random", "sample", "spatial", "fastv", "tome", "prumerge", "prumerge_plus", "visionzip", "metacompress"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from pipeline.datasets.mt_shapes import MTShapesConfig, generate

    root = tmp_path_factory.mktemp("evaluate")
    generate(root / "data", total=6, seed=1, cfg=MTShapesConfig(image_size=32), val=0, test=4, progress=False)
    save_tiny(root / "model", "llava", num_layers=3)
    return root


def make_config(root: Path, rates: list[float]):
    from pipeline.config import config_from_dict, resolve_paths

    data = {"work_dir": str(root / "work"), "model": {"path": str(root / "model")},
            "data": {"train": str(root / "data/train/dialogues.jsonl"), "val": str(root / "data/test/dialogues.jsonl"),
                     "test": str(root / "data/test/dialogues.jsonl")},
            "shards": {"dialogues_per_shard": 2}, "teacher": {"top_k": 4, "max_new_tokens": 2},
            "evaluate": {"methods": METHODS, "rates": rates, "max_new_tokens": 2, "batch_size": 2, "num_actors": 1,
                         "matrix_images": 1},
            "tracking": {"uri": f"sqlite:///{root}/mlflow.db"}}
    return resolve_paths(config_from_dict(data), root)


def save_compressor(config, rate: float, seed: int = 0) -> None:
    import torch

    from compress.metacompress import MetaCompress
    from stages.evaluate import compressor_dir

    from stages.outputs import rate_dir, write_trained_marker

    torch.manual_seed(seed)
    MetaCompress(hidden_size=64, compress_dim=16).save_pretrained(compressor_dir(config, rate))  # untrained
    # as the train stage leaves it: _SUCCESS records the weights' sha256, which evaluate checks (docs/design.md §8)
    write_trained_marker(f"{rate_dir(config, rate)}/_SUCCESS", compressor_dir(config, rate), {"run_hash": "test"})


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_evaluate_tables_match_a_plain_recomputation_and_cache_per_method_and_rate(workspace, ray_local):
    from compress.lvlm import load_adapter
    from compress.lvlm.session import ChatSession
    from pipeline import tracking
    from pipeline.dialogues import load_dialogues
    from pipeline.metrics import exact_match, normalize_vqa_answer
    from pipeline.reports import label
    from pipeline.shards import StageOutput
    from stages import evaluate

    config = make_config(workspace, [0.5])
    for rate in (0.25, 0.5):
        save_compressor(config, rate)
    tracking.log_compressor(evaluate.compressor_dir(config, 0.5), config)  # the candidate, at rate 0.5
    report = evaluate.run(config, "test", progress=False)
    assert report.skipped == [] and report.errors == 0
    assert report.computed == report.shards == 2 * (1 + len(METHODS))  # 2 shards per (method, rate), all new
    assert report.agreement_reference == "full"  # no teacher outputs for this split

    dialogues = load_dialogues(config.data.test)
    jobs, _ = evaluate.plan(config, "test")
    assert [j.key for j in jobs] == ["full"] + [f"{m}@0.5" for m in METHODS]
    stored = {j.key: [r for i in range(2) for r in StageOutput(**j.out_args).read_records(i)] for j in jobs}
    full_answers = {r["dialogue_id"]: r["answers"] for r in stored["full"]}
    table = {(row["rate"], row["method"]): row for row in read_csv(Path(report.reports_dir) / "results.csv")}
    for job in jobs:
        rows = stored[job.key]
        assert [r["dialogue_id"] for r in rows] == [d.dialogue_id for d in dialogues]
        scores = []
        for r, d in zip(rows, dialogues):
            assert len(r["answers"]) == len(d.turns) == 3
            assert r["scores"] == [exact_match(a, list(t.answers)) for a, t in zip(r["answers"], d.turns)]
            scores.append(r["scores"])
        row = table[("0.5", label(job.method))]
        for t in range(3):  # Acc_t: the plain mean over dialogues, in percent
            assert float(row[f"Acc_{t + 1}"]) == pytest.approx(100 * sum(s[t] for s in scores) / len(scores))
        assert float(row["Avg"]) == pytest.approx(sum(float(row[f"Acc_{t}"]) for t in (1, 2, 3)) / 3)
        same = [normalize_vqa_answer(a) == normalize_vqa_answer(full_answers[r["dialogue_id"]][t])
                for r in rows for t, a in enumerate(r["answers"])]
        assert float(row["Agree"]) == pytest.approx(100 * sum(same) / len(same))
    assert float(table[("0.5", "Base")]["Agree"]) == 100.0
    # the paired gap to MetaCompress: the mean of the per-dialogue differences, ± 1.96 standard errors of that mean
    import statistics

    ours = {r["dialogue_id"]: r["scores"] for r in stored["metacompress@0.5"]}
    for job in jobs[1:-1]:
        d = [100 * (sum(ours[r["dialogue_id"]]) - sum(r["scores"])) / 3 for r in stored[job.key]]
        row = table[("0.5", label(job.method))]
        assert float(row["vs_MetaCompress"]) == pytest.approx(statistics.mean(d), abs=1e-9)
        half = statistics.NormalDist().inv_cdf(0.975) * statistics.stdev(d) / len(d) ** 0.5
        assert float(row["vs_MetaCompress_ci95"]) == pytest.approx(half, abs=1e-9)
    assert table[("0.5", "MetaCompress")]["vs_MetaCompress"] == table[("0.5", "Base")]["vs_MetaCompress"] == ""

    # the test split only reports; the registry decides on the validation split (here the same file), with the
    # numbers of that split's table at the candidate's rate
    assert report.promotion is None
    val_report = evaluate.run(config, "val", progress=False)
    val_table = {(row["rate"], row["method"]): row for row in read_csv(Path(val_report.reports_dir) / "results.csv")}
    avg = {row["method"]: float(row["Avg"]) for (rate, _), row in val_table.items() if rate == "0.5"}
    ours = avg.pop(label("metacompress"))
    avg.pop("Base")
    decision = val_report.promotion
    assert decision["rate"] == 0.5 and decision["candidate_avg"] == pytest.approx(ours)
    assert decision["best_baseline_avg"] == pytest.approx(max(avg.values()))
    assert decision["promoted"] == (ours > max(avg.values()))
    closest = max(avg, key=avg.get)
    gap = round(float(val_table[("0.5", closest)]["vs_MetaCompress"]), 2) + 0.0
    assert decision["reason"].endswith("over 4 val dialogues") and f"gap {gap:+.2f} ± " in decision["reason"]
    assert [row["method"] for row in read_csv(Path(report.reports_dir) / "results.csv")][0] == "Base"

    # the stored answers are those of an independent single-dialogue chat session
    adapter = load_adapter(config.model.path)
    for method, key in (("full", "full"), ("sample", "sample@0.5")):
        session = ChatSession(adapter, method, None if method == "full" else 0.5, max_new_tokens=2)
        session.set_image(dialogues[3].image)
        assert [session.ask(t.question).answer for t in dialogues[3].turns] == stored[key][3]["answers"]

    # efficiency: one row per (method, rate, turn); Base keeps every visual token, reduced methods keep fewer
    eff = read_csv(Path(report.reports_dir) / "efficiency_per_turn.csv")
    assert len(eff) == 3 * len(jobs)
    summary = {(s["method"], s["rate"]): s for s in report.summaries}
    assert summary[("full", None)]["visual_tokens"] == 64
    assert summary[("sample", 0.5)]["visual_tokens"] == 32
    assert summary[("sample", 0.5)]["tflops"] < summary[("full", None)]["tflops"]
    for name in ("results.md", "efficiency.csv", "efficiency.md", "accuracy_vs_rate.png", "accuracy_per_turn.png",
                 "accuracy_vs_ttft.png", "metacompress_matrices.png"):
        assert (Path(report.reports_dir) / name).stat().st_size > 0
    markdown = (Path(report.reports_dir) / "results.md").read_text()
    assert all(f"| {label(m)} |" in markdown for m in ["full"] + METHODS)

    # once the teacher stage has run on the split, agreement is measured against its answers; nothing recomputed
    from stages import extract, teacher

    extract.run(config, "test", progress=False)
    teacher.run(config, "test", progress=False)
    shard_files = {p: p.read_bytes() for p in Path(config.work_dir, "evaluate").rglob("part-*")}
    again = evaluate.run(config, "test", progress=False)
    assert again.computed == 0 and again.computed_outputs == [] and again.agreement_reference == "teacher"
    out = StageOutput(**teacher.output_args(config, "test"))
    taught = {r["dialogue_id"]: r["answers"] for i in range(2) for r in out.read_records(i)}
    for s in again.summaries:
        rows = stored[s["method"] if s["rate"] is None else f"{s['method']}@{s['rate']:g}"]
        same = [normalize_vqa_answer(a) == normalize_vqa_answer(taught[r["dialogue_id"]][t])
                for r in rows for t, a in enumerate(r["answers"])]
        assert s["agreement"] == pytest.approx(100 * sum(same) / len(same))
    assert [{k: v for k, v in s.items() if k != "agreement"} for s in again.summaries] == \
        [{k: v for k, v in s.items() if k != "agreement"} for s in report.summaries]

    # a re-run leaves every shard and every report file as it was
    drawn = {p: p.stat().st_mtime_ns for p in Path(report.reports_dir).iterdir()}
    assert evaluate.run(config, "test", progress=False).computed == 0
    assert {p: p.stat().st_mtime_ns for p in Path(report.reports_dir).iterdir()} == drawn  # nothing redrawn
    assert {p: p.read_bytes() for p in Path(config.work_dir, "evaluate").rglob("part-*")} == shard_files

    # a new rate computes only the new (method, rate) outputs; the table gets a second block
    wider = make_config(workspace, [0.5, 0.25])
    more = evaluate.run(wider, "test", progress=False)
    assert more.computed_outputs == [f"{m}@0.25" for m in METHODS] and more.computed == 2 * len(METHODS)
    rows = read_csv(Path(more.reports_dir) / "results.csv")
    assert [(r["rate"], r["method"]) for r in rows] == [(rate, label(m)) for rate in ("0.25", "0.5")
                                                         for m in ["full"] + METHODS]
    assert {p: p.read_bytes() for p in shard_files} == shard_files  # nothing old rewritten


def test_judged_benchmarks_are_refused_before_any_work(workspace, tmp_path):
    import dataclasses
    import json

    from stages import evaluate

    path = tmp_path / "dialogues.jsonl"
    path.write_text(json.dumps({"dialogue_id": "c1", "image": "x.png", "source": "convbench",
                                "turns": [{"question": "Describe it.", "answers": ["a cat"]}]}) + "\n")
    config = make_config(workspace, [0.5])
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, test=str(path)))
    with pytest.raises(ValueError, match="judge"):
        evaluate.run(config, "test", progress=False)


# --- promotion on hand-made numbers with a real registry --------------------------------------------------------------
def test_decide_on_hand_made_numbers():
    from pipeline.registry import decide

    assert decide(60.0, {"sample": 55.0, "random": 50.0}, None)[0]
    assert decide(60.0, {"sample": 55.0}, 59.9)[0]
    assert not decide(60.0, {"sample": 60.0}, None)[0]  # a tie does not beat
    promote, reason = decide(60.0, {"sample": 61.0, "random": 50.0}, None)
    assert not promote and "sample (61.00)" in reason and "random" not in reason
    promote, reason = decide(60.0, {"sample": 50.0}, 60.5)
    assert not promote and "champion" in reason


def test_promotion_with_a_sqlite_registry(workspace):
    import dataclasses

    import torch
    from mlflow import MlflowClient

    from compress.metacompress import MetaCompress
    from pipeline import tracking
    from pipeline.hashing import file_sha256
    from pipeline.registry import CANDIDATE, CHAMPION, Evaluated, promote

    base = make_config(workspace, [0.5])  # the same SQLite store as the stage test (one schema migration)
    config = dataclasses.replace(base, tracking=dataclasses.replace(base.tracking, registered_model="promotion"))
    uri, name = tracking.tracking_uri(config), "promotion"
    sha = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        MetaCompress(hidden_size=8, compress_dim=4).save_pretrained(workspace / f"c{seed}")
        sha[seed] = file_sha256(str(workspace / f"c{seed}/model.safetensors"))
    tracking.setup(config)
    client = MlflowClient(uri, uri)
    assert not promote(uri, name, []).promoted  # no such model, no candidate

    v1 = tracking.log_compressor(workspace / "c0", config).version  # registered with the alias "candidate"
    other = promote(uri, name, [Evaluated(0.9, sha[1], 70.0, {"sample": 1.0}, "k")])
    assert not other.promoted and "weights differ" in other.reason
    first = promote(uri, name, [Evaluated(0.9, sha[0], 60.0, {"sample": 55.0, "random": 50.0}, "k")])
    assert first.promoted and first.rate == 0.9 and first.best_baseline == "sample"
    assert client.get_model_version_by_alias(name, CHAMPION).version == v1
    assert float(client.get_model_version(name, v1).tags["eval_avg_accuracy"]) == 60.0

    v2 = tracking.log_compressor(workspace / "c1", config).version
    assert client.get_model_version_by_alias(name, CANDIDATE).version == v2
    lower = promote(uri, name, [Evaluated(0.9, sha[1], 58.0, {"sample": 50.0}, "k")])  # below the champion's 60
    assert not lower.promoted and lower.champion_avg == 60.0
    assert client.get_model_version_by_alias(name, CHAMPION).version == v1
    assert client.get_model_version(name, v2).tags["promotion"] == "rejected"
    beaten = promote(uri, name, [Evaluated(0.9, sha[1], 58.0, {"sample": 59.0}, "other-protocol")])
    assert not beaten.promoted and beaten.champion_avg is None and "sample (59.00)" in beaten.reason
    higher = promote(uri, name, [Evaluated(0.9, sha[1], 65.0, {"sample": 50.0}, "k")])
    assert higher.promoted and higher.champion_version == v1
    assert client.get_model_version_by_alias(name, CHAMPION).version == v2
    assert "already" in promote(uri, name, [Evaluated(0.9, sha[1], 65.0, {}, "k")]).reason


def test_reports_put_base_first_in_every_rate_block(tmp_path):
    from pipeline.reports import results_markdown, results_rows, write_reports

    def s(method, rate, accs):
        return {"method": method, "rate": rate, "Acc_1": accs[0], "Acc_2": accs[1],
                "Avg": sum(accs) / 2, "agreement": 50.0, "ttft_ms": 10.0, "ttft_ms_std": 1.0, "e2e_ms": 30.0,
                "e2e_ms_std": 2.0, "peak_mem_gb": 0.1, "tflops": 0.5, "kv_cache_len": 20.0, "visual_tokens": 8}

    summaries = [s("sample", 0.9, [40, 50]), s("full", None, [80, 90]), s("sample", 0.7, [60, 70]),
                 s("metacompress", 0.7, [70, 80])]
    header, rows = results_rows(summaries)
    assert header == ["rate", "method", "Acc_1", "Acc_2", "Avg", "Agree", "vs_MetaCompress", "vs_MetaCompress_ci95"]
    assert [(r[0], r[1], r[4]) for r in rows] == [(0.7, "Base", 85.0), (0.7, "Sample", 65.0),
                                                  (0.7, "MetaCompress", 75.0), (0.9, "Base", 85.0),
                                                  (0.9, "Sample", 45.0)]
    assert "| MetaCompress | 70.00 | 80.00 | **75.00** |" in results_markdown(summaries)
    assert "±" not in results_markdown(summaries)  # one seed: no spread
    seeded = dict(s("random", 0.7, [50, 60]), seeds=[0, 1, 2], Acc_1_std=4.0, Acc_2_std=2.5, Avg_std=3.0)
    assert "| Random | 50.00 ± 4.00 | 60.00 ± 2.50 | 55.00 ± 3.00 | 50.00 |" in results_markdown(summaries + [seeded])
    paths = write_reports(summaries, [], tmp_path)
    assert all(p.stat().st_size > 0 for p in paths)


def test_report_files_are_reused_only_while_their_hashes_hold(tmp_path):
    import hashlib

    from stages.evaluate.report_files import write_report_files

    def s(method, rate, avg):
        return {"method": method, "rate": rate, "Acc_1": avg, "Avg": avg, "agreement": 50.0, "ttft_ms": 10.0,
                "e2e_ms": 30.0, "peak_mem_gb": 0.1, "tflops": 0.5, "kv_cache_len": 20.0, "visual_tokens": 8}

    summaries = [s("full", None, 90.0), s("sample", 0.9, 50.0), s("metacompress", 0.9, 70.0)]
    def render():
        return write_report_files(summaries, [], lambda: [], str(tmp_path), 4, "key-1")

    render()
    results = tmp_path / "results.md"
    original = results.read_bytes()
    stamp = json.loads((tmp_path / "_render.json").read_text())
    assert stamp["files"]["results.md"] == hashlib.sha256(original).hexdigest()
    mtime = results.stat().st_mtime_ns
    render()  # same outputs, files intact: nothing is drawn again
    assert results.stat().st_mtime_ns == mtime
    results.write_text("| MetaCompress | 99.99 |\n")  # a hand-edited or damaged table
    render()
    assert results.read_bytes() == original
