"""`metacompress run` on a ConvBench config: the builder reads a table in the official layout, the evaluate stage
answers with the benchmark's own generation settings on real Ray with a tiny LLaVA, a judge endpoint served on
127.0.0.1 by this test scores every turn against the full-token model's answers, and the per-turn scores (S1..S3,
S0) land in the report and in MLflow; Random runs with two seeds and reports mean and spread. The expected scores are
recomputed here from the stored answers with the judge's rule, independently of pipeline.judge."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.test_builders import CB_HEAD_COLUMNS, _cb_row, _write_xlsx
from tests.tiny_models import save_tiny

ORDINALS = ("first", "second", "third")
POSITIONS = [0, 1, 1, 0]  # as the official pairwise.npy: 0 -> the evaluated model is shown as A


def _section(user: str, who: str, ordinal: str) -> str:
    m = re.search(rf"### The {ordinal} turn response from Assistant {who}:\n(.*?)\n\n", user, re.S)
    return m.group(1) if m else ""


class _LongerWins(BaseHTTPRequestHandler):
    """A judge endpoint: for a turn, the longer response of that turn wins (B on equal length); for the whole
    conversation, the longer conversation wins."""

    calls = 0

    def do_POST(self) -> None:  # noqa: N802 (http.server API)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        type(self).calls += 1
        turn = next((o for o in ORDINALS if f"compare the {o} turn responses" in user), None)
        if turn is None:
            a = sum(len(_section(user, "A", o)) for o in ORDINALS)
            b = sum(len(_section(user, "B", o)) for o in ORDINALS)
        else:
            a, b = len(_section(user, "A", turn)), len(_section(user, "B", turn))
        text = f"Step by step... Overall, Response {'A' if a > b else 'B'} is better."
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def judge_endpoint():
    """The judge on 127.0.0.1, for this test only; it shuts itself down after 300 s whatever happens."""
    _LongerWins.calls = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _LongerWins)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    stopper = threading.Timer(300, server.shutdown)
    stopper.daemon = True
    stopper.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    stopper.cancel()
    server.shutdown()
    server.server_close()


def _expected(answers: list[str], full: list[str], model_first: bool) -> tuple[list[float], float]:
    """The endpoint's rule applied to stored answers: per-turn and overall scores of the evaluated model."""
    turns = []
    for a, f in zip(answers, full):
        if a == f:
            turns.append(0.5)
            continue
        shown_a, shown_b = (a, f) if model_first else (f, a)
        a_wins = len(shown_a) > len(shown_b)
        turns.append(1.0 if a_wins == model_first else 0.0)
    if answers == full:
        return turns, 0.5
    la, lb = (sum(map(len, answers)), sum(map(len, full)))
    shown_a, shown_b = (la, lb) if model_first else (lb, la)
    return turns, 1.0 if (shown_a > shown_b) == model_first else 0.0


