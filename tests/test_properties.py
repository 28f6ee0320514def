"""Property-based tests of the public ops against the float64 oracle (fastguide._reference).

Random shapes, dtypes, scales (1e-6..1e6), offsets, strides (transposed, strided, stride-0
expanded, channels_last), data structures (low rank, heavy tails, duplicate rows, dead ReLUs),
(B, T, D) inputs with every ``tokens=``, both estimators, both kernels, every route and the torch
backend; the Triton backend under the interpreter on tiny cases; float32 and float64 layers in one
call. Tolerances are DESIGN.md section 3's (``fastguide._reference.TOLERANCES`` through
tests/helpers.py). What the strategies leave out, and why, is in tests/props.py. Cases the suite
failed on are kept as ``@example`` regressions; breaks of the ops it found are tests in
tests/test_issue14_regressions.py (strict xfail where still open). Profiles (``ci`` by default,
``long``) are in tests/hypothesis_profiles.py.
"""

from __future__ import annotations

import props as P
import pytest
import torch
from helpers import assert_close, tolerance
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis_profiles import examples
from props import Layers, Options

import fastguide as fg
from fastguide import _reference as R
from fastguide import _utils as fastguide_utils

F32, F64 = torch.float32, torch.float64


def _check_values(got, want, dtype, what, zero=None):
    """Values within the CKA tolerance; pairs with a degenerate layer (``zero``) exactly 0."""
    assert torch.isfinite(got).all(), f"{what}: non-finite {got}"
    assert_close(got, want, "cka", dtype, what=what)
    if zero is not None:
        assert not got.double()[zero.reshape(got.shape)].any(), (
            f"{what}: degenerate pairs not exactly 0: {got}"
        )


def _check_grads(xs, grads, refs, weights_per_layer, dtype, what, degenerate=None, rtol=None, half=False):
    """Each layer's gradient against the float64 one: within ``P.grad_tolerance``; exactly 0 for a layer
    the oracle declares degenerate (``degenerate``: flags per layer). ``half``: fp16/bf16 inputs, whose
    gradient is the fp32 one rounded once (docs/numerics.md): the rounding of the exact gradient is
    allowed on top of the fp32 tolerance (fp16 values below its normal range included)."""
    rtol = tolerance("grad", F32 if half else dtype) if rtol is None else rtol
    for k, (x, g, r) in enumerate(zip(xs, grads, refs, strict=True)):
        if g is None:  # a layer in no pair gets no gradient
            assert not r.any(), f"{what}: layer {k} got no gradient"
            continue
        assert g.shape == x.shape, f"{what}: layer {k} gradient shape {tuple(g.shape)}"
        assert torch.isfinite(g).all(), f"{what}: layer {k} non-finite gradient"
        if R.is_degenerate(x) or (degenerate is not None and degenerate[k]):
            assert not g.any(), f"{what}: degenerate layer {k} should get an exactly zero gradient"
            continue
        err = float((g.double() - r).norm())
        tol = P.grad_tolerance(rtol, r, x, weights_per_layer[k])
        if half:
            tol += 2.0 * float((r.to(x.dtype).double() - r).norm())
        assert err <= tol, (
            f"{what}: layer {k} gradient error {err:.3g} > {tol:.3g} (|g| {float(r.norm()):.3g})"
        )


def _check_linear_matrix(xs, ys, kw, dtype, what, grads_what, half=False):
    """Linear-kernel ``cka_matrix(xs, ys)`` against the oracle's matrix, and the gradients of its sum
    against the float64 ones (:func:`_check_grads`)."""
    est = kw["estimator"]
    leaves = [x.detach().requires_grad_() for x in xs]
    M = fg.cka_matrix(leaves, ys, **kw)
    _check_values(
        M,
        P.ref_matrix(xs, ys, est, "linear", None),
        dtype,
        what,
        zero=P.ref_zero(xs, ys, est, "linear", None),
    )
    M.sum().backward()
    pairs = [(i, j) for i in range(len(xs)) for j in range(len(ys))]
    refs = P.ref_grads(xs, ys, pairs, [1.0] * len(pairs), est, "linear", None)
    lw = [float(len(ys))] * len(xs)
    flags = _degenerate(xs, kw)
    _check_grads(xs, [leaf.grad for leaf in leaves], refs, lw, dtype, grads_what, flags, half=half)


