"""Grouped CKA (tokens="positions" / "structure") against the float64 per-group oracle."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from helpers import assert_close, assert_same_grads

import fastguide as fg
from fastguide import _reference as R
from fastguide import _structure

MODES = ["positions", "structure"]
ESTIMATORS = ["unbiased", "biased"]
# triton: the interpreter on CPU tensors (tiny shapes); on CUDA test_triton_on_cuda runs it compiled.
_CPU_TRITON = pytest.mark.skipif(
    torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU tensors need the Triton interpreter; test_triton_on_cuda covers CUDA",
)
BACKENDS = ["torch", pytest.param("triton", marks=_CPU_TRITON)]


def _seq(B=9, T=6, dims=(7, 5), dtype=torch.float32, scale=1.0, offset=0.0, maps=False):
    """Correlated layers sharing a (B, T) latent: (B, T, D) sequences, or (B, C, H, W) maps (T = H*W = 6)."""
    z = torch.randn(B, T, 3, dtype=torch.float64)
    out = []
    for k, d in enumerate(dims):
        x = (
            z @ torch.randn(3, d, dtype=torch.float64)
            + 0.5 * torch.randn(B, T, d, dtype=torch.float64)
            + 0.1 * k
        )
        x = x * scale + offset
        if maps:
            x = x.transpose(1, 2).reshape(B, d, 2, T // 2)
        out.append(x.to(dtype))
    return out


def _ref_pairs(xs, ys, pairs, tokens, estimator):
    return R.cka_pairs_grouped(xs, ys, pairs, tokens, estimator)


def _ref_grads(xs, ys, pairs, tokens, estimator, w=None):
    xd = [x.detach().double().requires_grad_(True) for x in xs]
    yd = [y.detach().double() for y in ys]
    c = _ref_pairs(xd, yd, pairs, tokens, estimator)
    loss = (c * (torch.ones_like(c) if w is None else w.double())).sum()
    return torch.autograd.grad(loss, xd, allow_unused=True)


# --------------------------------------------------------------------------- the oracle itself
def test_oracle_groups_are_the_slices():
    x = torch.randn(4, 3, 2, 5)
    g = R.groups(x, "positions")
    assert len(g) == 10 and torch.equal(g[7], x[:, :, 1, 2])
    s = R.groups(x, "structure")
    assert len(s) == 4 and torch.equal(s[2], x[2].reshape(3, 10).T)
    q = torch.randn(4, 6, 5)
    assert torch.equal(R.groups(q, "positions")[5], q[:, 5]) and torch.equal(
        R.groups(q, "structure")[1], q[1]
    )


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("tokens", MODES)
@pytest.mark.parametrize("maps", [False, True], ids=["seq", "maps"])
def test_pairs_and_groups_match_oracle(tokens, estimator, backend, maps):
    xs = _seq(maps=maps)
    ys = _seq(dims=(4, 8), maps=maps)
    pairs = [(0, 1), (1, 0), (0, 0)]
    got = fg.cka_pairs(xs, ys, pairs, tokens=tokens, estimator=estimator, backend=backend)
    assert got.shape == (3,) and got.dtype == torch.float32
    assert_close(got, _ref_pairs(xs, ys, pairs, tokens, estimator), "cka", torch.float32, what="pairs")
    per = fg.cka_groups(xs, ys, pairs, tokens=tokens, estimator=estimator, backend=backend)
    G = 6 if tokens == "positions" else 9
    assert per.cka.shape == per.valid.shape == (3, G) and per.valid.all()
    for p, (i, j) in enumerate(pairs):
        vals, valid = R.cka_groups(xs[i], ys[j], tokens, estimator)
        assert_close(per.cka[p], vals, "cka", torch.float32, what=f"groups of pair {p}")
        assert torch.equal(per.valid[p], valid)
    one = fg.cka(xs[1], ys[0], tokens=tokens, estimator=estimator, backend=backend)
    assert one.dim() == 0
    assert_close(one, R.cka_grouped(xs[1], ys[0], tokens, estimator), "cka", torch.float32, what="cka")


@pytest.mark.parametrize("tokens", MODES)
def test_matrix_matches_oracle(tokens):
    xs, ys = _seq(dims=(3, 6)), _seq(dims=(5, 4, 2))
    got = fg.cka_matrix(xs, ys, tokens=tokens)
    want = torch.stack([R.cka_pairs_grouped(xs, ys, [(i, j) for j in range(3)], tokens) for i in range(2)])
    assert got.shape == (2, 3)
    assert_close(got, want, "cka", torch.float32, what="matrix")
    self_m = fg.cka_matrix(xs, tokens=tokens)
    assert_close(self_m.diagonal(), torch.ones(2), "cka", torch.float32, what="self diagonal")


def test_positions_with_sequence_target_and_map_guide():
    """A ViT's (B, T, D) tokens against a CNN's (B, C, H, W) map with H*W = T (REPA-style)."""
    x = _seq(T=6, dims=(5,))[0]
    y = _seq(T=6, dims=(4,), maps=True)[0]
    for tokens in MODES:
        got = fg.cka(x, y, tokens=tokens)
        assert_close(got, R.cka_grouped(x, y, tokens), "cka", torch.float32, what=tokens)


def test_gram_of_groups():
    x = _seq(dims=(5,), offset=1e3)[0]
    for tokens in MODES:
        K = fg.gram(x, tokens=tokens)
        want = torch.stack([R.centered_gram(g) for g in R.groups(x, tokens)])
        assert K.shape == want.shape
        assert_close(K, want, "gram", torch.float32, length=5, what=tokens)
    raw = fg.gram(x.double(), center=False, tokens="structure")
    want = x.double() @ x.double().transpose(1, 2)
    assert_close(raw, want, "gram", torch.float64, length=5, what="raw")


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("tokens", MODES)
def test_fp32_gradients_match_oracle(tokens, estimator, backend):
    xs = [x.requires_grad_(True) for x in _seq(dims=(7, 5, 3))]
    ys = _seq(dims=(4, 6))
    pairs = [(0, 1), (1, 0), (0, 0), (2, 1)]
    w = torch.tensor([0.5, -1.0, 2.0, 1.5])
    c = fg.cka_pairs(xs, ys, pairs, tokens=tokens, estimator=estimator, backend=backend)
    (c * w).sum().backward()
    for k, (x, g) in enumerate(zip(xs, _ref_grads(xs, ys, pairs, tokens, estimator, w), strict=True)):
        assert_close(x.grad, g, "grad", torch.float32, what=f"xs[{k}]")


@pytest.mark.parametrize("tokens", MODES)
def test_target_vs_target_pairs_give_both_sides_a_gradient(tokens):
    a, b = (x.requires_grad_(True) for x in _seq(dims=(5, 3), maps=True))
    fg.cka_matrix([a, b], tokens=tokens).sum().backward()
    ad, bd = (x.detach().double().requires_grad_(True) for x in (a, b))
    pairs = [(i, j) for i in range(2) for j in range(2)]
    R.cka_pairs_grouped([ad, bd], [ad, bd], pairs, tokens).sum().backward()
    assert_close(a.grad, ad.grad, "grad", torch.float32, what="a")
    assert_close(b.grad, bd.grad, "grad", torch.float32, what="b")


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("tokens", MODES)
def test_gradcheck_fp64(tokens, estimator):
    a = torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 2, 2, 2, dtype=torch.float64, requires_grad=True)  # (B, C, H, W): 4 positions
    g = torch.randn(5, 4, 6, dtype=torch.float64)

    def f(a, b):
        return fg.cka_pairs([a, b], [g, a], [(0, 0), (1, 0), (1, 1)], tokens=tokens, estimator=estimator)

    assert torch.autograd.gradcheck(f, (a, b))

    def per_group(a):
        return fg.cka_groups([a], [g], tokens=tokens, estimator=estimator).cka

    assert torch.autograd.gradcheck(per_group, (a,))


@_CPU_TRITON
@pytest.mark.parametrize("tokens", MODES)
def test_gradcheck_fp64_through_triton(tokens):
    # Tiny: every numerical-Jacobian column is an interpreter launch (the guide is precomputed).
    a = torch.randn(4, 4, 2, dtype=torch.float64, requires_grad=True)
    st = fg.layer_stats(torch.randn(4, 4, 3, dtype=torch.float64), tokens=tokens)

    def f(a):
        return fg.cka_pairs([a], [st], tokens=tokens, backend="triton")

    assert torch.autograd.gradcheck(f, (a,))


# --------------------------------------------------------------------------- degenerate groups
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_constant_position_is_left_out_with_zero_gradient(estimator, backend):
    """A causal model's position 0 after a shared BOS token is the same vector for every sample."""
    x, y = _seq(B=8, T=5, dims=(6, 4))
    x[:, 0] = torch.linspace(-3, 3, 6) + 3333.33  # identical across the batch, inexact in fp32
    y[:, 2] = 0.0  # a dead guide position
    x.requires_grad_(True)
    per = fg.cka_groups([x], [y], tokens="positions", estimator=estimator, backend=backend)
    assert per.valid.tolist() == [[False, True, False, True, True]]
    assert per.cka[0, 0] == 0 and per.cka[0, 2] == 0
    got = fg.cka(x, y, tokens="positions", estimator=estimator, backend=backend)
    want = R.cka_grouped(x, y, "positions", estimator)
    assert_close(got, want, "cka", torch.float32, what="mean over the valid positions")
    assert_close(got, per.cka[0, [1, 3, 4]].mean(), "cka", torch.float32, what="the documented reduction")
    got.backward()
    assert torch.isfinite(x.grad).all()
    assert torch.count_nonzero(x.grad[:, 0]) == 0 and torch.count_nonzero(x.grad[:, 2]) == 0
    (g,) = _ref_grads([x], [y], [(0, 0)], "positions", estimator)
    assert_close(x.grad, g, "grad", torch.float32, what="grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens", MODES)
