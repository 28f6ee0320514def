"""Public ops (gram, cka, cka_matrix, cka_pairs, layer_stats) against the float64 oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_close, assert_same_grads

import fastguide as fg
from fastguide import _reference as R

# Every test here runs under both CPU Gram schedules (serial, layer-parallel): see conftest.
pytestmark = pytest.mark.usefixtures("cpu_gram_mode")

ESTIMATORS = ["unbiased", "biased"]
ROUTES = ["gram", "feature"]


def _layers(n=24, dims=(7, 40, 3), dtype=torch.float32, scale=1.0, offset=0.0):
    """Layers that are correlated with each other (so CKA is not just noise around 0)."""
    base = torch.randn(n, 5, dtype=torch.float64)
    out = []
    for k, d in enumerate(dims):
        mix = torch.randn(5, d, dtype=torch.float64)
        x = base @ mix + 0.5 * torch.randn(n, d, dtype=torch.float64) + 0.1 * k
        out.append((x * scale + offset).to(dtype))
    return out


# --------------------------------------------------------------------------- independent numpy oracle
def _np_hsic_biased(K, L):
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return np.trace(K @ H @ L @ H) / (n - 1) ** 2


def _np_hsic_unbiased(K, L):
    """Nguyen et al. 2021, eq. (3): written directly from the paper, in numpy."""
    n = K.shape[0]
    K = K.copy()
    L = L.copy()
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    one = np.ones(n)
    return (
        np.trace(K @ L)
        + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one @ K @ L @ one)
    ) / (n * (n - 3))


def _np_cka(x, y, estimator):
    X = x.reshape(x.shape[0], -1).astype(np.float64)
    Y = y.reshape(y.shape[0], -1).astype(np.float64)
    K, L = X @ X.T, Y @ Y.T
    f = _np_hsic_unbiased if estimator == "unbiased" else _np_hsic_biased
    return f(K, L) / np.sqrt(f(K, K) * f(L, L))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_reference_matches_numpy_oracle(estimator):
    xs = _layers(dtype=torch.float64)
    for x in xs:
        for y in xs:
            ref = R.cka(x, y, estimator).item()
            want = _np_cka(x.numpy(), y.numpy(), estimator)
            assert_close(ref, want, "exact64", torch.float64, what="oracle vs numpy")


def test_reference_u_centring_equals_closed_form():
    x, y, _ = _layers(dtype=torch.float64)
    K, L = R.linear_gram(x), R.linear_gram(y)
    n = K.shape[0]
    via_u = (R.u_center(K) * R.u_center(L)).sum() / (n * (n - 3))
    assert_close(via_u / R.hsic_unbiased(K, K), R.hsic_unbiased(K, L) / R.hsic_unbiased(K, K), "exact64")


# --------------------------------------------------------------------------- forward against the oracle
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_cka_matrix_matches_reference(estimator, route):
    xs = _layers()
    got = fg.cka_matrix(xs, estimator=estimator, route=route)
    assert got.shape == (3, 3) and got.dtype == torch.float32
    assert_close(got, R.cka_matrix(xs, estimator=estimator), "cka", torch.float32, what="matrix")


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_cka_matrix_rectangular_and_pairs(estimator):
    xs = _layers(dims=(6, 9))
    ys = _layers(dims=(11, 2, 30))
    ref = R.cka_matrix(xs, ys, estimator=estimator)
    assert_close(fg.cka_matrix(xs, ys, estimator=estimator), ref, "cka", torch.float32, what="rect")
    pairs = [(1, 2), (0, 0), (1, 0), (0, 2)]
    got = fg.cka_pairs(xs, ys, pairs, estimator=estimator)
    assert_close(got, torch.stack([ref[i, j] for i, j in pairs]), "cka", torch.float32, what="pairs")
    one = fg.cka(xs[1], ys[2], estimator=estimator)
    assert one.dim() == 0
    assert_close(one, ref[1, 2], "cka", torch.float32, what="cka")


@pytest.mark.parametrize("sigma", [None, 4.0], ids=["median", "sigma4"])  # median: np.median's (item 5)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_rbf_kernel(estimator, sigma):
    xs = _layers(n=20)
    got = fg.cka_matrix(xs, estimator=estimator, kernel="rbf", sigma=sigma)
    ref = R.cka_matrix(xs, estimator=estimator, kernel="rbf", sigma=sigma)
    assert_close(got, ref, "cka", torch.float32, what=f"rbf sigma={sigma}")


def test_gram_matches_reference():
    x = _layers(n=10, dims=(13,), offset=1e4)[0]
    assert_close(fg.gram(x), R.centered_gram(x), "gram", torch.float32, length=13, what="gram")
    raw = fg.gram(x.double(), center=False)
    X = x.double()
    assert_close(raw, X @ X.T, "gram", torch.float64, length=13, what="raw gram")
    g = fg.gram(torch.randn(6, 4, dtype=torch.float16))
    assert g.dtype == torch.float32


# --------------------------------------------------------------------------- adversarial inputs
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0, 1e3, 1e6])
def test_fp32_scale_invariance(scale, estimator, route):
    xs64 = _layers(n=32, dims=(50, 8, 20), dtype=torch.float64)
    ref = R.cka_matrix(xs64, estimator=estimator)
    xs = [(x * scale).float() for x in xs64]
    got = fg.cka_matrix(xs, estimator=estimator, route=route)
    assert_close(got, ref, "cka", torch.float32, what=f"scale {scale}")


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_fp32_large_n_pair_products_stay_accurate(estimator):
    """n = 1024: the pair inner products run over n^2 = 1M terms. One fp32 BLAS GEMM over them (few
    pairs) was off by 3e-5 in CKA (2e-4 at n = 2048, where a layer's CKA with itself came out 0.99977).
    Reference: the same op in float64 (checked against the oracle at small n by the other tests; the
    O(n^3) oracle itself is too slow at this n)."""
    n = 1024
    base = torch.randn(n, 8, dtype=torch.float64)
    xs = [
        base @ torch.randn(8, 48, dtype=torch.float64) + 0.3 * torch.randn(n, 48, dtype=torch.float64)
        for _ in range(3)
    ]
    want = fg.cka_matrix(xs, estimator=estimator, route="gram")
    xs32 = [x.float() for x in xs]
    got = fg.cka_matrix(xs32, estimator=estimator, route="gram")
    assert_close(got, want, "cka", torch.float32, what="cka_matrix n=1024")
    pairs = fg.cka_pairs(xs32[:2], xs32[1:], [(0, 0), (1, 1), (0, 1)], estimator=estimator, route="gram")
    assert_close(
        pairs,
        torch.stack([want[0, 1], want[1, 2], want[0, 2]]),
        "cka",
        torch.float32,
        what="cka_pairs n=1024",
    )


def test_fp32_conv_sized_layer_at_1e6_does_not_overflow():
    # Without the Gram normalisation one HSIC term overflows fp32 at this scale and width.
    n, d = 16, 200_000
    x = torch.randn(n, 4, dtype=torch.float64) @ torch.randn(4, d, dtype=torch.float64) * 1e6
    y = torch.randn(n, 30, dtype=torch.float64)
    got = fg.cka(x.float(), y.float(), route="gram")
    assert torch.isfinite(got)
    assert_close(got, R.cka(x, y), "cka", torch.float32, what="1e6 x 200000")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_large_offsets(estimator, route):
    xs64 = _layers(n=40, dims=(30, 10), dtype=torch.float64)
    xs = [(x + 1e4).float() for x in xs64]
    got = fg.cka_matrix(xs, estimator=estimator, route=route)
    # The oracle sees the same fp32-rounded inputs (rounding x + 1e4 to fp32 is the input's own error).
    ref = R.cka_matrix([x.double() for x in xs], estimator=estimator)
    assert_close(got, ref, "cka", torch.float32, what="offset 1e4")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("bad", ["zero", "constant", "constant_3333", "dead_relu", "jitter"], ids=lambda s: s)
def test_degenerate_layers_give_zero_and_zero_grad(bad, estimator, route):
    n, d = 16, 12
    if bad == "zero":
        z = torch.zeros(n, d)
    elif bad == "constant":
        z = torch.full((n, d), 7.0)
    elif bad == "constant_3333":
        z = torch.full((n, d), 3333.33)
    elif bad == "dead_relu":
        z = torch.relu(-torch.rand(n, d) - 1.0)
    else:  # rounding-level jitter around a large constant
        z = torch.full((n, d), 1000.0) + torch.randn(n, d) * 1e-12
    z.requires_grad_(True)
    x = torch.randn(n, 5, requires_grad=True)
    c = fg.cka_pairs([z, x], [x, z], [(0, 0), (1, 1), (1, 0), (0, 1)], estimator=estimator, route=route)
    assert torch.isfinite(c).all()
    assert c[0].item() == 0.0 and c[1].item() == 0.0 and c[3].item() == 0.0
    assert_close(c[2], 1.0, "cka", torch.float32, what="CKA(x, x)")
    c.sum().backward()
    assert torch.isfinite(z.grad).all() and torch.count_nonzero(z.grad) == 0
    assert torch.isfinite(x.grad).all()


def test_legitimate_layer_with_huge_offset_is_kept():
    x = torch.randn(16, 8, dtype=torch.float64)
    xf = (x + 1e6).float()  # fp32 spacing at 1e6 is 0.0625: a coarse but legitimate layer
    got = fg.cka(xf, x.float())
    assert got.item() > 0.99
    assert_close(got, R.cka(xf.double(), x), "cka", torch.float32, what="+1e6 offset")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_half_precision_inputs_accumulate_in_fp32(dtype, estimator):
    xs64 = _layers(n=32, dims=(64, 16), dtype=torch.float64, scale=30.0)
    xs = [x.to(dtype) for x in xs64]
    ref = R.cka_matrix([x.double() for x in xs], estimator=estimator)
    got = fg.cka_matrix(xs, estimator=estimator)
    assert got.dtype == torch.float32
    assert_close(got, ref, "cka", dtype, what=str(dtype))
    xg = xs[0].clone().requires_grad_(True)
    fg.cka(xg, xs[1], estimator=estimator).backward()
    assert xg.grad.dtype == dtype and torch.isfinite(xg.grad.float()).all()


@pytest.mark.parametrize("route", ROUTES)
def test_transposed_and_sliced_inputs(route):
    base = torch.randn(30, 20)
    xt = base.T[:, ::2]  # (20, 15), non-contiguous
    ys = torch.randn(40, 20)[::2]  # (20, 20) strided rows
    for t in (xt, ys):
        assert not t.is_contiguous()
    got = fg.cka(xt, ys, route=route)
    assert_close(got, R.cka(xt, ys), "cka", torch.float32, what="strided")
    xt = xt.clone().requires_grad_(True)  # contiguous copy, then a transposed view of a leaf
    leaf = torch.randn(15, 20, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: fg.cka(a.T, ys.double(), route=route), (leaf,))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gram_and_feature_routes_agree(estimator):
    xs = [x.requires_grad_(True) for x in _layers(n=64, dims=(8, 5, 12))]
    out = {}
    for route in ROUTES:
        for x in xs:
            x.grad = None
        c = fg.cka_matrix(xs, estimator=estimator, route=route)
        (c * torch.arange(9.0).view(3, 3)).sum().backward()
        out[route] = (c.detach(), [x.grad.clone() for x in xs])
    assert_close(out["gram"][0], out["feature"][0], "cka", torch.float32, what="routes")
    for g, f in zip(out["gram"][1], out["feature"][1], strict=False):
        assert_close(f, g, "grad", torch.float32, what="route grads")


def test_auto_route_picks_feature_when_n_exceeds_d():
    from fastguide import _torch_backend as tb

    feat, gram = tb.feature_cost([16, 16], [(0, 1)], 512)
    assert feat < gram
    feat, gram = tb.feature_cost([4096, 4096], [(0, 1)], 64)
    assert feat > gram


@pytest.mark.parametrize("tokens", ["flatten", "mean", "samples"])
def test_tokens_modes(tokens):
    x = torch.randn(8, 5, 6, dtype=torch.float64)
    y = torch.randn(8, 5, 3, dtype=torch.float64)
    got = fg.cka(x, y, tokens=tokens)
    if tokens == "flatten":
        want = R.cka(x.reshape(8, -1), y.reshape(8, -1))
    elif tokens == "mean":
        want = R.cka(x.mean(1), y.mean(1))
    else:
        want = R.cka(x.reshape(40, 6), y.reshape(40, 3))
    assert_close(got, want, "cka", torch.float64, what=f"tokens={tokens!r}")


def test_nan_input_propagates():
    x = torch.randn(10, 4)
    x[3, 1] = float("nan")
    assert torch.isnan(fg.cka(x, torch.randn(10, 3)))
    x[3, 1] = float("inf")
    assert not torch.isfinite(fg.cka(x, torch.randn(10, 3)))


# --------------------------------------------------------------------------- gradients
def _ref_grads(xs, weights, estimator, kernel="linear", sigma=None):
    leaves = [x.detach().double().requires_grad_(True) for x in xs]
    M = R.cka_matrix(leaves, estimator=estimator, kernel=kernel, sigma=sigma)
    # cka_matrix in the oracle writes into a zeros tensor; rebuild it differentiably.
    M = torch.stack([torch.stack([R.cka(a, b, estimator, kernel, sigma) for b in leaves]) for a in leaves])
    (M * weights.double()).sum().backward()
    return [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_fp32_gradients_match_reference(estimator, route):
    xs = [x.requires_grad_(True) for x in _layers(n=20, dims=(9, 30, 4))]
    w = torch.randn(3, 3)
    (fg.cka_matrix(xs, estimator=estimator, route=route) * w).sum().backward()
    for x, g in zip(xs, _ref_grads(xs, w, estimator), strict=False):
        assert_close(x.grad, g, "grad", torch.float32, what="grad")


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_rbf_gradients_match_reference(estimator):
    xs = [x.requires_grad_(True) for x in _layers(n=16, dims=(6, 10))]
    w = torch.randn(2, 2)
    (fg.cka_matrix(xs, estimator=estimator, kernel="rbf", sigma=3.0) * w).sum().backward()
    for x, g in zip(xs, _ref_grads(xs, w, estimator, "rbf", 3.0), strict=False):
        assert_close(x.grad, g, "grad", torch.float32, what="rbf grad")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gradcheck_fp64(estimator, route):
    xs = [x.requires_grad_(True) for x in _layers(n=8, dims=(3, 5), dtype=torch.float64)]
    y = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)

    def f(a, b, c):
        return fg.cka_pairs(
            [a, b], [c, a], [(0, 0), (1, 0), (1, 1), (0, 1)], estimator=estimator, route=route
        )

    assert torch.autograd.gradcheck(f, (*xs, y))
    assert torch.autograd.gradgradcheck is not None


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gradcheck_rbf_and_matrix(estimator):
    xs = [x.requires_grad_(True) for x in _layers(n=8, dims=(3, 5), dtype=torch.float64)]
    assert torch.autograd.gradcheck(
        lambda a, b: fg.cka_matrix([a, b], estimator=estimator, kernel="rbf", sigma=2.0), tuple(xs)
    )
    assert torch.autograd.gradcheck(
        lambda a, b: fg.cka_matrix([a, b], [b, a], estimator=estimator), tuple(xs)
    )


def test_precomputed_layer_stats_give_same_values_and_target_grads():
    xs = [x.requires_grad_(True) for x in _layers(n=20, dims=(6, 8))]
    ys = _layers(n=20, dims=(10, 3))
    direct = fg.cka_pairs(xs, ys, [(0, 1), (1, 0)])
    stats = [fg.layer_stats(y) for y in ys]
    assert all(isinstance(s, fg.LayerStats) and s.C.shape == (20, 20) for s in stats)
    pre = fg.cka_pairs(xs, stats, [(0, 1), (1, 0)])
    assert_close(pre, direct, "cka", torch.float32, what="precomputed")
    assert_same_grads(pre, direct, xs, "precomputed grad")
    mixed = fg.cka_pairs(xs, [ys[0], stats[1]], [(0, 1), (1, 0)])
    assert_close(mixed, direct, "cka", torch.float32, what="mixed")


def test_guide_layers_get_no_gradient_work():
    x = torch.randn(12, 5, requires_grad=True)
    y = torch.randn(12, 7)
    fg.cka(x, y).backward()
    assert x.grad is not None and y.grad is None


def test_backward_saves_only_inputs_grams_and_vectors():
    """Saved tensors: the inputs, one n x n Gram per layer, and O(L) / O(P) vectors."""
    n, dims = 64, (300, 200, 100, 50)
    xs = [torch.randn(n, d, requires_grad=True) for d in dims]
    ys = [torch.randn(n, d) for d in dims]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = (1 - fg.cka_pairs(xs, ys, route="gram")).sum()
    total = sum(t.numel() for t in saved)
    inputs = sum(x.numel() for x in xs) + sum(y.numel() for y in ys)
    grams = 2 * len(dims) * n * n
    small = 8 * (2 * len(dims) + len(dims))
    assert total <= inputs + grams + small, (total, inputs, grams)
    biggest_non_input = max(
        (t.numel() for t in saved if not any(t.data_ptr() == x.data_ptr() for x in xs + ys)), default=0
    )
    assert biggest_non_input <= 2 * len(dims) * n * n
    loss.backward()
    assert all(x.grad is not None for x in xs)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: fg.cka(torch.randn(8, 3), torch.randn(9, 3)), ValueError, "same number of examples"),
        (lambda: fg.cka(torch.randn(3, 3), torch.randn(3, 3)), ValueError, "n >= 4"),
        (lambda: fg.cka(torch.randn(1, 3), torch.randn(1, 3), estimator="biased"), ValueError, "n >= 2"),
        (lambda: fg.cka(torch.randn(0, 3), torch.randn(0, 3)), ValueError, "empty"),
        (lambda: fg.cka(torch.ones(8, 3, dtype=torch.int64), torch.randn(8, 3)), TypeError, "floating dtype"),
        (lambda: fg.cka(torch.ones(8, 3, dtype=torch.bool), torch.randn(8, 3)), TypeError, "x must have"),
        (
            lambda: fg.cka(torch.randn(8, 3), torch.randn(8, 3, dtype=torch.complex64)),
            TypeError,
            "y must have",
        ),
        (lambda: fg.cka(torch.randn(8, 3), torch.randn(8, 3, device="meta")), ValueError, "one device"),
        (lambda: fg.cka(torch.randn(8, 3), torch.randn(8, 3), estimator="unbiasd"), ValueError, "estimator"),
        (lambda: fg.cka(torch.randn(8, 3), torch.randn(8, 3), kernel="poly"), ValueError, "kernel"),
        (lambda: fg.cka(torch.randn(8, 3), torch.randn(8, 3), backend="cuda"), ValueError, "backend"),
        (lambda: fg.cka(torch.randn(8, 3), torch.randn(8, 3), tokens="all"), ValueError, "tokens"),
        (lambda: fg.cka(torch.randn(8, 3), torch.randn(8, 3), route="fast"), ValueError, "route"),
        (lambda: fg.cka(torch.randn(8, 3), torch.randn(8, 3), kernel="rbf", sigma=-1.0), ValueError, "sigma"),
        (lambda: fg.cka(torch.randn(8, 3), torch.randn(8, 3), sigma=1.0), ValueError, "sigma"),
        (lambda: fg.cka([1, 2], torch.randn(8, 3)), TypeError, "x must be a torch.Tensor"),
        (lambda: fg.cka_matrix(torch.randn(8, 3)), TypeError, "xs must be a list"),
        (lambda: fg.cka_matrix([]), ValueError, "xs must hold"),
        (
            lambda: fg.cka_pairs([torch.randn(8, 3)], [torch.randn(8, 3)], [(0, 1)]),
            IndexError,
            "out of range",
        ),
        (lambda: fg.cka_pairs([torch.randn(8, 3)], [torch.randn(8, 3)], [(0,)]), TypeError, "(i, j)"),
        (lambda: fg.cka_pairs([torch.randn(8, 3)], [torch.randn(8, 3)], []), ValueError, "pairs must not"),
        (lambda: fg.cka_pairs([torch.randn(8, 3)] * 2, [torch.randn(8, 3)]), ValueError, "pairs=None"),
        (
            lambda: fg.cka_pairs(
                [torch.randn(8, 3)], [fg.layer_stats(torch.randn(8, 3), estimator="biased")]
            ),
            ValueError,
            "estimator",
        ),
        (
            lambda: fg.cka(torch.randn(8, 3), torch.randn(8, 3), backend="triton", kernel="rbf"),
            ValueError,
            "linear kernel",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_input_raises_clearly(call, exc, words):
    with pytest.raises(exc, match=None) as info:
        call()
    assert words in str(info.value), str(info.value)
