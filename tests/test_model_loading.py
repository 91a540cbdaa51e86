"""Models load straight onto their device, and the driver never loads an LVLM (docs/design.md §6.4).

The evaluate driver path runs with the LVLM's classes booby-trapped in the driver process only (Ray's actors are
other processes): the stage still finishes, and the P plots it drew (the one place the driver used to load the LVLM)
equal P computed here, afterwards, from the LVLM's own features."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import save_tiny


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from pipeline.datasets.mt_shapes import MTShapesConfig, generate

    root = tmp_path_factory.mktemp("loading")
    generate(root / "data", total=6, seed=1, cfg=MTShapesConfig(image_size=32), val=0, test=2, progress=False)
    save_tiny(root / "model", "llava", num_layers=2)
    return root


def _config(root: Path):
    from pipeline.config import config_from_dict, resolve_paths

    data = {"work_dir": str(root / "work"), "model": {"path": str(root / "model")},
            "data": {"train": str(root / "data/train/dialogues.jsonl"), "val": str(root / "data/test/dialogues.jsonl"),
                     "test": str(root / "data/test/dialogues.jsonl")},
            "shards": {"dialogues_per_shard": 2},
            "evaluate": {"methods": ["sample", "metacompress"], "rates": [0.5], "max_new_tokens": 2, "batch_size": 2,
                         "num_actors": 1, "matrix_images": 2},
            "tracking": {"uri": f"sqlite:///{root}/mlflow.db"}}
    return resolve_paths(config_from_dict(data), root)


def _no_lvlm_here(monkeypatch):
    """Any LVLM built in this process raises: the adapter's loader and transformers' model classes."""
    import transformers

    from compress.lvlm.base import LVLMAdapter

    def refuse(*args, **kwargs):
        raise AssertionError("an LVLM was loaded in the driver process")

    monkeypatch.setattr(LVLMAdapter, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(LVLMAdapter, "__init__", refuse)
    for name in ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration"):
        monkeypatch.setattr(getattr(transformers, name), "__init__", refuse)


def test_evaluate_driver_never_loads_the_lvlm(workspace, ray_local, monkeypatch):
    import torch

    from compress.metacompress import MetaCompress
    from compress.reduction import num_keep
    from stages import evaluate
    from stages.common import load_split
    from stages.evaluate.report_files import matrix_items
    from stages.outputs import rate_dir, write_trained_marker

    config = _config(workspace)
    torch.manual_seed(0)
    MetaCompress(hidden_size=64, compress_dim=16).save_pretrained(evaluate.compressor_dir(config, 0.5))
    write_trained_marker(f"{rate_dir(config, 0.5)}/_SUCCESS", evaluate.compressor_dir(config, 0.5),
                         {"run_hash": "test"})
    _no_lvlm_here(monkeypatch)
    with pytest.raises(AssertionError, match="driver process"):  # the guard is armed
        from compress.lvlm import load_adapter

        load_adapter(config.model.path)
    # no extract output: the evaluate actors and the P plots must encode the images themselves
    report = evaluate.run(config, "test", progress=False)
    assert report.errors == 0 and report.computed == report.shards == 3  # full, sample and metacompress, 1 shard
    assert (Path(report.reports_dir) / "metacompress_matrices.png").is_file()
    records, _ = load_split(config, "test", None)
    jobs, _ = evaluate.plan(config, "test")
    items = matrix_items(config, "test", jobs, records)
    monkeypatch.undo()

    from compress.lvlm import load_adapter

    adapter = load_adapter(config.model.path)
    module = MetaCompress.from_pretrained(evaluate.compressor_dir(config, 0.5))
    assert [it["title"] for it in items] == [f"{d['dialogue_id']}, rate 0.5" for d in records[:2]]
    with torch.no_grad():
        for item, d in zip(items, records):
            enc = adapter.encode(d["image"])
            expected = module(enc.tokens, num_keep(enc.tokens.shape[0], 0.5), enc.layout).matrix
            torch.testing.assert_close(torch.from_numpy(item["matrix"]), expected.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_puts_every_weight_on_the_device_in_the_dtype(tmp_path, dtype):
    import torch
    from transformers import LlavaForConditionalGeneration

    from compress.lvlm import load_adapter

    model_dir = save_tiny(tmp_path / "model", "llava", num_layers=2)
    adapter = load_adapter(model_dir, device="cpu", dtype=getattr(torch, dtype))
    assert {p.dtype for p in adapter.model.parameters()} == {getattr(torch, dtype)}
    assert {p.device for p in adapter.model.parameters()} == {torch.device("cpu")}
    # the values of transformers' plain load (no device map), converted to the dtype
    plain = LlavaForConditionalGeneration.from_pretrained(str(model_dir)).state_dict()
    state = adapter.model.state_dict()
    assert set(state) == set(plain)
    for name, value in plain.items():
        assert torch.equal(state[name], value.to(getattr(torch, dtype))), name


# In a fresh process: a LLaVA with a bf16 LLM (0.4 GB for the GPU check, 50 MB on CPU) is saved, then loaded by
# load_adapter onto the device and, for comparison, by a plain CPU load; a thread samples the process's anonymous
# resident memory (RssAnon) meanwhile. On CPU the weights must stay the file's memory-mapped pages (file-backed, shared
# by every actor of a node through the page cache), not a private copy per process.
GPU_SCRIPT = r"""
import json, sys, threading, time
import torch
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from tests.tiny_models import IMAGE_TOKEN_ID, VOCAB, _vision_config, tiny_image_processor, tiny_tokenizer

