"""MLflow tracking on a SQLite store in a temporary directory: run nesting, the compressor as a registered model."""

import json
from pathlib import Path

import pytest


def make_config(root: Path, **tracking):
    from pipeline.config import config_from_dict

    return config_from_dict({"work_dir": str(root / "work"), "tracking": {"registered_model": "mc-test", **tracking}})


def trained_like(seed: int, d: int = 24):
    """A MetaCompress whose weights are all moved away from the initialisation (as training would)."""
    import torch

    from compress.metacompress import MetaCompress

    torch.manual_seed(seed)
    module = MetaCompress(d, compress_dim=8, kernel_size=3, reference_grid=(4, 4))
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module


def test_store_locations(tmp_path):
    from pipeline.tracking import artifact_root, tracking_uri

    config = make_config(tmp_path)
    assert tracking_uri(config) == f"sqlite:///{tmp_path / 'work'}/mlflow.db"
    assert artifact_root(config) == f"file://{tmp_path / 'work'}/mlartifacts"
    remote = make_config(tmp_path, uri="http://head:5000")
    assert tracking_uri(remote) == "http://head:5000" and artifact_root(remote) is None


def test_stage_runs_nest_under_the_pipeline_run(tmp_path):
    import mlflow

    from pipeline import tracking

    config = make_config(tmp_path)
    with tracking.pipeline_run(config, name="p") as parent:
        with tracking.stage_run(config, "extract", params={"split": "train"}) as child:
            mlflow.log_metric("records", 3)
    with tracking.stage_run(config, "alone") as alone:  # no active parent: a top-level run
        pass
    client = mlflow.tracking.MlflowClient()
    got = client.get_run(child.info.run_id)
    assert got.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert got.data.params == {"split": "train"} and got.data.metrics == {"records": 3.0}
    assert client.get_run(parent.info.run_id).data.params["train.lr"] == str(config.train.lr)
    assert "mlflow.parentRunId" not in client.get_run(alone.info.run_id).data.tags
    assert (tmp_path / "work" / "mlflow.db").is_file()


def test_registered_compressor_loads_back_and_reduces_identically(tmp_path):
    import mlflow
    import numpy as np
    import torch

    from compress.layout import Layout
    from pipeline import tracking

    config = make_config(tmp_path)
    first, second = trained_like(0), trained_like(1)
    first.save_pretrained(tmp_path / "c1")
    second.save_pretrained(tmp_path / "c2")
    with tracking.stage_run(config, "train"):
        v1 = tracking.log_compressor(tmp_path / "c1", config, tags={"rate": "0.9"})
        v2 = tracking.log_compressor(tmp_path / "c2", config)
    assert (int(v1.version), int(v2.version)) == (1, 2)
    assert v2.aliases == ["candidate"] and v1.tags["rate"] == "0.9"

    loaded = tracking.load_compressor("models:/mc-test@candidate")  # the alias moved to the latest
    pinned = tracking.load_compressor("models:/mc-test/1")
    x = torch.randn(20, 24)
    layout = Layout.sequence(20)
    for module, reference in ((loaded, second), (pinned, first)):
        got, want = module(x, 5, layout), reference(x, 5, layout)
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.matrix, want.matrix)

    # nothing pickled: the model directory holds the code file, safetensors and JSON only
    local = Path(mlflow.artifacts.download_artifacts("models:/mc-test@candidate", dst_path=str(tmp_path / "dl")))
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle", ".pt", ".pth")]
    assert any(p.name == "model.safetensors" for p in local.rglob("*"))
    # the pyfunc flavour (runs pipeline/mlflow_model.py) predicts the same reduction
    pyfunc = mlflow.pyfunc.load_model("models:/mc-test@candidate")
    out = pyfunc.predict(x.numpy(), params={"rate": 0.75, "layout": json.dumps(layout.to_dict())})
    np.testing.assert_array_equal(out, second(x, 5, layout).tokens.detach().numpy())


def test_load_compressor_from_directories_and_bad_refs(tmp_path):
    import torch

    from pipeline import tracking

    module = trained_like(2)
    module.save_pretrained(tmp_path / "plain")
    back = tracking.load_compressor(tmp_path / "plain")
    for key, value in module.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="expected one MetaCompress directory"):
        tracking.load_compressor(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="is missing"):  # validated before anything is logged
        tracking.log_compressor(tmp_path / "empty", make_config(tmp_path))
