"""`metacompress plan`: the memory arithmetic against real models, the cluster file, the refusal and its advice."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_failure_cli import run_cli

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "infra" / "configs" / "cluster.yaml"


@pytest.mark.parametrize("arch", ["llava-1.5-7b", "llava-next-7b", "tiny", "tiny-next"])
def test_parameter_count_equals_the_model_built_on_the_meta_device(arch):
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    from infra.architectures import build_config
    from infra.memory_plan import ModelShape

    config = build_config(arch)
    cls = LlavaNextForConditionalGeneration if "next" in arch else LlavaForConditionalGeneration
    with torch.device("meta"):
        model = cls(config)
    assert ModelShape.of(config).params == sum(p.numel() for p in model.parameters())


def test_visual_tokens_are_the_most_the_adapter_produces():
    from infra.architectures import build_adapter, build_config, get_architecture, random_image
    from infra.memory_plan import ModelShape

    adapter = build_adapter("tiny-next")
    sizes = get_architecture("tiny-next").grid_pinpoints + [[40, 64], [64, 20], [50, 50]]
    most = max(adapter.encode(random_image(h, w)).tokens.shape[0] for h, w in sizes)
    assert ModelShape.of(build_config("tiny-next")).max_visual_tokens == most
    assert ModelShape.of(build_config("llava-1.5-7b")).max_visual_tokens == 576
    assert ModelShape.of(build_config("llava-next-7b")).max_visual_tokens == 2928  # as in infra.architectures


def test_kv_bytes_equal_the_cache_of_a_real_prefill():
    import torch

    from infra.architectures import build_adapter
    from infra.memory_plan import ModelShape

    adapter = build_adapter("tiny")
    batch, tokens = 3, 37
    with torch.no_grad():
        out = adapter.language_model(input_ids=torch.randint(0, 100, (batch, tokens)), use_cache=True)
    cache = out.past_key_values
    stored = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    shape = ModelShape.of(adapter.model.config)
    assert shape.kv_bytes(batch, tokens, torch.finfo(adapter.dtype).bits // 8) == stored


def test_cluster_file_gpus():
    import yaml

    from infra.memory_plan import cluster_gpus

    found = cluster_gpus(yaml.safe_load((ROOT / "ray_cluster.yaml").read_text()))
    assert found and "head" not in found
    assert cluster_gpus({"available_node_types": {"a": {"node_config": {"InstanceType": "g5.2xlarge"}},
                                                  "b": {"resources": {"H100-80GB": 1}},
                                                  "c": {"node_config": {"InstanceType": "m6i.large"}}}}) == \
        {"a": "A10G", "b": "H100-80GB"}


@pytest.mark.parametrize("arch", ["llava-1.5-7b", "llava-next-7b"])
def test_the_cluster_config_fits_the_cluster_file(arch):
    from pipeline.commands.plan import check_plan
    from pipeline.config import load_config

    table, problem = check_plan(load_config(CONFIG), arch)
    assert problem is None, problem
    assert table.count("| fits |") + table.count("| fits") >= 4


def test_a_plan_that_does_not_fit_names_the_stage_and_its_advice_fits():
    import re

    from pipeline.commands.plan import check_plan
    from pipeline.config import load_config

    config = load_config(CONFIG)
    _, problem = check_plan(config, "llava-next-7b", gpus=["A10G"])
    stage = re.match(r"stage (\w+) needs [\d.]+ GiB per actor but --gpu A10G has A10G", problem).group(1)
    batch = int(re.search(r"set evaluate.batch_size: (\d+) \(or less\)", problem).group(1))
    assert stage in ("teacher", "evaluate")
    config.evaluate.batch_size = batch  # the advice: now neither batched stage is refused
    _, again = check_plan(config, "llava-next-7b", gpus=["A10G"])
    assert again is None or not re.match(r"stage (teacher|evaluate) ", again), again
    config.evaluate.batch_size = batch + 1  # and the advice was the largest batch that fits
    assert re.match(r"stage (teacher|evaluate) ", check_plan(config, "llava-next-7b", gpus=["A10G"])[1])


def test_plan_command_exit_codes(capsys):
    ok = run_cli(capsys, "plan", str(CONFIG), "--arch", "llava-next-7b")
    assert ok.returncode == 0 and "| evaluate |" in ok.stdout, ok.stderr[-2000:]
    refused = run_cli(capsys, "plan", str(CONFIG), "--arch", "llava-next-7b", "--gpu", "T4")
    assert refused.returncode == 2 and "| evaluate |" in refused.stdout
    assert refused.stderr.strip().count("\n") == 0 and "stage " in refused.stderr and "T4" in refused.stderr


def test_submit_dry_run_prints_the_job_and_the_plan(capsys):
    proc = run_cli(capsys, "submit", str(CONFIG), "--dry-run", "--arch", "llava-1.5-7b")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "would submit metacompress-extract-teacher-train-" in proc.stdout and "| train |" in proc.stdout


def test_qwen_visual_tokens_are_what_the_adapter_produces_at_max_pixels(tmp_path):
    """Dynamic resolution: planned at the processor's max_pixels (stated in the plan); the tiny Qwen's adapter makes
    exactly that many tokens from an image of that size."""
    from infra.architectures import build_adapter, build_config
    from infra.memory_plan import ModelShape
    from tests.tiny_models import random_image

    adapter = build_adapter("tiny-qwen")
    shape = ModelShape.of(build_config("tiny-qwen"), max_pixels=64 * 48)
    assert shape.max_visual_tokens == adapter.encode(random_image(48, 64)).tokens.shape[0]
    assert ModelShape.of(build_config("qwen2.5-vl-7b"), max_pixels=672 * 672).max_visual_tokens == 576  # 24 x 24
    with pytest.raises(ValueError, match="--max-pixels"):
        ModelShape.of(build_config("tiny-qwen"))
    # a model directory: its preprocessor_config.json's bound (longest_edge pixels), 8 x 8 pixels per token
    import json

    from pipeline.commands.plan import model_shape
    from pipeline.config import config_from_dict

    adapter.model.save_pretrained(str(tmp_path))
    adapter.image_processor.save_pretrained(str(tmp_path))
    longest = json.loads((tmp_path / "preprocessor_config.json").read_text())["size"]["longest_edge"]
    shape, _ = model_shape(config_from_dict({"model": {"path": str(tmp_path)}}), None)
    assert shape.max_visual_tokens == longest // 64 and str(longest) in shape.note


def test_plan_for_qwen_states_its_assumption(capsys):
    def plan(*args):
        return run_cli(capsys, "plan", str(CONFIG), "--arch", "qwen2.5-vl-7b", *args)

    default = plan()  # the processor's max_pixels, 12845056: 16384 tokens of 28 x 28 pixels
    assert default.returncode in (0, 2) and "Traceback" not in default.stderr, default.stderr[-2000:]
    assert "dynamic resolution" in default.stdout and "= 16384 visual tokens" in default.stdout
    small = plan("--max-pixels", str(672 * 672))
    assert small.returncode == 0, small.stderr[-2000:]
    assert "| evaluate | 8 | 736 |" in small.stdout  # 576 visual tokens + 160 of text, as llava-1.5-7b's 736


def test_train_memory_under_zero3_and_activation_checkpointing():
    """ZeRO-3: a worker's weights fall with the number of workers (never below its share); checkpointing keeps less;
    the batch column is the micro batch."""
    from infra.architectures import build_config
    from infra.memory_plan import ModelShape, stage_memory
    from pipeline.config import load_config

    shape = ModelShape.of(build_config("llava-1.5-7b"))

    def train_row(**train):
        return stage_memory(shape, load_config(CONFIG, {f"train.{k}": v for k, v in train.items()}))[-1]

    base = train_row()
    assert base.batch == 3 and base.weights == shape.params * 2  # micro 3 x 3 steps x 4 workers; bf16, ZeRO-2
    four, twelve = train_row(zero_stage=3), train_row(zero_stage=3, num_workers=12, gradient_accumulation_steps=1)
    assert shape.params * 2 / 12 < twelve.weights < four.weights < base.weights
    assert four.weights >= shape.params * 2 / 4
    checkpointed = train_row(activation_checkpointing=True)
    assert checkpointed.activations < base.activations / 4 and checkpointed.weights == base.weights
