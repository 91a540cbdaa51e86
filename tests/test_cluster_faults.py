"""A worker node dies mid-stage on a real multi-node Ray cluster (ray.cluster_utils): the stage still completes
with every sample exactly once."""

import threading
import time
from pathlib import Path

from tests.workspace import make_config, make_workspace


def test_worker_node_removed_mid_extract(tmp_path):
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from pipeline.dialogues import load_dialogues
    from pipeline.shards import StageOutput
    from stages import extract

    # Enough shards that the stage is still running when a node goes, however loaded the machine.
    dialogues, per_shard = 120, 2
    shards = dialogues // per_shard
    root = make_workspace(tmp_path, train=dialogues)
    config = make_config(root, per_shard=per_shard)
    config.extract.num_actors = 2
    ray.shutdown()  # other modules' local cluster, if any: this test needs its own
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        result = {}
        runner = threading.Thread(target=lambda: result.update(report=extract.run(config, "train", progress=False)))
        runner.start()
        out_dir = Path(extract.output_uri(config, "train"))
        deadline = time.monotonic() + 240
        busy: set = set()
        while not (busy and list(out_dir.glob("part-*.parquet"))) and time.monotonic() < deadline:
            busy = {a.node_id for a in list_actors(filters=[("class_name", "=", "FeatureExtractor"),
                                                             ("state", "=", "ALIVE")])}
            time.sleep(0.05)
        victim = next(w for w in workers if w.node_id in busy)
        written = len(list(out_dir.glob("part-*.parquet")))
        assert runner.is_alive() and written < shards, "the stage ended before the fault"
        cluster.remove_node(victim)
        runner.join(timeout=300)
        assert "report" in result, "the stage did not finish after the node was removed"
        assert len([n for n in ray.nodes() if n["Alive"]]) == 3
        out = StageOutput(**extract.output_args(config, "train"))
        assert out.is_complete(deep=True)
        ids = [r["dialogue_id"] for i in range(shards) for r in out.read_records(i)]
        expected = [d.dialogue_id for d in load_dialogues(config.data.train)]
        assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    finally:
        ray.shutdown()
        cluster.shutdown()
