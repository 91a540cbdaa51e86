import pytest
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


def test_pool_start_puts_each_row_on_its_window_and_adam_recovers_the_selection():
    x = torch.eye(6) * 3.0
    start = fit_oracle(x, 2, lambda tokens, p: tokens.sum() * 0.0, steps=0, init="pool", init_std=0.0)
    p = start.reduction.matrix
    # n = 6, m = 2, kernel 3: windows centred on floor(0.5 * 3) = 1 and floor(1.5 * 3) = 4 -> tokens 0-2 and 3-5
    assert p[0, :3].sum() > 0.98 and p[1, 3:].sum() > 0.98
    torch.testing.assert_close(p[0, :3], torch.full((3,), p[0, 0].item()))  # uniform inside the window
    wanted = torch.tensor([5, 0])  # each row must leave its window
    fit = fit_oracle(x, 2, lambda tokens, p: (tokens - x[wanted]).pow(2).sum(), steps=200, lr=0.5, init="pool",
                     optimizer="adam", entropy_weight=0.0)
    assert fit.reduction.matrix.argmax(-1).tolist() == wanted.tolist()
    with pytest.raises(ValueError, match="init="):
        fit_oracle(x, 2, lambda tokens, p: tokens.sum(), steps=1, init="uniform")
