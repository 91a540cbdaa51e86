"""`metacompress bench scale --arch A --images N --dialogues-per-image K [--json]`: the feature cache and data plane
at paper scale, without weights (docs/design.md §3, "At scale").

Synthetic features of the architecture's exact shapes and dtype (bfloat16 on a GPU) go through the real shard store
(``pipeline.shards.StageOutput``, the config's default format); model time is simulated by sleeping for the H100
figures of docs/table2_h100.md (or ``--preprocess-ms``, ``--tower-ms``, ``--step-ms``). Two cache layouts:

* ``image`` (``extract.cache: pre_projector``): the vision tower's selected-layer output before the projector once
  per distinct image (LLaVA-NeXT: each crop's (576, 1024)), later dialogues of the image referring to it;
* ``dialogue`` (``extract.cache: post_projector``, the default): one row per dialogue of X_IMG (n, 4096).

Both are read by the train stage's own ``CachedSource`` (through ``stages.common.FeatureReader``) and
``Prefetcher``; the projector of the image layout is simulated by allocating its output (``_StubProjector``).

Extract is simulated with the structure of ``stages/extract.py``: preprocessing on ``--cpu-workers`` workers, the
tower in batches of ``--batch-size``, shard writes on their own threads; ``--engine ray-data`` runs the same work
through Ray Data (``map_batches`` tasks into a one-actor pool, streaming) for comparison (docs/design.md §6.1). The
model actor's busy share is its simulated tower time over its wall time. The no-op re-run is what ``metacompress run`` does on a finished stage: ``missing_shards``
and ``finish`` on both outputs (and, for comparison, the same with ``verify``, which hashes every shard).
"""

from __future__ import annotations

import json
import queue
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Turn-1 breakdown of docs/table2_h100.md (Base rows): preprocessing and vision tower ms per image. A training
# step per dialogue is taken as forward + backward (3x the forward) of the 7B decoder on MetaCompress' tokens at
# rate 0.7 (its prefill column there).
H100 = {"llava-1.5-7b": {"preprocess_ms": 10.86, "tower_ms": 10.50, "step_ms": 3 * 28.97},
        "llava-next-7b": {"preprocess_ms": 38.12, "tower_ms": 11.27, "step_ms": 3 * 33.66}}
SCALES = (100_000, 665_000)


@dataclass(frozen=True)
class Shapes:
    """Per image: ``crops`` tower outputs of ``(tokens_per_crop, vision_dim)`` before the projector, or
    ``(post_tokens, text_dim)`` after it; ``dtype`` as stored (bfloat16: the H100 runs)."""

    crops: int
    tokens_per_crop: int
    vision_dim: int
    post_tokens: int
    text_dim: int
    grid: tuple[int, int] = (0, 0)  # LLaVA-NeXT: the crops' token grid after the projector (rows, columns)
    dtype: str = "bfloat16"