def _degenerate(xs, kw, tokens="flatten"):
    """Per layer: degenerate for the oracle under these options (its gradient must be exactly 0)."""
    est, kernel, sigma = kw["estimator"], kw["kernel"], kw["sigma"]
    return [not R.layer_oracle(P.ref_examples(x.detach(), tokens), est, kernel, sigma).ok for x in xs]


def _layer_weights(pairs, weights, A):
    out = [0.0] * A
    for (i, _), w in zip(pairs, weights, strict=False):
        out[i] += abs(w)
    return out


def _case(a: Layers, b: Layers, opts: Options, route=None):
    """(xs, ys, keyword arguments, dtype of the tolerances) of a case; rejects (assume) the regions
    still left to tests/test_issue14_regressions.py."""
    xs, ys = a.build(), b.build(salt=1)
    assume(all(bool(torch.isfinite(t).all()) for t in xs + ys))  # fp16 overflows beyond 65504
    kw = opts.kwargs(xs + ys)
    assume(not P.known_break(xs + ys, opts.estimator, opts.kernel, kw["sigma"], route or opts.route))
    return xs, ys, kw, P.case_dtype(a.dtype, b.dtype)


# --------------------------------------------------------------------------- forward
@settings(max_examples=examples(3))
@given(specs=P.two_sets(), opts=P.options(), raw_pairs=P.PAIRS)
@example(  # feature route, n = 4, a duplicated row: inside the cancellation break, rejected (props.py)
    specs=(
        Layers(14183, 4, (12, 2), F32, 0.0, 0.0, "dup", "transposed"),
        Layers(0, 4, (1,), F32, 0.0, 0.0, "gauss", "contiguous"),
    ),
    opts=Options("unbiased", "linear", None, "feature", "auto"),
    raw_pairs=[(1, 0)],
)
@example(  # explicit sigma 4.8x one layer's spread at n = 4: 1.8e-5 before the sigma range was narrowed
    specs=(
        Layers(0, 4, (1, 1), F32, 0.0, 0.0, "gauss", "contiguous"),
        Layers(18264911, 4, (8,), F32, 0.0, 0.0, "relu", "contiguous"),
    ),
    opts=Options("unbiased", "rbf", 1.0, "auto", "auto"),
    raw_pairs=[(1, 0)],
)
def test_matrix_pairs_and_cka_agree_with_oracle(specs, opts, raw_pairs):
    a, b = specs
    xs, ys, kw, dt = _case(a, b, opts)
    M = fg.cka_matrix(xs, ys, **kw)
    _check_values(
        M,
        P.ref_matrix(xs, ys, kw["estimator"], kw["kernel"], kw["sigma"]),
        dt,
        f"cka_matrix {kw}",
        zero=P.ref_zero(xs, ys, kw["estimator"], kw["kernel"], kw["sigma"]),
    )
    pairs = P.pairs_for(raw_pairs, len(xs), len(ys))
    got = fg.cka_pairs(xs, ys, pairs, **kw)
    assert_close(got, torch.stack([M[i, j] for i, j in pairs]), "cka", dt, what="cka_pairs vs matrix")
    i, j = pairs[0]
    assert_close(fg.cka(xs[i], ys[j], **kw), M[i, j], "cka", dt, what="cka vs matrix")
    S = fg.cka_matrix(xs, **kw)
    _check_values(
        S,
        P.ref_matrix(xs, xs, kw["estimator"], kw["kernel"], kw["sigma"]),
        a.dtype,
        "cka_matrix(xs)",
        zero=P.ref_zero(xs, xs, kw["estimator"], kw["kernel"], kw["sigma"]),
    )
    assert_close(S, S.T, "cka", a.dtype, what="cka_matrix(xs) symmetric")


