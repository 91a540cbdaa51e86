"""ZeRO-3 that shards (docs/design.md §6.3): the frozen LVLM partitioned as it loads, a killed ZeRO-3 run resumed to
the uninterrupted run's weights, gradient accumulation and activation checkpointing that leave the update unchanged,
the batch keys that must multiply. Tiny LLaVA, gloo on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, config_from_dict
from tests.test_train import RATE, fresh_work, load_state, objective
from tests.tiny_models import random_image


def make_examples(adapter, count: int, seed: int = 1) -> list:
    """``count`` dialogues of the same size (same image size, one answer of the same tokens): the mean loss of two
    halves is then the mean loss of the whole, as gradient accumulation assumes."""
    import torch

    from stages.train.data import Example

    g = torch.Generator().manual_seed(seed)
    answer = adapter.tokenizer("red circle", add_special_tokens=False).input_ids
    out = []
    for i in range(count):
        enc = adapter.encode(random_image(seed=seed * 100 + i))
        logp = torch.log_softmax(torch.randn(len(answer), 4, generator=g), -1) + torch.log(torch.tensor(0.9))
        out.append(Example(f"d{i}", enc.tokens, enc.layout, ["what color is it?"], [answer], logp,
                           torch.randint(0, 40, (len(answer), 4), generator=g),
                           torch.full((len(answer),), float(torch.log(torch.tensor(0.1))))))
    return out


def test_zero3_shards_the_lvlm_as_it_loads_and_a_killed_run_resumes_to_the_same_weights(train_workspace, zero2_run,
                                                                                       monkeypatch):
    """Two workers, ZeRO-3 with activation checkpointing and gradient accumulation (micro 1 x 2 x 2 workers): each
    worker holds about half the LVLM's parameter bytes from the load on; training still lowers the objective (the
    gradient reaches the compressor through the partitioned LLM) and ends where plain ZeRO-2 (micro 2 x 2 workers)
    does, up to the order of float reductions; killed after step 5 (checkpoint at 4) and resumed, it ends with the
    uninterrupted run's weights, bit for bit."""
    import torch
    from transformers import AutoConfig, LlavaForConditionalGeneration

    from stages import train

    settings = dict(zero_stage=3, activation_checkpointing=True, micro_batch_size=1, gradient_accumulation_steps=2)
    config = fresh_work(train_workspace, "zero3-whole", **settings)
    result = train.run(config, progress=False).results[RATE]
    assert result["step"] == result["total_steps"] == 8 and result["replica_max_abs_diff"] == 0.0
    assert result["frozen_params_partitioned"] > 0  # the LLM's matrices really are sharded across the workers
    # the whole model's bytes, counted here from its config on the meta device (float32: model.dtype's default)
    with torch.device("meta"):
        whole = sum(p.numel() for p in LlavaForConditionalGeneration(
            AutoConfig.from_pretrained(config.model.path)).parameters()) * 4
    assert result["lvlm_param_bytes"] == whole
    # vectors below the persistence threshold stay whole on each worker: a little over half
    assert 0.5 * whole <= result["lvlm_param_bytes_per_worker"] <= 0.55 * whole, result
    directory = train.compressor_dir(config, RATE)
    assert objective(config, directory) < objective(config) - 1e-3
    zero2 = load_state(train.compressor_dir(zero2_run[0], RATE))
    for key, value in load_state(directory).items():
        torch.testing.assert_close(value, zero2[key], rtol=1e-4, atol=1e-5)

    crashed = fresh_work(train_workspace, "zero3-crash", **settings)
    monkeypatch.setenv(train.CRASH_ENV, "5")
    with pytest.raises(Exception):
        train.run(crashed, progress=False)
    assert not Path(train.compressor_dir(crashed, RATE)).exists()
    monkeypatch.delenv(train.CRASH_ENV)
    resumed = train.run(crashed, progress=False).results[RATE]
    assert resumed["step"] == 8
    expected, got = load_state(directory), load_state(train.compressor_dir(crashed, RATE))
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


