"""Training losses (paper eq. 10): distillation against cached top-k teacher targets, and the regularisers of P."""

from __future__ import annotations

import torch


def topk_kl(student_logits: torch.Tensor, teacher_topk_logprobs: torch.Tensor, teacher_topk_ids: torch.Tensor,
            mask: torch.Tensor | None = None, teacher_tail_logmass: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) over the k cached token ids plus one bucket for the rest of the mass.

    student_logits (..., V); teacher_topk_logprobs (..., k) log-probabilities over the full vocabulary;
    teacher_topk_ids (..., k); mask (...) true for real answer tokens (padding false);
    teacher_tail_logmass (...) log of the teacher mass outside the k ids (derived from the top-k when omitted).
    Returns the mean KL over unmasked positions (a scalar).
    """
    student_logits = student_logits.float()
    log_z = torch.logsumexp(student_logits, -1)
    student_topk = student_logits.gather(-1, teacher_topk_ids.long()) - log_z[..., None]
    # Finite fill (not -inf) keeps gradients finite when the k ids cover the whole vocabulary.
    outside = student_logits.scatter(-1, teacher_topk_ids.long(), torch.finfo(student_logits.dtype).min)
    student_tail = torch.logsumexp(outside, -1) - log_z

    teacher_topk = teacher_topk_logprobs.float()
    if teacher_tail_logmass is None:
        teacher_tail_mass = (1.0 - teacher_topk.exp().sum(-1)).clamp_min(0.0)
    else:
        teacher_tail_mass = teacher_tail_logmass.float().exp()
    # When the k ids cover the vocabulary the tail is empty, whatever rounding left in 1 - sum(top-k).
    has_tail = (teacher_tail_mass > 1e-12) & (teacher_topk_ids.shape[-1] < student_logits.shape[-1])
    safe_mass = torch.where(has_tail, teacher_tail_mass, torch.ones_like(teacher_tail_mass))
    tail_term = torch.where(has_tail, safe_mass * (safe_mass.log() - student_tail), 0.0)
    per_token = (teacher_topk.exp() * (teacher_topk - student_topk)).sum(-1) + tail_term
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def entropy_loss(p: torch.Tensor, row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean row entropy of P (..., m, n), rows being distributions; row_mask (..., m) excludes padded rows."""
    # clamp, not xlogy: xlogy's gradient is 0/0 where a sharp row has exact zeros
    h = -(p * p.clamp_min(1e-30).log()).sum(-1)
    if row_mask is None:
        return h.mean()
    row_mask = row_mask.to(h.dtype)
    return (h * row_mask).sum() / row_mask.sum().clamp_min(1.0)


def collapse_loss(p: torch.Tensor) -> torch.Tensor:
    """max_j sum_i P[i, j] for P (m, n); for a batch (B, m, n) (padded rows zero) the mean over the batch."""
    column_mass = p.sum(-2)
    return column_mass.amax(-1).mean()


def topk_targets(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's cached targets: logits (A, V) -> top-k log-probs (A, k), ids (A, k) and log tail mass (A,),
    all on the CPU (the inputs of :func:`topk_kl`)."""
    logprobs = torch.log_softmax(logits.float(), -1)
    top, ids = logprobs.topk(min(k, logprobs.shape[-1]), -1)
    # log(1 - sum p_topk) computed as log(sum of the other probabilities): exact where the tail is tiny.
    tail = torch.logsumexp(logprobs.scatter(-1, ids, float("-inf")), -1)
    return top.cpu(), ids.cpu(), tail.cpu()
