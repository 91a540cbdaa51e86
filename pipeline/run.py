"""`metacompress run [CONFIG] [--stages ...]`: the stages in order, each skipping what is already computed."""

from __future__ import annotations

import importlib
import logging

from pipeline.config import PipelineConfig, load_config

# stage -> (module, splits it runs on). Order matters: each stage reads the previous one's outputs.
STAGES = {
    "extract": ("stages.extract", ["train", "test"]),
    "teacher": ("stages.teacher", ["train", "test"]),
}


def parse_stages(text: str | None) -> list[str]:
    names = list(STAGES) if not text else [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}; stages are {', '.join(STAGES)}")
    return [s for s in STAGES if s in names]


def parse_overrides(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set train.lr=0.01")
        out[key] = yaml.safe_load(value)
    return out


def run_pipeline(config: PipelineConfig, stage_names: list[str], progress: bool = True) -> list:
    from pathlib import Path

    from pipeline.cluster import init_ray

    Path(config.work_dir).mkdir(parents=True, exist_ok=True)
    config.save(Path(config.work_dir) / "resolved_config.yaml")
    init_ray(config)
    reports = []
    for name in stage_names:
        module_name, splits = STAGES[name]
        module = importlib.import_module(module_name)
        for split in splits:
            report = module.run(config, split, progress=progress)
            print(report.line(), flush=True)
            reports.append(report)
    return reports


def run_command(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = parse_overrides(args.set)
    if args.overwrite:
        overrides["shards.overwrite"] = True
    config = load_config(args.config, overrides)
    run_pipeline(config, parse_stages(args.stages))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="run the pipeline stages (default: all) for a config")
    p.add_argument("config", nargs="?", help="YAML config (default: the embedded default)")
    p.add_argument("--stages", help=f"comma-separated subset of: {', '.join(STAGES)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--overwrite", action="store_true", help="delete outputs made with another config and recompute")
    p.set_defaults(func=run_command)
