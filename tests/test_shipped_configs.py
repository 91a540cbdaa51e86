"""The shipped main-job configs: each validates, points at a committed reference model, and trains with default.yaml's
train section (nothing tuned per model or benchmark; README, "MetaCompress beyond its benchmark")."""

from pathlib import Path

import pytest

from pipeline.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "infra" / "configs"
MAIN_JOBS = ["default", "llava_next", "mt_focus", "llava_next_mt_focus", "qwen2_5_vl", "qwen2_5_vl_video"]


@pytest.mark.parametrize("name", MAIN_JOBS)
def test_main_job_config_uses_a_committed_model_and_the_default_train_section(name):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert (Path(config.model.path) / "config.json").is_file(), config.model.path
    default = load_config(CONFIGS / "default.yaml")
    assert config.to_dict()["train"] == default.to_dict()["train"]
    assert {"sample", "fastv", "fastv_k1", "metacompress"} <= set(config.evaluate.methods)
    assert config.evaluate.rates == default.evaluate.rates == [0.7, 0.9]


def test_every_shipped_config_is_listed_or_special():
    shipped = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert shipped == set(MAIN_JOBS) | {"cluster", "tprl"}