# --------------------------------------------------------------------------- gradients
@settings(max_examples=examples(2.5))
@given(specs=P.two_sets(), opts=P.options(), raw_pairs=P.PAIRS, weights=P.WEIGHTS)
@example(  # |CKA| = 0.999: a gradient at 3e-3 of its natural scale (the tolerance floor, props.py)
    specs=(
        Layers(1, 4, (1,), F32, 0.0, 0.0, "lowrank", "contiguous"),
        Layers(343364, 4, (1,), F32, 0.0, 0.0, "lowrank", "contiguous"),
    ),
    opts=Options("unbiased", "linear", None, "auto", "auto"),
    raw_pairs=[(0, 0)],
    weights=[1.5, 0.0, 0.0, 0.0],
)
@example(  # two equal rows of four (U(K) = 0, issue 14 item 2): degenerate, gradient exactly 0
    specs=(
        Layers(786735, 4, (2, 1, 1), F32, 0.0, 0.0, "relu", "contiguous"),
        Layers(0, 4, (1,), F32, 0.0, 0.0, "gauss", "contiguous"),
    ),
    opts=Options("unbiased", "linear", None, "gram", "auto"),
    raw_pairs=[(0, 0)],
    weights=[1.0, 0.0, 0.0, 0.0],
)
def test_gradients_match_float64_autograd(specs, opts, raw_pairs, weights):
    """d(sum_p w_p CKA_p)/dx for every target layer against fp64 autograd through the oracle."""
    a, b = specs
    xs, ys, kw, dt = _case(a, b, opts)
    pairs = P.pairs_for(raw_pairs, len(xs), len(ys))
    w = weights[: len(pairs)]
    leaves = [x.detach().requires_grad_() for x in xs]  # detach() keeps the strides
    c = fg.cka_pairs(leaves, ys, pairs, **kw)
    (c * torch.tensor(w, dtype=c.dtype)).sum().backward()
    refs = P.ref_grads(xs, ys, pairs, w, kw["estimator"], kw["kernel"], kw["sigma"])
    lw = _layer_weights(pairs, w, len(xs))
    _check_grads(xs, [leaf.grad for leaf in leaves], refs, lw, dt, str(kw), _degenerate(xs, kw))


@settings(max_examples=examples(1))
@given(spec=P.layers(count=(1, 3)), opts=P.options(), weights=P.WEIGHTS)
@example(  # CKA(x, x) = 1: the oracle's gradient is exactly 0, fastguide's 1e-22 (rounding)
    spec=Layers(9, 4, (2,), F64, 5.0, 0.0, "heavy", "contiguous"),
    opts=Options("biased", "rbf", 0.5, "auto", "auto"),
    weights=[1.0, 0.0, 0.0, 0.0],
)
def test_self_matrix_gradients(spec, opts, weights):
    """cka_matrix(xs): a layer paired with itself and with the others, both sides differentiable."""
    xs, _, kw, _ = _case(spec, spec, opts)
    L = len(xs)
    W = torch.tensor((weights * 3)[: L * L]).view(L, L)
    leaves = [x.detach().requires_grad_() for x in xs]
    M = fg.cka_matrix(leaves, **kw)
    (M * W.to(M.dtype)).sum().backward()
    a = [x.detach().double().requires_grad_() for x in xs]
    ok = [P.layer_ok(x, kw["estimator"], kw["kernel"], kw["sigma"]) for x in xs]  # in the inputs' dtype
    ref = sum(
        float(W[i, j]) * R.cka(a[i], a[j], kw["estimator"], kw["kernel"], kw["sigma"])
        for i in range(L)
        for j in range(L)
        if ok[i] and ok[j]
    )
    refs = (
        torch.autograd.grad(ref, a, allow_unused=True)
        if torch.is_tensor(ref) and ref.requires_grad
        else [None] * L
    )
    refs = [torch.zeros_like(t) if g is None else g for t, g in zip(a, refs, strict=True)]
    wl = [float(W[k].abs().sum() + W[:, k].abs().sum()) for k in range(L)]
    _check_grads(
        xs, [leaf.grad for leaf in leaves], refs, wl, spec.dtype, f"self matrix {kw}", _degenerate(xs, kw)
    )


# --------------------------------------------------------------------------- sequences
@st.composite
def sequences(draw):
    """(spec, (B, T, D) layers): batch-first, or RNN-style (T, B, D) storage viewed batch-first."""
    B, T = draw(st.integers(4, 10)), draw(st.integers(1, 6))
    dims = tuple(draw(st.lists(st.integers(1, 12), min_size=2, max_size=3)))
    spec = Layers(
        draw(st.integers(0, 2**31 - 1)),
        B,
        tuple(T * d for d in dims),
        draw(st.sampled_from(P.FLOAT)),
        draw(st.floats(-4.0, 4.0)),
        draw(st.sampled_from([0.0, 1.0, 10.0, 100.0, 1e3])),
        draw(st.sampled_from(P.STRUCTURES)),
        "contiguous",
    )
    return spec, T, dims, draw(st.booleans())


