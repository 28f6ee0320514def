"""The CPU BLAS layer (fastguide/_cpu/): bindings, the fixed syrk rule, Gram numerics, the layer pool."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, layer_parallel_forced

import fastguide as fg
from fastguide import _config
from fastguide import _cpu as cpu
from fastguide._cpu import blas, gram, pool
from fastguide._utils import shift_of

needs_pool = pytest.mark.skipif(not blas.omp_set_num_threads(), reason="torch does not run on OpenMP here")
needs_mkl = pytest.mark.skipif(
    blas._load_mkl().get(torch.float32) is None, reason="no MKL syrk in this torch"
)


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
    monkeypatch.setattr(pool, "PRECHECK_MIN_WORK", 0 if precheck else 1 << 60)
    xs = _mixed_layers()
    n = xs[0].shape[0]
    out = torch.empty(len(xs), n, n)
    sq = cpu.gram_stack(xs, out)
    assert sq is not None, "layer-parallel path not taken"
    for l, x in enumerate(xs):
        ref = _centred64(x)
        got = _centre(out[l])  # raw-route Grams come without the (centring-invisible) shift terms
        assert_close(got, ref, "gram", torch.float32, length=x.shape[1], what=f"layer {l}: centred Gram")
        want = x.double().square().sum()
        assert_close(sq[l], want, "gram", torch.float32, length=x.numel(), what=f"layer {l}: ||x||^2")


@needs_pool
def test_gram_stack_not_used_when_switched_off_or_single_layer(forced_parallel):
    xs = _mixed_layers()[:2]
    out = torch.empty(2, 64, 64)
    assert cpu.gram_stack(xs[:1], out[:1]) is None  # one layer: nothing to spread
    with _config.override(cpu_layer_parallel=False):
        assert cpu.gram_stack(xs, out) is None
        assert cpu.describe_layer_parallel().startswith("off")
    assert cpu.gram_stack(xs, out) is not None


@needs_pool
@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_cka_matrix_same_under_both_schedules(forced_parallel, estimator):
    xs = _mixed_layers()
    par = fg.cka_matrix(xs, estimator=estimator)
    with _config.override(cpu_layer_parallel=False):
        ser = fg.cka_matrix(xs, estimator=estimator)
    assert torch.isfinite(par).all()
    assert_close(par, ser, "cka", torch.float32, what="layer-parallel vs serial")


@needs_pool
def test_inference_mode_and_autograd_in_workers(forced_parallel):
    xs = [torch.randn(48, 64) for _ in range(3)]
    with torch.inference_mode():
        a = fg.cka_matrix(xs)
    ws = [x.clone().requires_grad_(True) for x in xs]
    b = fg.cka_matrix(ws)
    b.sum().backward()
    assert_close(a, b, "cka", torch.float32, what="inference mode vs autograd")
    assert all(w.grad is not None and torch.isfinite(w.grad).all() for w in ws)


@needs_pool
def test_pool_is_per_process(monkeypatch):
    """A forked child must not reuse the parent's pool object (its worker threads do not exist there).

    (A real fork test cannot run here: with torch's CPU wheel, a child forked after the parent ran an
    MKL GEMM hangs in its first GEMM even without fastguide -- torch + GNU OpenMP are not fork-safe.)
    """
    a = pool.layer_pool(2)
    assert pool.layer_pool(2) is a
    pid = pool.os.getpid()
    monkeypatch.setattr(pool.os, "getpid", lambda: pid + 1)
    assert pool.layer_pool(2) is not a


@needs_pool
def test_pool_follows_the_openblas_setting():
    """Workers are prepared for OpenBLAS when they start: switching it on starts a fresh pool."""
    with _config.override(cpu_openblas=False):
        a = pool.layer_pool(2)
    with _config.override(cpu_openblas=True):
        b = pool.layer_pool(2)
        if not blas.openblas():
            pytest.skip("no usable SciPy OpenBLAS here")
        assert pool.layer_pool(2) is b
    assert b is not a and a._shutdown


@pytest.mark.parametrize("n", [64, 100, 257, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mirror_fills_upper_triangle_exactly(n, dtype):
    K = torch.randn(n, n, dtype=dtype)
    want = K.tril() + K.tril(-1).T
    gram.mirror_lower_(K)
    assert torch.equal(K, want)


@needs_pool
@pytest.mark.parametrize(
    "setting", [{"cpu_openblas": False}, {"cpu_syrk": "off"}], ids=["mkl-only", "torch-mm-only"]
)
def test_gram_stack_same_with_other_products(forced_parallel, setting):
    """SciPy's OpenBLAS (syrk, mirror), the MKL fallback and plain torch.mm give the same centred Grams."""
    xs = _mixed_layers()
    n = xs[0].shape[0]
    a = torch.empty(len(xs), n, n)
    cpu.gram_stack(xs, a)
    b = torch.empty(len(xs), n, n)
    with _config.override(**setting):
        assert cpu.gram_stack(xs, b) is not None
    for l in range(len(xs)):
        ref = _centre(b[l])
        assert_close(_centre(a[l]), ref, "gram", torch.float32, length=xs[l].shape[1], what=f"layer {l}")


