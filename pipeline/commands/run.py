"""`metacompress run [CONFIG] [--stages ...]`: the stages in order, each skipping what is already computed."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from pipeline.config import PipelineConfig, load_config

# stage -> (module, splits it runs on). Order matters: each stage reads the previous one's outputs.
STAGES = {
    "extract": ("stages.extract", ["train", "test"]),
    "teacher": ("stages.teacher", ["train", "test"]),
    "train": ("stages.train", ["train"]),
    "tprl": ("stages.tprl", ["train"]),  # skipped unless tprl.enabled
    "evaluate": ("stages.evaluate", ["test"]),
}
# Stages that open their own MLflow run (with their own metrics); the others get one here.
SELF_TRACKED = {"train", "tprl", "evaluate"}
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "infra" / "configs" / "default.yaml"


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


def prepare_data(config: PipelineConfig) -> None:
    """Generate MT-Shapes when the config asks for it (once: an existing set is reused)."""
    spec = config.data.mt_shapes
    if spec is None:
        return
    from pipeline.datasets.mt_shapes import MTShapesConfig, generate

    root = Path(config.work_dir) / "data" / "mt-shapes"
    if not (root / "mt_shapes.json").is_file():
        cfg = MTShapesConfig(image_size=spec.image_size, aspect=None if spec.random_aspect else 1.0)
        generate(root, total=spec.dialogues, seed=spec.seed, cfg=cfg, val=spec.val, test=spec.test)
    for split in ("train", "val", "test"):
        setattr(config.data, split, str(root / split / "dialogues.jsonl"))


def run_stage(config: PipelineConfig, name: str, split: str, progress: bool):
    from pipeline import tracking

    module = importlib.import_module(STAGES[name][0])
    if name in SELF_TRACKED:
        return module.run(config, split, progress=progress)
    import mlflow

    with tracking.stage_run(config, f"{name}/{split}"):
        report = module.run(config, split, progress=progress)
        mlflow.log_metrics({"shards": report.shards, "computed_shards": report.computed, "records": report.records,
                            "errors": report.errors, "seconds": report.seconds})
        mlflow.log_text(Path(report.uri, "_manifest.json").read_text(), f"{name}-{split}-manifest.json")
    return report


def run_pipeline(config: PipelineConfig, stage_names: list[str], progress: bool = True) -> list:
    from pipeline import tracking
    from pipeline.cluster import init_ray

    Path(config.work_dir).mkdir(parents=True, exist_ok=True)
    prepare_data(config)
    config.save(Path(config.work_dir) / "resolved_config.yaml")
    init_ray(config)
    reports = []
    with tracking.pipeline_run(config):
        for name in stage_names:
            for split in STAGES[name][1]:
                report = run_stage(config, name, split, progress)
                print(report.line(), flush=True)
                reports.append(report)
    return reports


def print_summary(config: PipelineConfig, reports: list) -> None:
    from pipeline import tracking

    for report in reports:
        reports_dir = getattr(report, "reports_dir", None)
        if reports_dir:
            print("\n" + Path(reports_dir, "results.md").read_text())
            print(f"Tables and plots: {reports_dir}")
    uri = tracking.tracking_uri(config)
    if uri.startswith("sqlite:"):
        print(f"MLflow UI: .venv/bin/mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)")
    else:
        print(f"MLflow tracking server: {uri}")


def run_command(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = parse_overrides(args.set)
    if args.overwrite:
        overrides["shards.overwrite"] = True
    config = load_config(args.config or DEFAULT_CONFIG, overrides)
    reports = run_pipeline(config, parse_stages(args.stages))
    print_summary(config, reports)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="run the pipeline stages (default: all) for a config")
    p.add_argument("config", nargs="?", help="YAML config (default: the embedded default)")
    p.add_argument("--stages", help=f"comma-separated subset of: {', '.join(STAGES)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--overwrite", action="store_true", help="delete outputs made with another config and recompute")
    p.set_defaults(func=run_command)
