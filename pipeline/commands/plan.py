"""`metacompress plan CONFIG`: GPU memory per stage actor against the cluster file's GPU types; refuses a plan that
does not fit, saying what to change (infra.memory_plan holds the arithmetic; docs/design.md §6.4)."""

from __future__ import annotations

from pathlib import Path

CLUSTER_FILE = Path(__file__).resolve().parents[2] / "ray_cluster.yaml"


def model_shape(config, arch: str | None, max_pixels: int | None = None):
    """The shape of ``--arch`` (a known architecture, no weights needed) or of ``model.path``'s config.json. A
    dynamic-resolution family (Qwen) is planned at ``max_pixels``, by default its processor's."""
    from infra.architectures import build_config
    from infra.memory_plan import QWEN_FAMILIES, ModelShape

    if arch:
        model_config, source = build_config(arch), arch
    else:
        from transformers import AutoConfig

        if not Path(config.model.path, "config.json").is_file():
            raise FileNotFoundError(f"model.path: {config.model.path} has no config.json; point model.path at a model "
                                    "directory or pass --arch (e.g. llava-next-7b)")
        model_config, source = AutoConfig.from_pretrained(config.model.path), config.model.path
    if model_config.model_type in QWEN_FAMILIES and not max_pixels:
        max_pixels = processor_max_pixels(arch, None if arch else Path(config.model.path))
    return ModelShape.of(model_config, max_pixels), source


def processor_max_pixels(arch: str | None, model_dir: Path | None) -> int | None:
    """The largest image (pixels) a Qwen processor keeps: ``max_pixels`` or ``size.longest_edge`` of the model's
    ``preprocessor_config.json``, or of the processor ``--arch`` builds; None when neither says."""
    import json

    if arch:
        from infra.architectures import build_image_processor, get_architecture

        return build_image_processor(get_architecture(arch)).size.get("longest_edge")
    path = model_dir / "preprocessor_config.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data.get("max_pixels") or (data.get("size") or {}).get("longest_edge")


def gpu_types(cluster_file: Path | None, gpus: list[str]) -> dict[str, str]:
    """node type (or "--gpu") -> GPU type."""
    import yaml

    from infra.memory_plan import GPUS, cluster_gpus

    if gpus:
        unknown = [g for g in gpus if g not in GPUS]
        if unknown:
            raise ValueError(f"--gpu {unknown[0]}: unknown GPU type; known: {', '.join(GPUS)}")
        return {f"--gpu {g}": g for g in gpus}
    found = cluster_gpus(yaml.safe_load(Path(cluster_file).read_text()))
    if not found:
        raise ValueError(f"{cluster_file}: no node type with a GPU (an AWS InstanceType of a known family, or "
                         "resources naming a GPU type); pass --gpu TYPE")
    return found


def markdown(rows, types: dict[str, str], model: str, note: str = "") -> str:
    from infra.memory_plan import GIB, usable_bytes

    lines = [f"Memory per actor, GiB ({model}); a stage fits where the total <= the usable memory."
             + (f" Assumed: {note}." if note else ""), "",
             "| stage | batch | tokens | weights | KV cache | activations | FastV scores | total | "
             + " | ".join(f"{gpu} ({usable_bytes(gpu) / GIB:.1f})" for gpu in dict.fromkeys(types.values())) + " |",
             "|---|---:|---:|---:|---:|---:|---:|---:|" + "---|" * len(set(types.values()))]
    for r in rows:
        fits = " | ".join("fits" if r.total <= usable_bytes(gpu) else "**no**" for gpu in dict.fromkeys(types.values()))
        lines.append(f"| {r.stage} | {r.batch} | {r.tokens} | {r.weights / GIB:.1f} | {r.kv_cache / GIB:.1f} | "
                     f"{r.activations / GIB:.1f} | {r.fastv / GIB:.1f} | {r.total / GIB:.1f} | {fits} |")
    return "\n".join(lines)


def check_plan(config, arch: str | None = None, cluster_file: Path | None = CLUSTER_FILE, gpus: list[str] = (),
               turns: int = 3, max_pixels: int | None = None) -> tuple[str, str | None]:
    """-> (the plan as Markdown, None) or (the plan, one line naming the stage, the node type, its GPU and what to
    change) when a stage does not fit every GPU type of the cluster (an actor can land on any of them)."""
    from infra.memory_plan import GIB, advice, misfits, stage_memory, usable_bytes

    shape, model = model_shape(config, arch, max_pixels)
    types = gpu_types(cluster_file, list(gpus))
    rows = stage_memory(shape, config, turns)
    table = markdown(rows, types, model, shape.note)
    for node, gpu in types.items():
        for row in misfits(rows, gpu):
            return table, (f"stage {row.stage} needs {row.total / GIB:.1f} GiB per actor but {node} has {gpu} with "
                           f"{usable_bytes(gpu) / GIB:.1f} GiB usable: {advice(row, shape, config, gpu)}")
    return table, None


def plan_command(args) -> int:
    from pipeline.commands.run import parse_overrides
    from pipeline.config import load_config

    config = load_config(args.config, parse_overrides(args.set))
    table, problem = check_plan(config, args.arch, Path(args.cluster), args.gpu, args.turns, args.max_pixels)
    print(table)
    if problem:
        raise ValueError(problem)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="GPU memory per stage against the cluster's GPUs (refuses what won't fit)")
    p.add_argument("config", help="YAML config")
    p.add_argument("--arch", help="plan for a known architecture instead of model.path (llava-1.5-7b, llava-next-7b, "
                   "qwen2.5-vl-7b)")
    p.add_argument("--max-pixels", type=int, help="Qwen (dynamic resolution): plan for images of at most this many "
                   "pixels (default: the processor's max_pixels)")
    p.add_argument("--cluster", default=str(CLUSTER_FILE), help="Ray cluster-launcher file (default: ray_cluster.yaml)")
    p.add_argument("--gpu", action="append", default=[], help="plan for this GPU type instead of the cluster file's")
    p.add_argument("--turns", type=int, default=3, help="dialogue turns (default: 3)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.set_defaults(func=plan_command)
