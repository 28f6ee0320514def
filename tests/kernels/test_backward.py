"""fastguide.kernels.backward.grad_x, and an fp64 gradcheck of a Function built from the launchers."""

from __future__ import annotations

import pytest
import torch
from fastguide.kernels import cka_pairs_bwd, cka_pairs_fwd, grad_x, gram_fwd, hsic_pairs
from helpers import assert_close, assert_close_verbose

from fastguide import _reference as ref


def _expected(x, Cs, w, scale):
    """``scale (sum_k w_k C_k)(x - shift)`` in float64 with G formed explicitly."""
    X = x.double()
    Xh = X - X[:32].mean(0)
    G = sum(wk.double() * Ck.double() for wk, Ck in zip(w, Cs, strict=True))
    return scale.double() * (G @ Xh)


def _x(n, d, dtype, layout, dev):
    if layout == "contig":
        return torch.randn(n, d).to(dtype).to(dev) + 2.0
    if layout == "transposed":
        return torch.randn(d, n).to(dtype).to(dev).T
    return torch.randn(n, 2 * d).to(dtype).to(dev)[:, ::2]


@pytest.mark.parametrize(
    "n,d,k,layout",
    [
        pytest.param(4, 1, 1, "contig", id="n4-d1-k1"),
        pytest.param(37, 70, 3, "transposed", id="n37-d70-k3-transposed"),
        pytest.param(33, 17, 2, "strided", id="n33-d17-k2-strided"),
        pytest.param(9, 5, 6, "contig", id="k6-folded"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_grad_x(n, d, k, layout, dtype, dev, highest_precision):
    x = _x(n, d, dtype, layout, dev)
    Cs = [torch.randn(n, n, dtype=dtype, device=dev) for _ in range(k)]
    if k > 1:
        Cs[1] = Cs[1].T  # a transposed C operand
    w = torch.randn(k, dtype=dtype, device=dev)
    scale = torch.tensor(0.37, dtype=dtype, device=dev)
    out = grad_x(x, Cs, w, scale)
    assert out.shape == (n, d) and out.dtype == dtype
    exp = _expected(x, Cs, w, scale)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert_close_verbose(out, exp, tol * exp.abs().max().item(), "grad_x")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_grad_x_16bit_output(dtype, dev):
    x = _x(20, 12, dtype, "contig", dev)
    Cs = [torch.randn(20, 20, device=dev)]
    out = grad_x(x, Cs, torch.ones(1, device=dev), torch.tensor(1.0, device=dev))
    assert out.dtype == dtype
    exp = _expected(x, Cs, torch.ones(1, device=dev), torch.tensor(1.0, device=dev))
    # One rounding of the output to the 16-bit dtype (up to one ulp: 2^-7 relative for bf16).
    tol = 2e-3 if dtype == torch.float16 else 8e-3
    assert_close_verbose(out, exp, tol * exp.abs().max().item(), f"grad_x {dtype}")


def test_grad_x_bad_input(dev):
    x = torch.randn(6, 3, device=dev)
    C = torch.randn(6, 6, device=dev)
    one = torch.ones(1, device=dev)
    s = torch.tensor(1.0, device=dev)
    with pytest.raises(ValueError, match="shape"):
        grad_x(x, [torch.randn(5, 5, device=dev)], one, s)
    with pytest.raises(TypeError, match="accumulation"):
        grad_x(x, [C.double()], one, s)
    with pytest.raises(ValueError, match="one weight per C"):
        grad_x(x, [C, C], one, s)
    assert torch.equal(grad_x(x, [], torch.ones(0, device=dev), s), torch.zeros_like(x))


# --------------------------------------------------------------------------- an op from the launchers
def _pair_weights(g, cka, h, ok, pi, pj, L, N):
    """DESIGN.md section 2: W[a, b] with G_a = sum_b W[a, b] C_b (alpha off-, -beta on the diagonal)."""
    valid = ok[pi] & ok[pj]
    hs = torch.where(ok, h, torch.ones_like(h))
    zero = torch.zeros_like(g)
    alpha = torch.where(valid, g / (hs[pi].sqrt() * hs[pj].sqrt()), zero)
    W = torch.zeros(L * L, dtype=h.dtype, device=h.device)
    W.index_add_(0, pi * L + pj, alpha)
    W.index_add_(0, pj * L + pi, alpha)
    W.index_add_(0, pi * (L + 1), -torch.where(valid, g * cka / hs[pi], zero))
    W.index_add_(0, pj * (L + 1), -torch.where(valid, g * cka / hs[pj], zero))
    return W.view(L, L) / N


class _LauncherCKA(torch.autograd.Function):
    """CKA of selected pairs of one layer list, forward and backward through the Triton launchers."""

    @staticmethod
    def forward(ctx, estimator, pairs, *xs):
        n = xs[0].shape[0]
        N = n * (n - 3) if estimator == "unbiased" else (n - 1) ** 2
        C, s, ok, h, _ = gram_fwd(list(xs), estimator)
        pi = torch.tensor([p[0] for p in pairs], device=xs[0].device)
        pj = torch.tensor([p[1] for p in pairs], device=xs[0].device)
        root = torch.where(ok, h, torch.ones_like(h)).sqrt()
        hs = hsic_pairs(C, C, pi, pj) / N
        cka = torch.where(ok[pi] & ok[pj], hs / (root[pi] * root[pj]), torch.zeros_like(hs))
        ctx.save_for_backward(*xs, C, s, ok, h, pi, pj, cka)
        ctx.N = N
        return cka

    @staticmethod
    def backward(ctx, g):
        *xs, C, s, ok, h, pi, pj, cka = ctx.saved_tensors
        L = len(xs)
        W = _pair_weights(g, cka, h, ok, pi, pj, L, ctx.N)
        grads = []
        for a, x in enumerate(xs):
            if not ctx.needs_input_grad[2 + a]:
                grads.append(None)
                continue
            # A degenerate layer has all-zero weights (masked above): exact 0 gradient.
            grads.append(grad_x(x, [C[b] for b in range(L)], W[a], 2.0 / s[a]))
        return (None, None, *grads)


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_gradcheck_fp64_through_launchers(estimator, dev):
    xs = [
        torch.randn(6, 3, dtype=torch.float64, device=dev, requires_grad=True),
        torch.randn(2, 6, dtype=torch.float64, device=dev).T.requires_grad_(),
    ]
    pairs = [(0, 1), (1, 1), (1, 0)]
    # Full (not fast-mode) gradcheck for the unbiased estimator; fast mode keeps CI time down for biased.
    fast = estimator == "biased"
    torch.autograd.gradcheck(lambda *t: _LauncherCKA.apply(estimator, pairs, *t), xs, fast_mode=fast)


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_grad_vs_reference_autograd(estimator, dtype, dev, highest_precision):
    """Analytic launcher gradients equal autograd through the float64 oracle (incl. a degenerate
    layer, whose gradient is exactly 0, and a guide layer that gets none)."""
    n = 10
    xs = [
        torch.randn(n, 7, dtype=dtype, device=dev) + 1e2,
        torch.randn(n, 4, dtype=dtype, device=dev),
        torch.zeros(n, 3, dtype=dtype, device=dev),
        torch.randn(n, 5, dtype=dtype, device=dev),
    ]
    pairs = [(0, 1), (0, 3), (2, 1), (1, 3)]
    weights = torch.tensor([1.0, -0.5, 2.0, 0.25], dtype=torch.float64)
    inputs = [x.clone().requires_grad_(i != 3) for i, x in enumerate(xs)]  # layer 3: guide
    cka = _LauncherCKA.apply(estimator, pairs, *inputs)
    (cka.double() * weights.to(dev)).sum().backward()

    refs = [x.detach().double().cpu().requires_grad_() for x in xs]
    total = sum(w * ref.cka(refs[i], refs[j], estimator) for w, (i, j) in zip(weights, pairs, strict=True))
    total.backward()
    assert_close(
        cka,
        torch.stack([ref.cka(refs[i], refs[j], estimator) for i, j in pairs]),
        "cka",
        dtype,
        what="cka",
    )
    for a in range(3):
        # The oracle returns a constant 0 for pairs with a degenerate layer (no graph -> grad None).
        expected = refs[a].grad if refs[a].grad is not None else torch.zeros_like(refs[a])
        assert_close(inputs[a].grad, expected, "grad", dtype, what=f"grad layer {a}")
    assert inputs[3].grad is None
    assert torch.equal(inputs[2].grad, torch.zeros_like(inputs[2]))


class _FusedCKA(torch.autograd.Function):
    """The same op through the fused launchers: cka_pairs_fwd (1 launch) and cka_pairs_bwd (1 launch
    per target group); guide layers (``guide``) form a second stack, as in Guidance."""

    @staticmethod
    def forward(ctx, estimator, pairs, n_target, *xs):
        C, s, ok, h, _ = gram_fwd(list(xs[:n_target]), estimator)
        C2, _, ok2, h2, _ = gram_fwd(list(xs[n_target:]), estimator)
        cka, _ = cka_pairs_fwd(C, h, ok, pairs, estimator, C2=C2, h2=h2, ok2=ok2)
        ctx.save_for_backward(*xs[:n_target], C, s, ok, h, C2, ok2, h2, cka)
        ctx.args = (estimator, pairs, n_target, len(xs))
        return cka

    @staticmethod
    def backward(ctx, g):
        estimator, pairs, n_target, L = ctx.args
        *xs, C, s, ok, h, C2, ok2, h2, cka = ctx.saved_tensors
        which = [a for a in range(n_target) if ctx.needs_input_grad[3 + a]]
        dxs = cka_pairs_bwd(
            g, cka, [xs[a] for a in which], which, C, s, h, ok, pairs, estimator, C2=C2, h2=h2, ok2=ok2
        )
        grads = [None] * L
        for a, dx in zip(which, dxs, strict=True):
            grads[a] = dx
        return (None, None, None, *grads)


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_cka_pairs_bwd_vs_reference_autograd(estimator, dtype, dev, highest_precision):
    """One grouped launch for all target layers (two stacks, a self pair, a within-target pair, a
    degenerate target, a target without pairs, a transposed target) equals autograd through the
    float64 oracle."""
    n = 10
    targets = [
        torch.randn(n, 7, dtype=dtype, device=dev) + 1e2,
        torch.randn(5, n, dtype=dtype, device=dev).T,
        torch.zeros(n, 3, dtype=dtype, device=dev),
        torch.randn(n, 4, dtype=dtype, device=dev),
        torch.randn(n, 6, dtype=dtype, device=dev),  # in no pair: exact 0
    ]
    guides = [torch.randn(n, 5, dtype=dtype, device=dev), torch.randn(n, 9, dtype=dtype, device=dev)]
    T = len(targets)
    pairs = [(0, T), (0, T + 1), (1, 1), (2, T), (3, 0), (1, T + 1)]
    weights = torch.tensor([1.0, -0.5, 2.0, 0.25, 0.7, -1.3], dtype=torch.float64)
    inputs = [x.clone().requires_grad_(True) for x in targets] + [g.clone() for g in guides]
    cka = _FusedCKA.apply(estimator, pairs, T, *inputs)
    (cka.double() * weights.to(dev)).sum().backward()

    refs = [x.detach().double().cpu().requires_grad_() for x in targets + guides]
    expected_cka = torch.stack([ref.cka(refs[i], refs[j], estimator) for i, j in pairs])
    sum(w * c for w, c in zip(weights, expected_cka, strict=True)).backward()
    assert_close(cka, expected_cka, "cka", dtype, what="cka")
    for a in range(T):
        expected = refs[a].grad if refs[a].grad is not None else torch.zeros_like(refs[a])
        assert_close(inputs[a].grad, expected, "grad", dtype, what=f"grad layer {a}")
    assert torch.equal(inputs[2].grad, torch.zeros_like(inputs[2]))
    assert torch.equal(inputs[4].grad, torch.zeros_like(inputs[4]))


def test_cka_pairs_bwd_matches_grad_x(dev, highest_precision):
    """The in-kernel pair weights equal the explicit ones (_pair_weights) fed to grad_x."""
    n, estimator = 12, "unbiased"
    xs = [torch.randn(n, 8, device=dev), torch.randn(n, 5, device=dev), torch.randn(n, 20, device=dev)]
    pairs = [(0, 1), (0, 2), (1, 2), (2, 2)]
    C, s, ok, h, _ = gram_fwd(xs, estimator)
    cka, _ = cka_pairs_fwd(C, h, ok, pairs, estimator)
    g = torch.tensor([0.3, -1.0, 2.0, 0.5], device=dev)
    pi = torch.tensor([p[0] for p in pairs], device=dev)
    pj = torch.tensor([p[1] for p in pairs], device=dev)
    W = _pair_weights(g, cka, h, ok, pi, pj, 3, n * (n - 3))
    fused = cka_pairs_bwd(g, cka, [xs[2], xs[0]], [2, 0], C, s, h, ok, pairs, estimator)
    for out, a in zip(fused, [2, 0], strict=True):
        exp = grad_x(xs[a], [C[b] for b in range(3)], W[a], 2.0 / s[a])
        assert_close_verbose(out, exp, 1e-5 * exp.abs().max().item(), f"layer {a}")


def test_cka_pairs_bwd_takes_an_expanded_gradient(dev):
    """The gradient of ``cka.sum()`` arrives expanded (stride 0): read with its stride, not copied."""
    n, estimator = 16, "unbiased"
    xs = [torch.randn(n, 16, device=dev), torch.randn(n, 16, device=dev), torch.randn(n, 16, device=dev)]
    pairs = [(0, 1), (0, 2)]
    C, s, ok, h, _ = gram_fwd(xs, estimator)
    cka, _ = cka_pairs_fwd(C, h, ok, pairs, estimator)
    g = torch.ones((), device=dev).expand(2)
    assert g.stride() == (0,)
    got = cka_pairs_bwd(g, cka, [xs[0]], [0], C, s, h, ok, pairs, estimator)[0]
    want = cka_pairs_bwd(g.contiguous(), cka, [xs[0]], [0], C, s, h, ok, pairs, estimator)[0]
    assert torch.equal(got, want)


def test_cka_pairs_bwd_bad_input(dev):
    x = torch.randn(6, 3, device=dev)
    C, s, ok, h, _ = gram_fwd([x, torch.randn(6, 2, device=dev)], "unbiased")
    g = torch.ones(1, device=dev)
    with pytest.raises(ValueError, match="which"):
        cka_pairs_bwd(g, g, [x], [2], C, s, h, ok, [(0, 1)], "unbiased")
    with pytest.raises(ValueError, match="out of range"):
        cka_pairs_bwd(g, g, [x], [0], C, s, h, ok, [(0, 7)], "unbiased")
    with pytest.raises(ValueError, match="grad"):
        cka_pairs_bwd(torch.ones(2, device=dev), g, [x], [0], C, s, h, ok, [(0, 1)], "unbiased")
    with pytest.raises(ValueError, match="n=6"):
        cka_pairs_bwd(g, g, [torch.randn(5, 3, device=dev)], [0], C, s, h, ok, [(0, 1)], "unbiased")
    assert cka_pairs_bwd(g, g, [], [], C, s, h, ok, [(0, 1)], "unbiased") == []


@pytest.mark.gpu
def test_grad_x_gpu_large(highest_precision):
    x = torch.randn(1000, 3000, device="cuda")
    Cs = [torch.randn(1000, 1000, device="cuda") for _ in range(3)]
    w = torch.randn(3, device="cuda")
    s = torch.tensor(0.5, device="cuda")
    out = grad_x(x, Cs, w, s)
    exp = _expected(x, Cs, w, s)
    assert_close_verbose(out, exp, 1e-5 * exp.abs().max().item(), "grad_x gpu")
    xb = x.to(torch.bfloat16)
    outb = grad_x(xb, Cs, w, s)
    assert_close_verbose(outb, _expected(xb, Cs, w, s), 2e-2 * exp.abs().max().item(), "grad_x bf16")