def test_all_groups_degenerate_gives_zero_and_zero_gradient(tokens, backend):
    z = torch.full((6, 5, 4), 7.0, requires_grad=True)
    y = _seq(B=6, T=5, dims=(3,))[0]
    c = fg.cka_pairs([z], [y], tokens=tokens, backend=backend)
    assert c.item() == 0.0
    c.sum().backward()
    assert torch.count_nonzero(z.grad) == 0
    zero = torch.zeros(6, 5, 4, requires_grad=True)
    per = fg.cka_groups([zero], [y], tokens=tokens, backend=backend)
    assert not per.valid.any() and torch.count_nonzero(per.cka) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_sample_in_structure_mode(backend):
    """One sample whose tokens are all the same (e.g. an all-padding sequence) is left out."""
    x, y = _seq(B=5, T=6, dims=(4, 3))
    x[3] = 0.25
    x.requires_grad_(True)
    per = fg.cka_groups([x], [y], tokens="structure", backend=backend)
    assert per.valid.tolist() == [[True, True, True, False, True]]
    c = fg.cka(x, y, tokens="structure", backend=backend)
    assert_close(c, R.cka_grouped(x, y, "structure"), "cka", torch.float32, what="structure")
    c.backward()
    assert torch.count_nonzero(x.grad[3]) == 0 and torch.isfinite(x.grad).all()


