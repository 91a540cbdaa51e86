"""Fuzzing the loaders of user files (docs/design.md §8) with Hypothesis: random bytes and random structures give a
dialogue or a named bad record per line (never a traceback, never a silent drop), and a config or one ConfigError."""

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
turn = st.fixed_dictionaries({"question": json_value | st.text(min_size=1, max_size=10),
                              "answers": json_value | st.lists(st.text(max_size=5), max_size=3)},
                             optional={"meta": json_value, "extra": json_value})
record = st.fixed_dictionaries(
    {"dialogue_id": json_value | st.text(min_size=1, max_size=8), "image": json_value | st.sampled_from(
        ["a.png", "../up.png", "/abs/b.png", "sub/../c.png", "", "x\x00y"]),
     "turns": json_value | st.lists(turn, max_size=3), "source": json_value | st.sampled_from(["vqa_v2", "s"])},
    optional={"meta": json_value, "turn": json_value})
line = (record.map(lambda r: json.dumps(r).encode()) | json_value.map(lambda v: json.dumps(v).encode())
        | st.binary(max_size=40).map(lambda b: b.replace(b"\n", b" ")))


def _nonblank(lines: list[bytes]) -> int:
    return sum(1 for raw in lines if raw.decode("utf-8", errors="replace").strip())


@SETTINGS
@given(st.lists(line, max_size=8))
def test_every_line_of_a_dialogue_file_is_a_dialogue_or_a_named_bad_record(lines):
    from pipeline.dialogues import DialogueFormatError, iter_dialogues

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dialogues.jsonl"
        path.write_bytes(b"\n".join(lines))
        bad = []
        good = list(iter_dialogues(path, check_images=False, on_error=bad.append))
        assert len(good) + len(bad) == _nonblank(lines)  # nothing dropped silently
        for b in bad:
            assert b.path == str(path) and 1 <= b.line <= len(lines) and b.reason
        for d in good:  # what passes is what the format promises (docs/design.md §3.1)
            assert isinstance(d.dialogue_id, str) and d.dialogue_id.strip() and d.turns
            assert all(isinstance(a, str) for t in d.turns for a in t.answers) and all(t.answers for t in d.turns)
            assert Path(d.image).is_absolute() and ".." not in Path(d.image).relative_to(tmp).parts \
                if not d.image.startswith("/abs") else True
        assert len({d.dialogue_id for d in good}) == len(good)
        try:  # strict mode: the same file raises one error naming file:line, or passes
            assert len(list(iter_dialogues(path, check_images=False))) == len(good) and not bad
        except DialogueFormatError as e:
            assert bad and str(e).startswith(f"{path}:{bad[0].line}: ")


config_keys = st.sampled_from(["work_dir", "model", "data", "shards", "train", "evaluate", "tprl", "ray", "x",
                               "teacher", "tracking"])
sub_keys = st.sampled_from(["path", "dtype", "rates", "lr", "max_train_dialogues", "max_eval_dialogues", "methods",
                            "format", "dialogues_per_shard", "batch_size", "epochs", "num_workers", "mt_shapes",
                            "top_k", "enabled", "bogus"])
config_value = json_value | st.dictionaries(sub_keys, json_value | st.floats() | st.integers(-5, 5), max_size=4)


@SETTINGS
@given(st.dictionaries(config_keys, config_value, max_size=5))
def test_random_config_structures_load_or_raise_one_config_error(data):
    from pipeline.config import ConfigError, PipelineConfig, config_from_dict

    try:
        config = config_from_dict(data)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e).strip()
        return
    assert isinstance(config, PipelineConfig)
    assert all(0 < r < 1 for r in config.train.rates + config.evaluate.rates)
    for limit in (config.data.max_train_dialogues, config.data.max_eval_dialogues):
        assert limit is None or limit >= 1


@SETTINGS
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_random_config_files_load_or_raise_one_config_error(content):
    from pipeline.config import ConfigError, load_config

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_bytes(content)
        try:
            load_config(path)
        except ConfigError as e:
            assert str(path) in str(e)