# One DeepSpeed engine (ZeRO-2, world 1, SGD): one optimizer step over the same 4 dialogues as micro batch 4 x 1 and
# as micro batch 2 x 2 accumulated, through the train stage's own step (stages.train.worker.accumulate).
SCRIPT = r"""
import json, os, sys, tempfile
import torch
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
from compress.lvlm import load_adapter
from infra.deepspeed import full_fp32_state, initialize
from pipeline.config import TrainConfig
from stages.train.student import build_student
from stages.train.worker import accumulate
from tests.test_zero3 import make_examples
from tests.tiny_models import save_tiny

model_dir = save_tiny(f"{tempfile.mkdtemp()}/model", "llava", num_layers=2)
states, engines = {}, []
for micro, accum in ((4, 1), (2, 2)):
    adapter = load_adapter(model_dir)
    tc = TrainConfig(compress_dim=16, batch_size=4, micro_batch_size=micro, gradient_accumulation_steps=accum,
                     zero_stage=2, optimizer="sgd", lr=0.5, grad_clip=100.0)
    student = build_student(adapter, tc, seed=0)
    engine = initialize(student, tc, 1, on_gpu=False)
    engines.append(engine)
    initial = full_fp32_state(student.compressor)
    engine.train()
    accumulate(engine, make_examples(adapter, 4), micro, 0.75)
    states[micro] = full_fp32_state(student.compressor)
# the ZeRO-3 load path of the train worker in bfloat16: zero.Init must not cast the LVLM to its own default (fp32)
from transformers import AutoConfig, LlavaForConditionalGeneration
from stages.train.worker import _load_lvlm, local_parameter_bytes
with torch.device("meta"):  # counted before a ZeRO-3 config is live (transformers would build under zero.Init)
    numel = sum(p.numel() for p in LlavaForConditionalGeneration(AutoConfig.from_pretrained(model_dir)).parameters())
adapter3, live = _load_lvlm(str(model_dir), "cpu", torch.bfloat16, TrainConfig(batch_size=4, zero_stage=3), 1, False)
print(json.dumps({"diff": max(float((states[4][k] - states[2][k]).abs().max()) for k in initial),
                  "update": max(float((states[4][k] - initial[k]).abs().max()) for k in initial),
                  "optimizer_steps": [e.global_steps for e in engines],
                  "zero3_dtypes": sorted({str(p.dtype) for p in adapter3.model.parameters()}),
                  "zero3_partitioned": all(hasattr(p, "ds_tensor") for p in adapter3.model.parameters()),
                  "zero3_bytes": list(local_parameter_bytes(adapter3.model)), "numel": numel}))
"""


def test_gradient_accumulation_gives_the_large_batch_update_and_zero3_loads_in_model_dtype():
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", SCRIPT, "29631"], capture_output=True, text=True, timeout=900,
                         cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["optimizer_steps"] == [1, 1]  # two micro batches, one optimizer step
    assert r["update"] > 1e-3 and r["diff"] <= 1e-5 * max(1.0, r["update"]), r
    # one worker: every parameter partitioned (into one whole part), in bfloat16
    assert r["zero3_dtypes"] == ["torch.bfloat16"] and r["zero3_partitioned"], r
    assert r["zero3_bytes"] == [2 * r["numel"], 2 * r["numel"]], r


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tmp_path):
    """The same student with and without checkpointing: equal loss and compressor gradients; with it, each decoder
    layer runs twice (the forward, then its recomputation in the backward pass)."""
    import torch

    from compress.lvlm import load_adapter
    from pipeline.config import TrainConfig
    from stages.train.student import build_student
    from tests.tiny_models import save_tiny

    model_dir = save_tiny(tmp_path / "model", "llava", num_layers=2)
    results = {}
    for checkpointing in (False, True):
        adapter = load_adapter(model_dir)
        student = build_student(adapter, TrainConfig(compress_dim=16, activation_checkpointing=checkpointing), 0)
        student.train()
        calls = []
        # counts the MLP's calls as they start: torch's recompute stops once the saved tensors are back, inside the
        # MLP, so its forward hooks would miss the recompute
        for layer in adapter.language_model.layers:
            layer.mlp.forward = (lambda f: lambda *a, **k: calls.append(1) or f(*a, **k))(layer.mlp.forward)
        out = student(make_examples(adapter, 2), 0.75)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in student.compressor.named_parameters() if p.grad is not None}
        results[checkpointing] = (out["loss"].detach(), grads, len(calls))
        assert not any(m.training for m in adapter.model.modules() if m not in student.checkpointed)
    (loss0, grads0, calls0), (loss1, grads1, calls1) = results[False], results[True]
    assert calls0 == 2 and calls1 == 4  # two layers; recomputed once each under checkpointing
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    assert grads0.keys() == grads1.keys() and grads0
    for key in grads0:
        torch.testing.assert_close(grads1[key], grads0[key], rtol=1e-6, atol=1e-8)
    assert max(float(g.abs().max()) for g in grads0.values()) > 0  # the gradient reaches the compressor


@pytest.mark.parametrize("train, message", [
    ({"batch_size": 36, "num_workers": 8}, "train.batch_size: 32 or train.batch_size: 40 or train.num_workers: one of"),
    ({"batch_size": 36, "num_workers": 4, "micro_batch_size": 4},
     "set train.micro_batch_size: 9 with train.gradient_accumulation_steps: 1 or train.batch_size: 16"),
])
def test_a_batch_that_does_not_multiply_is_one_line_with_a_fix(train, message):
    from pipeline.config import batch_split

    with pytest.raises(ConfigError) as err:
        config_from_dict({"train": train})
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"train.batch_size = {train['batch_size']} must equal "
                                                "train.micro_batch_size") and message in text
    # every batch size offered does multiply
    import re

    for batch in re.findall(r"train.batch_size: (\d+)", text):
        fixed = config_from_dict({"train": {**train, "batch_size": int(batch)}}).train
        micro, accum = batch_split(fixed)
        assert micro * accum * fixed.num_workers == int(batch)
    ok = config_from_dict({"train": {"batch_size": 36, "num_workers": 4, "micro_batch_size": 3,
                                     "gradient_accumulation_steps": 3}}).train
    assert batch_split(ok) == (3, 3)
    from infra.deepspeed import ds_config

    ds = ds_config(ok, 4)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (36, 3, 3)