def test_nan_input_propagates():
    x, y = _seq(dims=(4, 3))
    x[2, 1, 0] = float("nan")
    assert torch.isnan(fg.cka(x, y, tokens="positions"))
    per = fg.cka_groups([x], [y], tokens="structure")
    assert torch.isnan(per.cka[0, 2]) and not torch.isnan(per.cka[0, :2]).any()


# --------------------------------------------------------------------------- fp32 numerics
@pytest.mark.parametrize("tokens", MODES)
@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1e3, 1e6])
def test_fp32_scale_invariance(scale, tokens):
    xs64 = _seq(B=12, T=8, dims=(40, 9), dtype=torch.float64)
    want = R.cka_pairs_grouped(xs64, xs64[::-1], [(0, 0), (1, 1)], tokens)
    xs = [(x * scale).float() for x in xs64]
    for backend in ("torch", "triton"):
        got = fg.cka_pairs(xs, xs[::-1], tokens=tokens, backend=backend)
        assert_close(got, want, "cka", torch.float32, what=f"scale {scale} {backend}")


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("tokens", MODES)
def test_large_offsets(tokens, estimator):
    xs64 = _seq(B=12, T=6, dims=(9, 5), dtype=torch.float64)
    xs = [(x + 1e4).float().requires_grad_(True) for x in xs64]
    got = fg.cka_pairs(xs, [xs64[1], xs64[0]], tokens=tokens, estimator=estimator)
    # The oracle sees the same fp32-rounded inputs (rounding x + 1e4 to fp32 is the input's own error).
    rounded = [x.detach().double() for x in xs]
    want = R.cka_pairs_grouped(rounded, [xs64[1], xs64[0]], [(0, 0), (1, 1)], tokens, estimator)
    assert_close(got, want, "cka", torch.float32, what="offset 1e4")
    got.sum().backward()
    gs = _ref_grads(rounded, [xs64[1], xs64[0]], [(0, 0), (1, 1)], tokens, estimator)
    for x, g in zip(xs, gs, strict=True):
        assert_close(x.grad, g, "grad", torch.float32, what="offset grad")
    # +1e6 on a legitimate layer keeps every group.
    per = fg.cka_groups([(xs64[0] * 10 + 1e6).float()], [xs64[1]], tokens=tokens, estimator=estimator)
    assert per.valid.all()


