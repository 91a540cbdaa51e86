"""Where each stage writes and what its output is keyed by: the contract between the stages (docs/design.md §3, §6).

Every stage finds its own output and its inputs here, so no stage imports another. A stage output is a
:class:`pipeline.shards.StageOutput` whose arguments (``uri``, ``stage``, ``config_hash``, ``input_hash``, ``fmt``)
are built by the ``*_args`` functions below: ``config_hash`` covers everything the numbers depend on besides the
data, ``input_hash`` the data and how it is cut into shards. Paths are ``<work_dir>/<stage>/...``.
"""

from __future__ import annotations

from pipeline.config import PipelineConfig
from pipeline.hashing import config_hash, file_sha256
from pipeline.shards import StageOutput, read_completed
from stages.common import model_identity, split_limit, video_sampling

EXTRACT, TEACHER, TRAIN, TPRL, EVALUATE = "extract", "teacher", "train", "tprl", "evaluate"


# --- extract: feature shards ---------------------------------------------------------------------------------------
def storage_dtype(model_dtype: str) -> str:
    """The dtype features are stored in: float16 for float32 models (half the bytes), else the model's."""
    return "float16" if model_dtype == "float32" else model_dtype


def extract_hash(config: PipelineConfig) -> str:
    keyed = {"model": model_identity(config.model.path), "dtype": config.model.dtype, "format": config.shards.format}
    if config.extract.cache != "post_projector":  # the post-projector cache keeps the hash it always had
        keyed.update(cache=config.extract.cache, quantize=config.extract.quantize)
    return config_hash(keyed)


def extract_uri(config: PipelineConfig, split: str) -> str:
    return f"{config.work_dir}/{EXTRACT}/{split}"


def extract_args(config: PipelineConfig, split: str) -> dict:
    # What goes into which shard depends on the file, how much of it is used and how it is cut.
    inputs = {"dialogues": file_sha256(getattr(config.data, split)), "limit": split_limit(config, split),
              "dialogues_per_shard": config.shards.dialogues_per_shard}
    video = video_sampling(config)
    if video is not None:  # a video's tokens depend on its frames (image runs keep the hash they had)
        inputs["video"] = video
    return dict(uri=extract_uri(config, split), stage=EXTRACT, config_hash=extract_hash(config),
                input_hash=config_hash(inputs), fmt=config.shards.format, verify=config.shards.verify)


def finished_extract_args(config: PipelineConfig, split: str, consumer: str) -> dict:
    """The extract stage's finished output of ``split`` for this config; FileNotFoundError naming ``consumer`` when
    it is missing or unfinished, ValueError when it was made from another model, dtype, format or dialogue file."""
    args = extract_args(config, split)
    try:
        manifest = read_completed(args["uri"])
    except FileNotFoundError:
        raise FileNotFoundError(f"{consumer}: no finished extract output at {args['uri']} for this config; run the "
                                f"extract stage first (`metacompress run --stages extract,{consumer}`)") from None
    if [manifest["config_hash"], manifest["input_hash"]] != [args["config_hash"], args["input_hash"]]:
        raise ValueError(f"{args['uri']} was extracted with another model, dtype, format or dialogue file than this "
                         "config; run the extract stage for this config first (or point work_dir elsewhere)")
    return args


# --- teacher: target shards ----------------------------------------------------------------------------------------
def teacher_hash(config: PipelineConfig) -> str:
    return config_hash({"model": model_identity(config.model.path), "dtype": config.model.dtype,
                        "top_k": config.teacher.top_k, "max_new_tokens": config.teacher.max_new_tokens,
                        "history": config.teacher.history, "format": config.shards.format,
                        "targets": "answer+end_of_turn"})  # targets end with the stop token (docs/design.md §5)


def teacher_uri(config: PipelineConfig, split: str) -> str:
    return f"{config.work_dir}/{TEACHER}/{split}"


def teacher_args(config: PipelineConfig, split: str) -> dict:
    """Keyed by the features it was computed from (FileNotFoundError when extract has not finished)."""
    features = read_completed(extract_uri(config, split))
    return dict(uri=teacher_uri(config, split), stage=TEACHER, config_hash=teacher_hash(config),
                input_hash=config_hash([features["config_hash"], features["input_hash"]]), fmt=config.shards.format,
                verify=config.shards.verify)


