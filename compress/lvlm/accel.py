"""The fast path of a chat session (issue 22): static KV cache, CUDA graphs, image preprocessing and vision tower on
the device, fused reducers. Off by default: ``BatchChatSession(..., static_cache=True, cuda_graphs=True,
device_image=True, fused_reducer=True)``; results equal the eager path's (the tests compare token for token).

One ``Accelerator`` per adapter and option set (``Accelerator.get``) owns what the captured graphs point at: the
static cache of each batch size (reset per dialogue, never reallocated) and the graphs themselves, so later
dialogues replay what the first one captured. Prompts are left-padded to a length ``bucket`` (pads are masked), so a
few graphs serve every prompt length.
"""

from __future__ import annotations

import inspect

import torch

from compress.lvlm import image_ops, static_cache
from compress.lvlm.base import EncodedImage, LVLMAdapter, load_image
from compress.lvlm.fused import fused_reducer
from compress.lvlm.graphs import Graphs


class Accelerator:
    def __init__(self, adapter: LVLMAdapter, static_cache: bool = True, cuda_graphs: bool = False,
                 device_image: bool = False, fused_reducer: bool = False, max_cache_len: int | None = None,
                 window_step: int = 256, pad_step: int = 64):
        if cuda_graphs and not static_cache:
            raise ValueError("cuda_graphs needs static_cache=True (a captured step has fixed shapes)")
        if cuda_graphs and adapter.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs the model on a CUDA device, not {adapter.device}")
        self.adapter, self.static_cache, self.device_image, self.fused = adapter, static_cache, device_image, \
            fused_reducer
        self.graphs = Graphs(cuda_graphs)
        self.max_len = max_cache_len or adapter.text_config.max_position_embeddings
        self.window_step, self.pad_step = window_step, pad_step
        self._states: dict[int, static_cache.StaticState] = {}
        self._pinned: dict[tuple, torch.Tensor] = {}
        self._pack: dict[tuple, torch.Tensor | None] = {}
        self._reducers: dict[tuple, object] = {}

    @classmethod
    def get(cls, adapter: LVLMAdapter, **options) -> "Accelerator":
        """The adapter's accelerator with these options (made once, kept on the adapter)."""
        store = adapter.__dict__.setdefault("_accelerators", {})
        # Keyed with the defaults filled in: a caller that spells out a default must find the same accelerator
        # (the benchmark's graph count once read an empty twin of the session's accelerator).
        bound = inspect.signature(cls.__init__).bind(None, adapter, **options)
        bound.apply_defaults()
        key = tuple(sorted((k, v) for k, v in bound.arguments.items() if k not in ("self", "adapter")))
        if key not in store:
            store[key] = cls(adapter, **options)
        return store[key]

    # --- decoder -----------------------------------------------------------------------------------------------
    def new_state(self, batch: int) -> static_cache.StaticState:
        """The (reset) static cache for ``batch`` dialogues."""
        if batch not in self._states:
            self._states[batch] = static_cache.StaticState.allocate(self.adapter.language_model, batch, self.max_len,
                                                                    self.window_step)
        state = self._states[batch]
        state.reset()
        return state

    def pad(self, ids: torch.Tensor, mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, mask (B, L) -> left-padded to (B, bucket(L))."""
        extra = static_cache.bucket(ids.shape[1], self.pad_step) - ids.shape[1]
        if not extra:
            return ids, mask
        return (torch.cat([ids.new_full((ids.shape[0], extra), pad_id), ids], 1),
                torch.cat([mask.new_zeros(mask.shape[0], extra), mask], 1))

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.adapter.lm_head(hidden[:, -1]).float()

    def prefill(self, state, embeds: torch.Tensor, new_mask: torch.Tensor, pruner=None,
                record: list | None = None) -> torch.Tensor:
        """embeds (B, q, d), new_mask (B, q) -> logits (B, V) float of the last position (graph memory: valid until
        the next prefill of this shape)."""
        logits, _ = static_cache.forward(self.adapter.language_model, state, embeds, new_mask, pruner, record,
                                         head=self._head, graphs=self.graphs, pad_step=self.pad_step)
        return logits

    def step(self, state, tokens: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """One decoding step: tokens (B,) long, active (B,) bool -> logits (B, V) float."""
        embeds = self.adapter.model.get_input_embeddings()(tokens[:, None])
        return self.prefill(state, embeds, active[:, None])

    # --- image -------------------------------------------------------------------------------------------------
    def prepare(self, image) -> EncodedImage:
        """As ``adapter.prepare``; with ``device_image`` the pixels go to the device as 8 bits and are resized and
        normalised there (``image_ops``)."""
        ad = self.adapter
        if not self.device_image:
            return ad.prepare(image)
        pil = load_image(image)
        pixels = image_ops.pil_to_tensor(pil)
        if ad.device.type == "cuda":
            key = tuple(pixels.shape)
            if key not in self._pinned:
                self._pinned[key] = (torch.empty(pixels.shape, dtype=torch.uint8).pin_memory(), torch.cuda.Event())
            host, copied = self._pinned[key]
            copied.synchronize()  # the previous copy out of this buffer is done
            pixels = host.copy_(pixels).to(ad.device, non_blocking=True)
            copied.record()
        else:
            pixels = pixels.to(ad.device)

        def fn(u8):
            return (image_ops.pixel_values(ad.family, ad.image_processor, u8, ad.dtype),)

        pv = self.graphs.run(("pixels", tuple(pixels.shape)), fn, (pixels,))[0].clone()
        size = (pil.height, pil.width)
        layout = ad.layout() if ad.family == "llava" else ad.layout(size)
        return EncodedImage(None, layout, pv, size)

    def features(self, prepared: EncodedImage) -> EncodedImage:
        """As ``adapter.features``; with ``device_image`` the tower stops at the feature layer and runs captured."""
        ad = self.adapter
        if not self.device_image:
            return ad.features(prepared)
        pv = prepared.pixel_values
        index = None
        if pv.dim() == 5:
            key = (prepared.image_size, pv.shape[1])
            if key not in self._pack:
                vc = ad.model.config.vision_config
                self._pack[key] = image_ops.pack_index(ad, prepared.image_size, pv.shape[1],
                                                       (vc.image_size // vc.patch_size) ** 2)
            index = self._pack[key]
        with torch.no_grad():
            out = self.graphs.run(("tower", tuple(pv.shape), prepared.image_size),
                                  lambda p: (image_ops.packed_features(ad, p, index),), (pv,))[0].clone()
        if out.shape[0] != prepared.layout.num_tokens:
            raise ValueError(f"{out.shape[0]} visual tokens but the layout gives {prepared.layout.num_tokens}")
        return EncodedImage(out, prepared.layout, pv, prepared.image_size)

    def reduce(self, fn, x: torch.Tensor, num_keep: int, layout) -> torch.Tensor | None:
        """x (n, d) -> reduced tokens (m, d) through the fused form of ``fn`` (captured), or None when ``fused_reducer``
        is off or ``fn`` has none."""
        if not self.fused:
            return None
        key = ("reduce", id(fn), x.shape[0], num_keep, layout, x.dtype)
        if key not in self._reducers:
            self._reducers[key] = fused_reducer(fn, x.shape[0], num_keep, layout, x.device)
        f = self._reducers[key]
        if f is None:
            return None
        with torch.no_grad():
            return self.graphs.run(key, lambda t: (f(t),), (x,))[0].clone()
