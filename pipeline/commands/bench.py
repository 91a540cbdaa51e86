"""`metacompress bench ...`: benchmarks whose figures go in the README (never timed assertions in tests)."""

from __future__ import annotations

import statistics
import time

# Visual sequences of the 7B models the paper reports on: LLaVA-1.5 (24x24 grid) and LLaVA-NeXT at 672x672
# (24x24 base + 48x47 unpadded crop grid whose 48 rows each end with a newline token: 2880 tokens).
SHAPES = {
    "llava-1.5-7b": {"hidden": 4096, "base": (24, 24), "crops": None},
    "llava-next-7b": {"hidden": 4096, "base": (24, 24), "crops": (48, 47)},
}


def visual_layout(base: tuple[int, int], crops: tuple[int, int] | None):
    from compress.layout import Layout, Segment

    if crops is None:
        return Layout.grid(*base)
    n_base = base[0] * base[1]
    rows, cols = crops
    segments = (Segment("base", *base, 0, base[1]), Segment("crops", rows, cols, n_base, cols + 1))
    newlines = tuple(n_base + r * (cols + 1) + cols for r in range(rows))
    return Layout(n_base + rows * (cols + 1), segments, newlines)


def time_call(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_reducer(args) -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from compress.baselines import FEATURE_REDUCERS
    from compress.flops import LLAMA_7B, llama_prefill_flops, metacompress_flops
    from compress.metacompress import MetaCompress
    from compress.reduction import num_keep

    torch.manual_seed(0)
    print(f"device: cpu, torch threads: {torch.get_num_threads()}, text tokens per prompt: {args.text_tokens}, "
          f"repeats: {args.repeats} (median)")
    header = ("| shape | n | rate | m | method | reducer ms | reducer GFLOPs (counted / analytic) "
              "| 7B prefill TFLOPs | reducer / prefill FLOPs |")
    print(header)
    print("|---" * 9 + "|")
    for shape_name, spec in SHAPES.items():
        layout = visual_layout(spec["base"], spec["crops"])
        n, d = layout.num_tokens, spec["hidden"]
        x = torch.randn(n, d)
        module = MetaCompress(d, compress_dim=args.compress_dim).eval()
        methods = {"metacompress": module, "sample": FEATURE_REDUCERS["sample"],
                   "spatial": FEATURE_REDUCERS["spatial"]}
        for rate in args.rates:
            m = num_keep(n, rate)
            prefill = llama_prefill_flops(LLAMA_7B, m + args.text_tokens)
            for name, reduce in methods.items():
                def call():
                    with torch.no_grad():
                        return reduce(x, m, layout)
                seconds = time_call(call, args.repeats)
                with FlopCounterMode(display=False) as counter:
                    call()
                counted = counter.get_total_flops()
                analytic = metacompress_flops(n, m, d, args.compress_dim) if name == "metacompress" else None
                analytic_text = f"{analytic / 1e9:.2f}" if analytic is not None else "-"
                print(f"| {shape_name} | {n} | {rate} | {m} | {name} | {seconds * 1e3:.1f} | "
                      f"{counted / 1e9:.2f} / {analytic_text} | {prefill / 1e12:.2f} | {100 * counted / prefill:.3f} % |")


def bench_extract(args) -> None:
    """Extract-stage throughput against a bare in-process loop, a no-op re-run, and the teacher cache size."""
    import tempfile
    from pathlib import Path

    from compress.lvlm import load_adapter
    from pipeline.cluster import init_ray
    from pipeline.config import config_from_dict, resolve_paths
    from pipeline.datasets.mt_shapes import MTShapesConfig, generate
    from pipeline.dialogues import load_dialogues
    from pipeline.shards import StageOutput, bytes_per_answer_token
    from stages import extract, teacher

    root = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-extract-"))
    if args.arch:  # an architecture with random weights, saved as a model directory (throughput needs no training)
        from infra.architectures import build_adapter

        built = build_adapter(args.arch)
        args.model = str(root / f"model-{args.arch}")
        for part in (built.model, built.tokenizer, built.image_processor):
            part.save_pretrained(args.model)
    if args.dialogues:
        data = args.dialogues
    else:
        generate(root / "data", total=args.count, seed=0, cfg=MTShapesConfig(image_size=args.image_size), val=0, test=0)
        data = str(root / "data/train/dialogues.jsonl")
    config = resolve_paths(config_from_dict({
        "work_dir": str(root / "work"), "model": {"path": args.model}, "data": {"train": data},
        "shards": {"dialogues_per_shard": args.per_shard}, "extract": {"num_actors": args.actors},
        "teacher": {"top_k": args.top_k}, "ray": {"num_cpus": args.actors}}), Path.cwd())
    images = [d.image for d in load_dialogues(data)]

    start = time.perf_counter()
    adapter = load_adapter(config.model.path)
    loaded = time.perf_counter()
    for image in images:
        adapter.encode(image)
    bare_s, bare_load_s = time.perf_counter() - loaded, loaded - start
    del adapter

    init_ray(config)
    start = time.perf_counter()
    report = extract.run(config, "train")
    stage_s = time.perf_counter() - start
    start = time.perf_counter()
    extract.run(config, "train", progress=False)
    noop_s = time.perf_counter() - start
    teacher_report = teacher.run(config, "train")
    per_token = bytes_per_answer_token(StageOutput(**teacher.output_args(config, "train")), teacher_report.shards)

    bare_rate = len(images) / bare_s
    stage_rate = report.records / stage_s
    print(f"model: {config.model.path}; {len(images)} images; {args.actors} actor(s) on {args.actors} CPU(s)")
    print("| measure | value |\n|---|---|")
    print(f"| bare in-process loop (model loaded once, {bare_load_s:.1f} s load not counted) | {bare_rate:.1f} images/s |")
    print(f"| extract stage (actor start-up, shard writes and validation included) | {stage_rate:.1f} images/s |")
    print(f"| stage / bare | {stage_rate / bare_rate:.2f} |")
    print(f"| no-op re-run of the finished stage | {noop_s:.2f} s |")
    print(f"| teacher cache at k = {args.top_k} | {per_token:.0f} bytes per answer token |")


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks (figures recorded in the README)")
    which = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    p = which.add_parser("reducer", help="reducer time and FLOPs against a 7B Llama prefill, at LLaVA-1.5/NeXT shapes")
    p.add_argument("--rates", type=float, nargs="+", default=[0.7, 0.9])
    p.add_argument("--text-tokens", type=int, default=64, help="prompt text tokens added to the visual ones")
    p.add_argument("--compress-dim", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.set_defaults(func=bench_reducer)

    p = which.add_parser("extract", help="extract-stage throughput vs a bare loop, no-op re-run, teacher cache size")
    p.add_argument("--model", default="infra/reference/llava", help="model directory (default: the reference LLaVA)")
    p.add_argument("--arch", help="instead of --model: an architecture of infra/architectures.py with random weights")
    p.add_argument("--dialogues", help="dialogues.jsonl (default: freshly generated MT-Shapes)")
    p.add_argument("--count", type=int, default=256, help="MT-Shapes dialogues to generate")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--per-shard", type=int, default=32)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--work-dir", help="where data and outputs go (default: a new temporary directory)")
    p.set_defaults(func=bench_extract)

    from pipeline.commands.bench_efficiency import register as register_efficiency
    from pipeline.commands.bench_scale import register as register_scale
    from pipeline.commands.bench_train import register_bench as register_train

    register_efficiency(which)
    register_train(which)
    register_scale(which)
