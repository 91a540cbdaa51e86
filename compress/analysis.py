"""The oracle's attention analysis (paper section 4, figures 1 and 5; docs/design.md §4.3): which visual tokens the per-image
oracle keeps, against the attention scores that attention-based reducers rank by.

Three per-token scores, each aligned with X_IMG (n,):
- ``cls``: [CLS] -> patch attention of one CLIP encoder layer (default the last one, whose queries/keys are computed
  from the penultimate hidden state LLaVA-1.5 feeds the projector), softmax over all N + 1 keys, mean over heads.
  LLaVA-1.5 only: LLaVA-NeXT's anyres crops have no single [CLS] (paper 6.6).
- ``fastv``: FastV-style importance, the attention the last prompt token gives each image token in LLM layer K-1
  (default K = 2), mean over heads (``compress.baselines.fastv.fastv_scores``).
- ``prompt``: prompt attention, the attention from the text tokens after the image (the question and the template
  up to the generation prompt) to each image token in LLM layer 0 (as figure 1c), mean over heads and query tokens.
Both LLM scores come from one forward of the first turn's prompt with all visual tokens.

A token counts as kept by the oracle when it is the argmax of some row of P (``rule="argmax"``), or, with
``rule="mass"``, when it is among the m tokens with the largest column mass ``sum_i P[i, j]``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

KEEP_RULES = ("argmax", "mass")


# --- which tokens the oracle keeps --------------------------------------------------------------------------------
def kept_tokens(p: torch.Tensor, rule: str = "argmax") -> torch.Tensor:
    """P (m, n), rows distributions over the n tokens -> kept (n,) bool. ``argmax``: the argmax of some row (at most m
    tokens: rows may share one); ``mass``: the m largest column masses (ties: the earlier token)."""
    if p.dim() != 2:
        raise ValueError(f"P must be (m, n), got shape {tuple(p.shape)}")
    m, n = p.shape
    kept = torch.zeros(n, dtype=torch.bool, device=p.device)
    if rule == "argmax":
        kept[p.argmax(1)] = True
    elif rule == "mass":
        kept[torch.sort(-p.float().sum(0), stable=True).indices[:m]] = True
    else:
        raise ValueError(f"keep rule {rule!r}; use one of {KEEP_RULES}")
    return kept


def top_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """scores (n,) -> (n,) bool: the ``ceil(fraction * n)`` highest scores (at least one; ties: the earlier token)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"top fraction {fraction} must be in (0, 1]")
    n = scores.shape[0]
    k = max(1, math.ceil(fraction * n - 1e-9))
    out = torch.zeros(n, dtype=torch.bool, device=scores.device)
    out[torch.sort(-scores.float(), stable=True).indices[:k]] = True
    return out


def rank_auc(scores: torch.Tensor, kept: torch.Tensor) -> float | None:
    """P(score of a kept token > score of a dropped one), ties counting 1/2 (Mann-Whitney U / (n1 n0)); 0.5 means the
    oracle's choice is unrelated to the score. None when every or no token is kept."""
    pos, neg = scores[kept].double(), scores[~kept].double()
    if not pos.numel() or not neg.numel():
        return None
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def relative_scores(scores: torch.Tensor) -> torch.Tensor:
    """scores (n,) >= 0 -> scores * n / sum: 1 is a uniform share, so images with different n pool together."""
    total = scores.double().sum()
    if total <= 0:
        raise ValueError("attention scores sum to zero; cannot normalise")
    return (scores.double() * scores.shape[0] / total).float()


@dataclass
class KeptStats:
    """Pooled over images. ``top``: tokens in each image's top ``fraction`` by score; ``kept_in_top``: kept tokens
    among them. ``share_of_kept_in_top`` = kept_in_top / kept (the paper's "1.71 % of the retained tokens"),
    ``chance`` = top / tokens (what a score-blind choice gives), ``recall_of_top`` = kept_in_top / top.
    ``auc``: mean of the per-image ``rank_auc``. ``mean_relative_score_*``: mean of ``relative_scores``."""

    images: int
    tokens: int
    kept: int
    top: int
    kept_in_top: int
    fraction: float
    share_of_kept_in_top: float
    chance: float
    recall_of_top: float
    auc: float | None
    mean_relative_score_kept: float
    mean_relative_score_all: float

    def to_json(self) -> dict:
        return asdict(self)


