"""fastguide.kernels.cka: hsic_matrix / hsic_pairs against torch, and CKA end to end vs the oracle."""

from __future__ import annotations

import pytest
import torch
from fastguide.kernels import cka_matrix_fwd, cka_pairs_fwd, gram_fwd, hsic_matrix, hsic_pairs
from helpers import assert_close, assert_close_verbose

from fastguide import _reference as ref

RTOL = {torch.float64: 1e-13, torch.float32: 2e-6}


def _stack(L: int, n: int, dtype, layout: str, dev) -> torch.Tensor:
    if layout == "contig":
        return torch.randn(L, n, n, dtype=dtype, device=dev)
    if layout == "transposed":  # (L, n, n) view with swapped last two strides
        return torch.randn(L, n, n, dtype=dtype, device=dev).transpose(1, 2)
    if layout == "layers-last":
        return torch.randn(n, n, L, dtype=dtype, device=dev).permute(2, 0, 1)
    raise ValueError(layout)


def _rel_check(actual, expected, dtype, what):
    scale = expected.abs().max().item()
    assert_close_verbose(actual, expected, RTOL[dtype] * max(scale, 1e-30), what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(
    "La,Lb,n,la,lb",
    [
        pytest.param(1, 1, 4, "contig", "contig", id="1x1-n4"),
        pytest.param(3, 5, 37, "contig", "layers-last", id="3x5-n37-strided"),
        pytest.param(17, 2, 9, "transposed", "contig", id="17x2-n9-transposed"),
    ],
)
def test_hsic_matrix(La, Lb, n, la, lb, dtype, dev, highest_precision):
    A = _stack(La, n, dtype, la, dev)
    B = _stack(Lb, n, dtype, lb, dev)
    out = hsic_matrix(A, B)
    assert out.shape == (La, Lb) and out.dtype == dtype
    expected = A.reshape(La, -1).double() @ B.reshape(Lb, -1).double().T
    _rel_check(out, expected, dtype, "hsic_matrix")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_hsic_pairs(dtype, dev):
    A = _stack(4, 23, dtype, "contig", dev)
    B = _stack(3, 23, dtype, "transposed", dev)
    pi = torch.tensor([0, 3, 3, 1, 2], device=dev)
    pj = torch.tensor([2, 0, 1, 1, 2], device=dev)
    out = hsic_pairs(A, B, pi, pj)
    full = A.reshape(4, -1).double() @ B.reshape(3, -1).double().T
    _rel_check(out, full[pi, pj], dtype, "hsic_pairs")
    # Self pairs of one stack (what the loss uses for the self terms).
    same = hsic_pairs(A, A, torch.arange(4, device=dev), torch.arange(4, device=dev))
    _rel_check(same, (A.double() ** 2).sum((1, 2)), dtype, "hsic_pairs self")


def test_hsic_pairs_out_of_range_is_zero(dev):
    A = torch.randn(2, 5, 5, device=dev)
    out = hsic_pairs(A, A, torch.tensor([0, 2, -1], device=dev), torch.tensor([1, 0, 0], device=dev))
    assert out[1].item() == 0.0 and out[2].item() == 0.0
    assert torch.isclose(out[0], (A[0] * A[1]).sum(), rtol=1e-5)


def test_hsic_pairs_empty_and_bad_input(dev):
    A = torch.randn(2, 5, 5, device=dev)
    idx = torch.zeros(0, dtype=torch.int64, device=dev)
    assert hsic_pairs(A, A, idx, idx).shape == (0,)
    with pytest.raises(ValueError, match="same n"):
        hsic_matrix(A, torch.randn(2, 4, 4, device=dev))
    with pytest.raises(TypeError, match="one dtype"):
        hsic_matrix(A, A.double())
    with pytest.raises(ValueError, match=r"\(L, n, n\)"):
        hsic_matrix(A[0], A)
    with pytest.raises(TypeError, match="integer"):
        hsic_pairs(A, A, torch.zeros(1, device=dev), torch.zeros(1, device=dev))


def _cka_from(C, h, ok, pi, pj, n, estimator):
    """The caller's epilogue (torch backend's cka_from_hsic), kept local to test the launchers."""
    N = n * (n - 3) if estimator == "unbiased" else (n - 1) ** 2
    hs = hsic_pairs(C, C, pi, pj) / N
    root = torch.where(ok, h, torch.ones_like(h)).sqrt()
    return torch.where(ok[pi] & ok[pj], hs / (root[pi] * root[pj]), torch.zeros_like(hs))


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_cka_end_to_end_vs_reference(estimator, dtype, dev, highest_precision):
    """gram_fwd + hsic_pairs/hsic_matrix give the oracle's CKA (incl. a degenerate layer -> 0)."""
    n = 13
    base = torch.randn(n, 6, dtype=dtype, device=dev)
    xs = [
        base,
        base @ torch.randn(6, 9, dtype=dtype, device=dev) + 0.3 * torch.randn(n, 9, dtype=dtype, device=dev),
        torch.randn(11, n, dtype=dtype, device=dev).T * 1e3 + 50.0,
        torch.full((n, 4), 7.0, dtype=dtype, device=dev),
    ]
    C, s, ok, h, _ = gram_fwd(xs, estimator)
    L = len(xs)
    pi = torch.arange(L, device=dev).repeat_interleave(L)
    pj = torch.arange(L, device=dev).repeat(L)
    got = _cka_from(C, h, ok, pi, pj, n, estimator).view(L, L)
    expected = ref.cka_matrix(xs, estimator=estimator)
    assert_close(got, expected, "cka", dtype, what=f"CKA {estimator}")
    # The fused epilogues give the same CKA (and HSIC = <C_a, C_b> / N).
    pairs = list(zip(pi.tolist(), pj.tolist(), strict=True))
    fused, hs = cka_pairs_fwd(C, h, ok, pairs, estimator)
    assert_close(fused.view(L, L), expected, "cka", dtype, what=f"cka_pairs_fwd {estimator}")
    fused_m, hs_m = cka_matrix_fwd(C, C, h, h, ok, ok, estimator)
    assert_close(fused_m, expected, "cka", dtype, what=f"cka_matrix_fwd {estimator}")
    assert_close_verbose(hs_m.flatten(), hs, 1e-5 * hs.abs().max().item(), "hsic of the matrix vs the pairs")
    assert fused_m[3].eq(0).all() and fused_m[:, 3].eq(0).all()  # degenerate layer: exactly 0
    # All pairs through the GEMM kernel agree with the pair kernel.
    N = n * (n - 3) if estimator == "unbiased" else (n - 1) ** 2
    M = hsic_matrix(C, C) / N
    assert_close_verbose(
        M.flatten(), hsic_pairs(C, C, pi, pj) / N, 1e-5 * M.abs().max().item(), "matrix vs pairs"
    )


def test_cka_pairs_two_stacks_vs_torch_epilogue(dev, highest_precision):
    """Target/guide stacks of different sizes, as the loss uses them; matches cka_from_hsic."""
    from fastguide import _torch_backend as tb

    n = 11
    xt = [torch.randn(n, 5, device=dev), torch.zeros(n, 2, device=dev), torch.randn(n, 8, device=dev)]
    xg = [torch.randn(n, 3, device=dev), torch.randn(7, n, device=dev).T]
    Ct, _, okt, ht, _ = gram_fwd(xt, "unbiased")
    Cg, _, okg, hg, _ = gram_fwd(xg, "unbiased")
    pi = torch.tensor([0, 1, 2, 2], device=dev)
    pj = torch.tensor([1, 0, 0, 1], device=dev)
    pairs = [(i, 3 + j) for i, j in zip(pi.tolist(), pj.tolist(), strict=True)]
    cka, hs = cka_pairs_fwd(Ct, ht, okt, pairs, "unbiased", C2=Cg, h2=hg, ok2=okg)
    hs_ref = hsic_pairs(Ct, Cg, pi, pj) / (n * (n - 3))
    # The torch epilogue on one concatenated layer list (global indices).
    h_all, ok_all = torch.cat([ht, hg]), torch.cat([okt, okg])
    ref_cka = tb.cka_from_hsic(hs_ref, h_all, ok_all, pi, pj + 3)
    assert_close_verbose(hs, hs_ref, 1e-6 * hs_ref.abs().max().item(), "hsic")
    assert_close_verbose(cka, ref_cka, 1e-6, "cka vs cka_from_hsic")
    assert cka[1].item() == 0.0  # layer 1 of the target side is all-zero
    assert cka_pairs_fwd(Ct, ht, okt, [], "unbiased", C2=Cg, h2=hg, ok2=okg)[0].shape == (0,)
    with pytest.raises(ValueError, match="h2"):
        cka_pairs_fwd(Ct, ht, okt, pairs, "unbiased", C2=Cg, h2=ht, ok2=okt)
    with pytest.raises(ValueError, match="out of range"):
        cka_pairs_fwd(Ct, ht, okt, [(0, 5)], "unbiased", C2=Cg, h2=hg, ok2=okg)


@pytest.mark.gpu
def test_hsic_gpu_large(highest_precision):
    A = torch.randn(24, 512, 512, device="cuda")
    B = torch.randn(70, 512, 512, device="cuda")[::3]
    out = hsic_matrix(A, B)
    expected = A.reshape(24, -1).double() @ B.reshape(B.shape[0], -1).double().T
    assert_close_verbose(out, expected, 2e-6 * expected.abs().max().item(), "hsic_matrix gpu")
    pi = torch.randint(0, 24, (50,), device="cuda")
    pj = torch.randint(0, B.shape[0], (50,), device="cuda")
    assert_close_verbose(
        hsic_pairs(A, B, pi, pj), expected[pi, pj], 2e-6 * expected.abs().max().item(), "pairs"
    )
    # Deterministic (per-program partials, no atomics).
    assert torch.equal(hsic_matrix(A, B), out)


def test_one_launch_reduction_is_deterministic_and_resets_counters(dev, highest_precision):
    """Several chunks per output: the last program sums the partials in a fixed order, the result
    repeats bit for bit, and the arrival counters are back at 0 afterwards (so the next launch and a
    CUDA-graph replay find them zeroed)."""
    from fastguide.kernels import _common

    C = torch.randn(5, 37, 37, device=dev)
    h = (C * C).sum((1, 2)) / (37 * 34)
    ok = torch.tensor([True, True, False, True, True], device=dev)
    pairs = [(0, 1), (2, 3), (4, 4), (1, 0)]
    first = cka_pairs_fwd(C, h, ok, pairs, "unbiased")
    second = cka_pairs_fwd(C, h, ok, pairs, "unbiased")
    m1 = cka_matrix_fwd(C, C[:3], h, h[:3], ok, ok[:3], "biased")
    m2 = cka_matrix_fwd(C, C[:3], h, h[:3], ok, ok[:3], "biased")
    for a, b in zip(first + m1, second + m2, strict=True):
        assert torch.equal(a, b)
    assert first[0][1].item() == 0.0  # layer 2 is flagged degenerate
    expected = torch.stack([(C[i].double() * C[j].double()).sum() for i, j in pairs]) / (37 * 34)
    assert_close_verbose(first[1], expected, 1e-6 * expected.abs().max().item(), "hsic")
    for buf in _common._COUNTERS.values():
        assert int(buf.abs().sum()) == 0