@pytest.mark.parametrize("tokens", MODES)
def test_wide_groups_stay_accurate(tokens):
    """Long pair/self reductions: n = 96 examples per group, d = 600."""
    base = torch.randn(
        96 if tokens == "positions" else 3, 96 if tokens == "structure" else 3, 4, dtype=torch.float64
    )
    mk = [
        base @ torch.randn(4, 600, dtype=torch.float64) + torch.randn(*base.shape[:2], 600) for _ in range(2)
    ]
    got = fg.cka(mk[0].float(), mk[1].float(), tokens=tokens)
    assert_close(got, R.cka_grouped(mk[0], mk[1], tokens), "cka", torch.float32, what="wide")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("tokens", MODES)
def test_half_precision_inputs(tokens, dtype):
    xs64 = _seq(B=16, T=8, dims=(32, 12), dtype=torch.float64, scale=30.0)
    xs = [x.to(dtype).requires_grad_(True) for x in xs64]
    ys = [xs64[1].to(dtype), xs64[0].to(dtype)]
    got = fg.cka_pairs(xs, ys, tokens=tokens)
    assert got.dtype == torch.float32
    # Against the unrounded float64 layers: the contract's 1e-2 covers the input rounding too.
    want = R.cka_pairs_grouped(xs64, [xs64[1], xs64[0]], [(0, 0), (1, 1)], tokens)
    assert_close(got, want, "cka", dtype, what=str(dtype))
    got.sum().backward()
    assert all(x.grad.dtype == dtype and torch.isfinite(x.grad).all() for x in xs)
    # Gradients against the oracle on the same rounded inputs (the accumulation's error, not the rounding's).
    gs = _ref_grads([x.detach() for x in xs], [y.double() for y in ys], [(0, 0), (1, 1)], tokens, "unbiased")
    for x, g in zip(xs, gs, strict=True):
        assert_close(x.grad, g, "grad", dtype, what="half grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens", MODES)
def test_non_contiguous_inputs(tokens, backend):
    x64, y64 = _seq(B=6, T=8, dims=(10, 5), dtype=torch.float64)
    views = {
        "time-major": x64.float().transpose(0, 1).contiguous().transpose(0, 1),  # stored (T, B, D)
        "sliced": torch.cat([x64, x64], dim=2).float()[:, :, ::2],
        "channels-last map": x64.float()
        .transpose(1, 2)
        .reshape(6, 10, 2, 4)
        .contiguous(memory_format=torch.channels_last),
    }
    for name, v in views.items():
        v = v.detach().requires_grad_(True)  # the views keep their strides
        got = fg.cka(v, y64.float(), tokens=tokens, backend=backend)
        ref_x = v.detach().double()
        assert_close(got, R.cka_grouped(ref_x, y64, tokens), "cka", torch.float32, what=name)
        got.backward()
        (g,) = _ref_grads([ref_x], [y64], [(0, 0)], tokens, "unbiased")
        assert v.grad.shape == v.shape
        assert_close(v.grad, g, "grad", torch.float32, what=name)


# --------------------------------------------------------------------------- precomputed guide statistics
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens", MODES)
def test_layer_stats_give_same_values_and_target_grads(tokens, backend):
    xs = [x.requires_grad_(True) for x in _seq(dims=(6, 4))]
    ys = _seq(dims=(5, 3), maps=True)
    st = [fg.layer_stats(y, tokens=tokens, backend=backend) for y in ys]
    assert isinstance(st[0], fg.GroupStats) and st[0].tokens == tokens and not st[0].C.requires_grad
    G, n = (6, 9) if tokens == "positions" else (9, 6)
    assert st[0].C.shape == (G, n, n) and st[0].groups == G and st[0].n == n and st[0].ok.all()
    pairs = [(0, 1), (1, 0), (1, 1)]
    got = fg.cka_pairs(xs, [st[0], ys[1]], pairs, tokens=tokens, backend=backend)
    want = fg.cka_pairs(xs, ys, pairs, tokens=tokens, backend="torch")
    assert_close(got, want, "cka", torch.float32, what="stats vs raw")
    assert_same_grads(got, want, xs, "grad with stats")
    assert fg.cka_groups(xs, st, [(0, 0)], tokens=tokens).cka.shape == (1, G)
    moved = st[0].to("cpu")
    assert isinstance(moved, fg.GroupStats) and moved.tokens == tokens


