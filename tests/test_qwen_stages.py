"""The teacher and train stages' per-item functions on a tiny random Qwen2.5-VL (3-D rotary positions, dynamic
resolution, 2 x 2 merger) against transformers' own forward: the teacher's cached top-k log-probabilities are the
model's own (pixel values in, its tower, merger and get_rope_index), and the student with P = identity reproduces
them (KL 0), which it only does when the stage passes the reduced tokens' 3-D positions (docs/design.md §5)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_qwen2_5_vl import QUESTIONS, SIZES, tiny_processor, tiny_qwen, tiny_tokenizer  # noqa: E402
from tiny_models import random_image  # noqa: E402


@pytest.fixture(scope="module")
def qwen():
    from compress.lvlm.qwen2_5_vl import Qwen25VLAdapter

    return Qwen25VLAdapter(tiny_qwen(seed=3), tiny_tokenizer(), tiny_processor(), "<tiny-qwen2.5-vl>")


@pytest.fixture(scope="module")
def teacher_rows(qwen):
    """The teacher stage's rows for two dialogues of different token grids (3 x 5 and 5 x 7 merged tokens)."""
    from stages.teacher import TeacherWorker

    worker = object.__new__(TeacherWorker)  # the stage's per-batch function without Ray or shards
    worker.adapter, worker.teacher = qwen, {"top_k": 8, "max_new_tokens": 3, "history": "own"}
    encoded = [qwen.encode(random_image(*size, seed=20 + i)) for i, size in enumerate((SIZES[0], SIZES[2]))]
    dialogues = [{"dialogue_id": f"d{i}", "questions": QUESTIONS} for i in range(2)]
    return encoded, worker._dialogue_batch(encoded, dialogues)


def test_teacher_targets_are_the_models_own_forward(qwen, teacher_rows):
    from compress.lvlm.session import dialogue_ids

    encoded, rows = teacher_rows
    for enc, row in zip(encoded, rows):
        answers = [a.tolist() for a in row["answer_ids"]]
        ids, positions, _ = dialogue_ids(qwen, enc.layout.num_tokens, QUESTIONS, answers)
        with torch.no_grad():  # transformers' path: pixels through its tower and merger, its own 3-D positions
            ref = qwen.full_forward_logits(torch.tensor([ids]), enc)[0].float().log_softmax(-1)
        at = torch.tensor(positions) - 1  # the position predicting each answer token
        top_ids = torch.cat(row["topk_ids"]).long()
        want = ref[at].gather(1, top_ids)
        got = torch.cat(row["topk_logprobs"]).float()
        assert got.shape == (len(positions), 8)
        assert torch.allclose(got, want, atol=2e-3), (got - want).abs().max()
        # the top ids are the reference's best k (their log-probabilities at least the k-th best)
        kth = ref[at].topk(8).values[:, -1:]
        assert bool((want >= kth - 1e-4).all())


def _examples(encoded, rows):
    from stages.train.data import Example

    return [Example(r["dialogue_id"], e.tokens.float(), e.layout, list(QUESTIONS),
                    [a.tolist() for a in r["answer_ids"]], torch.cat(r["topk_logprobs"]).float(),
                    torch.cat(r["topk_ids"]).long(), torch.cat(r["tail_logmass"]).float())
            for e, r in zip(encoded, rows)]


class Identity(torch.nn.Module):
    """A compressor whose P is the identity: m = n, every token kept where it was."""

    def forward(self, xs, keeps, layouts):
        return tuple(xs), tuple(torch.eye(x.shape[0], dtype=x.dtype) for x in xs)


def test_student_with_identity_p_has_zero_kl_and_a_reduction_does_not(qwen, teacher_rows):
    from stages.train.student import _student_module

    student = _student_module()(Identity(), qwen, 0.0, 0.0)
    examples = _examples(*teacher_rows)
    with torch.no_grad():
        same = student(examples, rate=0.5)  # Identity ignores the budget: P = I whatever the rate
        sampled = student(examples, rate=0.7, method="sample")
    assert same["tokens"] == sum(e.topk_ids.shape[0] for e in examples)
    assert abs(float(same["kl"])) < 1e-3 and float(same["loss"]) == pytest.approx(float(same["kl"]))
    assert float(sampled["kl"]) > 1e-2  # the check can fail: a reduction changes the answers' distributions


def test_student_passes_positions_the_flat_rule_would_get_wrong(qwen, teacher_rows):
    """Dropping the 3-D positions (1-D counting over the visual tokens) moves the KL off zero: the zero above
    depends on the positions the stage passes."""
    from compress.lvlm.base import VisualPositions
    from stages.train.student import _student_module

    examples = _examples(*teacher_rows)
    flat = lambda layout, reduction=None, reducer=None: VisualPositions(  # noqa: E731
        torch.arange(layout.num_tokens)[:, None].repeat(1, 3), layout.num_tokens)
    student = _student_module()(Identity(), qwen, 0.0, 0.0)
    original = qwen.positions_after
    qwen.positions_after = flat
    try:
        with torch.no_grad():
            wrong = student(examples, rate=0.5)
    finally:
        del qwen.positions_after
    assert qwen.positions_after == original
    assert float(wrong["kl"]) > 1e-3
