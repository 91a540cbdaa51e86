import math

import pytest
import torch

from compress.losses import collapse_loss, entropy_loss, topk_kl


def full_kl(teacher_logits, student_logits):
    t = teacher_logits.log_softmax(-1)
    s = student_logits.log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def test_topk_kl_equals_full_kl_when_k_is_vocabulary():
    torch.manual_seed(0)
    teacher, student = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    lp, ids = teacher.log_softmax(-1).topk(11, -1)
    got = topk_kl(student, lp, ids)
    torch.testing.assert_close(got, full_kl(teacher, student))
    student.requires_grad_(True)
    topk_kl(student, lp, ids).backward()
    assert torch.isfinite(student.grad).all()


def test_topk_kl_is_zero_for_identical_distributions_with_a_tail():
    torch.manual_seed(1)
    logits = torch.randn(4, 20)
    lp, ids = logits.log_softmax(-1).topk(5, -1)
    assert topk_kl(logits, lp, ids).abs().item() < 1e-6


def test_topk_kl_tail_bucket_hand_computed():
    # vocabulary of 4; teacher keeps ids 2 and 0 with p = 0.5, 0.3 (tail 0.2); student probs 0.1, 0.2, 0.3, 0.4
    student = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    lp = torch.log(torch.tensor([[0.5, 0.3]]))
    ids = torch.tensor([[2, 0]])
    expected = 0.5 * math.log(0.5 / 0.3) + 0.3 * math.log(0.3 / 0.1) + 0.2 * math.log(0.2 / 0.6)
    assert topk_kl(student, lp, ids).item() == pytest.approx(expected, rel=1e-5)
    # the stored tail log-mass gives the same answer
    got = topk_kl(student, lp, ids, teacher_tail_logmass=torch.log(torch.tensor([0.2])))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_topk_kl_mask_averages_only_real_tokens():
    torch.manual_seed(2)
    teacher, student = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    lp, ids = teacher.log_softmax(-1).topk(7, -1)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    per_token = [full_kl(teacher[b, t], student[b, t]) for b, t in [(0, 0), (0, 1), (1, 0)]]
    expected = torch.stack(per_token).mean()
    torch.testing.assert_close(topk_kl(student, lp, ids, mask=mask), expected)


def test_entropy_and_collapse_on_hand_made_matrices():
    one_hot = torch.eye(4)[:3]  # 3 rows, 4 columns, distinct sources
    uniform = torch.full((3, 4), 0.25)
    assert entropy_loss(one_hot).item() == pytest.approx(0.0)
    assert entropy_loss(uniform).item() == pytest.approx(math.log(4))
    assert collapse_loss(one_hot).item() == pytest.approx(1.0)
    assert collapse_loss(uniform).item() == pytest.approx(0.75)
    collapsed = torch.zeros(3, 4)
    collapsed[:, 1] = 1.0
    assert collapse_loss(collapsed).item() == pytest.approx(3.0)
    batch = torch.stack([one_hot, collapsed])
    assert collapse_loss(batch).item() == pytest.approx(2.0)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    mixed = torch.stack([uniform, one_hot])
    assert entropy_loss(mixed, mask).item() == pytest.approx(3 * math.log(4) / 4)


def test_entropy_gradient_is_finite_on_rows_with_exact_zeros():
    raw = torch.tensor([[200.0, 0.0, -200.0], [0.0, 0.0, 0.0]], requires_grad=True)
    p = raw.softmax(-1)
    assert (p == 0).any()
    entropy_loss(p).backward()
    assert torch.isfinite(raw.grad).all()