def test_loss_module_with_grouped_tokens():
    xs = [x.requires_grad_(True) for x in _seq(dims=(6, 4))]
    ys = _seq(dims=(5, 3))
    loss = fg.CKALoss([(0, 0), (1, 1)], weights=[1.0, 2.0], estimator="biased", tokens="positions")
    out = loss(xs, [fg.layer_stats(y, estimator="biased", tokens="positions") for y in ys])
    c = R.cka_pairs_grouped(xs, ys, [(0, 0), (1, 1)], "positions", "biased")
    assert_close(out, (1 - c[0]) + 2 * (1 - c[1]), "cka", torch.float32, what="loss")
    out.backward()
    assert all(torch.isfinite(x.grad).all() for x in xs)
    with pytest.raises(ValueError, match="kernel"):
        fg.CKALoss(tokens="structure", kernel="rbf")


def test_guide_layers_get_no_gradient_work(monkeypatch):
    x = _seq(dims=(4,))[0].requires_grad_(True)
    y = _seq(dims=(3,))[0].requires_grad_(True)
    seen = []
    real = _structure._group_cka_bwd

    def spy(*args):
        seen.append(list(args[11]))
        return real(*args)

    monkeypatch.setattr(_structure, "_group_cka_bwd", spy)
    fg.cka(x, y.detach(), tokens="structure").backward()
    assert seen == [[0]] and y.grad is None


def test_backend_auto_is_torch_on_cpu(monkeypatch):
    from fastguide import functional

    assert functional._group_backend("auto", torch.device("cpu")) == "torch"
    assert functional._group_backend("triton", torch.device("cpu")) == "triton"  # interpreter in tests
    assert functional._group_backend("torch", torch.device("cpu")) == "torch"