def _seqs(spec, T, dims, time_major):
    out = []
    for x, d in zip(spec.build(), dims, strict=True):
        x = x.reshape(spec.n, T, d)
        out.append(x.transpose(0, 1).contiguous().transpose(0, 1) if time_major else x)
    return out


@settings(max_examples=examples(2))
@given(case=sequences(), tokens=st.sampled_from(["flatten", "mean", "samples"]), opts=P.options())
@example(  # CKA = 1 exactly at n = 4 (two zero rows in both): |g| 1e-15, fp32 error 5e-5 of natural
    case=(Layers(0, 4, (1, 1), F32, 0.0, 0.0, "relu", "contiguous"), 1, (1, 1), False),
    tokens="flatten",
    opts=Options("unbiased", "linear", None, "auto", "auto"),
)
@example(  # tokens="mean", +100x offset, n = 4: 1.7e-5 before the shift-first mean (issue 14 item 6)
    case=(Layers(0, 4, (3, 3), F32, 0.0, 100.0, "gauss", "contiguous"), 3, (1, 1), False),
    tokens="mean",
    opts=Options("unbiased", "linear", None, "auto", "auto"),
)
@example(  # tokens="mean", +10x offset, n = 4: gradient error 3.6e-4 before the shift-first mean
    case=(Layers(5, 4, (2, 2), F32, 0.0, 10.0, "lowrank", "contiguous"), 2, (1, 1), False),
    tokens="mean",
    opts=Options("unbiased", "linear", None, "auto", "auto"),
)
@example(  # CKA = 1 - 4e-6: a gradient at 1e-2 of its natural scale (the tolerance floor, props.py)
    case=(Layers(0, 4, (2, 2), F32, 0.0, 0.0, "lowrank", "contiguous"), 2, (1, 1), False),
    tokens="mean",
    opts=Options("unbiased", "linear", None, "auto", "auto"),
)
def test_sequence_tokens(case, tokens, opts):
    spec, T, dims, time_major = case
    seqs = _seqs(spec, T, dims, time_major)
    xs, ys = seqs[:1], seqs[1:]
    ex = [P.ref_examples(s, tokens) for s in seqs]
    kw = opts.kwargs(ex, tokens=tokens)
    assume(not P.known_break(ex, opts.estimator, opts.kernel, kw["sigma"], opts.route))
    leaf = xs[0].detach().requires_grad_()
    M = fg.cka_matrix([leaf], ys, **kw)
    _check_values(
        M,
        P.ref_matrix(xs, ys, opts.estimator, opts.kernel, kw["sigma"], tokens),
        spec.dtype,
        f"{kw}",
        zero=P.ref_zero(xs, ys, opts.estimator, opts.kernel, kw["sigma"], tokens),
    )
    M.sum().backward()
    pairs = [(0, j) for j in range(len(ys))]
    (ref,) = P.ref_grads(xs, ys, pairs, [1.0] * len(ys), opts.estimator, opts.kernel, kw["sigma"], tokens)
    flags = _degenerate(xs, kw, tokens)
    _check_grads(xs, [leaf.grad], [ref], [float(len(ys))], spec.dtype, f"sequence grads {kw}", flags)


# --------------------------------------------------------------------------- half precision
@settings(max_examples=examples(1.5))
@given(
    specs=P.two_sets(dtypes=P.HALF, log_scale=(-2.0, 4.0), count_x=(1, 2), count_y=(1, 1)),
    opts=P.options(kernels=("linear",)),
)
def test_half_precision(specs, opts):
    """fp16/bf16 inputs accumulate in fp32: CKA within 1e-2 of the rounded data's, and each gradient
    the fp32 one rounded once (fp16 values below its normal range at large scales included).

    Layers far from the origin (offsets up to 1e4 x the spread) are degenerate exactly when their
    centred signal is below one ulp of their magnitude (DESIGN.md section 3, issue 14 item 10)."""
    a, b = specs
    xs, ys, kw, dt = _case(a, b, opts)
    _check_linear_matrix(xs, ys, kw, dt, f"{a.dtype} {kw}", f"{a.dtype} grads", half=True)


