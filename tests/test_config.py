import pytest
import yaml

from pipeline.config import ConfigError, PipelineConfig, load_config


def write(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_default_config_is_valid_and_round_trips(tmp_path):
    config = load_config()
    assert isinstance(config, PipelineConfig)
    config.save(tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again.to_dict() == config.to_dict()


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    config = load_config(write(tmp_path, {"work_dir": "out", "model": {"path": "m"}, "data": {"train": "s3://b/t.jsonl"}}))
    assert config.work_dir == str(tmp_path / "out")
    assert config.model.path == str(tmp_path / "m")
    assert config.data.train == "s3://b/t.jsonl"


@pytest.mark.parametrize("data, message", [
    ({"trian": {}}, "unknown key trian"),
    ({"train": {"lrr": 1}}, "unknown key train.lrr"),
    ({"train": {"lr": "fast"}}, "train.lr: expected float"),
    ({"train": {"zero_stage": 4}}, r"train.zero_stage: 4 is not one of \[0, 1, 2, 3\]"),
    ({"train": {"rates": [0.5, 1.0]}}, r"train.rates: every rate must be in \(0, 1\)"),
    ({"shards": {"format": "csv"}}, "shards.format"),
    ({"train": {"heldout_dialogues": -1}}, r"train.heldout_dialogues = -1: must be >= 0"),
    ({"shards": {"verify": "yes"}}, "shards.verify: expected bool"),
    ({"extract": {"quantize": "int8"}}, "extract.quantize = int8 needs extract.cache: pre_projector"),
    ({"extract": {"cache": "pre_projector"}, "train": {"zero_stage": 3}}, "pre_projector needs train.zero_stage"),
    ({"teacher": {"top_k": True}}, "teacher.top_k: expected int"),
    ({"model": "x"}, "model: expected a mapping"),
])
def test_bad_configs_name_the_key(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, data))


def test_ints_are_accepted_for_floats_and_overrides_apply(tmp_path):
    config = load_config(write(tmp_path, {"train": {"lr": 1}}), overrides={"train.epochs": 3})
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.train.epochs == 3
    # YAML 1.1 reads 3e-4 as a string; a float field takes it as the number it spells
    (tmp_path / "e.yaml").write_text("train:\n  lr: 3e-4\n")
    assert load_config(tmp_path / "e.yaml").train.lr == 0.0003


def test_section_hash_changes_only_with_its_sections():
    a, b = load_config(), load_config()
    b.train.lr = 0.5
    assert a.section_hash("model", "teacher") == b.section_hash("model", "teacher")
    assert a.section_hash("train") != b.section_hash("train")


def test_a_split_named_next_to_a_generated_benchmark_is_refused_not_replaced(tmp_path):
    source = write(tmp_path, {"model": {"path": "m"}, "data": {"mt_shapes": {"dialogues": 100, "val": 10, "test": 10}}})
    with pytest.raises(ConfigError, match=r"data.test = /elsewhere/test.jsonl, but data.mt_shapes generates .* "
                                          r"set data.mt_shapes: null"):
        load_config(source, overrides={"data.test": "/elsewhere/test.jsonl"})
    # the generated files themselves (a saved resolved_config.yaml) and the generator turned off are fine
    generated = {f"data.{s}": f"/w/data/mt-shapes/{s}/dialogues.jsonl" for s in ("train", "val", "test")}
    assert load_config(source, overrides=generated).data.test == "/w/data/mt-shapes/test/dialogues.jsonl"
    own = load_config(source, overrides={"data.mt_shapes": None, "data.test": "/elsewhere/test.jsonl"})
    assert own.data.mt_shapes is None and own.data.test == "/elsewhere/test.jsonl"
    video = write(tmp_path, {"model": {"path": "m"}, "data": {"mt_video": {"dialogues": 100, "val": 10, "test": 10},
                                                               "val": "v.jsonl"}}, "v.yaml")
    with pytest.raises(ConfigError, match="data.val = .*v.jsonl, but data.mt_video generates"):
        load_config(video)
