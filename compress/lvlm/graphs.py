"""CUDA graphs by key, for fixed-shape pieces of work (a decode step, a prefill at a bucketed length, the image
preprocessing, the vision tower, a reducer).

``Graphs(enabled).run(key, fn, inputs, state)``: the first call of a key runs ``fn(*inputs)`` once on a side stream
(warm-up: lazy initialisations, library workspaces), rolls ``state`` back (``snapshot`` / ``restore``: the warm-up
wrote to the static cache), and captures ``fn`` on copies of the inputs; every call copies the inputs into the
captured ones and replays. ``fn`` must have fixed shapes and no host synchronisation; its outputs (a tuple of
tensors) live in the graph's memory and are overwritten by the next replay of that key. Disabled (CPU), ``run``
calls ``fn`` directly. A key whose capture fails runs eagerly from then on; ``failed`` says why (reported by the
benchmark, so a fallback never passes for a captured run).
"""

from __future__ import annotations

from typing import Callable, Hashable

import torch


class Graphs:
    def __init__(self, enabled: bool):
        if enabled and not torch.cuda.is_available():
            raise ValueError("CUDA graphs need a CUDA device; run without them on the CPU")
        self.enabled = enabled
        self.graphs: dict[Hashable, tuple] = {}
        self.failed: dict[Hashable, str] = {}

    def __len__(self) -> int:
        return len(self.graphs)

    def run(self, key: Hashable, fn: Callable, inputs: tuple, state=None) -> tuple:
        if not self.enabled or key in self.failed:
            return fn(*inputs)
        entry = self.graphs.get(key)
        if entry is None:
            static = tuple(t.clone() for t in inputs)
            snap = state.snapshot() if state is not None else None
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn(*static)
            torch.cuda.current_stream().wait_stream(side)
            if state is not None:
                state.restore(snap)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    out = fn(*static)
            except RuntimeError as err:  # e.g. an operation that synchronises with the host
                self.failed[key] = f"{type(err).__name__}: {err}"[:300]
                torch.cuda.synchronize()
                if state is not None:
                    state.restore(snap)
                return fn(*inputs)
            entry = self.graphs[key] = (graph, static, out)
        graph, static, out = entry
        for buffer, value in zip(static, inputs):
            buffer.copy_(value)
        graph.replay()
        return out