# --------------------------------------------------------------------------- Triton (interpreter)
@settings(max_examples=examples(0.4))
@given(
    specs=P.two_sets(n=(4, 12), d=(1, 16), count_x=(1, 2), count_y=(1, 2), log_scale=(-3.0, 3.0)),
    opts=P.options(routes=("gram",), kernels=("linear",), backends=("triton",)),
)
@example(  # a guide layer with ||K||^2 / ||U(K)||^2 = 1.8e7: gradient error 1e-3 (rejected, still pinned)
    specs=(
        Layers(0, 5, (1,), F32, 0.0, 0.0, "gauss", "contiguous"),
        Layers(1, 5, (2,), F32, 0.0, 0.0, "relu", "contiguous"),
    ),
    opts=Options("unbiased", "linear", None, "gram", "triton"),
)
def test_triton_backend_tiny(specs, opts):
    """backend='triton' (the interpreter on CPU) against the oracle, values and gradients."""
    if not torch.cuda.is_available() and not fastguide_utils.triton_usable(torch.device("cpu")):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    a, b = specs
    xs, ys, kw, dt = _case(a, b, opts)
    _check_linear_matrix(xs, ys, kw, dt, "triton", "triton grads")


# --------------------------------------------------------------------------- metric and loss
@settings(max_examples=examples(1.5))
@given(
    sizes=st.lists(st.integers(4, 20), min_size=1, max_size=4),
    dims=st.lists(st.integers(1, 24), min_size=1, max_size=3),
    dtype=st.sampled_from(P.FLOAT),
    estimator=st.sampled_from(["unbiased", "biased"]),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-4.0, 4.0),
    raw_pairs=st.none() | P.PAIRS,
)
@example(  # n = 4 on the feature route: its cancellation (3.2e-5), rejected (props.py), still pinned
    sizes=[4],
    dims=[1],
    dtype=F32,
    estimator="unbiased",
    symmetric=False,
    seed=1049,
    log_scale=0.0,
    raw_pairs=None,
)
def test_minibatch_cka_unequal_batches(sizes, dims, dtype, estimator, symmetric, seed, log_scale, raw_pairs):
    """Nguyen et al. 2021: sums of per-batch HSICs over batches of different sizes, one ratio at the end."""

    def batch(t, m, ds, salt):
        return Layers(seed + t, m, tuple(ds), dtype, log_scale, 0.0, "gauss", "contiguous").build(salt)

    xb = [batch(t, m, dims, 0) for t, m in enumerate(sizes)]
    yb = xb if symmetric else [batch(t, m, (3, 5), 1) for t, m in enumerate(sizes)]
    assume(
        not any(P.known_break(x + y, estimator, "linear", None, "auto") for x, y in zip(xb, yb, strict=True))
    )
    A, B = len(dims), len(yb[0])
    pairs = None if raw_pairs is None else P.pairs_for(raw_pairs, A, B)
    m = fg.MinibatchCKA(estimator, pairs=pairs)
    for t in range(len(sizes)):
        m.update(xb[t], None if symmetric else yb[t])
    got = m.compute().flatten()
    plist = [(i, j) for i in range(A) for j in range(B)] if pairs is None else pairs
    want = torch.stack([R.minibatch_cka([x[i] for x in xb], [y[j] for y in yb], estimator) for i, j in plist])
    assert_close(got, want, "cka", dtype, what="MinibatchCKA")
    if len(sizes) == 1 and pairs is None:
        single = fg.cka_matrix(xb[0], None if symmetric else yb[0], estimator=estimator).flatten()
        assert_close(got, single, "cka", dtype, what="one batch = cka_matrix")


