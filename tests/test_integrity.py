"""The integrity chain (docs/design.md §8): nothing on disk is unpickled, every trained artifact is checked against
the sha256 its producer recorded before use, the registry keeps the weights' hash and loading checks it."""

import hashlib
import json
import pickle
from pathlib import Path

import pytest


class _Payload:
    """Unpickling this creates ``path``: the marker that code from the work directory ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(_Payload(marker)))


def flip_bytes(path: Path, count: int = 8) -> None:
    """Flip ``count`` bytes in the middle of the file (the tensor data, not the header)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(count):
        data[middle + i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_the_payload_really_runs_when_unpickled(tmp_path):
    """The marker the tests below look for appears when the payload is unpickled (so its absence means something)."""
    marker = tmp_path / "ran"
    plant(tmp_path / "x.pt", marker)
    pickle.loads((tmp_path / "x.pt").read_bytes())
    assert marker.exists()


def _fake_train_checkpoint(directory: Path, run_hash: str = "abc") -> None:
    """A checkpoint in the train stage's format, written without DeepSpeed (one rank, one parameter)."""
    import torch
    from safetensors.torch import save_file

    from stages.train import checkpoints

    directory.mkdir(parents=True, exist_ok=True)
    save_file({"param.0": torch.arange(4.0), "state.0.exp_avg": torch.ones(4), "rng.torch": torch.get_rng_state()},
              str(directory / "rank-0.safetensors"))
    save_file({"w": torch.ones(2, 2)}, str(directory / checkpoints.COMPRESSOR_FILE))
    record = {"format": checkpoints.FORMAT, "run_hash": run_hash, "step": 4, "rank": 0, "world_size": 1,
              "zero_stage": 0, "metrics": {"loss": 1.0}, "extra": {}, "param_groups": [{"lr": 0.1}],
              "param_shapes": [[4]], "optimizer_scalars": {}, "state_entries": [0],
              "files": {name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
                        for name in ("rank-0.safetensors", checkpoints.COMPRESSOR_FILE)}}
    (directory / "rank-0.json").write_text(json.dumps(record))


def test_train_checkpoint_reads_only_safetensors_and_json(tmp_path):
    import torch

    from stages.train import checkpoints

    ckpt, marker = tmp_path / "ckpt", tmp_path / "ran"
    _fake_train_checkpoint(ckpt)
    # DeepSpeed's file names next to ours: never opened
    for name in ("step-4/mp_rank_00_model_states.pt", "step-4/zero_pp_rank_0_mp_rank_00_optim_states.pt", "latest",
                 "model.pkl"):
        plant(ckpt / name, marker)
    record, tensors, compressor = checkpoints.read(ckpt, 0, 1, "abc")
    assert record["step"] == 4 and torch.equal(tensors["param.0"], torch.arange(4.0))
    assert torch.equal(compressor["w"], torch.ones(2, 2))
    assert not marker.exists()


@pytest.mark.parametrize("victim", ["rank-0.json", "rank-0.safetensors", "compressor.safetensors"])
def test_a_pickle_in_place_of_a_train_checkpoint_file_is_refused_and_never_runs(tmp_path, victim):
    from stages.train import checkpoints

    ckpt, marker = tmp_path / "ckpt", tmp_path / "ran"
    _fake_train_checkpoint(ckpt)
    plant(ckpt / victim, marker)
    with pytest.raises(checkpoints.CheckpointRefused, match=victim.replace(".", r"\.")):
        checkpoints.read(ckpt, 0, 1, "abc")
    assert not marker.exists()


def test_train_checkpoint_of_another_run_or_world_size_is_refused(tmp_path):
    from stages.train import checkpoints

    _fake_train_checkpoint(tmp_path / "c")
    with pytest.raises(checkpoints.CheckpointRefused, match="not this run"):
        checkpoints.read(tmp_path / "c", 0, 1, "other")
    with pytest.raises(checkpoints.CheckpointRefused, match="workers"):
        checkpoints.read(tmp_path / "c", 0, 2, "abc")


def test_no_code_path_in_the_project_unpickles():
    """No torch.load / pickle.load / DeepSpeed load_checkpoint in the code that reads the work directory."""
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for folder in ("compress", "pipeline", "stages", "infra"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            for needle in ("torch.load(", "pickle.load", "cloudpickle.load", ".load_checkpoint(", "allow_pickle=True",
                           "read_pickle(", "joblib.load"):
                if needle in text:
                    offenders.append(f"{path.relative_to(root)}: {needle}")
    assert offenders == []


def _tiny_policy():
    from compress.tprl.autoencoder import TokenAutoencoder
    from compress.tprl.policy import PolicyConfig, TPRLPolicy

    return TPRLPolicy(PolicyConfig(d_query=16, d_model=8, n_layers=1, n_heads=2), TokenAutoencoder(16, 8, 16))


def test_tprl_checkpoint_damaged_or_pickled_is_skipped_for_the_previous_one(tmp_path):
    import torch

    from compress.tprl.ppo import make_optimizer
    from stages.tprl.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint

    policy = _tiny_policy()
    optimizer = make_optimizer(policy, 1e-3, 1e-3)
    first = save_checkpoint(tmp_path, 1, policy, optimizer, {"trajectory_hash": "t"})
    second = save_checkpoint(tmp_path, 2, policy, optimizer, {"trajectory_hash": "t"})
    assert latest_checkpoint(tmp_path) == second
    marker = tmp_path / "ran"
    plant(second / "tensors.safetensors", marker)
    assert latest_checkpoint(tmp_path) == first  # the damaged newest one is refused
    with pytest.raises(ValueError, match="tensors.safetensors"):
        load_checkpoint(second, lambda p: make_optimizer(p, 1e-3, 1e-3))
    plant(first / "state.json", marker)
    assert latest_checkpoint(tmp_path) is None
    assert not marker.exists()
    restored, _, state = load_checkpoint(save_checkpoint(tmp_path, 3, policy, optimizer, {}),
                                         lambda p: make_optimizer(p, 1e-3, 1e-3))
    assert state["iteration"] == 3
    for key, value in policy.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value)


def _trained(tmp_path: Path) -> tuple[Path, Path]:
    """A compressor directory and the _SUCCESS its stage leaves (sha256 of its files)."""
    import torch

    from compress.metacompress import MetaCompress
    from stages.outputs import write_trained_marker

    torch.manual_seed(0)
    directory = tmp_path / "rate-0.9" / "compressor"
    MetaCompress(hidden_size=16, compress_dim=8).save_pretrained(directory)
    marker = tmp_path / "rate-0.9" / "_SUCCESS"
    write_trained_marker(str(marker), str(directory), {"run_hash": "h", "metrics": {"loss": 1.0}})
    return directory, marker


def test_flipped_bytes_in_a_trained_compressor_are_caught_by_train_and_evaluate(tmp_path, caplog):
    from pipeline.hashing import file_sha256
    from stages.outputs import verified_trained_dir
    from stages.train.driver import _finished

    directory, marker = _trained(tmp_path)
    recorded = json.loads(marker.read_text())["files"]
    assert recorded["model.safetensors"] == file_sha256(str(directory / "model.safetensors"))
    assert _finished(marker, "h", str(directory))["metrics"] == {"loss": 1.0}  # intact: reused
    assert verified_trained_dir(str(marker), str(directory), "train") == str(directory)
    flip_bytes(directory / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors changed after it was written"):
        verified_trained_dir(str(marker), str(directory), "train")  # evaluate refuses it
    with caplog.at_level("WARNING", logger="metacompress"):
        assert _finished(marker, "h", str(directory)) is None  # train recomputes it
    assert "model.safetensors" in caplog.text


def test_a_compressor_without_its_stage_record_is_not_used(tmp_path):
    from stages.outputs import verified_trained_dir

    directory, marker = _trained(tmp_path)
    marker.unlink()
    with pytest.raises(ValueError, match="_SUCCESS is missing"):
        verified_trained_dir(str(marker), str(directory), "train")


def test_registry_records_the_weights_hash_and_loading_checks_it(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline import tracking
    from pipeline.config import config_from_dict
    from pipeline.hashing import file_sha256

    directory, _ = _trained(tmp_path)
    config = config_from_dict({"work_dir": str(tmp_path / "work"), "tracking": {"registered_model": "integrity"}})
    version = tracking.log_compressor(directory, config)
    assert version.tags[tracking.WEIGHTS_SHA_TAG] == file_sha256(str(directory / "model.safetensors"))
    ref = "models:/integrity@candidate"
    assert tracking.load_compressor(ref) is not None
    # damage the stored artifact (not the work_dir copy)
    uri = MlflowClient().get_model_version_download_uri("integrity", version.version)
    stored = sorted(Path(tmp_path / "work" / "mlartifacts").rglob("model.safetensors"))
    assert stored, uri
    for path in stored:
        flip_bytes(path)
    with pytest.raises(ValueError, match=r"model\.safetensors differs from the sha256 the registry recorded"):
        tracking.load_compressor(ref)


def test_a_truncated_compressor_is_a_named_error(tmp_path):
    from pipeline.tracking import load_compressor

    directory, _ = _trained(tmp_path)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    with pytest.raises(ValueError, match=f"{directory}: cannot read the compressor.*damaged"):
        load_compressor(directory)