def arch_shapes(name: str, image_size: tuple[int, int] | None = None) -> Shapes:
    """The architecture's shapes (infra/architectures.py) at its benchmark image size. LLaVA-NeXT: base + the
    pinpoint's tiles as crops; after the projector base + the crop grid + one newline per grid row (a square image
    is not unpadded)."""
    from infra.architectures import get_architecture

    arch = get_architecture(name)
    side = arch.vision["image_size"] // arch.vision["patch_size"]
    per_crop = side * side  # strategy "default": the CLS token is dropped
    if arch.family == "llava":
        return Shapes(1, per_crop, arch.vision["hidden_size"], per_crop, arch.text["hidden_size"])
    h, w = image_size or arch.image_size
    if h != w:
        raise ValueError(f"bench scale: {name} at {h}x{w}: only square images are supported (no unpadding)")
    tile = arch.vision["image_size"]
    th, tw = -(-h // tile), -(-w // tile)
    post = per_crop + (th * side) * (tw * side) + th * side
    return Shapes(1 + th * tw, per_crop, arch.vision["hidden_size"], post, arch.text["hidden_size"],
                  (th * side, tw * side))


def _layout(shapes: Shapes) -> dict:
    """The post-projector token layout the train step reads (LLaVA-NeXT: base grid, then the crop grid with a
    newline token ending each row)."""
    from compress.layout import Layout, Segment

    side = int(round(shapes.tokens_per_crop ** 0.5))
    if shapes.crops == 1:
        return Layout.grid(side, side).to_dict()
    rows, cols = shapes.grid
    n_base = side * side
    newlines = tuple(n_base + r * (cols + 1) + cols for r in range(rows))
    segments = (Segment("base", side, side, 0, side), Segment("crops", rows, cols, n_base, cols + 1))
    return Layout(shapes.post_tokens, segments, newlines).to_dict()


def _bf16_bits(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Normal values as bfloat16 bits (uint16, the shard store's bfloat16 encoding): realistic for compression."""
    x = rng.standard_normal(shape, dtype=np.float32)
    return (x.view(np.uint32) >> 16).astype(np.uint16)


def _features(rng, shapes: Shapes, layout: str) -> np.ndarray:
    if layout == "image":
        return _bf16_bits(rng, (shapes.crops * shapes.tokens_per_crop, shapes.vision_dim))
    return _bf16_bits(rng, (shapes.post_tokens, shapes.text_dim))


def _teacher_row(rng, dialogue_id: str, turns: int, tokens_per_turn: int, top_k: int, vocab: int) -> dict:
    from pipeline.tensor_columns import teacher_targets

    lp = [-np.sort(rng.exponential(1.0, (tokens_per_turn, top_k)), -1).astype(np.float32) for _ in range(turns)]
    ids = [rng.integers(0, vocab, (tokens_per_turn, top_k)) for _ in range(turns)]
    tail = [np.full(tokens_per_turn, -3.0, np.float32) for _ in range(turns)]
    return {"dialogue_id": dialogue_id, "answer_ids": [list(map(int, i[:, 0])) for i in ids],
            **teacher_targets(lp, ids, tail)}


def _store(root: Path, stage: str, fmt: str):
    from pipeline.shards import StageOutput

    return StageOutput(str(root / stage), stage, f"bench-{stage}", "bench", fmt)


def _feature_arrays(args, shapes: Shapes, layout: str) -> list:
    """Distinct random arrays made before the clock starts (this machine's CPUs would otherwise time the random
    number generator); Parquet compresses each page on its own, so reusing them does not help compression."""
    arrays = [_features(np.random.default_rng(i), shapes, layout) for i in range(min(args.images, 8))]
    if args.quantize == "int8":  # extract.quantize: int8 with a float32 scale per token
        from pipeline.tensor_columns import quantize_int8

        arrays = [quantize_int8((x.astype(np.uint32) << 16).view(np.float32)) for x in arrays]
    return arrays


class _ShardSink:
    """Rows of the extract stage (``stages/extract.py``'s layout) cut into shards of ``--images-per-shard`` images'
    dialogues, written by ``--writers`` threads through a bounded queue (a slow store makes the tower wait)."""

    def __init__(self, args, shapes: Shapes, layout: str, out, warm):
        self.args, self.shapes, self.layout, self.out = args, shapes, layout, out
        self.per_shard = args.images_per_shard * args.dialogues_per_image  # dialogues: teacher shards stay aligned
        self.layout_json = json.dumps(_layout(shapes))
        self.empty = np.zeros((0, shapes.vision_dim), np.int8 if args.quantize == "int8" else np.uint16)
        self.rows, self.shard, self.failure = [], 0, []
        out.prepare()  # as the stage's driver does before any actor starts
        # A long run pays the store's start-up (imports, first large allocations) once; keep it off the clock.
        scratch = _store(Path(out.root).parent / "warm-up", "scratch", out.fmt)
        scratch.write_shard(0, [{"features": warm[0] if isinstance(warm, tuple) else warm}])
        shutil.rmtree(scratch.root, ignore_errors=True)
        self.writes: queue.Queue = queue.Queue(maxsize=args.writers + 1)
        self.threads = [threading.Thread(target=self._writer, daemon=True) for _ in range(args.writers)]
        for thread in self.threads:
            thread.start()

    def _writer(self) -> None:
        while (item := self.writes.get()) is not None:
            try:
                self.out.write_shard(*item)
            except BaseException as err:  # noqa: BLE001 - re-raised by close()
                self.failure.append(err)

    def add(self, image: int, x) -> None:
        args = self.args
        for k in range(args.dialogues_per_image):
            row = {"dialogue_id": f"img{image}-d{k}", "image": f"img{image}", "n_tokens": self.shapes.post_tokens,
                   "layout": self.layout_json, "features": x}
            if self.layout == "image":  # stages/extract.py's pre-projector row
                ref = (image * args.dialogues_per_image) // self.per_shard
                row.update(features=x if k == 0 else self.empty, image_size=[336, 336], crops=self.shapes.crops,
                           ref_shard=ref, post_dtype="bfloat16")
                if args.quantize == "int8":
                    q, scale = x
                    row.update(features=q if k == 0 else self.empty, scale=scale if k == 0 else np.zeros(0, np.float32))
            self.rows.append(row)
        while len(self.rows) >= self.per_shard:
            self.writes.put((self.shard, self.rows[:self.per_shard]))
            self.rows, self.shard = self.rows[self.per_shard:], self.shard + 1

    def close(self) -> int:
        if self.rows:
            self.writes.put((self.shard, self.rows))
            self.shard += 1
        for _ in self.threads:
            self.writes.put(None)
        for thread in self.threads:
            thread.join()
        if self.failure:
            raise self.failure[0]
        return self.shard


def _simulated_extract(args, shapes: Shapes, layout: str, timing: dict, out) -> dict:
    """The project's pool (``stages/extract.py``): images through CPU workers (sleep preprocess), the tower in batches
    (sleep), shard writes on their own threads. Returns images/s and the tower's busy share."""
    arrays = _feature_arrays(args, shapes, layout)

    def prepare(first: int):  # one CPU worker prepares a whole batch, as an ImagePrep actor does
        count = min(args.batch_size, args.images - first)
        time.sleep(timing["preprocess_ms"] * count / 1e3)
        return [arrays[i % len(arrays)] for i in range(first, first + count)]

    firsts = list(range(0, args.images, args.batch_size))
    sink = _ShardSink(args, shapes, layout, out, arrays[0])
    busy = 0.0
    with ThreadPoolExecutor(max_workers=args.cpu_workers) as pool:
        # requested max(2, workers) batches ahead, as FeatureExtractor._prepared_batches
        pending = [pool.submit(prepare, f) for f in firsts[:max(2, args.cpu_workers)]]
        start = time.perf_counter()
        for k, first in enumerate(firsts):
            batch = pending.pop(0).result()
            if k + len(pending) + 1 < len(firsts):
                pending.append(pool.submit(prepare, firsts[k + len(pending) + 1]))
            t0 = time.perf_counter()
            time.sleep(timing["tower_ms"] * len(batch) / 1e3)  # the tower: no batching speed-up assumed
            busy += time.perf_counter() - t0
            for j, x in enumerate(batch):
                sink.add(first + j, x)
        shards = sink.close()
        wall = time.perf_counter() - start
    return {"images_per_s": args.images / wall, "actor_busy_share": busy / wall, "shards": shards, "wall_s": wall}


def _ray_data_extract(args, shapes: Shapes, layout: str, timing: dict, out) -> dict:
    """The same work through Ray Data (the issue's anchor): ``map_batches`` of preprocessing tasks (``--cpu-workers``
    at once, each returning an image's float32 pixel values) streaming into a one-actor pool that sleeps the tower
    per batch of ``--batch-size``; order preserved (shards must be deterministic to resume); the driver cuts the
    output stream into shards for the same writer threads. Busy share: the actor's tower time over the time from its
    first batch to the last shard written."""
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(num_cpus=args.cpu_workers + 2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    arrays = _feature_arrays(args, shapes, layout)
    pixels = (shapes.crops, 3, 336, 336)
    prep_s, tower_s = timing["preprocess_ms"] / 1e3, timing["tower_ms"] / 1e3

    def prepare(batch: dict) -> dict:
        time.sleep(prep_s * len(batch["id"]))
        return {"id": batch["id"], "pixels": np.zeros((len(batch["id"]), *pixels), np.float32)}

    class Tower:
        def __call__(self, batch: dict) -> dict:
            n = len(batch["id"])
            t0 = time.time()
            time.sleep(tower_s * n)
            return {"id": batch["id"], "t0": np.full(n, t0), "t1": np.full(n, time.time())}

    sink = _ShardSink(args, shapes, layout, out, arrays[0])
    ds = (ray.data.range(args.images)
          .map_batches(prepare, batch_size=1, num_cpus=1, concurrency=args.cpu_workers)
          .map_batches(Tower, batch_size=args.batch_size, num_cpus=1, concurrency=1))
    spans = set()
    for batch in ds.iter_batches(batch_size=args.batch_size, batch_format="numpy"):
        for i, t0, t1 in zip(batch["id"], batch["t0"], batch["t1"]):
            spans.add((float(t0), float(t1)))
            sink.add(int(i), arrays[int(i) % len(arrays)])
    shards = sink.close()
    wall = time.time() - min(t0 for t0, _ in spans)
    busy = sum(t1 - t0 for t0, t1 in spans)
    return {"images_per_s": args.images / wall, "actor_busy_share": busy / wall, "shards": shards, "wall_s": wall}


def _teacher(args, out) -> int:
    """Teacher shards aligned with the feature shards: dialogue order = image order, K per image."""
    per_shard = args.images_per_shard * args.dialogues_per_image
    dialogues = args.images * args.dialogues_per_image
    rng = np.random.default_rng(1)
    shards = 0
    for shard, first in enumerate(range(0, dialogues, per_shard)):
        rows = [_teacher_row(rng, f"img{d // args.dialogues_per_image}-d{d % args.dialogues_per_image}",
                             args.turns, args.answer_tokens, args.top_k, 32064)
                for d in range(first, min(first + per_shard, dialogues))]
        out.write_shard(shard, rows)
        shards += 1
    return shards


class _StubProjector:
    """Stands in for the model in ``FeatureReader``: the projector's output allocated (bfloat16, (post_tokens,
    text_dim)), no weights; its compute (about 0.2 ms on an H100) is left out."""

    family, device = "llava", "cpu"

    def __init__(self, shapes: Shapes):
        import torch

        self.dtype, self.shapes = torch.bfloat16, shapes

    def project(self, hidden):
        import torch

        return torch.empty((1, self.shapes.post_tokens, self.shapes.text_dim), dtype=self.dtype)


def _train(args, shapes: Shapes, layout: str, timing: dict, features, teacher, shard_rows: list[int]) -> dict:
    """The train loop's data path (``CachedSource``, with and without the ``Prefetcher`` the train stage uses) and
    a simulated step: the share of step time spent waiting for data."""
    from stages.train.data import CachedSource, Prefetcher, batch_keys, steps_per_epoch

    questions = {f"img{i}-d{k}": ["q"] * args.turns for i in range(args.images)
                 for k in range(args.dialogues_per_image)}
    per_epoch = steps_per_epoch(shard_rows, 1, args.micro_batch)
    steps = min(per_epoch, args.train_steps)
    result = {"train_steps": steps}
    for mode in ("in_step", "prefetched"):
        source = CachedSource(_args_of(features), _args_of(teacher), questions,
                              _StubProjector(shapes) if layout == "image" else None)

        def keys_of(step):
            return batch_keys(shard_rows, 0, step, 0, 1, args.micro_batch, per_epoch)

        batches = Prefetcher(source, keys_of, 0, steps).get if mode == "prefetched" else \
            (lambda step: source.examples(keys_of(step)))
        wait = total = 0.0
        for step in range(steps):
            t0 = time.perf_counter()
            batches(step)
            t1 = time.perf_counter()
            time.sleep(timing["step_ms"] * args.micro_batch / 1e3)
            wait, total = wait + t1 - t0, total + time.perf_counter() - t0
        result[f"data_wait_share_{mode}"] = wait / total if steps else float("nan")  # --train-steps 0: not run
    return result


def _args_of(out) -> dict:
    return dict(uri=out.uri, stage=out.stage, config_hash=out.config_hash, input_hash=out.input_hash, fmt=out.fmt)


def _noop_rerun(outs: list, shards: list[int], verify: bool) -> float:
    from pipeline.shards import StageOutput

    start = time.perf_counter()
    for out, n in zip(outs, shards):
        fresh = StageOutput(**_args_of(out), verify=verify)
        if fresh.missing_shards(n):
            raise RuntimeError(f"bench scale: {out.uri} lost shards between the run and its re-run")
        fresh.finish(n)
    return time.perf_counter() - start


def _shard_bytes(out, n: int) -> int:
    return sum(out.fs.get_file_info(out._path(out.shard_name(i))).size for i in range(n))


def bench_scale(args) -> None:
    shapes = arch_shapes(args.arch)
    if args.quantize != "none" and args.layout != "image":
        raise ValueError("bench scale: --quantize int8 needs --layout image (extract.quantize needs the pre-projector "
                         "cache)")
    timing = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in H100[args.arch].items()}
    root = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        features, teacher = _store(root, "extract", args.format), _store(root, "teacher", args.format)
        engine = _ray_data_extract if args.engine == "ray-data" else _simulated_extract
        ext = engine(args, shapes, args.layout, timing, features)
        features.finish(ext["shards"])
        teacher_shards = _teacher(args, teacher)
        teacher.finish(teacher_shards)
        dialogues = args.images * args.dialogues_per_image
        feature_bytes, teacher_bytes = _shard_bytes(features, ext["shards"]), _shard_bytes(teacher, teacher_shards)
        shard_rows = [s["rows"] for s in teacher.manifest()["shards"]]
        train = _train(args, shapes, args.layout, timing, features, teacher, shard_rows)
        outs, counts = [features, teacher], [ext["shards"], teacher_shards]
        noop = float(np.median([_noop_rerun(outs, counts, verify=False) for _ in range(5)]))  # ms: noisy alone
        noop_verify = _noop_rerun(outs, counts, verify=True)
    finally:
        if not args.keep and not args.work_dir:
            shutil.rmtree(root, ignore_errors=True)
    result = {"arch": args.arch, "layout": args.layout, "quantize": args.quantize, "images": args.images,
              "engine": args.engine,
              "dialogues_per_image": args.dialogues_per_image, "format": args.format,
              "feature_bytes_per_image": feature_bytes / args.images,
              "teacher_bytes_per_dialogue": teacher_bytes / dialogues,
              "extract_images_per_s": ext["images_per_s"], "actor_busy_share": ext["actor_busy_share"],
              "data_wait_share": train["data_wait_share_prefetched"],
              "data_wait_share_in_step": train["data_wait_share_in_step"], "noop_rerun_s": noop,
              "noop_rerun_verify_s": noop_verify,
              "shards": sum(counts), **{f"sim_{k}": v for k, v in timing.items()}}
    per_image = result["feature_bytes_per_image"] + args.dialogues_per_image * result["teacher_bytes_per_dialogue"]
    per_shard_s = noop / sum(counts)
    print(f"{args.arch}, layout {args.layout} ({args.quantize}): {args.images} images x {args.dialogues_per_image} "
          "dialogues, "
          f"{args.format} shards of {args.images_per_shard} images; simulated preprocess {timing['preprocess_ms']} ms "
          f"on {args.cpu_workers} CPU workers ({args.engine}), tower {timing['tower_ms']} ms/image in batches of {args.batch_size}, "
          f"train step {timing['step_ms']:.1f} ms/dialogue x {args.micro_batch}")
    print("| measure | value |\n|---|---|")
    print(f"| stored feature bytes per image | {result['feature_bytes_per_image'] / 1e6:.3f} MB |")
    print(f"| teacher bytes per dialogue ({args.turns} turns x {args.answer_tokens} tokens, k = {args.top_k}) | "
          f"{result['teacher_bytes_per_dialogue'] / 1e3:.1f} kB |")
    print(f"| extract throughput (one model actor) | {result['extract_images_per_s']:.1f} images/s |")
    print(f"| model-actor busy share | {result['actor_busy_share']:.3f} |")
    print(f"| train data-wait share of step time ({train['train_steps']} steps; prefetched, as the train stage) | "
          f"{result['data_wait_share']:.3f} |")
    print(f"| the same, read inside the step | {result['data_wait_share_in_step']:.3f} |")
    print(f"| no-op re-run ({sum(counts)} shards, {(feature_bytes + teacher_bytes) / 1e9:.2f} GB; median of 5) | "
          f"{noop:.4f} s |")
    print(f"| same with --verify (hashes every shard) | {noop_verify:.3f} s |")
    for n in SCALES:
        shards = -(-n // args.images_per_shard) * 2
        print(f"| at {n:,} images: cache / extract on one actor / no-op re-run | {per_image * n / 1e12:.2f} TB / "
              f"{n / result['extract_images_per_s'] / 3600:.1f} h / {per_shard_s * shards:.1f} s |")
    if args.json:
        print(json.dumps(result, sort_keys=True))


def register(which) -> None:
    p = which.add_parser("scale", help="feature cache and data plane at 7B shapes: bytes, busy share, data wait, "
                                       "no-op re-run, extrapolated to 100k and 665k images")
    p.add_argument("--arch", required=True, choices=sorted(H100), help="shapes (infra/architectures.py)")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--dialogues-per-image", type=int, default=4)
    p.add_argument("--layout", choices=["image", "dialogue"], default="image",
                   help="image: pre-projector, one row per image; dialogue: post-projector per dialogue (today's)")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="image layout: the tower output as int8 with a per-token scale (extract.quantize)")
    p.add_argument("--format", choices=["parquet", "webdataset", "arrow"], default="parquet")
    p.add_argument("--images-per-shard", type=int, default=16)
    p.add_argument("--cpu-workers", type=int, default=4, help="preprocessing threads feeding the model actor")
    p.add_argument("--batch-size", type=int, default=16, help="images per tower call")
    p.add_argument("--writers", type=int, default=2, help="threads encoding and writing shards")
    p.add_argument("--engine", choices=["pool", "ray-data"], default="pool",
                   help="extract through the project's pool (as stages/extract.py) or Ray Data map_batches")
    p.add_argument("--micro-batch", type=int, default=8, help="dialogues per simulated train step")
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--answer-tokens", type=int, default=8, help="answer tokens per turn")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--preprocess-ms", type=float, help="per image (default: the H100 figure)")
    p.add_argument("--tower-ms", type=float, help="per image (default: the H100 figure)")
    p.add_argument("--step-ms", type=float, help="per dialogue of a train step (default: 3x the H100 prefill)")
    p.add_argument("--work-dir", help="keep the outputs here (default: a temporary directory, deleted)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    p.set_defaults(func=bench_scale)