@settings(max_examples=examples(1))
@given(
    specs=P.two_sets(count_x=(1, 3), count_y=(1, 3)),
    reduction=st.sampled_from(["sum", "mean", "none"]),
    opts=P.options(kernels=("linear",)),
    raw_pairs=st.none() | P.PAIRS,
    weights=st.none() | st.lists(st.floats(0.05, 3.0), min_size=4, max_size=4),
)
@example(  # fp64: the loss carried the weights' float32 rounding (6e-8) before they were kept in float64
    specs=(
        Layers(3, 9, (5,), F64, 0.0, 0.0, "gauss", "contiguous"),
        Layers(4, 9, (3,), F64, 0.0, 0.0, "gauss", "contiguous"),
    ),
    reduction="mean",
    opts=Options("unbiased", "linear", None, "auto", "auto"),
    raw_pairs=[(0, 0), (0, 0)],
    weights=[0.1, 1.0 / 3.0, 1.0, 1.0],
)
def test_cka_loss_reductions_and_weights(specs, reduction, opts, raw_pairs, weights):
    a, b = specs
    assume(raw_pairs is not None or a.dims.__len__() == b.dims.__len__())
    xs, ys, kw, dt = _case(a, b, opts)
    pairs = None if raw_pairs is None else P.pairs_for(raw_pairs, len(xs), len(ys))
    plist = [(k, k) for k in range(len(xs))] if pairs is None else pairs
    w = None if weights is None else weights[: len(plist)]
    loss_fn = fg.CKALoss(pairs, w, reduction=reduction, **kw)
    leaves = [x.detach().requires_grad_() for x in xs]
    loss = loss_fn(leaves, ys)
    wt = torch.ones(len(plist), dtype=F64) if w is None else torch.tensor(w, dtype=F64)
    ref_c = torch.stack(
        [P.ref_matrix([xs[i]], [ys[j]], opts.estimator, "linear", None)[0, 0] for i, j in plist]
    )
    per = wt * (1 - ref_c)
    want = {"sum": per.sum(), "mean": per.sum() / wt.sum(), "none": per}[reduction]
    assert_close(loss, want, "loss", dt, length=float(wt.sum()), what=f"CKALoss {reduction}")
    loss.sum().backward()
    scale = {"sum": -wt, "mean": -wt / wt.sum(), "none": -wt}[reduction]
    refs = P.ref_grads(xs, ys, plist, scale.tolist(), opts.estimator, "linear", None)
    lw = _layer_weights(plist, scale.abs().tolist(), len(xs))
    flags = _degenerate(xs, kw)
    _check_grads(xs, [leaf.grad for leaf in leaves], refs, lw, dt, f"CKALoss {reduction} grads", flags)


@settings(max_examples=examples(1))
@given(specs=P.two_sets(), opts=P.options(routes=("gram",)))
@example(  # the median on a near-duplicate distance (sigma 7e-6, spread 0.5): rejected, still pinned
    specs=(
        Layers(1, 23, (1,), F32, 0.0, 0.0, "relu", "contiguous"),
        Layers(0, 23, (1,), F32, 0.0, 0.0, "gauss", "contiguous"),
    ),
    opts=Options("unbiased", "rbf", None, "gram", "auto"),
)
def test_precomputed_layer_stats(specs, opts):
    """cka_pairs with the guide side as LayerStats equals the raw call (and the oracle)."""
    a, b = specs
    xs, ys, kw, dt = _case(a, b, opts)
    stats = [fg.layer_stats(y, estimator=opts.estimator, kernel=opts.kernel, sigma=kw["sigma"]) for y in ys]
    pairs = [(i, j) for i in range(len(xs)) for j in range(len(ys))]
    got = fg.cka_pairs(xs, stats, pairs, **kw)
    raw = fg.cka_pairs(xs, ys, pairs, **kw)
    assert_close(got, raw, "cka", dt, what="LayerStats vs raw")
    want = P.ref_matrix(xs, ys, opts.estimator, opts.kernel, kw["sigma"]).flatten()
    zero = P.ref_zero(xs, ys, opts.estimator, opts.kernel, kw["sigma"])
    _check_values(got, want, dt, "LayerStats vs oracle", zero=zero)


