"""The module DeepSpeed wraps: the compressor (trainable) around the frozen LVLM, and its loss (paper eq. 10,
docs/design.md §4.2)."""

from __future__ import annotations

import functools


@functools.cache
def _student_module():
    import torch
    from torch import nn

    from compress.losses import collapse_loss, entropy_loss, topk_kl
    from compress.reduction import Reduction, num_keep

    class Student(nn.Module):
        """The compressor (trainable) and the LVLM (frozen, always in eval mode). ``forward(examples, rate,
        method)`` -> {"loss", "kl", "entropy", "collapse", "tokens"} for a batch of :class:`Example`;
        ``method="sample"`` replaces the compressor by equidistant sampling (a reference for held-out KL)."""

        def __init__(self, compressor: nn.Module, adapter, entropy_weight: float, collapse_weight: float,
                     activation_checkpointing: bool = False):
            super().__init__()
            self.compressor = compressor
            self.lvlm = adapter.model
            for p in self.lvlm.parameters():
                p.requires_grad_(False)
            self.adapter = adapter
            self.weights = (entropy_weight, collapse_weight)
            self.checkpointed: list = []
            if activation_checkpointing:  # docs/design.md §6.3
                from transformers.modeling_layers import GradientCheckpointingLayer

                adapter.language_model.activation_checkpointing_enable({"use_reentrant": False})
                self.checkpointed = [m for m in adapter.language_model.modules()
                                     if isinstance(m, GradientCheckpointingLayer)]

        def train(self, mode: bool = True):
            self.training = mode
            self.compressor.train(mode)
            self.lvlm.eval()  # frozen: no dropout, whatever DeepSpeed asks
            # transformers recomputes a layer only while that layer is in training mode; only the layer's own flag
            # is set, its attention and MLP stay in eval mode (no dropout)
            for layer in self.checkpointed:
                layer.training = mode
            return self

        def forward(self, examples: list, rate: float, method: str = "metacompress") -> dict:
            from compress.baselines import FEATURE_REDUCERS
            from compress.lvlm.session import answer_logits_batch

            ad = self.adapter
            xs = [e.features.to(ad.device, ad.dtype) for e in examples]
            keeps = [num_keep(x.shape[0], rate) for x in xs]
            layouts = [e.layout for e in examples]
            if method == "metacompress":
                tokens, matrices = self.compressor(xs, keeps, layouts)
                reductions, reducer = [Reduction(t, p) for t, p in zip(tokens, matrices)], self.compressor
            else:
                reducer = FEATURE_REDUCERS[method]
                reductions = [reducer(x, m, lay) for x, m, lay in zip(xs, keeps, layouts)]
                tokens, matrices = [r.tokens for r in reductions], []
            tokens = [t.to(ad.dtype) for t in tokens]
            # 3-D rotary families: the reduced tokens' positions by the rule of docs/design.md §5 (None for 1-D)
            positions = [ad.positions_after(lay, r, reducer) for lay, r in zip(layouts, reductions)]
            outs = answer_logits_batch(ad, tokens, [e.questions for e in examples],
                                       [e.answer_ids for e in examples], image_positions=positions)
            for e, o in zip(examples, outs):
                if o.logits.shape[0] != e.topk_ids.shape[0]:
                    raise ValueError(f"dialogue {e.dialogue_id!r}: {o.logits.shape[0]} answer tokens in the student "
                                     f"pass but {e.topk_ids.shape[0]} teacher targets; the teacher cache is stale")
            logits = torch.cat([o.logits for o in outs])
            dev = logits.device
            count = logits.shape[0]
            if count:
                kl = topk_kl(logits, torch.cat([e.topk_logprobs for e in examples]).to(dev),
                             torch.cat([e.topk_ids for e in examples]).to(dev),
                             teacher_tail_logmass=torch.cat([e.tail_logmass for e in examples]).to(dev))
            else:  # every answer empty: nothing to distil, keep the graph connected
                kl = logits.float().sum() * 0.0
            zero = kl.new_zeros(())
            entropy = collapse = zero
            if method == "metacompress":
                p, row_mask = _pad_matrices(list(matrices))
                entropy, collapse = entropy_loss(p, row_mask), collapse_loss(p)
            loss = kl + self.weights[0] * entropy + self.weights[1] * collapse
            return {"loss": loss, "kl": kl, "entropy": entropy, "collapse": collapse, "tokens": count}

    return Student