def kept_statistics(scores: list[torch.Tensor], kept: list[torch.Tensor], fraction: float = 0.1) -> KeptStats:
    """scores[i] (n_i,) one image's scores; kept[i] (n_i,) bool its kept tokens -> pooled KeptStats."""
    if not scores or len(scores) != len(kept):
        raise ValueError(f"need one kept mask per score vector and at least one image ({len(scores)} vs {len(kept)})")
    tokens = k_all = top_all = both = 0
    aucs, rel_kept, rel_all = [], [], []
    for s, k in zip(scores, kept):
        if s.shape != k.shape:
            raise ValueError(f"scores {tuple(s.shape)} and kept mask {tuple(k.shape)} differ in shape")
        top = top_mask(s, fraction)
        tokens += s.numel()
        k_all += int(k.sum())
        top_all += int(top.sum())
        both += int((top & k).sum())
        auc = rank_auc(s, k)
        if auc is not None:
            aucs.append(auc)
        rel = relative_scores(s)
        rel_kept.append(rel[k])
        rel_all.append(rel)
    return KeptStats(
        images=len(scores), tokens=tokens, kept=k_all, top=top_all, kept_in_top=both, fraction=fraction,
        share_of_kept_in_top=both / max(k_all, 1), chance=top_all / tokens, recall_of_top=both / max(top_all, 1),
        auc=sum(aucs) / len(aucs) if aucs else None,
        mean_relative_score_kept=float(torch.cat(rel_kept).mean()) if k_all else float("nan"),
        mean_relative_score_all=float(torch.cat(rel_all).mean()))


# --- attention extraction -----------------------------------------------------------------------------------------
@torch.no_grad()
def clip_cls_attention(vision_tower: nn.Module, pixel_values: torch.Tensor, layer: int = -1,
                       include_cls: bool = False) -> torch.Tensor:
    """pixel_values (B, 3, H, W) -> (B, N) [CLS] -> patch attention of encoder ``layer`` (negative counts from the
    end), the model's own heads and scale, softmax over all N + 1 keys, mean over heads, float32. With
    ``include_cls`` (LLaVA's ``full`` strategy, where [CLS] is a visual token) -> (B, N + 1), [CLS] self-attention
    first. The q/k projections are read by hooks, so any attention kernel (sdpa, flash) gives the same result."""
    from compress.baselines._clip_hooks import encoder_layers, layer_index, run_tower, split_heads

    layers = encoder_layers(vision_tower)
    index = layer_index(layer, len(layers))
    attn = layers[index].self_attn
    _, qk = run_tower(vision_tower, pixel_values, (index,))
    q = split_heads(qk[index]["q"].float(), attn.num_heads)[:, :, :1]  # (B, H, 1, hd): the [CLS] query
    k = split_heads(qk[index]["k"].float(), attn.num_heads)  # (B, H, N + 1, hd)
    weights = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1)[:, :, 0]  # (B, H, N + 1)
    weights = weights.mean(1)
    return weights if include_cls else weights[:, 1:]