# --------------------------------------------------------------------------- bad input
_X3 = torch.randn(6, 5, 4)


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: fg.cka(torch.randn(6, 4), _X3, tokens="positions"), ValueError, r"needs \(B, T, D\).*x"),
        (
            lambda: fg.cka_pairs([_X3], [torch.randn(6, 4)], tokens="structure"),
            ValueError,
            r"ys\[0\] has shape",
        ),
        (lambda: fg.cka(torch.randn(6, 2, 5, 3, 3), _X3, tokens="positions"), ValueError, "sequence or"),
        (
            lambda: fg.cka(torch.randn(7, 5, 4), _X3, tokens="positions"),
            ValueError,
            r"same batch size B.*xs\[0\] has 7 but ys\[0\] has 6",
        ),
        (lambda: fg.cka(torch.randn(7, 5, 4), _X3, tokens="structure"), ValueError, "same batch size B"),
        (lambda: fg.cka(torch.randn(6, 4, 4), _X3, tokens="positions"), ValueError, "same positions T"),
        (
            lambda: fg.cka(torch.randn(6, 4, 4), _X3, tokens="structure"),
            ValueError,
            "same tokens T.*resample",
        ),
        (
            lambda: fg.cka(torch.randn(3, 5, 4), torch.randn(3, 5, 2), tokens="positions"),
            ValueError,
            "B >= 4",
        ),
        (
            lambda: fg.cka(torch.randn(3, 3, 4), torch.randn(3, 3, 2), tokens="structure"),
            ValueError,
            "T.* >= 4",
        ),
        (lambda: fg.cka(_X3, _X3, tokens="positions", kernel="rbf"), ValueError, "linear kernel"),
        (lambda: fg.cka(_X3, _X3, tokens="structure", route="feature"), ValueError, "route='feature'"),
        (lambda: fg.cka(_X3, _X3, tokens="rows"), ValueError, "tokens must be one of"),
        (lambda: fg.cka(_X3, _X3.to(torch.int64), tokens="positions"), TypeError, "floating dtype"),
        (lambda: fg.cka(_X3, _X3[:0], tokens="positions"), ValueError, "empty"),
        (lambda: fg.cka_pairs([_X3], [_X3], [(0, 1)], tokens="positions"), IndexError, "out of range"),
        (
            lambda: fg.cka_pairs([_X3], [fg.layer_stats(_X3)], tokens="positions"),
            TypeError,
            r"ys\[0\] is a precomputed LayerStats",
        ),
        (
            lambda: fg.cka_pairs([_X3], [fg.layer_stats(_X3, tokens="positions")]),
            TypeError,
            r"ys\[0\] is a precomputed GroupStats",
        ),
        (
            lambda: fg.cka_pairs([_X3], [fg.layer_stats(_X3, tokens="positions")], tokens="structure"),
            ValueError,
            r"ys\[0\]: precomputed GroupStats made with.*tokens='positions'",
        ),
        (
            lambda: fg.cka_pairs(
                [_X3], [fg.layer_stats(_X3, tokens="positions", estimator="biased")], tokens="positions"
            ),
            ValueError,
            "estimator='biased'",
        ),
        (
            lambda: fg.cka_pairs(
                [_X3], [fg.layer_stats(torch.randn(6, 4, 3), tokens="structure")], tokens="structure"
            ),
            ValueError,
            r"xs\[0\] has 5 but ys\[0\] has 4",
        ),
        (lambda: fg.cka_groups([_X3], [_X3], tokens="flatten"), ValueError, "cka_groups needs tokens"),
        (lambda: fg.MinibatchCKA(tokens="positions"), ValueError, "MinibatchCKA does not support"),
        (lambda: fg.layer_stats(torch.randn(6, 4), tokens="structure"), ValueError, "y has shape"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_input_raises_clearly(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


def test_as_examples_refuses_grouped_tokens():
    from fastguide._validate import as_examples

    with pytest.raises(ValueError, match="guide layer 'h'.*grouped Grams|grouped Grams.*guide layer 'h'"):
        as_examples(_X3, "positions", "guide layer 'h'")


# --------------------------------------------------------------------------- torch.library registration
def _op_args(tokens="positions", estimator="unbiased", backend="torch", pre=False):
    from fastguide._validate import group_view

    a = torch.randn(6, 5, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 5, 4, dtype=torch.float64)
    layers = [group_view(a, tokens, "a"), group_view(b, tokens, "b")]
    G, n = layers[0].shape[:2]
    if pre:
        st = fg.layer_stats(torch.randn(6, 5, 2, dtype=torch.float64), tokens=tokens, estimator=estimator)
        pre_t = (st.C[None], st.ok[None], st.h[None])
        pairs = [0, 1, 0, 2, 1, 2]
    else:
        pre_t = (
            torch.empty((0, G, n, n), dtype=torch.float64),
            torch.empty((0, G), dtype=torch.bool),
            torch.empty((0, G), dtype=torch.float64),
        )
        pairs = [0, 1, 1, 0, 0, 0]
    return (layers, *pre_t, pairs, estimator, backend)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"tokens": "structure"},
        {"estimator": "biased", "pre": True},
        pytest.param({"backend": "triton"}, marks=_CPU_TRITON),
    ],
    ids=["positions", "structure", "biased-pre", "triton"],
)
def test_opcheck_forward_op(kw):
    torch.library.opcheck(torch.ops.fastguide.group_cka_fwd.default, _op_args(**kw))


@pytest.mark.parametrize("kw", [{}, {"tokens": "structure", "pre": True}], ids=["positions", "structure-pre"])
def test_opcheck_backward_op(kw):
    args = _op_args(**kw)
    cka, _valid, C, s, ok, h = torch.ops.fastguide.group_cka_fwd.default(*args)
    layers, pre_C, pre_ok, pre_h, pairs, est, be = args
    bwd = (torch.randn_like(cka), cka, [x.detach() for x in layers], C, s, ok, h, pre_C, pre_ok, pre_h)
    torch.library.opcheck(
        torch.ops.fastguide.group_cka_bwd.default,
        (*bwd, pairs, [0], est, be),
        test_utils=("test_schema", "test_faketensor"),
    )


