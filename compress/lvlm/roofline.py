"""Roofline lower bounds of the phases of a turn: ``max(FLOPs / peak, bytes moved / bandwidth)`` on a device whose
peak and bandwidth come from a short probe (a large matrix product, a device copy, a pinned host-to-device copy);
the specification sheet's figures of known GPUs are reported beside them.

Work per phase (batch 1; bytes = what must cross the memory bus at least once):
- preprocessing: the 8-bit image over the host link, then reading it and writing the pixel values on the device;
- vision tower: the FLOPs counted (``FlopCounterMode``) of the layers up to the feature layer and the projector; bytes:
  their weights, the pixels in, the tokens out;
- reducer: counted FLOPs of the reducer; bytes: its weights, X_IMG in, the reduced tokens out;
- prefill: the analytic prefill FLOPs (``compress.flops``); bytes: the decoder weights (without the embedding table:
  only its rows are read) and the KV cache written;
- one decoded token: the same FLOPs formula for one token over the cache; bytes: the weights and the whole KV cache.
TTFT's bound is the sum of the first four (the phases run one after the other).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from compress.flops import decoder_dims, layer_flops

# bf16 dense tensor-core peak (FLOP/s) and memory bandwidth (B/s), from the vendors' sheets (SXM parts).
KNOWN_GPUS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.039e12)}


@dataclass
class DevicePeaks:
    name: str
    peak_flops: float  # FLOP/s, probed
    bandwidth: float  # B/s, probed (bytes read + written by a device copy)
    h2d_bandwidth: float  # B/s, pinned host-to-device copy (on a CPU: the memory bandwidth)
    spec_flops: float | None = None
    spec_bandwidth: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Mean seconds of fn() over ``repeats`` calls after two warm-ups."""
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / repeats


def probe(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> DevicePeaks:
    """Peak matrix FLOP/s (n^3 product: 8192 on a GPU, 1024 on a CPU), device copy and host-to-device bandwidth."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    n = 8192 if gpu else 1024
    dtype = dtype if gpu else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    flops = 2 * n ** 3 / _timed(lambda: a @ b, device, 10 if gpu else 3)
    del a, b
    count = (1 << 30 if gpu else 1 << 26) // 4
    src = torch.empty(count, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / _timed(lambda: dst.copy_(src), device, 10)
    h2d = bandwidth
    if gpu:
        host = torch.empty(count // 4, dtype=torch.float32).pin_memory()
        h2d = host.numel() * 4 / _timed(lambda: src[: host.numel()].copy_(host, non_blocking=True), device, 5)
        name = torch.cuda.get_device_name(device)
    else:
        import platform

        name = f"CPU {platform.processor() or platform.machine()}"
    del src, dst
    spec = next((v for k, v in KNOWN_GPUS.items() if k in name), (None, None)) if gpu else (None, None)
    return DevicePeaks(name, flops, bandwidth, h2d, *spec)


def bound(flops: float, nbytes: float, peaks: DevicePeaks) -> float:
    """Roofline seconds: max(FLOPs / peak, bytes / bandwidth)."""
    return max(flops / peaks.peak_flops, nbytes / peaks.bandwidth)


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs of fn(*args, **kwargs) as torch's FlopCounterMode counts them (matrix products)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def param_bytes(*modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def decoder_bytes(adapter) -> int:
    """Weights a forward pass reads: every decoder layer, the final norm, the LM head."""
    lm = adapter.language_model
    return param_bytes(lm.layers, lm.norm, adapter.lm_head)


def kv_bytes_per_token(adapter) -> int:
    """K and V of one token in every layer."""
    c = decoder_dims(adapter.text_config)
    return 2 * c["layers"] * c["kv_heads"] * c["head_dim"] * adapter.dtype.itemsize


def decode_flops(config, kv_len: float) -> float:
    """FLOPs of one decoded token over ``kv_len`` cached tokens (every layer) and the LM head."""
    c = decoder_dims(config)
    return c["layers"] * layer_flops(config, 1, int(round(kv_len)) + 1) + 2 * c["hidden"] * c["vocab"]


def tower_work(adapter, pixel_values: torch.Tensor) -> tuple[int, int]:
    """(FLOPs, bytes) of the vision tower up to the feature layer and the projector on pixel_values."""
    from compress.lvlm import image_ops

    vt = image_ops._transformer(adapter.model.model.vision_tower)
    layers = vt.encoder.layers
    depth = len(layers) + 1 + adapter.feature_layer if adapter.feature_layer < 0 else adapter.feature_layer
    pv = pixel_values[0] if pixel_values.dim() == 5 else pixel_values
    flops = count_flops(image_ops.tower_features, adapter, pv)
    out = pv.shape[0] * (pv.shape[-1] // vt.embeddings.patch_size) ** 2 * adapter.text_config.hidden_size
    weights = param_bytes(vt.embeddings, vt.pre_layrnorm, layers[:depth], adapter.model.model.multi_modal_projector)
    return flops, weights + tensor_bytes(pv) + out * adapter.dtype.itemsize


def phase_bounds(adapter, peaks: DevicePeaks, *, image_hw: tuple[int, int], pixel_values: torch.Tensor,
                 tower: tuple[int, int], reducer: tuple[int, int] | None, prefill_flops: int, prefill_kv: float,
                 decode_kv: float) -> dict[str, dict]:
    """Per phase {"flops", "bytes", "bound_ms"} (reducer None: not bounded, e.g. a reducer inside the tower);
    ``prefill_kv``: tokens written to the cache (mean over layers), ``decode_kv``: cached tokens a decoded token
    reads (mean over layers)."""
    h, w = image_hw
    raw = h * w * 3
    pixels = tensor_bytes(pixel_values)
    weights = decoder_bytes(adapter)
    kv = kv_bytes_per_token(adapter)
    work = {
        "preprocessing": (0, raw + pixels, raw / peaks.h2d_bandwidth),
        "tower": tower + (None,),
        "reducer": reducer + (None,) if reducer is not None else None,
        "prefill": (prefill_flops, weights + prefill_kv * kv, None),
        "decode": (decode_flops(adapter.text_config, decode_kv), weights + decode_kv * kv, None),
    }
    out = {}
    for phase, item in work.items():
        if item is None:
            out[phase] = None
            continue
        flops, nbytes, extra = item
        out[phase] = {"flops": flops, "bytes": nbytes, "bound_ms": 1e3 * (bound(flops, nbytes, peaks) + (extra or 0))}
    parts = [out[p] for p in ("preprocessing", "tower", "reducer", "prefill") if out[p] is not None]
    out["ttft"] = {"flops": sum(p["flops"] for p in parts), "bytes": sum(p["bytes"] for p in parts),
                   "bound_ms": sum(p["bound_ms"] for p in parts)}
    return out