def _pad_matrices(mats: list):
    """P_b (m_b, n_b) -> (B, m_max, n_max) zero-padded and the row mask (B, m_max)."""
    import torch

    m_max, n_max = max(p.shape[0] for p in mats), max(p.shape[1] for p in mats)
    out = mats[0].new_zeros(len(mats), m_max, n_max)
    mask = torch.zeros(len(mats), m_max, dtype=torch.bool, device=mats[0].device)
    for b, p in enumerate(mats):
        out[b, : p.shape[0], : p.shape[1]] = p
        mask[b, : p.shape[0]] = True
    return out, mask


@functools.cache
def _tensor_output_class():
    from compress.metacompress import MetaCompress

    class TensorOutput(MetaCompress):
        """MetaCompress whose batched call returns (tokens tuple, matrices tuple) instead of Reductions: ZeRO-3
        re-gathers a module's partitioned weights for backward through hooks on the tensors its forward returns,
        and those hooks do not look inside dataclasses. Same weights and state dict as MetaCompress."""

        def forward(self, xs, keeps, layouts):
            reductions = super().forward(list(xs), list(keeps), list(layouts))
            return tuple(r.tokens for r in reductions), tuple(r.matrix for r in reductions)

    return TensorOutput


AUTO_THRESHOLD = 0.5  # generator "auto": "normed" when the paper's P starts above this share of log n


def initial_entropy_share(hidden_size: int, train_cfg, seed: int, xs: list, layouts: list, rate: float) -> float:
    """Mean row entropy of the paper's P at initialisation (seeded as the student is) over ``xs`` (n_i, d), as a
    share of the mean log n_i: near 0, P starts as a selection / pooling; near 1, uniform (docs/design.md §4.1)."""
    import math

    import torch

    from compress.metacompress import MetaCompress
    from compress.reduction import num_keep

    torch.manual_seed(seed)  # the reference grid does not matter here: E is zero at initialisation
    probe = MetaCompress(hidden_size, train_cfg.compress_dim, train_cfg.kernel_size, generator="paper")
    shares = []
    with torch.no_grad():
        for x, layout in zip(xs, layouts):
            p = probe(x.float(), num_keep(x.shape[0], rate), layout).matrix.double()
            h = -(p * p.clamp_min(1e-300).log()).sum(-1).mean()
            shares.append(float(h) / math.log(x.shape[0]) if x.shape[0] > 1 else 0.0)
    return sum(shares) / max(len(shares), 1)


def resolve_generator(generator: str, entropy_share: float) -> str:
    """``"auto"`` -> ``"normed"`` when the paper's P starts near uniform on this data (entropy share above
    ``AUTO_THRESHOLD``), else ``"paper"``; any other name is returned as given."""
    if generator != "auto":
        return generator
    return "normed" if entropy_share > AUTO_THRESHOLD else "paper"


def build_student(adapter, train_cfg, seed: int):
    """A fresh compressor (seeded: identical on every worker) around ``adapter``'s frozen model."""
    import torch

    if train_cfg.generator == "auto":
        raise ValueError("train.generator 'auto' must be resolved on the data first (stages.train.student."
                         "resolve_generator, as the train stage's worker does); or set 'paper' or 'normed'")

    torch.manual_seed(seed)
    compressor = _tensor_output_class()(adapter.text_config.hidden_size, train_cfg.compress_dim,
                                         train_cfg.kernel_size, reference_grid=adapter.reference_grid,
                                         generator=train_cfg.generator,
                                         temperature=train_cfg.temperature,
                                         locality=train_cfg.locality,
                                         spatial_prior=train_cfg.spatial_prior).to(
        adapter.device, getattr(torch, train_cfg.compressor_dtype))
    return _student_module()(compressor, adapter, train_cfg.entropy_weight, train_cfg.collapse_weight,
                             train_cfg.activation_checkpointing)