def query_mean_attention(weights: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """weights (B, H, q, kv) of one layer, query_mask (B, q) bool -> (B, kv): mean over heads and the masked query
    rows (the attention those queries give each key)."""
    w = weights.float().mean(1)  # (B, q, kv)
    mask = query_mask.to(w.dtype)
    count = mask.sum(1).clamp_min(1.0)
    return (w * mask[:, :, None]).sum(1) / count[:, None]


@dataclass
class PromptAttention:
    """One first-turn prompt with all n visual tokens. ``weights[l]`` (1, H, L, L): eager attention of LLM layer l;
    ``image_positions`` (n,): where the visual tokens sit in the prompt; ``text_after`` (L,) bool: the text tokens
    after the image (the prompt queries of figure 1c)."""

    weights: dict[int, torch.Tensor]
    image_positions: torch.Tensor
    text_after: torch.Tensor

    def prompt_scores(self, layers: list[int] | None = None) -> torch.Tensor:
        """(n,): attention from the text after the image to each image token, mean over heads, queries and
        ``layers`` (default: every captured layer)."""
        layers = sorted(self.weights) if layers is None else layers
        per = [query_mean_attention(self.weights[l], self.text_after[None])[0] for l in layers]
        return torch.stack(per).mean(0)[self.image_positions]

    def last_token_scores(self, layer: int) -> torch.Tensor:
        """(n,): FastV's ranking, the attention from the last prompt token in ``layer`` (mean over heads)."""
        from compress.baselines.fastv import fastv_scores

        return fastv_scores(self.weights[layer])[0][self.image_positions]


@torch.no_grad()
def prompt_attention(adapter, image_tokens: torch.Tensor, question: str, layers: list[int],
                     vqa: bool = True, image_positions=None) -> PromptAttention:
    """One forward of the first turn's prompt (``question`` with the n image tokens (n, d)) through the adapter's LLM;
    ``layers`` run eager attention so their weights (1, H, L, L) can be read, the others keep their kernel.
    ``image_positions``: the tokens' ``VisualPositions``, required by 3-D rotary families (Qwen2.5-VL)."""
    from compress.lvlm import decoder
    from compress.lvlm.session import expand_image

    lm = adapter.language_model
    if adapter.rope_dims != 1 and image_positions is None:  # its visual tokens would run at 1-D positions
        raise ValueError(f"{adapter.family} uses 3-D rotary positions: pass image_positions with the image tokens")
    num_layers = len(lm.layers)
    for l in layers:
        if not 0 <= l < num_layers:
            raise ValueError(f"LLM layer {l} does not exist (the LLM has {num_layers} layers)")
    n = image_tokens.shape[0]
    ids = expand_image(adapter.segment_ids([question], vqa)[0], adapter.image_token_id, n)
    ids_t = torch.tensor([ids], dtype=torch.long, device=adapter.device)
    embeds = adapter.embed(ids_t, [image_tokens])
    state = decoder.DecoderState.empty(lm, 1, adapter.device, use_cache=False)
    mask = torch.ones_like(ids_t, dtype=torch.bool)
    with contextlib.ExitStack() as stack:
        boxes = {l: stack.enter_context(decoder.eager_attention(lm.layers[l].self_attn)) for l in set(layers)}
        decoder.forward(lm, state, embeds, mask, mrope=adapter.rope_inputs(ids_t, mask, [image_positions]))
    is_img = ids_t[0] == adapter.image_token_id
    positions = is_img.nonzero().squeeze(1)
    after = torch.zeros_like(is_img)
    after[int(positions[-1]) + 1:] = True
    return PromptAttention({l: b["weights"].detach() for l, b in boxes.items()}, positions, after)


# --- what a compression matrix P does (docs/design.md §4.3, `metacompress analyze compressor`) -------------------
def row_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of P (..., m, n); rows are distributions over the n input tokens."""
    p = p.double()
    return -(p * p.clamp_min(1e-300).log()).sum(-1)


def effective_tokens(p: torch.Tensor) -> torch.Tensor:
    """exp(row entropy): how many input tokens each row averages (1 = a selection, n = uniform)."""
    return row_entropy(p).exp()


def column_share(p: torch.Tensor) -> torch.Tensor:
    """(n,): the share of P's total mass each input token receives, ``sum_i P[i, j] / m`` (sums to 1)."""
    p = p.double()
    return p.sum(0) / p.shape[0]


def mask_mass(p: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(share of P's mass on the tokens where ``mask`` (n,) is true, share of the tokens that are true): the first
    far above the second means P concentrates on the masked tokens (for example the objects of the scene)."""
    mask = mask.bool().to(p.device)
    return float(column_share(p)[mask].sum()), float(mask.double().mean())


def window_mass(p: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(m,): each row's mass inside its pooling window (``compress.metacompress.pool_windows``); 1 for pooling."""
    from compress.metacompress import pool_windows

    m, n = p.shape
    index, valid = pool_windows(n, m, kernel_size)
    inside = torch.zeros(m, n, dtype=torch.bool)
    inside[torch.arange(m)[:, None].expand_as(index)[valid], index[valid]] = True
    return (p.double() * inside.to(p.device)).sum(1)


def near_mass(p: torch.Tensor, layout) -> torch.Tensor:
    """(m,): each row's mass on the tokens within one query spacing of its window's centre, in image units
    (``compress.metacompress.locality_distances`` <= 1): how much of a row stays where its output slot says it is."""
    from compress.metacompress import locality_distances

    near = locality_distances(layout, p.shape[0], p.device) <= 1.0
    return (p.double() * near).sum(1)


def rectangle_mass(p: torch.Tensor, layout) -> torch.Tensor:
    """(m,): each row's mass inside its rectangle of Spatial's pooling matrix (``compress.metacompress.
    spatial_windows``); 1 for Spatial itself and where a Spatial prior keeps its start."""
    from compress.metacompress import spatial_windows

    return (p.double() * spatial_windows(layout, p.shape[0], p.device)).sum(1)


def total_variation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Total-variation distance ``0.5 * sum |a - b|`` over the last dimension (0: equal, 1: disjoint supports)."""
    return 0.5 * (a.double() - b.double()).abs().sum(-1)


def row_spread(p: torch.Tensor) -> float:
    """Mean total-variation distance between two different rows of P (0: every row is the same distribution)."""
    m = p.shape[0]
    if m < 2:
        return 0.0
    pairwise = total_variation(p[:, None, :], p[None, :, :])
    return float(pairwise.sum() / (m * (m - 1)))


def oracle_distance(p: torch.Tensor, oracle: torch.Tensor) -> dict[str, float]:
    """How far P is from the per-image oracle of the same rate (both (m, n)), in ways that ignore the row order:
    ``column_tv``: total variation between the two column shares (which input tokens get the mass);
    ``row_tv``: for each oracle row, the total variation to the nearest row of P, averaged over the oracle's rows."""
    if p.shape[1] != oracle.shape[1]:
        raise ValueError(f"P has {p.shape[1]} input tokens but the oracle {oracle.shape[1]}")
    nearest = total_variation(oracle[:, None, :], p[None, :, :]).amin(1)
    return {"column_tv": float(total_variation(column_share(p), column_share(oracle))),
            "row_tv": float(nearest.mean())}


def matrix_statistics(p: torch.Tensor, kernel_size: int | None = None, mask: torch.Tensor | None = None,
                      oracle: torch.Tensor | None = None, layout=None) -> dict[str, float]:
    """The diagnostics of one P (m, n), each a float: row entropy (mean, min, max, and log n for scale), effective
    tokens per row, the effective number of input tokens that receive mass (exp of the column shares' entropy), the
    largest column share against the uniform 1/n, the spread between rows, and where given the mass inside the
    pooling windows, near the window centres and inside Spatial's rectangles (``layout``), on ``mask`` and the
    distance to ``oracle``."""
    p = p.detach().cpu()
    m, n = p.shape
    h = row_entropy(p)
    share = column_share(p)
    out = {"m": float(m), "n": float(n), "row_entropy": float(h.mean()), "row_entropy_min": float(h.min()),
           "row_entropy_max": float(h.max()), "log_n": math.log(n), "effective_tokens": float(h.exp().mean()),
           "max_column_share": float(share.max()), "uniform_share": 1.0 / n,
           "effective_columns": float(row_entropy(share[None])[0].exp()),
           "row_spread": row_spread(p)}
    if kernel_size is not None:
        out["window_mass"] = float(window_mass(p, kernel_size).mean())
    if layout is not None:
        out["near_mass"] = float(near_mass(p, layout).mean())
        out["rectangle_mass"] = float(rectangle_mass(p, layout).mean())
    if mask is not None:
        out["mask_mass"], out["mask_area"] = mask_mass(p, mask.cpu())
    if oracle is not None:
        out.update({f"oracle_{k}": v for k, v in oracle_distance(p, oracle.detach().cpu()).items()})
    return out
