"""CPU Gram schedules (fastguide/_cpu_blas.py): the layer-parallel stack against per-layer products."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import layer_parallel_forced

import fastguide as fg
from fastguide import _cpu_blas as cb
from fastguide import _torch_backend as tb

needs_pool = pytest.mark.skipif(not cb._omp_set_num_threads(), reason="torch does not run on OpenMP here")


@pytest.fixture
def forced_parallel(monkeypatch):
    with layer_parallel_forced(monkeypatch):
        yield


def _centred64(x: torch.Tensor) -> torch.Tensor:
    X = x.double() - x.double().mean(0)
    return X @ X.T


def _centre(K: torch.Tensor) -> torch.Tensor:
    K = K.double()
    return K - K.mean(0) - K.mean(1, keepdim=True) + K.mean()


def _mixed_layers(n: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tail_offset = torch.randn(n, 80, generator=g)
    tail_offset[32:] += 300.0  # first rows look centred, the rest carry a large offset
    return [
        torch.randn(n, 96, generator=g),  # raw route, d >= n (syrk)
        torch.randn(n, 40, generator=g),  # raw route, n / 4 <= d < n (syrk)
        torch.randn(n, 8, generator=g) + 0.5,  # d < n / 4: shifted route
        torch.randn(n, 70, generator=g) + 1e4,  # large offset: the pre-check sends it to the shifted route
        tail_offset,  # passes the pre-check, fails the exact check: recomputed shifted
        torch.randn(120, n, generator=g).T,  # transposed (not C-contiguous): shifted route
        torch.randn(n, 100, generator=g, dtype=torch.float64)[:, ::2].float(),  # fp32 copy, contiguous
    ]


@needs_pool
@pytest.mark.parametrize("precheck", [True, False], ids=["first-rows-precheck", "exact-check-only"])
def test_gram_stack_matches_float64_centred_grams(forced_parallel, monkeypatch, precheck):
    monkeypatch.setattr(cb, "PRECHECK_MIN_WORK", 0 if precheck else 1 << 60)
    xs = _mixed_layers()
    n = xs[0].shape[0]
    out = torch.empty(len(xs), n, n)
    sq = cb.gram_stack(xs, tb.shift_of, out)
    assert sq is not None, "layer-parallel path not taken"
    for l, x in enumerate(xs):
        ref = _centred64(x)
        got = _centre(out[l])  # raw-route Grams come without the (centring-invisible) shift terms
        err = ((got - ref).norm() / ref.norm()).item()
        assert err <= 2e-6, f"layer {l}: relative error {err:.3g} of the centred Gram"
        want = x.double().square().sum().item()
        assert abs(sq[l].item() - want) <= 1e-5 * want, f"layer {l}: ||x||^2 {sq[l].item()} vs {want}"


@needs_pool
def test_gram_stack_not_used_when_switched_off_or_single_layer(forced_parallel, monkeypatch):
    xs = _mixed_layers()[:2]
    out = torch.empty(2, 64, 64)
    assert cb.gram_stack(xs[:1], tb.shift_of, out[:1]) is None  # one layer: nothing to spread
    monkeypatch.setenv("FASTGUIDE_CPU_LAYER_PARALLEL", "0")
    assert cb.gram_stack(xs, tb.shift_of, out) is None


@needs_pool
@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_cka_matrix_same_under_both_schedules(forced_parallel, monkeypatch, estimator):
    xs = _mixed_layers()
    par = fg.cka_matrix(xs, estimator=estimator)
    monkeypatch.setenv("FASTGUIDE_CPU_LAYER_PARALLEL", "0")
    ser = fg.cka_matrix(xs, estimator=estimator)
    assert torch.isfinite(par).all()
    assert (par - ser).abs().max().item() <= 1e-5


@needs_pool
def test_inference_mode_and_autograd_in_workers(forced_parallel):
    xs = [torch.randn(48, 64) for _ in range(3)]
    with torch.inference_mode():
        a = fg.cka_matrix(xs)
    ws = [x.clone().requires_grad_(True) for x in xs]
    b = fg.cka_matrix(ws)
    b.sum().backward()
    assert torch.allclose(a, b.detach(), atol=1e-6)
    assert all(w.grad is not None and torch.isfinite(w.grad).all() for w in ws)


@needs_pool
def test_pool_is_per_process(monkeypatch):
    """A forked child must not reuse the parent's pool object (its worker threads do not exist there).

    (A real fork test cannot run here: with torch's CPU wheel, a child forked after the parent ran an
    MKL GEMM hangs in its first GEMM even without fastguide -- torch + GNU OpenMP are not fork-safe.)
    """
    a = cb._layer_pool(2)
    assert cb._layer_pool(2) is a
    pid = os.getpid()
    monkeypatch.setattr(cb.os, "getpid", lambda: pid + 1)
    assert cb._layer_pool(2) is not a


@pytest.mark.parametrize("n", [64, 100, 257, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mirror_fills_upper_triangle_exactly(n, dtype):
    K = torch.randn(n, n, dtype=dtype)
    want = K.tril() + K.tril(-1).T
    cb._mirror_lower_(K)
    assert torch.equal(K, want)


@needs_pool
def test_gram_stack_same_with_mkl_only(forced_parallel, monkeypatch):
    """SciPy's OpenBLAS (syrk, mirror) and the MKL fallback give the same centred Grams."""
    xs = _mixed_layers()
    n = xs[0].shape[0]
    a = torch.empty(len(xs), n, n)
    cb.gram_stack(xs, tb.shift_of, a)
    monkeypatch.setattr(cb, "_OPENBLAS", {})
    b = torch.empty(len(xs), n, n)
    cb.gram_stack(xs, tb.shift_of, b)
    for l in range(len(xs)):
        ref = _centre(b[l])
        assert ((_centre(a[l]) - ref).norm() / ref.norm()).item() <= 1e-6, f"layer {l}"


def test_openblas_is_found_when_scipy_ships_it():
    pytest.importorskip("scipy")
    found = cb._load_openblas()
    if os.environ.get("FASTGUIDE_CPU_OPENBLAS") == "0":
        assert found == {}
        return
    if not found:
        pytest.skip("this SciPy's OpenBLAS lacks openblas_set_num_threads_local (needs >= 0.3.27)")
    assert torch.float32 in found and "local" in found


def test_raw_route_bound_tightens_with_width():
    assert cb.rho_max(1024) == cb.RHO_MAX
    assert cb.rho_max(1_000_000) == pytest.approx(cb.RHO_SQRT_D / 1000.0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 250_000, generator=g) + 1.8  # offset energy ~3.2x the spread: raw if narrow
    assert not cb._raw_ok(x, tb.shift_of(x))
    assert cb._raw_ok(x[:, :4096], tb.shift_of(x[:, :4096]))
    y = torch.randn(64, 40, generator=g) + 0.3 * x[:, :40]
    for est in ("biased", "unbiased"):
        got = fg.cka(x, y, estimator=est).item()
        want = fg.cka(x.double(), y.double(), estimator=est).item()
        assert abs(got - want) <= 1e-6