# --- train: one compressor per rate --------------------------------------------------------------------------------
def rate_dir(config: PipelineConfig, rate: float) -> str:
    return f"{config.work_dir}/{TRAIN}/rate-{rate}"


def compressor_dir(config: PipelineConfig, rate: float) -> str:
    """Where the trained compressor of ``rate`` is saved (``MetaCompress.save_pretrained``)."""
    return f"{rate_dir(config, rate)}/compressor"


def trained_files_problem(marker: str, directory: str) -> str | None:
    """None when the weights in ``directory`` are the bytes its stage's ``_SUCCESS`` (``marker``) recorded; else why
    not, naming the file (docs/design.md §8). A missing marker is a problem too: nothing vouches for the files.
    Both may be on any storage URI (pipeline.storage)."""
    import json

    from pipeline import storage

    try:
        recorded = json.loads(storage.read_bytes(marker)).get("files", {})
    except FileNotFoundError:
        return f"{marker} is missing (the stage did not finish writing {directory})"
    except (ValueError, AttributeError):
        return f"{marker} is not the JSON the stage writes"
    if not isinstance(recorded, dict) or not recorded:
        return f"{directory}: no sha256 recorded for its files (written by an older version)"
    found = storage.files_sha256(directory)
    for name, digest in sorted(recorded.items()):
        if name not in found:
            return f"{storage.join(directory, name)} is missing"
        if found[name] != digest:
            return f"{storage.join(directory, name)} changed after it was written (its sha256 differs from the one " \
                   "recorded)"
    return None


def write_trained_marker(marker: str, directory: str, record: dict) -> None:
    """``marker`` (a stage's ``_SUCCESS``) = ``record`` plus ``files``: the sha256 of every file in ``directory``,
    checked by every consumer before use (docs/design.md §8); written atomically (pipeline.storage)."""
    import json

    from pipeline import storage

    files = storage.files_sha256(directory)
    storage.write_bytes(marker, (json.dumps({**record, "files": files}, indent=2) + "\n").encode())


def verified_trained_dir(marker: str, directory: str, stage: str) -> str:
    """``directory`` after checking it against ``marker``; a ValueError naming the damaged file otherwise."""
    problem = trained_files_problem(marker, directory)
    if problem:
        raise ValueError(f"{problem}; it is not used. Run the {stage} stage again: it recomputes the weights from "
                         "its checkpoints")
    return directory


# --- tprl: one policy ----------------------------------------------------------------------------------------------
def tprl_dir(config: PipelineConfig) -> str:
    return f"{config.work_dir}/{TPRL}"


def policy_dir(config: PipelineConfig) -> str:
    """Where the trained TPRL policy is saved (``TPRLPolicy.save_pretrained``)."""
    return f"{tprl_dir(config)}/policy"


# --- evaluate: one output per (method, rate), then reports ----------------------------------------------------------
def eval_input_hash(config: PipelineConfig, split: str) -> str:
    """The dialogues and how they are cut into shards (a different cut changes what shard ``i`` holds)."""
    inputs = {"dialogues": file_sha256(getattr(config.data, split)), "limit": config.data.max_eval_dialogues,
              "per_shard": config.shards.dialogues_per_shard}
    video = video_sampling(config)
    return config_hash(inputs if video is None else {**inputs, "video": video})


def eval_feature_hash(config: PipelineConfig, split: str) -> str | None:
    """The extract output's config hash when ``evaluate.cached_features`` is on (None otherwise)."""
    if not config.evaluate.cached_features:
        return None
    uri = extract_uri(config, split)
    found = read_completed(uri)["config_hash"]
    if found != extract_hash(config):
        raise ValueError(f"{uri} was extracted with another model, dtype or format than this config; run the extract "
                         "stage for this config first (or set evaluate.cached_features: false)")
    return found


def eval_uri(config: PipelineConfig, split: str) -> str:
    return f"{config.work_dir}/{EVALUATE}/{split}"


def reports_dir(config: PipelineConfig, split: str) -> str:
    return f"{config.work_dir}/reports/{split}"


def complete_output(args: dict) -> StageOutput | None:
    """The finished stage output with these arguments, or None when it is missing or unfinished."""
    try:
        out = StageOutput(**args)
        return out if out.is_complete() else None
    except FileNotFoundError:
        return None
