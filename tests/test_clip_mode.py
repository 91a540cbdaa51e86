"""train.clip_mode (docs/design.md §4.2): "norm" clips the global gradient norm (DeepSpeed's gradient_clipping),
"value" clamps every element; both against torch's own clipping functions, through a real DeepSpeed ZeRO-2 engine."""

import json
import subprocess
import sys

import pytest
import torch

from infra.deepspeed import ds_config, make_optimizer
from pipeline.config import TrainConfig

ENGINE_SCRIPT = r"""
import json, os, sys
import torch
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
from infra.deepspeed import initialize
from pipeline.config import TrainConfig
clip, results = 0.05, {}
for mode in ("norm", "value"):
  torch.manual_seed(0)
  module = torch.nn.Linear(6, 3)
  start = {k: v.detach().clone() for k, v in module.state_dict().items()}
  x, y = torch.randn(4, 6), torch.randn(4, 3)
  engine = initialize(module, TrainConfig(optimizer="sgd", lr=1.0, grad_clip=clip, clip_mode=mode, batch_size=4,
                                          zero_stage=2), 1, on_gpu=False)
  loss = ((engine(x) - y) ** 2).sum()
  engine.backward(loss)
  engine.step()
  # the same step by hand: torch's gradient, torch's clipping, p - lr * g
  ref = torch.nn.Linear(6, 3)
  ref.load_state_dict(start)
  ((ref(x) - y) ** 2).sum().backward()
  params = list(ref.parameters())
  if mode == "norm":
      torch.nn.utils.clip_grad_norm_(params, clip)
  else:
      torch.nn.utils.clip_grad_value_(params, clip)
  expected = {k: (start[k] - dict(ref.named_parameters())[k].grad).tolist() for k in start}
  got = {k: v.detach().tolist() for k, v in module.state_dict().items()}
  results[mode] = {"expected": expected, "got": got}
print(json.dumps(results))
"""


def test_value_mode_clamps_each_element_like_clip_grad_value():
    torch.manual_seed(0)
    grads = [torch.randn(5, 4) * 3, torch.randn(4) * 0.01]
    start = [torch.randn(5, 4), torch.randn(4)]
    for opt_name in ("sgd", "adamw"):
        params = [torch.nn.Parameter(s.clone()) for s in start]
        ref = [torch.nn.Parameter(s.clone()) for s in start]
        cfg = TrainConfig(optimizer=opt_name, lr=0.1, grad_clip=0.5, clip_mode="value")
        opt = make_optimizer(params, cfg)
        ref_opt = (torch.optim.SGD(ref, lr=0.1) if opt_name == "sgd"
                   else torch.optim.AdamW(ref, lr=0.1, weight_decay=0.0))
        for p, r, g in zip(params, ref, grads):
            p.grad, r.grad = g.clone(), g.clone()
        torch.nn.utils.clip_grad_value_(ref, 0.5)
        opt.step()
        ref_opt.step()
        for p, r in zip(params, ref):
            torch.testing.assert_close(p, r)


def test_norm_mode_leaves_clipping_to_deepspeed_and_value_mode_turns_it_off():
    assert ds_config(TrainConfig(grad_clip=0.01), 1)["gradient_clipping"] == 0.01
    assert ds_config(TrainConfig(grad_clip=0.01, clip_mode="value"), 1)["gradient_clipping"] == 0.0
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(2))], TrainConfig(clip_mode="norm"))
    assert type(opt) is torch.optim.SGD
    with pytest.raises(ValueError, match="clip_mode"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2))], TrainConfig(clip_mode="elementwise"))


def test_deepspeed_zero2_step_matches_torch_clipping():
    out = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, "29611"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for mode in ("norm", "value"):
        for key, expected in results[mode]["expected"].items():
            torch.testing.assert_close(torch.tensor(results[mode]["got"][key]), torch.tensor(expected), rtol=1e-5,
                                       atol=1e-6, msg=f"{mode}: {key}")
