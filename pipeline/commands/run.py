"""`metacompress run [CONFIG] [--stages ...]`: the stages in order, each skipping what is already computed."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from pipeline import storage
from pipeline.config import GENERATED_DIRS, ConfigError, PipelineConfig, load_config

# stage -> (module, splits it runs on). Order matters: each stage reads the previous one's outputs.
STAGES = {
    "extract": ("stages.extract", ["train", "val", "test"]),
    "teacher": ("stages.teacher", ["train", "val", "test"]),
    "train": ("stages.train", ["train"]),  # early stopping and candidates read the val split's targets
    "tprl": ("stages.tprl", ["train"]),  # skipped unless tprl.enabled
    "evaluate": ("stages.evaluate", ["val", "test"]),  # the registry promotes on val; test is what is reported
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


def _local_dir(config: PipelineConfig) -> str:
    """Where files that must be local go (logs, generated data): the work_dir, or for a storage URI its local
    directory (pipeline.storage.local_cache, docs/design.md §6.4)."""
    return storage.local_cache(config.work_dir) if storage.is_remote(config.work_dir) else config.work_dir


def prepare_data(config: PipelineConfig) -> None:
    """Generate MT-Shapes or MT-Video when the config asks for it (once: an existing set is reused)."""
    if config.data.mt_video is not None:
        return _prepare_mt_video(config)
    spec = config.data.mt_shapes
    if spec is None:
        return
    from pipeline.datasets.mt_shapes import MTShapesConfig, generate

    root = Path(_local_dir(config)) / GENERATED_DIRS["mt_shapes"]
    if not (root / "mt_shapes.json").is_file():
        cfg = MTShapesConfig(image_size=spec.image_size, aspect=None if spec.random_aspect else 1.0)
        generate(root, total=spec.dialogues, seed=spec.seed, cfg=cfg, val=spec.val, test=spec.test)
    for split in ("train", "val", "test"):
        setattr(config.data, split, str(root / split / "dialogues.jsonl"))


def _prepare_mt_video(config: PipelineConfig) -> None:
    from pipeline.datasets.mt_video import MTVideoConfig, generate

    spec = config.data.mt_video
    root = Path(_local_dir(config)) / GENERATED_DIRS["mt_video"]
    if not (root / "mt_video.json").is_file():
        cfg = MTVideoConfig(image_size=spec.image_size, frames=spec.frames, fps=spec.fps)
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
        mlflow.log_text(storage.read_bytes(f"{report.uri}/_manifest.json").decode(), f"{name}-{split}-manifest.json")
    return report


def _check_model(config: PipelineConfig) -> str:
    from compress.lvlm import model_family

    try:
        return model_family(config.model.path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.path: {err}") from None


def _check_methods(config: PipelineConfig, family: str) -> None:
    """evaluate.methods exist, and each applies to the model family at every evaluate rate."""
    import json

    from compress.lvlm.methods import available_methods

    known = available_methods()
    unknown = [m for m in config.evaluate.methods if m not in known]
    if unknown:
        raise ConfigError(f"evaluate.methods: unknown method {unknown[0]!r}; known methods: {', '.join(sorted(known))}")
    if "tome" in config.evaluate.methods and family == "llava":
        from compress.baselines.tome import tome_schedule
        from compress.reduction import num_keep

        cfg = json.loads(Path(config.model.path, "config.json").read_text())
        vision = cfg.get("vision_config", {})
        layers = int(vision.get("num_hidden_layers", 24))
        n = (int(vision.get("image_size", 336)) // int(vision.get("patch_size", 14))) ** 2
        run = int(cfg.get("vision_feature_layer", -2)) % (layers + 1)
        for rate in config.evaluate.rates:
            try:
                tome_schedule(n + 1, num_keep(n, rate) + 1, run)
            except ValueError as err:
                raise ConfigError(f"evaluate.methods: tome at evaluate.rates {rate}: {err}; remove tome or that rate "
                                  "(ToMe merges at most half the tokens per vision layer)") from None


def _check_data(config: PipelineConfig, stage_names: list[str]) -> None:
    """Each dialogue file the stages read exists and holds at least one valid record."""
    from pipeline.dialogues import iter_dialogues

    if config.data.mt_shapes is not None or config.data.mt_video is not None:
        return  # generated by prepare_data
    splits = sorted({split for name in stage_names for split in STAGES[name][1]})
    for split in splits:
        path = getattr(config.data, split)
        if not Path(path).is_file():
            raise ConfigError(f"data.{split}: {path} does not exist; point it at a dialogues.jsonl file (or build one "
                              "with `metacompress data ...`)")
        first_bad: list = []
        for _ in iter_dialogues(path, check_images=False, on_error=lambda e: first_bad.append(e) if not first_bad
                                else None):
            break
        else:
            why = f"; first bad record: {first_bad[0].path}:{first_bad[0].line}: {first_bad[0].reason}" \
                if first_bad else " (it is empty)"
            raise ConfigError(f"data.{split}: {path} holds no valid dialogue{why}")


def preflight(config: PipelineConfig, stage_names: list[str]) -> None:
    """Everything that can be checked before any work starts (docs/design.md §8): the model directory and family,
    the methods against the family and rates, the dialogue files. Ranges are checked when the config loads."""
    family = _check_model(config)
    if "evaluate" in stage_names:
        _check_methods(config, family)
    if config.extract.cache == "pre_projector" and family not in ("llava", "llava_next"):
        raise ConfigError(f"extract.cache: pre_projector caches a CLIP tower's selected layer before a separate "
                          f"projector; {family} merges inside its vision tower: use post_projector or none")
    _check_data(config, stage_names)
    _check_video(config, stage_names)


def _check_video(config: PipelineConfig, stage_names: list[str]) -> None:
    """Video dialogues: one kind per run, a family with a video path, no TPRL (docs/design.md §5, video)."""
    from stages.common import video_sampling

    try:
        video = video_sampling(config)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if video is not None and config.tprl.enabled and "tprl" in stage_names:
        raise ConfigError("tprl.enabled: TPRL does not run on video dialogues; set tprl.enabled: false for this run")


def run_pipeline(config: PipelineConfig, stage_names: list[str], progress: bool = True, checked: bool = False) -> list:
    import ray

    from pipeline import tracking
    from pipeline.cluster import init_ray
    from pipeline.lease import Lease
    from stages.common import actors_kept_for_stage

    if not checked:
        preflight(config, stage_names)
    if not storage.is_remote(config.work_dir):
        Path(config.work_dir).mkdir(parents=True, exist_ok=True)
    with Lease(config.work_dir):  # one run per work_dir (docs/design.md §8)
        closed = tracking.close_stale_runs(config)
        if closed:
            logging.getLogger("metacompress").warning(
                "closed %d MLflow run(s) left RUNNING by a killed run on this work_dir (now KILLED)", len(closed))
        prepare_data(config)
        import yaml

        storage.write_bytes(f"{config.work_dir}/resolved_config.yaml",
                            yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
        started_ray = not ray.is_initialized()
        init_ray(config)
        reports = []
        try:
            with tracking.pipeline_run(config):
                for name in stage_names:
                    with actors_kept_for_stage():  # a model loads once per stage, not per split
                        for split in STAGES[name][1]:
                            report = run_stage(config, name, split, progress)
                            print(report.line(), flush=True)
                            logging.getLogger("metacompress.report").info(report.line())  # the log file too
                            reports.append(report)
        finally:
            if started_ray:  # the Ray processes this run started end with it
                ray.shutdown()
    return reports


def print_summary(config: PipelineConfig, reports: list) -> None:
    from pipeline import tracking

    for report in reports:
        reports_dir = getattr(report, "reports_dir", None)
        if getattr(report, "promotion", None):
            print(f"\nRegistry ({report.split} split): {report.promotion['reason']}")
        if reports_dir and getattr(report, "split", "test") != "val":
            print("\n" + storage.read_bytes(f"{reports_dir}/results.md").decode())
            print(f"Tables and plots: {reports_dir}")
    uri = tracking.tracking_uri(config)
    if uri.startswith("sqlite:"):
        print(f"MLflow UI: .venv/bin/mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)")
    else:
        print(f"MLflow tracking server: {uri}")


def run_command(args) -> int:
    from pipeline.env import configure_logging, verbose

    configure_logging(None)
    overrides = parse_overrides(args.set)
    if args.overwrite:
        overrides["shards.overwrite"] = True
    if args.verify:
        overrides["shards.verify"] = True
    config = load_config(args.config or DEFAULT_CONFIG, overrides)
    stage_names = parse_stages(args.stages)
    preflight(config, stage_names)  # before anything is written
    # everything in a log file in the work_dir (a remote one's local directory); the console stays quiet
    log_file = configure_logging(str(Path(_local_dir(config)) / "logs"))
    if not verbose():
        print(f"log: {log_file} (--verbose to see it all here)", flush=True)
    reports = run_pipeline(config, stage_names, checked=True)
    print_summary(config, reports)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="run the pipeline stages (default: all) for a config")
    p.add_argument("config", nargs="?", help="YAML config (default: the embedded default)")
    p.add_argument("--stages", help=f"comma-separated subset of: {', '.join(STAGES)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--overwrite", action="store_true", help="delete outputs made with another config and recompute")
    p.add_argument("--verify", action="store_true",
                   help="hash every finished shard before reusing it (default: its sidecar and size; readers hash "
                        "each shard they read)")
    p.set_defaults(func=run_command)
