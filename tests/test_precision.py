"""One precision (docs/design.md §6.3): model.dtype is the LVLM's compute dtype in training as in evaluation,
train.compressor_dtype the compressor's; the P a real DeepSpeed engine (gloo, CPU) computes in training equals the
P that evaluate's actor computes with the saved compressor on the same input."""

import json
import subprocess
import sys

import pytest

from pipeline.config import ConfigError, config_from_dict

# Per case: a tiny LLaVA in model.dtype, the student in a DeepSpeed engine; one optimiser step so that P is no
# longer the initial one, then a training forward whose P (the compressor's output) is captured; the compressor is
# saved as the train stage saves it and loaded by evaluate's actor (EvalWorker), whose session reduces the same
# features (reduce_image); its P is captured the same way.
SCRIPT = r"""
import json, os, sys, tempfile
import torch
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
from compress.lvlm import load_adapter
from compress.lvlm.base import EncodedImage
from compress.lvlm.methods import get_method
from compress.lvlm.session import reduce_image
from infra.deepspeed import full_fp32_state, initialize
from pipeline.config import TrainConfig
from stages.evaluate.worker import EvalWorker
from stages.train.data import Example
from stages.train.student import build_student
from stages.train.worker import _save_atomic, final_compressor
from tests.tiny_models import random_image, save_tiny

RATE = 0.75
root = tempfile.mkdtemp()
model_dir = save_tiny(f"{root}/model", "llava", num_layers=2)
results = []
for model_dtype, compressor_dtype, zero_stage in json.loads(sys.argv[2]):
    adapter = load_adapter(model_dir, dtype=getattr(torch, model_dtype))
    tc = TrainConfig(compress_dim=16, batch_size=2, zero_stage=zero_stage, optimizer="adamw", lr=0.05,
                     grad_clip=10.0, compressor_dtype=compressor_dtype)
    student = build_student(adapter, tc, seed=0)
    engine = initialize(student, tc, 1, on_gpu=False, persist_numel=4 * adapter.text_config.hidden_size)
    g = torch.Generator().manual_seed(1)
    examples, encoded = [], []
    for i in range(2):
        enc = adapter.encode(random_image(seed=i))
        encoded.append(enc)
        answer = adapter.tokenizer("red circle", add_special_tokens=False).input_ids
        logp = torch.log_softmax(torch.randn(len(answer), 4, generator=g), -1) + torch.log(torch.tensor(0.9))
        examples.append(Example(f"d{i}", enc.tokens, enc.layout, ["what color is it?"], [answer], logp,
                                torch.randint(0, 40, (len(answer), 4), generator=g),
                                torch.full((len(answer),), float(torch.log(torch.tensor(0.1))))))
    captured = []
    hook = student.compressor.register_forward_hook(lambda m, args, out: captured.append(out[1]))
    engine.train()
    out = engine(examples, RATE)
    engine.backward(out["loss"])
    engine.step()
    captured.clear()
    engine(examples, RATE)  # training's P after the step
    train_p = [p.detach().float() for p in captured[0]]
    hook.remove()
    lvlm_dtypes = sorted({str(p.dtype) for p in student.lvlm.parameters()})
    comp_dtypes = sorted({str(p.dtype) for p in student.compressor.parameters()})
    directory = f"{root}/compressor-{model_dtype}-{compressor_dtype}-{zero_stage}"
    _save_atomic(final_compressor(student.compressor.config, full_fp32_state(student.compressor), compressor_dtype),
                 directory)
    worker = EvalWorker(str(model_dir), model_dtype, "cpu", {})
    module = worker._compressor(directory)
    method = get_method("metacompress", module)
    eval_p = []
    # MetaCompress returns a Reduction for one tensor, a list of them for a list
    hook = module.register_forward_hook(
        lambda m, args, out: eval_p.append((out if hasattr(out, "matrix") else out[0]).matrix.float()))
    for enc in encoded:  # the features as evaluate's actor holds cached ones (stages.common.encoded_image)
        reduce_image(worker.adapter, method, RATE, EncodedImage(enc.tokens.to("cpu", worker.adapter.dtype),
                                                               enc.layout, None, (0, 0)))
    hook.remove()
    eval_dtype = str(module.w_key.dtype)
    # the same compressor run in the other dtype gives another P: the equality above is not trivial
    other = module.to(torch.bfloat16 if compressor_dtype == "float32" else torch.float32)
    with torch.no_grad():
        other_p = [other(enc.tokens, p.shape[0], enc.layout).matrix.float() for enc, p in zip(encoded, train_p)]
    results.append({"case": [model_dtype, compressor_dtype, zero_stage], "lvlm": lvlm_dtypes,
                    "compressor": comp_dtypes, "eval_compressor": eval_dtype,
                    "shapes": [list(p.shape) for p in train_p] == [list(p.shape) for p in eval_p],
                    "max_diff": max(float((a - b).abs().max()) for a, b in zip(train_p, eval_p)),
                    "other_dtype_diff": max(float((a - b).abs().max()) for a, b in zip(train_p, other_p)),
                    "row_sums": max(float((p.sum(-1) - 1).abs().max()) for p in eval_p),
                    "recorded": json.load(open(f"{directory}/config.json"))["compute_dtype"]})
print(json.dumps(results))
"""

CASES = [("bfloat16", "float32", 2), ("bfloat16", "bfloat16", 2), ("bfloat16", "float32", 3), ("float32", "float32", 3)]


def test_train_time_and_eval_time_P_are_equal_through_deepspeed():
    out = subprocess.run([sys.executable, "-c", SCRIPT, "29623", json.dumps(CASES)], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    results = {tuple(r["case"]): r for r in json.loads(out.stdout.strip().splitlines()[-1])}
    for model_dtype, compressor_dtype, stage in CASES:
        r = results[model_dtype, compressor_dtype, stage]
        assert r["lvlm"] == [f"torch.{model_dtype}"], r  # DeepSpeed left the frozen LVLM in model.dtype
        assert r["compressor"] == [f"torch.{compressor_dtype}"], r  # and the compressor in its own dtype
        assert r["recorded"] == compressor_dtype and r["eval_compressor"] == f"torch.{compressor_dtype}"
        assert r["shapes"] and r["row_sums"] < 1e-2  # P (m, n), rows on the simplex
        assert r["max_diff"] == 0.0, r  # the same P, bit for bit
        assert r["other_dtype_diff"] > 1e-4, r


def test_bf16_compressor_needs_a_bf16_model():
    with pytest.raises(ConfigError, match="train.compressor_dtype = bfloat16 needs model.dtype: bfloat16"):
        config_from_dict({"train": {"compressor_dtype": "bfloat16"}})
    assert config_from_dict({"model": {"dtype": "bfloat16"},
                             "train": {"compressor_dtype": "bfloat16"}}).train.compressor_dtype == "bfloat16"
    with pytest.raises(ConfigError, match="train.compressor_dtype"):
        config_from_dict({"train": {"compressor_dtype": "float16"}})