def _compiled_step_matches_eager(backend: str, dtype) -> None:
    torch._dynamo.reset()
    proj = torch.nn.Linear(6, 8, dtype=dtype)
    guide = torch.randn(5, 4, 3, dtype=dtype)
    stats = fg.layer_stats(guide, tokens="positions", estimator="biased")
    loss_fn = fg.CKALoss(estimator="biased", tokens="positions")

    def step(x):
        h = torch.tanh(proj(x))
        return loss_fn([h], [stats]) + fg.cka(h, guide, tokens="structure", estimator="biased")

    x = torch.randn(5, 4, 6, dtype=dtype)
    eager = step(x)
    eager.backward()
    g_eager = [p.grad.clone() for p in proj.parameters()]
    proj.zero_grad()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    got = compiled(x)
    got.backward()
    # fp64 aot_eager: the same arithmetic (exact64); fp32 inductor: fused kernels round differently.
    kind, gkind = ("exact64", "exact64") if dtype == torch.float64 else ("loss", "grad")
    assert_close(got, eager, kind, dtype, length=2, what="compiled loss")
    for p, g in zip(proj.parameters(), g_eager, strict=True):
        assert_close(p.grad, g, gkind, dtype, what="compiled gradient")
    torch._dynamo.reset()


def test_compile_fullgraph_loss_matches_eager():
    """Dynamo traces the grouped ops in one graph (fullgraph) and AOTAutograd their backward."""
    _compiled_step_matches_eager("aot_eager", torch.float64)


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    _compiled_step_matches_eager("inductor", torch.float32)


def test_dataclass_and_namedtuple_shapes():
    st = fg.layer_stats(_X3, tokens="structure")
    assert dataclasses.fields(st)[0].name == "C"
    res = fg.cka_groups([_X3], [_X3], tokens="structure")
    c, v = res
    assert_close(c, torch.ones_like(c), "cka", torch.float32, what="self")
    assert v.all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_accumulate_in_float64(backend):
    x64, y64 = _seq(dims=(5, 4), dtype=torch.float64)
    x = x64.requires_grad_(True)
    got = fg.cka(x, y64.float(), tokens="positions", backend=backend)
    assert got.dtype == torch.float64
    # The fp32 layer may accumulate in fp32 (the Triton Gram does; torch upcasts it first).
    assert_close(
        got, R.cka_grouped(x64, y64.float().double(), "positions"), "cka", torch.float32, what="mixed"
    )
    got.backward()
    assert x.grad.dtype == torch.float64 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("tokens", MODES)
def test_guidance_with_grouped_tokens_on_the_gram_route(tokens):
    """Guidance's guide hook calls layer_stats(..., tokens=) and passes GroupStats to cka_pairs."""

    class Net(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.a, self.b = torch.nn.Linear(6, d), torch.nn.Linear(d, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    target, guide = Net(8), Net(5)
    x = torch.randn(8, 5, 6)
    with fg.Guidance(target, guide, layers={"a": "a"}, tokens=tokens, route="gram", estimator="biased") as gd:
        target(x)
        loss = gd.loss(x)
        loss.backward()
    h_t = torch.tanh(target.a(x))
    with torch.no_grad():
        h_g = guide.a(x)
    want = 1 - R.cka_grouped(target.a(x).detach(), h_g, tokens, "biased")
    assert_close(loss, want, "cka", torch.float32, what="guidance loss")
    assert torch.isfinite(target.a.weight.grad).all() and h_t.shape == (8, 5, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("tokens", MODES)
def test_triton_on_cuda(tokens, estimator, dtype):
    """Compiled kernels (64-row tiles, 64-feature steps crossed) against the float64 oracle, IEEE fp32."""
    cuda = torch.device("cuda")
    xs64 = _seq(B=70, T=33, dims=(100, 40), dtype=torch.float64)
    xs = [x.to(cuda, dtype).requires_grad_(True) for x in xs64]
    ys = [xs64[1].to(cuda, dtype), xs64[0].to(cuda, dtype)]
    pairs = [(0, 0), (1, 1)]
    prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        from fastguide import functional

        assert functional._group_backend("auto", cuda) == "triton"
        got = fg.cka_pairs(xs, ys, pairs, tokens=tokens, estimator=estimator, backend="triton")
        got.sum().backward()
    finally:
        torch.set_float32_matmul_precision(prec)
    rounded = [x.detach().double() for x in xs]
    want = R.cka_pairs_grouped(rounded, [y.double() for y in ys], pairs, tokens, estimator)
    assert_close(got, want, "cka", dtype, what="cuda cka")
    for x, g in zip(xs, _ref_grads(rounded, [y.double() for y in ys], pairs, tokens, estimator), strict=True):
        assert_close(x.grad, g, "grad", dtype, what="cuda grad")
