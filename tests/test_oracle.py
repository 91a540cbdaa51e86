import torch

from compress.losses import entropy_loss
from compress.oracle import fit_oracle


def test_oracle_recovers_a_selection_the_loss_asks_for():
    torch.manual_seed(0)
    x = torch.eye(12) * 3.0  # orthogonal tokens: the target fixes P uniquely
    wanted = torch.tensor([2, 7, 11])
    target = x[wanted]
    fit = fit_oracle(x, 3, lambda tokens, p: (tokens - target).pow(2).sum(), steps=300, lr=1.0, entropy_weight=0.0)
    p = fit.reduction.matrix
    assert p.argmax(-1).tolist() == wanted.tolist()
    assert fit.losses[-1] < 0.05 * fit.losses[0]
    torch.testing.assert_close(fit.reduction.tokens, p @ x)


def test_entropy_term_sharpens_rows():
    torch.manual_seed(1)
    x = torch.randn(10, 4)
    flat = fit_oracle(x, 2, lambda tokens, p: tokens.sum() * 0.0, steps=1, lr=0.0)
    sharp = fit_oracle(x, 2, lambda tokens, p: tokens.sum() * 0.0, steps=200, lr=10.0)
    assert entropy_loss(sharp.reduction.matrix) < 0.5 * entropy_loss(flat.reduction.matrix)