def test_openblas_is_found_when_scipy_ships_it():
    pytest.importorskip("scipy")
    with _config.override(cpu_openblas=False):
        assert blas.openblas() == {}
    found = blas._load_openblas()
    if not found:
        pytest.skip("this SciPy's OpenBLAS lacks openblas_set_num_threads_local (needs >= 0.3.27)")
    assert torch.float32 in found and "local" in found
    with _config.override(cpu_openblas=True):
        assert blas.openblas() is found


def test_raw_route_bound_tightens_with_width():
    assert gram.rho_max(1024) == gram.RHO_MAX
    assert gram.rho_max(1_000_000) == pytest.approx(gram.RHO_SQRT_D / 1000.0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 250_000, generator=g) + 1.8  # offset energy ~3.2x the spread: raw if narrow
    assert not gram.raw_ok(x, shift_of(x))
    assert gram.raw_ok(x[:, :4096], shift_of(x[:, :4096]))
    y = torch.randn(64, 40, generator=g) + 0.3 * x[:, :40]
    for est in ("biased", "unbiased"):
        got = fg.cka(x, y, estimator=est)
        want = fg.cka(x.double(), y.double(), estimator=est)
        assert_close(got, want, "cka", torch.float32, what=est)


# --------------------------------------------------------------------------- the fixed syrk rule
@needs_mkl
def test_syrk_rule_is_a_fixed_function_of_shape_threads_and_setting():
    mkl = blas._load_mkl()[torch.float32]
    with _config.override(cpu_syrk="auto"):
        assert gram.syrk_for(torch.float32, 256, 1024, threads=1) is mkl
        assert gram.syrk_for(torch.float32, 256, 1024, threads=2) is None  # threaded MKL syrk loses
        assert gram.syrk_for(torch.float32, 256, 63, threads=1) is None  # 4 d < n: the mirror costs more
        assert gram.syrk_for(torch.float32, 256, 1024, threads=1) is mkl  # no state: the same answer again
    with _config.override(cpu_syrk="on"):
        assert gram.syrk_for(torch.float32, 256, 1024, threads=8) is mkl
        assert gram.syrk_for(torch.float32, 256, 63, threads=1) is None
        assert cpu.syrk_available()
    with _config.override(cpu_syrk="off"):
        assert gram.syrk_for(torch.float32, 256, 1024, threads=1, worker=True) is None
        assert not cpu.syrk_available()


def test_syrk_rule_workers_prefer_openblas():
    ob = blas._load_openblas().get(torch.float32)
    if ob is None:
        pytest.skip("no usable SciPy OpenBLAS here")
    with _config.override(cpu_syrk="auto", cpu_openblas=True):
        assert gram.syrk_for(torch.float32, 64, 96, threads=1, worker=True) is ob
        assert gram.syrk_for(torch.float32, 64, 96, threads=1) is not ob  # the caller's thread: MKL


_SYM_INPUTS = {
    "wide": lambda: torch.randn(64, 600) + 0.5,  # raw route, d >= n
    "narrow": lambda: torch.randn(96, 40) + 0.5,  # raw route only with syrk (n / 4 <= d < n)
    "thin": lambda: torch.randn(64, 8) + 0.5,  # d < n / 4: shifted route, torch.mm
    "offset": lambda: torch.randn(64, 600) + 1e4,  # large offset: shifted route in chunks
    "strided": lambda: torch.randn(600, 64).T,  # not C-contiguous: shifted route
}


@pytest.mark.parametrize("mode", ["auto", "on", "off"])
@pytest.mark.parametrize("case", list(_SYM_INPUTS))
def test_sym_gram_same_under_every_syrk_setting(monkeypatch, mode, case):
    monkeypatch.setattr(gram, "SYRK_MIN_WORK", 0)  # let syrk reach these small shapes
    monkeypatch.setattr(gram, "CHUNK_ELEMS", 64 * 512)  # several column chunks at d = 600
    x = _SYM_INPUTS[case]()
    ref = _centred64(x)
    old = torch.get_num_threads()
    with _config.override(cpu_syrk=mode):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            try:
                K = cpu.sym_gram(x, shift_of(x))
            finally:
                torch.set_num_threads(old)
            what = f"{mode}, {threads} threads"
            assert_close(_centre(K), ref, "gram", torch.float32, length=x.shape[1], what=what)


def test_describe_layer_parallel_names_the_product():
    line = cpu.describe_layer_parallel()
    assert isinstance(line, str) and line
    with _config.override(cpu_layer_parallel=True, cpu_syrk="off"):
        line = cpu.describe_layer_parallel()
        assert line.startswith("off") or line.endswith("torch.mm")
