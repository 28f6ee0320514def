"""CKALoss: reductions, weights, gradients, repr and device moves."""

import pytest
import torch
from helpers import assert_close

import fastguide as fg

# Every test here runs under both CPU Gram schedules (serial, layer-parallel): see conftest.
pytestmark = pytest.mark.usefixtures("cpu_gram_mode")


def _acts(n=20):
    t = [torch.randn(n, d, requires_grad=True) for d in (6, 9, 4)]
    g = [torch.randn(n, d) for d in (5, 7)]
    return t, g


def test_sum_is_sum_of_one_minus_cka():
    t, g = _acts()
    pairs = [(0, 0), (1, 1), (2, 1)]
    loss = fg.CKALoss(pairs)(t, g)
    want = (1 - fg.cka_pairs(t, g, pairs)).sum()
    assert_close(loss, want, "loss", torch.float32, length=3, what="sum")


def test_reductions_and_weights():
    t, g = _acts()
    pairs = [(0, 0), (1, 1), (2, 1)]
    w = torch.tensor([1.0, 2.0, 0.5])
    per = 1 - fg.cka_pairs(t, g, pairs)
    f32 = torch.float32
    assert_close(fg.CKALoss(pairs, w, reduction="none")(t, g), w * per, "loss", f32, length=2, what="none")
    assert_close(fg.CKALoss(pairs, w)(t, g), (w * per).sum(), "loss", f32, length=3.5, what="sum")
    want = (w * per).sum() / w.sum()
    assert_close(fg.CKALoss(pairs, w, reduction="mean")(t, g), want, "loss", f32, what="mean")
    assert_close(fg.CKALoss(pairs, reduction="mean")(t, g), per.mean(), "loss", f32, what="unweighted mean")


def test_gradients_equal_explicit_cka():
    t, g = _acts()
    pairs = [(0, 1), (2, 0)]
    fg.CKALoss(pairs, estimator="biased")(t, g).backward()
    got = [x.grad.clone() if x.grad is not None else torch.zeros_like(x) for x in t]
    for x in t:
        x.grad = None
    (1 - fg.cka_pairs(t, g, pairs, estimator="biased")).sum().backward()
    for a, x in zip(got, t, strict=False):
        want = x.grad if x.grad is not None else torch.zeros_like(x)
        assert_close(a, want, "grad", torch.float32, what="loss grad")
    assert t[1].grad is None  # a layer in no pair gets no gradient


def test_one_to_one_default_and_layer_stats():
    t, g = _acts()
    loss = fg.CKALoss()
    with pytest.raises(ValueError, match="pairs=None"):
        loss(t, g)
    stats = [fg.layer_stats(y) for y in g]
    assert_close(loss(t[:2], stats), loss(t[:2], g), "loss", torch.float32, length=2, what="LayerStats")


def test_repr_buffers_and_bad_options():
    loss = fg.CKALoss([(0, 0), (1, 1)], [1.0, 3.0], estimator="biased", reduction="mean")
    r = repr(loss)
    assert "2 pairs" in r and "biased" in r and "mean" in r and "weighted" in r
    assert "weights" in dict(loss.named_buffers())
    assert loss.to(torch.float64).weights.dtype == torch.float64
    with pytest.raises(ValueError, match="reduction"):
        fg.CKALoss(reduction="avg")
    with pytest.raises(ValueError, match="weights has 3 entries"):
        fg.CKALoss([(0, 0)], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="estimator"):
        fg.CKALoss(estimator="x")
    with pytest.raises(TypeError, match=r"\(i, j\)"):
        fg.CKALoss([(0, 0, 1)])
    t, g = _acts()
    with pytest.raises(IndexError, match="out of range"):
        fg.CKALoss([(5, 0)])(t, g)
