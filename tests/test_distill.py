"""distill_loss: the knowledge-distillation baseline."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

import fastguide


def test_matches_manual_kl():
    torch.manual_seed(0)
    s, t = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    T = 3.0
    expected = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T
    torch.testing.assert_close(fastguide.distill_loss(s, t, T), expected)


def test_zero_when_equal_and_positive_otherwise():
    torch.manual_seed(0)
    s = torch.randn(6, 4)
    assert_close(fastguide.distill_loss(s, s.clone(), 2.0), 0.0, "loss", torch.float32, what="equal logits")
    assert fastguide.distill_loss(s, torch.randn(6, 4), 2.0) > 0


def test_teacher_gets_no_gradient_student_does():
    s = torch.randn(6, 4, requires_grad=True)
    t = torch.randn(6, 4, requires_grad=True)
    fastguide.distill_loss(s, t, 4.0).backward()
    assert s.grad is not None and t.grad is None


def test_sequence_logits_and_reductions():
    torch.manual_seed(0)
    s, t = torch.randn(3, 7, 5), torch.randn(3, 7, 5)
    flat = fastguide.distill_loss(s.reshape(21, 5), t.reshape(21, 5), 2.0)
    torch.testing.assert_close(fastguide.distill_loss(s, t, 2.0), flat)
    per = fastguide.distill_loss(s, t, 2.0, reduction="none")
    assert per.shape == (3, 7)
    torch.testing.assert_close(per.mean(), flat)
    torch.testing.assert_close(fastguide.distill_loss(s, t, 2.0, reduction="sum"), per.sum())


@pytest.mark.parametrize(
    "args,exc,msg",
    [
        ((torch.randn(2, 3), torch.randn(2, 4), 1.0), ValueError, "same shape"),
        ((torch.randn(2, 3), torch.randn(2, 3), 0.0), ValueError, "temperature"),
        ((torch.randn(2, 3), torch.randn(2, 3), -1.0), ValueError, "temperature"),
        (
            (torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), 1.0),
            TypeError,
            "floating",
        ),
    ],
    ids=["shape", "zero-T", "negative-T", "integer"],
)
def test_bad_input(args, exc, msg):
    with pytest.raises(exc, match=msg):
        fastguide.distill_loss(*args)
