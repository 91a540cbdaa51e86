"""FastV (Chen et al., "An image is worth 1/2 tokens after layer 2"): prompt-dependent pruning inside the LLM.

Layers 0..K-1 run on the whole prompt; layer K-1 alone runs eager attention so its weights can be read; the image
tokens are ranked by the attention the last prompt token gives them in layer K-1 (mean over heads); the top ``m``
stay; layers K.. run on the shortened sequence with the original rotary positions. With a KV cache the pruning
happens once, at the first prefill, and the pruned cache serves every later token and turn.

Fixes over the public code (docs/design.md §4.4.2): the image span comes from the image token ids of each row
(never hard-coded offsets); every batch row is ranked on its own (not ``[0]``); RoPE cos/sin are gathered at the kept
original positions; layer K-1 runs once (its cache is not doubled). The thin patch is ``compress.lvlm.decoder``:
it drives transformers' own ``LlamaDecoderLayer`` modules and calls ``FastV`` after layer K-1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.reduction import num_keep as budget


def fastv_scores(weights: torch.Tensor) -> torch.Tensor:
    """weights (B, H, q, kv) of layer K-1 -> (B, kv): attention from the last query (the last prompt token; rows
    are left-padded so it is real) averaged over heads."""
    return weights[:, :, -1, :].float().mean(1)


def fastv_keep(scores: torch.Tensor, image_mask: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """scores (B, L), image_mask (B, L) bool, keep[b] image tokens to keep in row b -> keep mask (B, L) bool:
    every non-image position plus the ``keep[b]`` highest-scoring image positions (ties: the earlier position)."""
    out = ~image_mask.clone()
    for b in range(scores.shape[0]):
        span = image_mask[b].nonzero().squeeze(1)
        if keep[b] > span.numel():
            raise ValueError(f"FastV row {b}: cannot keep {keep[b]} of {span.numel()} image tokens")
        # stable sort on -score so equal scores keep the earlier token (deterministic)
        order = torch.sort(-scores[b, span], stable=True).indices[: keep[b]]
        out[b, span[order]] = True
    return out


def compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keep (B, L) bool -> (index (B, L'), valid (B, L')): the kept positions of each row in order, rows
    left-padded to the longest (padding points at position 0 and is invalid)."""
    counts = keep.sum(1)
    width = int(counts.max())
    index = torch.zeros(keep.shape[0], width, dtype=torch.long, device=keep.device)
    valid = torch.zeros(keep.shape[0], width, dtype=torch.bool, device=keep.device)
    for b in range(keep.shape[0]):
        c = int(counts[b])
        index[b, width - c:] = keep[b].nonzero().squeeze(1)
        valid[b, width - c:] = True
    return index, valid


@dataclass
class FastV:
    """The pruner the decoder driver calls after layer ``k - 1``.

    image_mask: (B, L) bool, the image token positions of the prompt being prefilled (from the token ids);
    rate: the share of image tokens dropped in (0, 1); row b keeps ``num_keep(n_b, rate)`` of its n_b image tokens.
    After the call, ``kept[b]`` holds the kept visual tokens of row b as sorted indices into its X_IMG (0..n_b-1)."""

    image_mask: torch.Tensor
    rate: float
    k: int = 2

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"FastV k={self.k}: the ranking layer k-1 must exist (k >= 1)")
        self.kept: list[torch.Tensor] = []

    @property
    def layer(self) -> int:
        return self.k - 1

    def num_keep(self) -> list[int]:
        return [budget(int(n), self.rate) for n in self.image_mask.sum(1).tolist()]

    def __call__(self, weights: torch.Tensor, new_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """weights (B, H, L, L) of layer k-1 over the prompt, new_mask (B, L) -> (index (B, L'), valid (B, L'))."""
        if weights.shape[-1] != self.image_mask.shape[1]:
            raise ValueError("FastV prunes the first prefill only (no cached tokens before the image)")
        image = self.image_mask & new_mask
        keep = fastv_keep(fastv_scores(weights), image, self.num_keep()) & new_mask
        self.kept = [keep[b][image[b]].nonzero().squeeze(1) for b in range(keep.shape[0])]
        return compact(keep)
