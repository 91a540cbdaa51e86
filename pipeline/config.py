"""The pipeline configuration: typed dataclasses, loaded from YAML and validated (unknown keys and bad values are
errors that name the key), resolved (relative paths against the config file), saved next to every output."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    path: str = "infra/reference/llava"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False


@dataclass
class GeneratedData:
    """A synthetic benchmark generated into ``<work_dir>/data/<name>`` (once), its splits used as data.train/val/test."""

    dialogues: int = 1200  # all splits together
    val: int = 50
    test: int = 100
    seed: int = 0
    image_size: int = 96


@dataclass
class MTShapesSpec(GeneratedData):
    """MT-Shapes, into ``<work_dir>/data/mt-shapes``."""

    random_aspect: bool = False  # several aspect ratios (LLaVA-NeXT)


@dataclass
class MTVideoSpec(GeneratedData):
    """MT-Video, into ``<work_dir>/data/mt-video``."""

    frames: int = 8  # frames per video file
    fps: int = 4  # of the file


@dataclass
class VideoSampling:
    """Which frames of a video file the model sees (docs/design.md §5, video), as transformers' Qwen2.5-VL video
    processor takes them: exactly one of ``num_frames`` (spread uniformly, first and last included) and ``fps`` (one
    frame every 1 / fps seconds)."""

    num_frames: int | None = None
    fps: float | None = None


DEFAULT_VIDEO_SAMPLING = {"num_frames": 8, "fps": None}  # data.video unset


@dataclass
class DataConfig:
    train: str = "data/train/dialogues.jsonl"
    val: str = "data/val/dialogues.jsonl"
    test: str = "data/test/dialogues.jsonl"
    max_train_dialogues: int | None = None
    max_eval_dialogues: int | None = None
    mt_shapes: MTShapesSpec | None = None
    mt_video: MTVideoSpec | None = None
    video: VideoSampling | None = None  # frame sampling of video dialogues (null: 8 frames, uniformly)

    def video_sampling(self) -> dict:
        """{"num_frames", "fps"} for ``compress.lvlm.video.video_adapter``."""
        if self.video is None:
            return dict(DEFAULT_VIDEO_SAMPLING)
        return {"num_frames": self.video.num_frames, "fps": self.video.fps}


@dataclass
class ShardConfig:
    format: Literal["parquet", "webdataset"] = "parquet"
    dialogues_per_shard: int = 64
    max_error_fraction: float = 0.05
    overwrite: bool = False
    verify: bool = False  # re-runs also hash every finished shard (else sidecars and sizes; docs/design.md §3)


@dataclass
class ExtractConfig:
    batch_size: int = 16  # images per vision-tower call (docs/design.md §6.1)
    num_actors: int = 1
    # CPU actors per model actor that decode and preprocess images, streaming them to it (1 CPU each, on its node);
    # 0: on a thread of the model actor (docs/design.md §6.1).
    cpu_workers: int = 0
    # What the feature cache holds (docs/design.md §3): "post_projector": X_IMG per dialogue; "pre_projector": the
    # vision tower's selected-layer output once per distinct image (4x narrower on CLIP-L; the frozen projector runs
    # in the consumer's step); "none" (teacher-only): no features stored, the consumers (teacher, train, evaluate)
    # encode the images in their step. quantize "int8" (pre_projector only): int8 with a per-token scale.
    cache: Literal["post_projector", "pre_projector", "none"] = "post_projector"
    quantize: Literal["none", "int8"] = "none"


@dataclass
class TeacherConfig:
    top_k: int = 64
    max_new_tokens: int = 8
    history: Literal["own", "reference"] = "own"


@dataclass
class TrainCandidate:
    """Train settings tried besides the train section's own (unset fields keep its values); per rate, the one with
    the lowest validation KL is kept (docs/design.md §4.2)."""

    entropy_weight: float | None = None
    collapse_weight: float | None = None
    lr: float | None = None
    optimizer: Literal["sgd", "adamw"] | None = None
    generator: Literal["paper", "normed", "auto"] | None = None
    locality: float | None = None
    spatial_prior: float | None = None
    plateau_start: float | None = None

    def overrides(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class TrainConfig:
    rates: list[float] = field(default_factory=lambda: [0.7, 0.9])
    compress_dim: int = 256
    kernel_size: int = 3
    # The generator of P (docs/design.md §4.1): "paper" (eq. of appendix 8.2) or "normed" (features centred and
    # normalised before the projections, cosine scores times a learned temperature: starts as pooling on any model).
    # "auto": "normed" when the paper's P starts near uniform on the first training batch, else "paper".
    generator: Literal["paper", "normed", "auto"] = "paper"
    temperature: float = 20.0  # the initial temperature of generator "normed"
    # The initial strength of the locality term (docs/design.md §4.1, ours): row i of P is pulled toward the tokens
    # near its pooling window's centre, learned from there; 0: off (the paper's P).
    locality: float = 0.0
    # The initial strength of the Spatial prior (docs/design.md §4.1, ours): P starts as Spatial's rectangle
    # averages (its scores gated to 0) and learns a residual from there; 0: off (the paper's P).
    spatial_prior: float = 0.0
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 1e-3
    grad_clip: float = 1e-2
    # "norm": the global L2 norm of the gradient is clipped to grad_clip (DeepSpeed's gradient_clipping);
    # "value": every gradient element is clamped to [-grad_clip, grad_clip] (torch.nn.utils.clip_grad_value_).
    clip_mode: Literal["norm", "value"] = "norm"
    epochs: int = 2
    # At least this many steps: epochs are raised to the fewest whole epochs that reach it (0: exactly `epochs`).
    min_steps: int = 0
    batch_size: int = 36  # the global batch: micro_batch_size x gradient_accumulation_steps x num_workers
    # Dialogues per worker per forward (null: batch_size / (gradient_accumulation_steps x num_workers)); each
    # optimizer step accumulates gradient_accumulation_steps of them (docs/design.md §6.3).
    micro_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    # Recompute each LLM layer's activations in the backward pass instead of keeping them (docs/design.md §6.3).
    activation_checkpointing: bool = False
    entropy_weight: float = 1.0
    collapse_weight: float = 1.0
    zero_stage: Literal[0, 1, 2, 3] = 2
    # The compressor's compute dtype, in training and wherever the trained compressor runs (recorded in its
    # config.json); the frozen LVLM computes in model.dtype in every stage (docs/design.md §6.3).
    compressor_dtype: Literal["float32", "bfloat16"] = "float32"
    num_workers: int = 1
    checkpoint_every: int = 50
    online_teacher: bool = False
    # The held-out pass after training (held-out KL of MetaCompress and Sample) runs on the test split's first this
    # many dialogues: a bounded cost at any data size (null: the whole split; 0: no held-out pass).
    heldout_dialogues: int | None = 64
    # Early stopping (docs/design.md §4.2): every validate_every steps (0: never) the KL on the validation split's first
    # validation_dialogues dialogues; the weights kept are the best so far; training stops after `patience`
    # validations without a new best (0: runs every planned step).
    validate_every: int = 0
    patience: int = 0
    # Each validation without a new best multiplies the learning rate by this (1: constant; docs/design.md §4.2).
    lr_decay_on_plateau: float = 1.0
    # The share of the planned steps whose validations keep the best weights but neither count toward patience nor
    # decay the rate (Keras's start_from_epoch): the validation KL of the first epochs jumps (docs/design.md §4.2).
    plateau_start: float = 0.0
    validation_dialogues: int | None = 64
    # Settings tried besides this section's own, per rate; the lowest validation KL wins (needs validate_every > 0).
    candidates: list[TrainCandidate] = field(default_factory=list)
    seed: int = 0
    # The training loader's shuffle buffer (docs/design.md §6.3): the rows of this many consecutive shards of a
    # worker's part are shuffled together (memory: that many shards per worker; 1: within a shard only).
    shuffle_shards: int = 2
    max_failures: int = 0  # Ray Train restarts after a worker failure (each resumes from the last checkpoint)


@dataclass
class GenerationSpec:
    """How the model answers one benchmark (dialogue ``source``), docs/design.md §3.5. Unset fields keep the source's
    default (pipeline.datasets.common.generation_defaults): short answers with the single-word instruction for
    VQA-v2, GQA, MT-Shapes and own data, free-form answers for ConvBench."""

    source: str
    style: Literal["short", "free"] | None = None  # short: the adapter's single-word/phrase instruction
    instruction: str | None = None  # text appended to each question instead ("" for none)
    max_new_tokens: int | None = None
    stop: list[str] | None = None  # the answer is cut before the first of these strings
    metric: str | None = None  # scorer name in pipeline.metrics.METRICS (e.g. vqa_v2_2016); judged sources: none


@dataclass
class JudgeConfig:
    """The pairwise judge of free-form benchmarks (pipeline.judge): ``url`` + ``model`` of an OpenAI-compatible
    endpoint (key from the environment variable ``api_key_env``) or ``model_dir``, a local transformers model."""

    url: str | None = None
    model: str | None = None
    model_dir: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_tokens: int = 512
    timeout_s: float = 120.0
    retries: int = 4
    backoff_s: float = 2.0
    cache: str | None = None  # None: <work_dir>/judge_cache.jsonl
    positions: str | None = None  # the official ConvBenchEval/pairwise.npy (None: seeded A/B order)
    seed: int = 0
    concurrency: int = 4  # dialogues judged at once by an endpoint (a local model_dir judges one at a time)


@dataclass
class EvaluateConfig:
    methods: list[str] = field(default_factory=lambda: ["random", "sample", "spatial", "fastv", "metacompress"])
    rates: list[float] = field(default_factory=lambda: [0.7, 0.9])
    history: Literal["own", "reference"] = "own"
    max_new_tokens: int = 8
    batch_size: int = 8
    num_actors: int = 1  # model actors evaluating (method, rate, shard) tasks in parallel (one GPU each if any)
    # True: feature/full/fastv methods start from the extract stage's cached X_IMG (faster; their TTFT then
    # excludes the vision tower). False: every method starts from the image, so TTFT is comparable across methods.
    cached_features: bool = False
    matrix_images: int = 2  # images whose MetaCompress matrix P is plotted (paper figures 6-7)
    generation: list[GenerationSpec] = field(default_factory=list)  # per-source overrides of the answer settings
    judge: JudgeConfig | None = None  # needed when the split holds free-form (judged) dialogues
    seeds: list[int] = field(default_factory=lambda: [0])  # stochastic methods (random) run once per seed


@dataclass
class TPRLConfig:
    """The TPRL baseline's training (stage ``tprl``, docs/design.md §4.5): autoencoder, behaviour cloning from the
    first-turn prompt attention, then PPO with rollouts on Ray actors that hold the LVLM."""

    enabled: bool = False  # off: the stage is skipped (and "tprl" is not evaluated)
    iterations: int = 50  # PPO iterations (each: collect rollouts, then update)
    rollouts_per_iteration: int = 64  # episodes (one dialogue's first turn each) per iteration
    rollout_batch_size: int = 8  # episodes per Ray task; the LVLM answers them in one batch
    num_actors: int = 1  # rollout actors (one GPU each if any)
    b: float = 0.1  # reward weight of the share of tokens removed
    share_of: Literal["original", "previous"] = "original"
    max_steps: int = 3
    step_discount: float = 0.5
    d_latent: int = 256
    d_hidden: int = 512
    d_model: int = 256
    n_layers: int = 2
    n_heads: int = 8
    ae_epochs: int = 1
    ae_lr: float = 1e-3
    teacher_layers: list[int] | None = None  # LLM layers whose prompt attention ranks tokens for BC (None: all)
    keep_fractions: list[float] = field(default_factory=lambda: [0.75, 0.5, 1 / 3])  # the teacher's steps
    bc_epochs: int = 5
    bc_lr: float = 5e-5
    bc_batch_size: int = 128
    actor_lr: float = 1e-5
    critic_lr: float = 3e-5
    ppo_epochs: int = 4
    minibatch_size: int = 16
    clip: float = 0.2
    gamma: float = 0.99
    gae_lambda: float = 0.95
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    max_grad_norm: float = 0.5
    ratio: Literal["joint", "per_token"] = "joint"
    checkpoint_every: int = 5  # PPO iterations between checkpoints (one is also written after BC and at the end)
    seed: int = 0


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: a SQLite store in the work directory
    experiment: str = "metacompress"
    registered_model: str = "metacompress"


@dataclass
class RayConfig:
    address: str | None = None  # None: RAY_ADDRESS if set, else an embedded local cluster
    num_cpus: int | None = None


@dataclass
class StageResources:
    """What each actor (or Ray Train worker) of a stage asks the cluster for."""

    num_gpus: float | None = None  # per actor; None: 1 when the cluster has GPUs when the stage starts, else the CPU
    num_cpus: float = 1
    gpu_wait_s: float = 900  # with num_gpus > 0: how long to wait for GPU nodes to join (autoscaler) before failing


@dataclass
class ResourcesConfig:
    """Per stage. On a cluster set ``num_gpus: 1``: a stage that asks for GPUs never runs on a CPU."""

    extract: StageResources = field(default_factory=StageResources)
    teacher: StageResources = field(default_factory=StageResources)
    train: StageResources = field(default_factory=StageResources)
    evaluate: StageResources = field(default_factory=StageResources)
    tprl: StageResources = field(default_factory=StageResources)


@dataclass
class PipelineConfig:
    work_dir: str = "work/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tprl: TPRLConfig = field(default_factory=TPRLConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """sha256 of the canonical JSON of some sections: what a stage's outputs depend on."""
        data = {s: self.to_dict()[s] for s in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _check_value(value, hint, key: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _check_value(value, next(a for a in args if a is not type(None)), key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_value(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 3e-4 (no dot in the mantissa) as a string
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) != (hint is bool) or not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def _build(cls, data, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; allowed here: {sorted(names)}")
    kwargs = {k: _check_value(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _tprl_checks(t: TPRLConfig) -> list[tuple[bool, str]]:
    fractions = t.keep_fractions
    return [
        (t.iterations >= 0, "tprl.iterations must be >= 0"),
        (t.rollouts_per_iteration > 0 and t.rollout_batch_size > 0,
         "tprl.rollouts_per_iteration and tprl.rollout_batch_size must be positive"),
        (t.num_actors > 0, "tprl.num_actors must be positive"),
        (t.b >= 0, "tprl.b must be >= 0"),
        (t.max_steps > 0, "tprl.max_steps must be positive"),
        (0 < t.step_discount <= 1, "tprl.step_discount must be in (0, 1]"),
        (min(t.d_latent, t.d_hidden, t.d_model, t.n_layers, t.n_heads) > 0,
         "tprl.d_latent, d_hidden, d_model, n_layers and n_heads must be positive"),
        (t.d_model % t.n_heads == 0, "tprl.d_model must be divisible by tprl.n_heads"),
        (t.teacher_layers is None or all(layer >= 0 for layer in t.teacher_layers),
         "tprl.teacher_layers: layer indices must be >= 0 (or null for every layer)"),
        (bool(fractions) and all(0 < f <= 1 for f in fractions) and fractions == sorted(fractions, reverse=True)
         and len(fractions) <= t.max_steps,
         "tprl.keep_fractions must be decreasing values in (0, 1], at most tprl.max_steps of them"),
        (min(t.ae_lr, t.bc_lr, t.actor_lr, t.critic_lr) > 0, "tprl learning rates must be positive"),
        (t.ae_epochs > 0 and t.bc_epochs >= 0 and t.bc_batch_size > 0, "tprl.ae_epochs and bc_batch_size must be "
         "positive, tprl.bc_epochs >= 0"),
        (t.ppo_epochs > 0 and t.minibatch_size > 0, "tprl.ppo_epochs and tprl.minibatch_size must be positive"),
        (0 < t.clip < 1 and 0 <= t.gamma <= 1 and 0 <= t.gae_lambda <= 1,
         "tprl.clip must be in (0, 1), tprl.gamma and tprl.gae_lambda in [0, 1]"),
        (t.checkpoint_every > 0, "tprl.checkpoint_every must be positive"),
    ]


def _with(t: TrainConfig, candidate: TrainCandidate | None, key: str):
    """The train section's ``key`` as ``candidate`` (None: the section itself) sets it."""
    value = getattr(candidate, key) if candidate is not None else None
    return getattr(t, key) if value is None else value


def _range_checks(c: PipelineConfig) -> list[tuple[bool, str]]:
    """Ranges a value must be in before any work starts (docs/design.md §8): each message names the key and the fix."""
    d, t = c.data, c.train
    checks = [
        (d.max_train_dialogues is None or d.max_train_dialogues >= 1,
         f"data.max_train_dialogues = {d.max_train_dialogues}: must be >= 1, or null for the whole file"),
        (d.max_eval_dialogues is None or d.max_eval_dialogues >= 1,
         f"data.max_eval_dialogues = {d.max_eval_dialogues}: must be >= 1, or null for the whole file"),
        (bool(t.rates), "train.rates is empty; give at least one rate in (0, 1), e.g. [0.9]"),
        (bool(c.evaluate.rates), "evaluate.rates is empty; give at least one rate in (0, 1), e.g. [0.9]"),
        (len(set(t.rates)) == len(t.rates), f"train.rates {t.rates} lists a rate twice; list each once"),
        (len(set(c.evaluate.rates)) == len(c.evaluate.rates),
         f"evaluate.rates {c.evaluate.rates} lists a rate twice; list each once"),
        (bool(c.evaluate.methods), "evaluate.methods is empty; list at least one method, e.g. [sample]"),
        (c.extract.batch_size >= 1 and c.extract.num_actors >= 1,
         "extract.batch_size and extract.num_actors must be >= 1"),
        (c.teacher.max_new_tokens >= 1, "teacher.max_new_tokens must be >= 1"),
        (t.compress_dim >= 1 and t.kernel_size >= 1, "train.compress_dim and train.kernel_size must be >= 1"),
        (t.grad_clip > 0, "train.grad_clip must be > 0"),
        (t.temperature > 0, "train.temperature must be > 0"),
        (all(_with(t, c, "locality") >= 0 for c in [None, *t.candidates]),
         "train.locality (and a candidate's) must be >= 0 (0: off)"),
        (all(_with(t, c, "spatial_prior") >= 0 for c in [None, *t.candidates]),
         "train.spatial_prior (and a candidate's) must be >= 0 (0: off)"),
        (not any(_with(t, c, "spatial_prior") > 0 and _with(t, c, "locality") > 0 for c in [None, *t.candidates]),
         "train.spatial_prior and train.locality both set (in the train section or one candidate): the Spatial "
         "prior replaces the locality term; set one of them to 0"),
        (t.entropy_weight >= 0 and t.collapse_weight >= 0, "train.entropy_weight and train.collapse_weight must be >= 0"),
        (t.compressor_dtype == "float32" or c.model.dtype == "bfloat16",
         f"train.compressor_dtype = bfloat16 needs model.dtype: bfloat16 (DeepSpeed's bf16 mode casts the frozen LVLM "
         f"too), got model.dtype = {c.model.dtype}; set model.dtype: bfloat16 or train.compressor_dtype: float32"),
        (c.ray.num_cpus is None or c.ray.num_cpus >= 1, "ray.num_cpus must be >= 1, or null for all of them"),
        (bool(c.work_dir), "work_dir is empty; give a directory for the outputs"),
        (bool(c.model.path), "model.path is empty; give a LLaVA-1.5 or LLaVA-NeXT model directory"),
    ]
    if d.mt_shapes is not None:
        m = d.mt_shapes
        checks += [
            (m.dialogues >= 1 and m.val >= 1 and m.test >= 0 and m.val + m.test < m.dialogues,
             f"data.mt_shapes: dialogues ({m.dialogues}) must be larger than val + test ({m.val} + {m.test}), and val "
             ">= 1 (the registry promotes on the validation split)"),
            (m.image_size >= 8, f"data.mt_shapes.image_size = {m.image_size}: must be >= 8 pixels"),
        ]
    checks += _video_checks(d)
    return checks


def _video_checks(d: DataConfig) -> list[tuple[bool, str]]:
    checks = []
    if d.video is not None:
        v = d.video
        checks += [
            ((v.num_frames is None) != (v.fps is None),
             f"data.video: give exactly one of num_frames and fps, got num_frames = {v.num_frames}, fps = {v.fps} "
             "(e.g. data.video: {num_frames: 8})"),
            (v.num_frames is None or v.num_frames >= 1, f"data.video.num_frames = {v.num_frames}: must be >= 1"),
            (v.fps is None or v.fps > 0, f"data.video.fps = {v.fps}: must be > 0 frames per second"),
        ]
    if d.mt_video is not None:
        m = d.mt_video
        checks += [
            (d.mt_shapes is None, "data.mt_shapes and data.mt_video are both set; a run uses one dataset: keep one"),
            (m.dialogues >= 1 and m.val >= 1 and m.test >= 0 and m.val + m.test < m.dialogues,
             f"data.mt_video: dialogues ({m.dialogues}) must be larger than val + test ({m.val} + {m.test}), and val "
             ">= 1 (the registry promotes on the validation split)"),
            (m.image_size >= 48, f"data.mt_video.image_size = {m.image_size}: must be >= 48 pixels (three objects "
             "per frame)"),
            (4 <= m.frames <= 64, f"data.mt_video.frames = {m.frames}: must be in 4..64"),
            (m.fps >= 1, f"data.mt_video.fps = {m.fps}: must be >= 1"),
        ]
    return checks


def _resource_checks(c: PipelineConfig) -> list[tuple[bool, str]]:
    checks = []
    for stage in ("extract", "teacher", "train", "evaluate", "tprl"):
        r = getattr(c.resources, stage)
        checks += [(r.num_gpus is None or r.num_gpus >= 0, f"resources.{stage}.num_gpus = {r.num_gpus}: must be "
                    ">= 0 (0: CPU only), or null to use a GPU when the cluster has one"),
                   (r.num_cpus > 0, f"resources.{stage}.num_cpus = {r.num_cpus}: must be > 0"),
                   (r.gpu_wait_s >= 0, f"resources.{stage}.gpu_wait_s = {r.gpu_wait_s}: must be >= 0 seconds")]
    return checks


def batch_split(train: TrainConfig) -> tuple[int, int]:
    """(micro batch per worker, accumulation steps) with ``batch_size = micro x accumulation x num_workers``
    (docs/design.md §6.3); a ConfigError naming the keys and a setting that multiplies when they do not."""
    workers, accum, micro = train.num_workers, train.gradient_accumulation_steps, train.micro_batch_size
    if workers < 1 or accum < 1 or (micro is not None and micro < 1):
        raise ConfigError("train.num_workers, train.gradient_accumulation_steps and train.micro_batch_size must be "
                          ">= 1 (micro_batch_size may be null)")
    if micro is None and train.batch_size % (accum * workers) == 0:
        return train.batch_size // (accum * workers), accum
    if micro is not None and micro * accum * workers == train.batch_size:
        return micro, accum
    # fixes: keep the global batch (the largest micro batch whose accumulation makes up the rest), else the nearest
    # batches that split, else worker counts that divide it
    unit = workers * (micro or 1) * accum
    keep = next(((m, train.batch_size // (m * workers)) for m in range(train.batch_size // workers, 0, -1)
                 if train.batch_size % (m * workers) == 0), None)
    lower, divisors = train.batch_size // unit * unit, [w for w in range(2, train.batch_size + 1) if not
                                                        train.batch_size % w][:4]
    fixes = [f"train.micro_batch_size: {keep[0]} with train.gradient_accumulation_steps: {keep[1]}"] if keep else []
    fixes += [f"train.batch_size: {b}" for b in ((unit,) if micro else (lower, lower + unit)) if b > 0]
    if not keep:
        fixes.append(f"train.num_workers: one of {divisors} (they divide {train.batch_size})")
    raise ConfigError(f"train.batch_size = {train.batch_size} must equal train.micro_batch_size ({micro or 'null'}) x "
                      f"train.gradient_accumulation_steps ({accum}) x train.num_workers ({workers}); set "
                      + " or ".join(fixes))


def validate(config: PipelineConfig) -> PipelineConfig:
    if config.train.batch_size > 0:
        batch_split(config.train)
    checks = [
        (all(0 < r < 1 for r in config.train.rates), "train.rates: every rate must be in (0, 1)"),
        (all(0 < r < 1 for r in config.evaluate.rates), "evaluate.rates: every rate must be in (0, 1)"),
        (0 <= config.shards.max_error_fraction <= 1, "shards.max_error_fraction must be in [0, 1]"),
        (config.shards.dialogues_per_shard > 0, "shards.dialogues_per_shard must be positive"),
        (config.teacher.top_k > 0, "teacher.top_k must be positive"),
        (config.train.lr > 0, "train.lr must be positive"),
        (config.train.batch_size > 0 and config.train.epochs > 0, "train.batch_size and train.epochs must be positive"),
        (config.train.num_workers > 0, "train.num_workers must be positive"),
        (config.train.checkpoint_every > 0, "train.checkpoint_every must be positive"),
        (config.extract.cache == "post_projector" or config.train.zero_stage != 3,
         f"extract.cache: {config.extract.cache} needs train.zero_stage 0, 1 or 2: the model runs as the data is "
         "read, and under ZeRO-3 its forward is a collective the workers would not call in step; use zero_stage 2 or "
         "extract.cache: post_projector"),
        (config.extract.quantize == "none" or config.extract.cache == "pre_projector",
         f"extract.quantize = {config.extract.quantize} needs extract.cache: pre_projector (the post-projector "
         "cache is stored in 16-bit only)"),
        (config.extract.batch_size >= 1 and config.extract.cpu_workers >= 0,
         f"extract.batch_size = {config.extract.batch_size} must be >= 1 and extract.cpu_workers = "
         f"{config.extract.cpu_workers} >= 0 (0: preprocess in the model actor)"),
        (config.train.shuffle_shards >= 1,
         f"train.shuffle_shards = {config.train.shuffle_shards}: must be >= 1 (1: rows shuffled within a shard)"),
        (config.train.heldout_dialogues is None or config.train.heldout_dialogues >= 0,
         f"train.heldout_dialogues = {config.train.heldout_dialogues}: must be >= 0 (0: no held-out pass), or null "
         "for the whole test split"),
        (0.0 < config.train.lr_decay_on_plateau <= 1.0,
         f"train.lr_decay_on_plateau = {config.train.lr_decay_on_plateau}: must be in (0, 1] (1: constant rate)"),
        (all(0.0 <= v < 1.0 for v in [config.train.plateau_start] + [
            c.plateau_start for c in config.train.candidates if c.plateau_start is not None]),
         "train.plateau_start (and a candidate's) must be in [0, 1): a share of the planned steps"),
        (config.train.validate_every >= 0 and config.train.patience >= 0,
         "train.validate_every and train.patience must be >= 0 (0: no validation / no early stop)"),
        (config.train.validation_dialogues is None or config.train.validation_dialogues >= 1,
         f"train.validation_dialogues = {config.train.validation_dialogues}: must be >= 1, or null for the whole "
         "validation split"),
        (not (config.train.candidates or config.train.patience) or config.train.validate_every > 0,
         "train.candidates and train.patience choose on the validation KL: set train.validate_every > 0 too"),
        (all(c.overrides() for c in config.train.candidates),
         "train.candidates: an entry sets nothing; give at least one of entropy_weight, collapse_weight, lr, "
         "optimizer, generator, locality, spatial_prior, plateau_start"),
        (config.train.max_failures >= -1, "train.max_failures must be >= 0 (or -1: retry forever)"),
        (config.evaluate.num_actors > 0, "evaluate.num_actors must be positive"),
        (config.evaluate.batch_size > 0 and config.evaluate.max_new_tokens > 0,
         "evaluate.batch_size and evaluate.max_new_tokens must be positive"),
        (config.evaluate.matrix_images >= 0, "evaluate.matrix_images must be >= 0"),
        (len(config.evaluate.seeds) > 0 and len(set(config.evaluate.seeds)) == len(config.evaluate.seeds),
         "evaluate.seeds must be a non-empty list of distinct seeds"),
        (all(g.max_new_tokens is None or g.max_new_tokens > 0 for g in config.evaluate.generation),
         "evaluate.generation[].max_new_tokens must be positive"),
        (config.evaluate.judge is None
         or (config.evaluate.judge.concurrency > 0 and config.evaluate.judge.retries >= 0),
         "evaluate.judge.concurrency must be positive and evaluate.judge.retries >= 0"),
        *_tprl_checks(config.tprl),
        *_range_checks(config),
        *_resource_checks(config),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return config


def config_from_dict(data: dict) -> PipelineConfig:
    return validate(_build(PipelineConfig, data or {}, ""))


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> PipelineConfig:
    """Load a YAML config (or the embedded default when ``path`` is None); relative paths resolve against the file."""
    data: dict = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                              "save it as UTF-8") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
        except RecursionError:
            raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from None
        base = path.parent.resolve()
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (work_dir, model, data, ...), got "
                          f"{type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: {'.'.join(parents[:i + 1])} is a value, not a section")
        node[leaf] = value
    try:
        config = config_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{path or 'default config'}: {err}") from None
    config = resolve_paths(config, base)
    _check_generated_splits(data.get("data") or {}, config, path)
    return config


# Where a generated benchmark writes its splits, under the work_dir (pipeline.commands.run.prepare_data)
GENERATED_DIRS = {"mt_shapes": "data/mt-shapes", "mt_video": "data/mt-video"}


def _check_generated_splits(named: dict, config: PipelineConfig, path) -> None:
    """A generated benchmark (data.mt_shapes / data.mt_video) writes its own three splits and points data.train,
    data.val and data.test at them, so a split file named next to it would be silently replaced: refuse it, unless
    it is the generated file itself (a saved resolved_config.yaml)."""
    generated = [name for name in GENERATED_DIRS if getattr(config.data, name) is not None]
    if not generated:
        return
    spec = generated[0]
    folder = GENERATED_DIRS[spec]
    for split in ("train", "val", "test"):
        value = getattr(config.data, split)
        if split in named and not Path(value).as_posix().endswith(f"{folder}/{split}/dialogues.jsonl"):
            raise ConfigError(f"{path or 'default config'}: data.{split} = {value}, but data.{spec} generates the "
                              f"splits under <work_dir>/{folder} and would replace it; to read your own files, set "
                              f"data.{spec}: null and name data.train, data.val and data.test")


def resolve_paths(config: PipelineConfig, base: Path) -> PipelineConfig:
    def resolve(p: str | None) -> str | None:
        if p is None or "://" in p:
            return p
        return str((base / p).resolve()) if not Path(p).is_absolute() else p

    config.work_dir = resolve(config.work_dir)
    config.model.path = resolve(config.model.path)
    for name in ("train", "val", "test"):
        setattr(config.data, name, resolve(getattr(config.data, name)))
    if config.evaluate.judge is not None:
        for name in ("model_dir", "cache", "positions"):
            setattr(config.evaluate.judge, name, resolve(getattr(config.evaluate.judge, name)))
    return config
