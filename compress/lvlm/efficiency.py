"""Per-turn efficiency figures: times, peak memory, analytic prefill FLOPs, KV-cache length.

FLOPs come from ``compress.flops`` (analytic, checked against torch's FLOP counter by the tests).
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass

import torch


def peak_memory_bytes(device: torch.device | str) -> int:
    """CUDA peak allocated bytes on a GPU (since the last reset), else the process's peak resident set size."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def reset_peak_memory(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def clock(device: torch.device | str) -> float:
    """A wall-clock reading after the device's queued work is done."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class TurnStats:
    """Figures of one turn of one dialogue. Times in seconds (for a batch, of the whole batched call);
    ``ttft_s`` = vision tower + reducer (first turn only) + prefill; ``total_s`` = ttft + decode;
    ``prefill_flops`` analytic, for this dialogue alone; ``kv_cache_len`` real cached tokens averaged over layers
    at the end of the turn (FastV layers after the pruning layer hold fewer); ``visual_tokens`` the image tokens the
    LLM sees (after an in-LLM pruning: in the pruned layers)."""

    turn: int
    vision_s: float
    reduce_s: float
    prefill_s: float
    decode_s: float
    ttft_s: float
    total_s: float
    peak_memory_bytes: int
    prefill_tokens: int
    prefill_flops: int
    kv_cache_len: float
    visual_tokens: int
    new_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return (f"[turn {self.turn}] ttft {self.ttft_s * 1e3:.1f} ms, decode {self.decode_s * 1e3:.1f} ms, "
                f"total {self.total_s * 1e3:.1f} ms, peak mem {self.peak_memory_bytes / 2**20:.0f} MiB, "
                f"prefill {self.prefill_tokens} tok / {self.prefill_flops / 1e9:.3f} GFLOPs, "
                f"kv cache {self.kv_cache_len:.0f}, visual tokens {self.visual_tokens}")