# --------------------------------------------------------------------------- invariances, degeneracy, gram
@settings(max_examples=examples(1))
@given(
    spec=P.layers(count=(2, 2), n=(4, 48), dtypes=(F32,)),
    opts=P.options(),
    seed=st.integers(0, 2**31 - 1),
    log_c=st.floats(-3.0, 3.0),
)
@example(  # offset 1e3 x spread, n = 4: re-rounding the shifted values changes the oracle's CKA too
    spec=Layers(0, 4, (1, 1), F32, 0.0, 1000.0, "lowrank", "contiguous"),
    opts=Options("unbiased", "rbf", 0.5, "auto", "auto"),
    seed=0,
    log_c=1.0,
)
def test_invariances(spec, opts, seed, log_c):
    """Same examples permuted, features rotated (linear), scaled or shifted: the same CKA.

    n up to 48 crosses the 32 rows the per-column shift is taken from, so a permutation changes it."""
    x, y = (t.reshape(spec.n, -1) for t in spec.build())
    kw = opts.kwargs([x, y])
    assume(not P.known_break([x, y], opts.estimator, opts.kernel, kw["sigma"], opts.route))
    base = fg.cka(x, y, **kw)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(spec.n, generator=g)
    assert_close(fg.cka(x[perm], y[perm], **kw), base, "cka", F32, what="permuted examples")
    if opts.kernel == "linear":
        Q, _ = torch.linalg.qr(torch.randn(x.shape[1], x.shape[1], generator=g, dtype=F64))
        xr = (x.double() @ Q).float()
        assert_close(fg.cka(xr, y, **kw), R.cka(xr, y, opts.estimator), "cka", F32, what="rotated features")
    # both layers scaled by a power of two (exact; one sigma serves both kernels): the same CKA
    c = 2.0 ** round(log_c * 3.32)
    kw2 = dict(kw, sigma=None if kw["sigma"] is None else kw["sigma"] * c)
    assert_close(fg.cka(x * c, y * c, **kw2), base, "cka", F32, what=f"scaled by {c:g}")
    # x shifted by 3x its spread (rounded again): the oracle's CKA of the shifted values
    xs = (x.double() + 3.0 * P.spread(x)).float()
    want = P.ref_matrix([xs], [y], opts.estimator, opts.kernel, kw["sigma"])[0, 0]
    assert_close(fg.cka(xs, y, **kw), want, "cka", F32, what="shifted")


def _degenerate_layer(kind: str, shape, dtype) -> torch.Tensor:
    n = shape[0]
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype)
    if kind == "constant":  # inexact in binary: its fp32 mean is not 3333.33
        return torch.full(shape, 3333.33, dtype=dtype)
    if kind == "dead-relu":
        return torch.relu(-torch.ones(shape, dtype=dtype))
    # rounding-level jitter: 1e4 and its next representable neighbour
    bump = torch.finfo(dtype).eps * (torch.arange(n) % 2).view(-1, *[1] * (len(shape) - 1))
    return (torch.full(shape, 1e4, dtype=F64) * (1 + bump)).to(dtype)


@settings(max_examples=examples(1))
@given(
    specs=P.two_sets(count_x=(2, 3)),
    kind=st.sampled_from(["zeros", "constant", "dead-relu", "jitter"]),
    opts=P.options(),
)
def test_degenerate_layer_is_exactly_zero(specs, kind, opts):
    """A degenerate layer: every CKA with it exactly 0, its gradient exactly 0, no NaN elsewhere."""
    a, b = specs
    xs, ys, kw, dt = _case(a, b, opts)
    bad = _degenerate_layer(kind, xs[0].shape, a.dtype)
    assert R.is_degenerate(bad)
    xs = [bad] + xs[1:]
    kw = opts.kwargs(xs[1:] + ys)
    leaves = [x.detach().requires_grad_() for x in xs]
    M = fg.cka_matrix(leaves, ys, **kw)
    assert torch.isfinite(M).all()
    assert not M[0].any(), f"{kind}: CKA with a degenerate layer {M[0]}"
    _check_values(
        M,
        P.ref_matrix(xs, ys, opts.estimator, opts.kernel, kw["sigma"]),
        dt,
        f"{kind} {kw}",
        zero=P.ref_zero(xs, ys, opts.estimator, opts.kernel, kw["sigma"]),
    )
    M.sum().backward()
    assert leaves[0].grad is None or not leaves[0].grad.any()
    for leaf in leaves[1:]:
        assert leaf.grad is None or torch.isfinite(leaf.grad).all()


@settings(max_examples=examples(1))
@given(spec=P.layers(count=(1, 1), n=(2, 40), max_offset=1e4))
@example(spec=Layers(2, 3, (1,), F64, 0.0, 1000.0, "gauss", "contiguous"))  # the oracle's own H (X X') H
def test_gram_matches_oracle(spec):
    """gram(x): the column-centred Gram H X X' H, in fp32 for fp32 inputs (relative in norm)."""
    (x,) = spec.build()
    got = fg.gram(x)
    assert got.dtype == (F64 if spec.dtype == F64 else F32)
    want = R.centered_gram(x)
    if float(want.norm()) > 0:  # a constant layer's centred Gram is rounding noise (relative: undefined)
        assert_close(got, want, "gram", spec.dtype, length=x[0].numel(), what="gram")