root, device, layers = sys.argv[1], sys.argv[2], int(sys.argv[3])
text = LlamaConfig(vocab_size=len(VOCAB), hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                   num_attention_heads=16, num_key_value_heads=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
cfg = LlavaConfig(vision_config=_vision_config(32, 4), text_config=text, image_token_index=IMAGE_TOKEN_ID,
                  image_seq_length=64, vision_feature_layer=-2, vision_feature_select_strategy="default")
model = LlavaForConditionalGeneration(cfg).to(torch.bfloat16)
size = sum(p.numel() * p.element_size() for p in model.parameters())
model.save_pretrained(root)
tiny_tokenizer().save_pretrained(root)
tiny_image_processor("llava").save_pretrained(root)
del model

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

def peak_growth(fn):
    base, peak, done = anon(), [0], threading.Event()
    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], anon() - base)
            time.sleep(0.002)
    t = threading.Thread(target=watch)
    t.start()
    out = fn()
    done.set()
    t.join()
    return out, peak[0]

from compress.lvlm import load_adapter
adapter, direct = peak_growth(lambda: load_adapter(root, device=device, dtype=torch.bfloat16))
devices = sorted({str(p.device) for p in adapter.model.parameters()})
dtypes = sorted({str(p.dtype) for p in adapter.model.parameters()})
del adapter
plain = None  # on CPU a plain load is memory-mapped as well: nothing to compare with
if device == "cuda":
    _, plain = peak_growth(lambda: LlavaForConditionalGeneration.from_pretrained(root, dtype=torch.bfloat16))
print(json.dumps({"size": size, "direct": direct, "plain": plain, "devices": devices, "dtypes": dtypes}))
"""


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_load_goes_straight_to_the_device(tmp_path, device):
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    layers = 16 if device == "cuda" else 2
    out = subprocess.run([sys.executable, "-c", GPU_SCRIPT, str(tmp_path / "model"), device, str(layers)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["devices"] == [f"{device}:0" if device == "cuda" else "cpu"] and r["dtypes"] == ["torch.bfloat16"]
    if device == "cuda":
        assert r["plain"] > 0.75 * r["size"], r  # the sampler sees a whole host copy when there is one
    assert r["direct"] < 0.25 * r["size"], r  # and none when the load goes straight to the device
