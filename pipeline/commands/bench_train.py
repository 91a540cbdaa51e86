"""`metacompress bench train CONFIG`: training steps per second with the cached teacher against the online teacher
(paper Algorithm 1: vision tower + teacher generation every step), and peak memory per worker.

Both runs use the real trainer (Ray Train + DeepSpeed, ``train.num_workers`` workers, ``train.zero_stage``) on the
first ``--shards`` shards of the config's train split, for one epoch, writing only under a temporary directory
(no MLflow run, no registered model). The cached run needs the extract and teacher stages done for the config.
"""

from __future__ import annotations

import copy
import tempfile


def _trim(plan: dict, shards: int) -> dict:
    plan = dict(plan)
    plan["shard_rows"] = plan["shard_rows"][:shards]
    if "shards" in plan:
        plan["shards"] = plan["shards"][:shards]
    return plan


def bench_train(args) -> None:
    from pipeline.cluster import init_ray
    from pipeline.commands.run import prepare_data
    from pipeline.config import load_config
    from stages.train import make_plan, train_rate

    config = load_config(args.config)
    prepare_data(config)  # an MT-Shapes config names its splits only once they are generated
    config.train.epochs = 1
    if args.zero_stage is not None:
        config.train.zero_stage = args.zero_stage
    if args.workers is not None:
        config.train.num_workers = args.workers
    rate = args.rate if args.rate is not None else config.train.rates[0]
    init_ray(config)
    rows = []
    for mode in ("cached", "online"):
        cfg = copy.deepcopy(config)
        cfg.train.online_teacher = mode == "online"
        plan = make_plan(cfg, "train")
        if plan is None:
            raise FileNotFoundError(f"bench train: no {mode} training data for {args.config}; run "
                                    "`metacompress run CONFIG --stages extract,teacher` first")
        with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
            cfg.work_dir = tmp
            metrics = train_rate(cfg, rate, _trim(plan, args.shards), heldout=None, tracking_run_id=None)
        rows.append((mode, metrics))
    print(f"model: {config.model.path}, rate {rate}, workers {config.train.num_workers}, "
          f"ZeRO-{config.train.zero_stage}, batch {config.train.batch_size}, first {args.shards} shards, 1 epoch")
    print("| teacher | steps | steps/s | dialogues/s | setup s | peak memory per worker |")
    print("|---|---|---|---|---|---|")
    for mode, m in rows:
        print(f"| {mode} | {m['step']} | {m['steps_per_second']:.3f} | "
              f"{m['steps_per_second'] * config.train.batch_size:.2f} | {m['setup_seconds']:.1f} | "
              f"{m['peak_memory_bytes_per_worker'] / 2 ** 30:.2f} GiB |")
    cached, online = rows[0][1]["steps_per_second"], rows[1][1]["steps_per_second"]
    print(f"cached / online steps per second: {cached / online:.2f}x" if online else "online made no steps")


def register_bench(which) -> None:
    """Add `train` to the `bench` sub-command parsers (``which`` = the bench subparsers)."""
    p = which.add_parser("train", help="training steps/s with the cached vs the online teacher, peak memory")
    p.add_argument("config", help="YAML config whose extract + teacher stages are done")
    p.add_argument("--shards", type=int, default=4, help="train on the first N shards of the split (one epoch)")
    p.add_argument("--rate", type=float, default=None, help="reduction rate (default: the first of train.rates)")
    p.add_argument("--workers", type=int, default=None, help="override train.num_workers")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None, help="override train.zero_stage")
    p.set_defaults(func=bench_train)