def test_run_convbench_with_a_judge_endpoint(tmp_path: Path, judge_endpoint, ray_local) -> None:
    import mlflow
    import numpy as np
    import yaml
    from PIL import Image

    from pipeline.commands.cli import main
    from pipeline.datasets import convbench
    from pipeline.shards import StageOutput
    from stages.evaluate.planning import plan

    # the official HEAD layout: one sheet, five columns, no answers
    rows = [_cb_row(i) for i in (1, 2, 3, 4)]
    _write_xlsx(tmp_path / "ConvBench.xlsx", {"multi_turn_benchmark": [CB_HEAD_COLUMNS] + rows})
    rng = np.random.default_rng(0)
    for i in (1, 2, 3, 4):
        path = tmp_path / "visit_bench_images" / f"{i}_tested_skill_x.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
    assert main(["data", "convbench", "--table", str(tmp_path / "ConvBench.xlsx"), "--images",
                 str(tmp_path / "visit_bench_images"), "--out", str(tmp_path / "convbench")]) == 0
    (tmp_path / "pairwise.json").write_text(json.dumps(POSITIONS))
    save_tiny(tmp_path / "model", "llava", num_layers=2)
    dialogues = str(tmp_path / "convbench" / "dialogues.jsonl")
    config = {"work_dir": str(tmp_path / "work"), "model": {"path": str(tmp_path / "model")},
              "data": {"train": dialogues, "val": dialogues, "test": dialogues},
              "shards": {"dialogues_per_shard": 2},
              "evaluate": {"methods": ["random", "sample"], "rates": [0.5], "batch_size": 2, "matrix_images": 0,
                           "seeds": [0, 1],
                           "generation": [{"source": "convbench", "max_new_tokens": 5, "stop": ["\n"]}],
                           "judge": {"url": judge_endpoint, "model": "local-judge", "positions": "pairwise.json",
                                     "retries": 1, "backoff_s": 0.1}},
              "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}}
    (tmp_path / "convbench.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "convbench.yaml"), "--stages", "evaluate"]) == 0

    from pipeline.config import load_config

    cfg = load_config(tmp_path / "convbench.yaml")
    jobs, _ = plan(cfg, "test")
    assert [j.key for j in jobs] == ["full", "random@0.5/seed0", "random@0.5/seed1", "sample@0.5"]
    stored = {j.key: [r for i in range(2) for r in StageOutput(**j.out_args).read_records(i)] for j in jobs}
    assert all(len(a.split()) <= 5 and "\n" not in a for r in stored["full"] for a in r["answers"])
    full = {r["dialogue_id"]: r["answers"] for r in stored["full"]}
    row_of = {f"convbench-{i}": i for i in (1, 2, 3, 4)}
    expected = {}
    for key, rows_ in stored.items():
        per = [_expected(r["answers"], full[r["dialogue_id"]], POSITIONS[row_of[r["dialogue_id"]] - 1] == 0)
               for r in rows_]
        expected[key] = {**{f"S{t + 1}": 100 * sum(p[0][t] for p in per) / len(per) for t in range(3)},
                         "S0": 100 * sum(p[1] for p in per) / len(per)}
        expected[key]["Avg"] = sum(expected[key][f"S{t}"] for t in (1, 2, 3)) / 3
    assert expected["full"] == {"S1": 50.0, "S2": 50.0, "S3": 50.0, "S0": 50.0, "Avg": 50.0}
    seeds = [expected["random@0.5/seed0"], expected["random@0.5/seed1"]]
    mean = {k: (seeds[0][k] + seeds[1][k]) / 2 for k in seeds[0]}
    spread = abs(seeds[0]["Avg"] - seeds[1]["Avg"]) / 2 ** 0.5  # sample std of two values

    # the report: summaries.json (and the results table) hold the per-turn judge scores
    summaries = json.loads(Path(cfg.work_dir, "reports", "test", "summaries.json").read_text())
    by = {(s["method"], s["rate"]): s for s in summaries}
    assert set(by) == {("full", None), ("random", 0.5), ("sample", 0.5)}
    for key, (method, rate) in (("full", ("full", None)), ("sample@0.5", ("sample", 0.5))):
        for k, v in expected[key].items():
            assert by[(method, rate)][k] == pytest.approx(v), (key, k)
        assert by[(method, rate)]["Acc_1"] == pytest.approx(expected[key]["S1"])
    for k, v in mean.items():
        assert by[("random", 0.5)][k] == pytest.approx(v), k
    assert by[("random", 0.5)]["seeds"] == 2 and by[("random", 0.5)]["Avg_std"] == pytest.approx(spread)
    assert "| Base |" in Path(cfg.work_dir, "reports", "test", "results.md").read_text()

    # MLflow: the evaluate run holds every per-turn score
    mlflow.set_tracking_uri(cfg.tracking.uri)
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    metrics = next(r.data.metrics for r in runs if "sample/r0.5/S1" in r.data.metrics)
    for t in ("S1", "S2", "S3", "S0"):
        assert metrics[f"sample/r0.5/{t}"] == pytest.approx(expected["sample@0.5"][t])
        assert metrics[f"random/r0.5/{t}"] == pytest.approx(mean[t])
        assert metrics[f"full/{t}"] == 50.0
    assert metrics["random/r0.5/Avg_std"] == pytest.approx(spread)

    # a re-run asks the judge nothing: every judgement comes from the cache
    calls = _LongerWins.calls
    assert calls > 0
    assert main(["run", str(tmp_path / "convbench.yaml"), "--stages", "evaluate"]) == 0
    assert _LongerWins.calls == calls
    assert convbench.SOURCE == "convbench"
