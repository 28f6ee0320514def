"""Symmetric Gram products on CPU: half the flops of ``X @ X.T`` through BLAS ``?syrk``.

The CPU path is GEMM-bound (DESIGN.md section 6), so the lever is fewer flops: ``K = X^ X^T`` is
symmetric and ``syrk`` computes one triangle (n^2 d flops instead of 2 n^2 d).

Which ``syrk``. torch's CPU wheel links MKL statically into ``libtorch_cpu.so`` and exports its
``mkl_blas_ssyrk`` / ``mkl_blas_dsyrk`` entry points (Fortran calling convention). Calling those runs
the product on MKL's threading layer, which is torch's own OpenMP pool, so it interleaves with torch
ops without the thread fight measured for SciPy's OpenBLAS ``ssyrk`` (torch's OpenMP workers spin
after each parallel region and starve OpenBLAS's pthreads: 284 ms vs 51 ms for a 10 x 10 all-pairs
CKA; see DESIGN.md section 6). MKL's Fortran ``?syrk`` takes integer arguments by reference; they are
passed as int64, which reads as the same value under an LP64 (int32) interface for sizes < 2^31 on
little-endian CPUs.

Whether it wins. On the 2-core development machine (AMD EPYC, interleaved timings), MKL's syrk was
1.2-1.7x faster than ``X @ X.T`` single-threaded for n = 256-1024, but with two threads it scaled worse
than MKL's GEMM for some shapes (0.9x at n = 256, d = 16384). So for a single layer the choice is
measured once per shape class in the real pipeline (:func:`_syrk_wins`) and syrk is used only where it
wins. Several layers at once (the usual case: a loss or a matrix over many layers) go through
:func:`gram_stack` instead: one layer per core, each a single-threaded syrk -- SciPy's OpenBLAS when
available (faster than MKL's on that AMD CPU, see :func:`_load_openblas`) -- with the mirror done in
BLAS/LAPACK too; 1.2-1.5x faster than two-thread ``X @ X.T`` layer after layer there.

The entry point is found once with ctypes and checked against ``X @ X.T`` on a small matrix before
first use; if the symbol is missing (a torch build without MKL, e.g. aarch64 or OpenBLAS builds), the
check fails, or ``FASTGUIDE_CPU_SYRK=0`` is set, :func:`sym_gram` uses ``torch.mm`` instead.

Memory: the shift (DESIGN.md section 2) must be applied before the product (fp32 cancellation), but a
full shifted copy of a conv activation (n x 802,816 fp32 = 822 MB at n = 256) is far more than the
Gram it produces. The shifted features are therefore formed in column chunks of at most
``CHUNK_ELEMS`` elements and the Gram is accumulated chunk by chunk (``beta = 1``), so the transient
is one chunk, not a copy of the activation.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["sym_gram", "gram_stack", "shifted_matmul", "syrk_available", "CHUNK_ELEMS"]

#: Largest shifted-feature chunk (elements) formed at once: 1 Mi elements = 4 MiB in fp32.
CHUNK_ELEMS = 1 << 20
#: Never make chunks narrower than this many columns (GEMM efficiency along the reduction dim).
MIN_CHUNK_COLS = 512

_lock = threading.Lock()
_SYRK: dict | None = None


def _load() -> dict:
    """{torch.float32: fn, torch.float64: fn} of verified MKL syrk entry points (possibly empty)."""
    global _SYRK
    if _SYRK is not None:
        return _SYRK
    with _lock:
        if _SYRK is not None:
            return _SYRK
        found: dict = {}
        if os.environ.get("FASTGUIDE_CPU_SYRK", "1") != "0":
            try:
                path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
                lib = ctypes.CDLL(path)
                for dt, name in ((torch.float32, "mkl_blas_ssyrk"), (torch.float64, "mkl_blas_dsyrk")):
                    fn = getattr(lib, name, None)
                    if fn is not None:
                        fn.restype = None
                        found[dt] = fn
            except OSError:
                found = {}
            for dt in list(found):
                if not _self_test(found[dt], dt):
                    del found[dt]
        _SYRK = found
        return found


def _call(fn, X: torch.Tensor, C: torch.Tensor, beta: float) -> None:
    """Lower triangle (row-major) of ``C = X X^T + beta C`` for C-contiguous X (n, k) and C (n, n).

    Row-major X (n, k) is the column-major (k, n) matrix A with lda = k, so ``X X^T = A^T A``:
    Fortran ``syrk('U', 'T', n, k, ...)``, whose column-major upper triangle is C's row-major lower one.
    """
    n, k = X.shape
    real = ctypes.c_double if X.dtype == torch.float64 else ctypes.c_float
    i64 = ctypes.c_int64
    fn(
        ctypes.byref(ctypes.c_char(b"U")),
        ctypes.byref(ctypes.c_char(b"T")),
        ctypes.byref(i64(n)),
        ctypes.byref(i64(k)),
        ctypes.byref(real(1.0)),
        ctypes.c_void_p(X.data_ptr()),
        ctypes.byref(i64(k)),
        ctypes.byref(real(beta)),
        ctypes.c_void_p(C.data_ptr()),
        ctypes.byref(i64(n)),
    )


def _self_test(fn, dt: torch.dtype) -> bool:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(37, 53, generator=g, dtype=dt)
    C = torch.full((37, 37), float("nan"), dtype=dt)
    try:
        _call(fn, X[:, :20].contiguous(), C, 0.0)
        _call(fn, X[:, 20:].contiguous(), C, 1.0)
    except Exception:  # pragma: no cover - depends on the torch build
        return False
    ref = (X.double() @ X.double().T).tril()
    got = C.tril().double()
    return bool(torch.isfinite(got).all()) and bool(
        ((got - ref).abs().max() <= 1e-3 * ref.abs().max()).item()
    )


def syrk_available(dtype: torch.dtype = torch.float32) -> bool:
    return dtype in _load()


_OPENBLAS: dict | None = None


def _load_openblas() -> dict:
    """``{dtype: syrk, "local": set_num_threads_local}`` from SciPy's OpenBLAS, verified; or {}.

    Used only by the single-threaded layer-parallel workers (:func:`gram_stack`): on the development
    machine (AMD EPYC) OpenBLAS's single-threaded ``ssyrk`` took 1.05 / 1.89 / 15.7 ms at n = 256,
    d = 1024 / 2048 / 16384 against MKL's 1.22 / 2.42 / 21.9 ms (torch's MKL runs a generic code path
    on AMD CPUs). OpenBLAS >= 0.3.27's ``openblas_set_num_threads_local`` makes each worker's calls
    single-threaded without touching the process-wide setting, so no OpenBLAS thread ever competes with
    torch's OpenMP threads (the thread fight of DESIGN.md section 6 cannot happen). Called through
    ctypes (the GIL is released during the product; SciPy's f2py wrappers keep it). Off with
    ``FASTGUIDE_CPU_OPENBLAS=0``; missing SciPy, symbols or a failed self-test leave MKL's ``syrk``.
    """
    global _OPENBLAS
    if _OPENBLAS is not None:
        return _OPENBLAS
    with _lock:
        if _OPENBLAS is not None:
            return _OPENBLAS
        found: dict = {}
        if os.environ.get("FASTGUIDE_CPU_OPENBLAS", "1") != "0":
            try:
                import scipy.linalg.blas  # noqa: F401  (loads SciPy's OpenBLAS)
                from threadpoolctl import threadpool_info

                paths = [i["filepath"] for i in threadpool_info() if i.get("internal_api") == "openblas"]
            except Exception:  # pragma: no cover - depends on the install
                paths = []
            for path in sorted(paths, key=lambda p: "scipy.libs" not in p):  # SciPy's own library first
                try:
                    lib = ctypes.CDLL(path)
                except OSError:  # pragma: no cover
                    continue
                local = _symbol(
                    lib, ["openblas_set_num_threads_local", "scipy_openblas_set_num_threads_local"]
                )
                if local is None:
                    continue
                local.restype = ctypes.c_int
                local.argtypes = [ctypes.c_int]
                for dt, c in ((torch.float32, "s"), (torch.float64, "d")):
                    fn = _symbol(lib, _names(f"{c}syrk_"))
                    if fn is not None:
                        fn.restype = None
                        if _self_test(fn, dt):
                            found[dt] = fn
                    # Mirror in BLAS too (omatcopy transpose + LAPACK lacpy of one triangle): a torch-op
                    # mirror in two workers at once costs ~0.3 ms a 256 x 256 Gram (GIL, TensorIterator).
                    om, la = _symbol(lib, _names(f"{c}omatcopy_")), _symbol(lib, _names(f"{c}lacpy_"))
                    if dt in found and om is not None and la is not None:
                        om.restype = la.restype = None
                        if _mirror_self_test(om, la, dt):
                            found[("mirror", dt)] = (om, la)
                if found:
                    found["local"] = local
                    break
        _OPENBLAS = found
        return found


def _names(base: str) -> list[str]:
    return [f"scipy_{base}", base, f"scipy_{base}64_", f"{base}64_"]


def _blas_mirror(fns, K: torch.Tensor, scratch: torch.Tensor) -> None:
    """Row-major lower triangle of the (n, n) C-contiguous K copied onto its upper one, in BLAS.

    ``omatcopy`` writes K^T into ``scratch`` (its row-major upper triangle is K's lower one), then
    LAPACK ``lacpy('L')`` (column-major lower = row-major upper) copies that triangle back into K.
    """
    om, la = fns
    n = K.shape[0]
    real = ctypes.c_double if K.dtype == torch.float64 else ctypes.c_float
    i64, one = ctypes.c_int64, ctypes.c_size_t(1)
    nn = ctypes.byref(i64(n))
    om(
        ctypes.byref(ctypes.c_char(b"C")),
        ctypes.byref(ctypes.c_char(b"T")),
        nn,
        nn,
        ctypes.byref(real(1.0)),
        ctypes.c_void_p(K.data_ptr()),
        nn,
        ctypes.c_void_p(scratch.data_ptr()),
        nn,
    )
    la(
        ctypes.byref(ctypes.c_char(b"L")),
        nn,
        nn,
        ctypes.c_void_p(scratch.data_ptr()),
        nn,
        ctypes.c_void_p(K.data_ptr()),
        nn,
        one,  # hidden Fortran length of the character argument
    )


def _mirror_self_test(om, la, dt: torch.dtype) -> bool:
    g = torch.Generator().manual_seed(0)
    K = torch.randn(37, 37, generator=g, dtype=dt)
    want = K.tril() + K.tril(-1).T
    try:
        _blas_mirror((om, la), K, torch.empty_like(K))
    except Exception:  # pragma: no cover - depends on the library
        return False
    return bool(torch.equal(K, want))


_SCRATCH = threading.local()


def _scratch(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread (n, n) buffer for the mirror (n <= 1024: at most 4 MiB fp32 kept per thread)."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.shape[0] != n or buf.dtype != dtype:
        buf = _SCRATCH.buf = torch.empty((n, n), dtype=dtype)
    return buf


def _symbol(lib, names: list[str]):
    for name in names:
        fn = getattr(lib, name, None)
        if fn is not None:
            return fn
    return None


_MASKS: dict[int, torch.Tensor] = {}


def _upper_mask(n: int) -> torch.Tensor:
    m = _MASKS.get(n)
    if m is None:
        m = torch.ones(n, n, dtype=torch.bool).triu_(1)
        if len(_MASKS) > 16:
            _MASKS.clear()
        _MASKS[n] = m
    return m


def _chunk_cols(n: int, d: int) -> int:
    return max(MIN_CHUNK_COLS, CHUNK_ELEMS // max(n, 1))


def _shifted_chunk(x: torch.Tensor, shift: torch.Tensor, c0: int, c1: int, acc: torch.dtype) -> torch.Tensor:
    """C-contiguous ``x[:, c0:c1] - shift[c0:c1]`` in the accumulation dtype (any strides of x)."""
    out = torch.empty((x.shape[0], c1 - c0), dtype=acc, device=x.device)
    return torch.sub(x[:, c0:c1], shift[c0:c1], out=out)


#: Raw-product route allowed while the offset energy n ||mu||^2 is at most this multiple of the centred
#: energy ||X^||_F^2 (rounding of the raw Gram relative to the centred one grows like 1 + rho). Measured
#: worst fp32 CKA error of the raw route against float64 (constant offsets, n = 256, d = 32768): 7e-7
#: at rho = 4, 2.6e-6 at 9, 4.5e-6 at 14 -- so 4, although conv activations (a ResNet-18's ReLU/pool
#: outputs: rho = 6-9) then take the chunked shifted route.
RHO_MAX = 4.0
#: ... and the error also grows with the width: 6.9e-6 at rho = 3.8, d = 200,000 (n = 256), so the bound
#: is ``min(RHO_MAX, RHO_SQRT_D / sqrt(d))`` (measured errors <= 7e-7 up to rho sqrt(d) ~ 700; the bound
#: only tightens RHO_MAX for d > 62,500, e.g. conv maps of 64 x 112 x 112).
RHO_SQRT_D = 1000.0
SHIFT_ROWS = 32


def rho_max(d: int) -> float:
    """Largest offset ratio the raw route accepts for a layer of width d (see ``RHO_MAX``)."""
    return min(RHO_MAX, RHO_SQRT_D / math.sqrt(max(d, 1)))


def _offset_terms(K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From raw Grams K (..., n, n) of x with shift mu = mean of the first m0 = min(n, 32) rows:
    ``u = x mu - ||mu||^2 / 2`` (..., n), ``||mu||^2`` (...) and the trace of the shifted Gram
    ``tr(K) - 2 sum(u)`` (...), for the exact offset check on all rows (the first rows could be
    unrepresentative) and the rank-2 shift correction ``K - u 1^T - 1 u^T``."""
    m0 = min(K.shape[-1], SHIFT_ROWS)
    v = K[..., :m0].mean(dim=-1)  # x mu
    mu2 = v[..., :m0].mean(dim=-1)  # mu^T mu
    u = v - 0.5 * mu2.unsqueeze(-1)
    return u, mu2, K.diagonal(dim1=-2, dim2=-1).sum(-1) - 2.0 * u.sum(-1)


#: Below this n^2 d the raw route uses ``torch.mm``: syrk's saving (measured 1.2-1.4x on the Gram,
#: single thread) does not cover its fixed cost (ctypes call, mirror ops) -- e.g. 0.6x at (128, 1024).
SYRK_MIN_WORK = 1 << 27


def _raw_ok(x: torch.Tensor, shift: torch.Tensor) -> bool:
    """Cheap pre-check from the first rows: is ``||mu||^2 <= RHO_MAX * (mean sq. distance to mu)``?

    ``shift`` is the mean ``mu`` of the first ``min(n, 32)`` rows, so their mean squared distance to it
    is ``mean ||x_r||^2 - ||mu||^2`` (cancellation there only makes a large offset look larger: safe).
    A host read on a CPU tensor (no device sync); never called for other devices.
    """
    m0 = min(x.shape[0], SHIFT_ROWS)
    off = float(shift.square().sum())
    head = float(torch.linalg.vector_norm(x[:m0], dtype=shift.dtype).square()) / m0
    return off <= rho_max(x.shape[1]) * (head - off)


def _can_raw(x: torch.Tensor, acc: torch.dtype) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == acc
        and x.dim() == 2
        and x.stride(1) == 1
        and x.stride(0) == x.shape[1]
    )


_CHOICE: dict = {}


def _syrk_wins(fn, x: torch.Tensor, acc: torch.dtype) -> bool:
    """Whether ``syrk`` + mirror beats ``torch.mm`` for this shape class here, measured once.

    syrk's gain depends on the machine and on threading: single-threaded it measured 1.2-1.7x faster
    than ``X @ X.T`` on the development machine, but with two threads MKL's syrk scaled worse than its
    GEMM (0.9x at n = 256, d = 16384). So the first product of each (n, d rounded to a power of two,
    dtype, torch thread count) class is timed both ways on the real input (interleaved, best of two
    each) and the winner is cached; syrk must win by 10 %. ``FASTGUIDE_CPU_SYRK=force`` skips the test.
    Only C-contiguous inputs in the accumulation dtype are timed (others take the chunked path).
    """
    mode = os.environ.get("FASTGUIDE_CPU_SYRK", "auto")
    if mode == "force":
        return True
    n, d = x.shape
    key = (n, 1 << max(0, round(math.log2(max(d, 1)))), acc, torch.get_num_threads())
    hit = _CHOICE.get(key)
    if hit is not None:
        return hit
    if not _can_raw(x, acc):
        return True
    C = torch.empty((n, n), dtype=acc)
    t_syrk, t_mm = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        _call(fn, x, C, 0.0)
        _mirror_lower_(C)
        t_syrk.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch.mm(x, x.T, out=C)
        t_mm.append(time.perf_counter() - t0)
    win = min(t_syrk) < 0.9 * min(t_mm)
    if len(_CHOICE) > 256:
        _CHOICE.clear()
    _CHOICE[key] = win
    return win


def _mirror_lower_(C: torch.Tensor, tile: int = 256) -> torch.Tensor:
    """Copy the lower triangle of a row-major (n, n) C onto its upper one, in place, tile by tile.

    Tiles keep the transposed reads in cache; a whole-matrix ``torch.where(mask, C.T, C)`` measured
    4.4 ms at n = 1024 against 2.9 ms here, and this allocates nothing but one tile. For
    64 <= n <= 1024 with SciPy's OpenBLAS present, two BLAS/LAPACK calls through a per-thread scratch
    instead (:func:`_blas_mirror`; no GIL, no torch dispatch: the torch-op mirror measured ~0.3 ms a
    256 x 256 Gram with two workers mirroring at once, ~20 % of the Gram phase).
    """
    n = C.shape[0]
    fns = _load_openblas().get(("mirror", C.dtype)) if 64 <= n <= 1024 and C.is_contiguous() else None
    if fns is not None:
        _blas_mirror(fns, C, _scratch(n, C.dtype))
        return C
    for i0 in range(0, n, tile):
        i1 = min(n, i0 + tile)
        d = C[i0:i1, i0:i1]
        d.copy_(torch.where(_upper_mask(i1 - i0), d.T, d))
        for j0 in range(i1, n, tile):
            j1 = min(n, j0 + tile)
            C[i0:i1, j0:j1].copy_(C[j0:j1, i0:i1].T)
    return C


def sym_gram(
    x: torch.Tensor,
    shift: torch.Tensor,
    out: torch.Tensor | None = None,
    centring_only: bool = False,
    sq: list | None = None,
) -> torch.Tensor:
    """``K = (x - shift)(x - shift)^T`` in ``shift.dtype`` (the accumulation dtype), full (n, n).

    ``x`` is (n, d) of any float dtype and strides; ``shift`` is (d,) in the accumulation dtype, the
    mean of the first ``min(n, 32)`` rows (``_torch_backend.shift_of``). ``out`` (optional, (n, n) of
    ``shift.dtype``) receives the result. No autograd: callers use it for the forward statistics
    (analytic backward) only. ``centring_only=True`` (the caller only uses ``H K H``, ``U(K)`` or
    pairwise distances, which are exactly invariant to the rank-2 shift terms ``a 1^T + 1 a^T``): the raw
    route may return the raw Gram without applying that correction (two passes over K fewer).

    Raw route (CPU, C-contiguous x already in the accumulation dtype, offset small against the spread:
    :func:`rho_max`, checked on the first rows before and exactly after): the product of the raw x with no
    copy at all -- ``syrk`` (half the flops) plus an in-place mirror when ``d >= n / 4`` and
    ``n^2 d >= SYRK_MIN_WORK``, else ``torch.mm`` on the raw x when ``d >= n`` (a shifted copy would
    outweigh the Gram); small ``d < n`` takes the plain path below
    (the mirror's transposed pass costs more than ``syrk`` saves when d is small against n: 2.9 ms vs
    3.2 ms saved at n = 1024, d = 256) -- then the exact shift correction from the Gram itself,
    ``K = K_raw - v 1^T - 1 v^T + m`` with ``v = x mu = K_raw[:, :32].mean(1)`` and ``m = mu^T mu``
    (O(n^2)). Otherwise the shifted features are formed in column chunks and accumulated (``syrk`` with
    ``beta = 1`` on CPU, ``torch.mm`` elsewhere), so the transient is one chunk, not a copy of x.

    ``sq`` (optional list): receives ``||x||_F^2`` (0-d, accumulation dtype) -- the trace of the raw
    Gram on the raw route (no extra pass over x), ``vector_norm`` otherwise.
    """
    acc = shift.dtype
    n, d = x.shape
    if out is not None and (out.dtype != acc or not out.is_contiguous()):
        return out.copy_(sym_gram(x, shift))
    fn = _load().get(acc) if x.device.type == "cpu" else None
    use_syrk = fn is not None and 4 * d >= n and n * n * d >= SYRK_MIN_WORK and _syrk_wins(fn, x, acc)
    # The raw route when it saves flops (syrk) or memory (a shifted copy of x would outweigh the
    # Gram, d >= n); small d < n keeps the plain path (shifted copy + one GEMM: two ops).
    if (use_syrk or d >= n) and _can_raw(x, acc) and _raw_ok(x, shift):
        K = out if out is not None else torch.empty((n, n), dtype=acc, device=x.device)
        _raw_gram(x, K, fn if use_syrk else None)
        u, _, tr_shifted = _offset_terms(K)
        if float(n * shift.square().sum()) <= rho_max(d) * float(tr_shifted):
            if sq is not None:
                sq.append(K.diagonal().sum())
            if not centring_only:
                K.sub_(u.unsqueeze(1)).sub_(u.unsqueeze(0))
            return K
    if sq is not None:
        sq.append(torch.linalg.vector_norm(x, dtype=acc).square())
    return _shifted_gram(x, shift, out, fn if use_syrk else None)


def _raw_gram(x: torch.Tensor, K: torch.Tensor, fn) -> torch.Tensor:
    """``x x^T`` of the raw x into K: ``syrk`` (``fn``) + mirror, or ``torch.mm`` when fn is None."""
    if fn is None:
        return torch.mm(x, x.T, out=K)
    _call(fn, x, K, 0.0)
    return _mirror_lower_(K)


def _shifted_gram(x: torch.Tensor, shift: torch.Tensor, out: torch.Tensor | None, fn) -> torch.Tensor:
    """``(x - shift)(x - shift)^T``, the shifted features formed in column chunks (never a full copy).

    ``fn``: MKL syrk (accumulated with ``beta = 1``, then mirrored) or None for ``torch.mm``/``addmm_``.
    """
    acc = shift.dtype
    n, d = x.shape
    step = _chunk_cols(n, d)
    if fn is None:
        K = out
        for c0 in range(0, d, step):
            Xc = _shifted_chunk(x, shift, c0, min(d, c0 + step), acc)
            if K is None:
                K = Xc @ Xc.T
            elif c0 == 0:
                torch.mm(Xc, Xc.T, out=K)
            else:
                K.addmm_(Xc, Xc.T)
        return K
    K = out if out is not None else torch.empty((n, n), dtype=acc)
    for c0 in range(0, d, step):
        Xc = _shifted_chunk(x, shift, c0, min(d, c0 + step), acc)
        _call(fn, Xc, K, 0.0 if c0 == 0 else 1.0)
        del Xc
    return _mirror_lower_(K)


def shifted_matmul(
    G: torch.Tensor, x: torch.Tensor, shift: torch.Tensor, scale, out_dtype: torch.dtype
) -> torch.Tensor:
    """``scale * G @ (x - shift)`` as an (n, d) tensor of ``out_dtype``, for a G with zero row sums.

    ``G`` is scaled in place (it is the caller's scratch buffer).

    ``G 1 = 0`` (a combination of centred Grams), so ``G (x - 1 mu^T) = G x`` exactly; the shift only
    matters for rounding. Under the same offset test as :func:`sym_gram` (CPU), one GEMM on the raw x.
    Otherwise one GEMM per column chunk of the shifted features, written straight into its column slice
    of the output (a strided BLAS destination), so the only transient is one shifted chunk.
    """
    acc = shift.dtype
    n, d = x.shape
    Gs = G.mul_(scale)  # G is the caller's scratch buffer (grad_from_terms builds it per layer)
    if d >= n and _can_raw(x, acc) and out_dtype == acc and _raw_ok(x, shift):
        return Gs @ x
    step = _chunk_cols(n, d)
    if step >= d:
        out = Gs @ _shifted_chunk(x, shift, 0, d, acc)
        return out if out.dtype == out_dtype else out.to(out_dtype)
    out = torch.empty((n, d), dtype=out_dtype, device=x.device)
    for c0 in range(0, d, step):
        c1 = min(d, c0 + step)
        Xc = _shifted_chunk(x, shift, c0, c1, acc)
        if out_dtype == acc:
            torch.mm(Gs, Xc, out=out[:, c0:c1])
        else:
            out[:, c0:c1].copy_(Gs @ Xc)
        del Xc
    return out


# --------------------------------------------------------------------------- layer-parallel Grams
#: Below this much work per call (sum of n^2 d over the layers) the layers run one after another.
PARALLEL_MIN_WORK = 1 << 24
#: Layers with n^2 d below this skip the first-rows pre-check of the raw route in the workers.
PRECHECK_MIN_WORK = 1 << 28

_POOL: tuple | None = None  # ((pid, workers), ThreadPoolExecutor)
_OMP_SET = None


def _omp_set_num_threads():
    """``omp_set_num_threads`` of the OpenMP runtime torch uses (libgomp in the CPU wheel), or False."""
    global _OMP_SET
    if _OMP_SET is None:
        _OMP_SET = False
        if "ATen parallel backend: OpenMP" in torch.__config__.parallel_info():
            lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
            for name in ("libgomp.so.1", "libgomp.so", "libiomp5.so"):
                path = os.path.join(lib_dir, name)
                if not os.path.exists(path):
                    continue
                try:
                    fn = ctypes.CDLL(path).omp_set_num_threads
                except (OSError, AttributeError):
                    continue
                fn.restype = None
                fn.argtypes = [ctypes.c_int]
                _OMP_SET = fn
                break
    return _OMP_SET


def _single_thread() -> None:
    # OpenMP's nthreads ICV is per thread: this makes torch ops and MKL calls made from the worker
    # single-threaded without touching the caller's setting; likewise OpenBLAS's thread-local count.
    _omp_set_num_threads()(1)
    local = _load_openblas().get("local")
    if local is not None:
        local(1)


def _layer_pool(workers: int) -> ThreadPoolExecutor:
    global _POOL
    key = (os.getpid(), workers)  # a forked child gets its own pool
    _load_openblas()  # before the workers start (their initializer sets its thread-local count)
    if _POOL is None or _POOL[0] != key:
        with _lock:
            if _POOL is None or _POOL[0] != key:
                _POOL = (
                    key,
                    ThreadPoolExecutor(
                        workers, thread_name_prefix="fastguide-gram", initializer=_single_thread
                    ),
                )
    return _POOL[1]


def _parallel(device: torch.device, layers: int, work: float) -> bool:
    return (
        device.type == "cpu"
        and layers >= 2
        and torch.get_num_threads() >= 2
        and work >= PARALLEL_MIN_WORK
        and os.environ.get("FASTGUIDE_CPU_LAYER_PARALLEL", "1") != "0"
        and not threading.current_thread().name.startswith("fastguide-gram")
        and bool(_omp_set_num_threads())
    )


def _gram_worker(x: torch.Tensor, K: torch.Tensor, shift_fn, fn, eligible: bool) -> tuple:
    """One layer's Gram in a single-threaded worker; returns (raw, sq).

    Raw route (``eligible`` and the first-rows pre-check :func:`_raw_ok` passes): ``syrk`` + mirror
    (``d >= n / 4``; single-threaded syrk beat single-threaded ``X @ X.T`` by 1.2-1.5x at n = 256-512
    on the development machine) or ``torch.mm``; ``sq`` None (the caller takes ``||x||^2`` from the
    Gram's trace). Otherwise the chunked shifted product and ``sq = ||x||_F^2``.
    """
    n, d = x.shape
    shift = None
    if eligible:
        # Below PRECHECK_MIN_WORK the pre-check's fixed cost (0.13 ms a layer in a worker: ~10 % of a
        # 256 x 1024 Gram, ~7 % at 256 x 2048) outweighs what it saves: the exact check after the
        # product still catches a large offset, at the price of one wasted product for that layer.
        if n * n * d < PRECHECK_MIN_WORK or _raw_ok(x, shift := shift_fn(x)):  # NaN: not raw
            _raw_gram(x, K, fn if 4 * d >= n else None)
            return True, None
    if shift is None:  # the pre-check's shift serves the shifted route too
        shift = shift_fn(x)
    _shifted_gram(x, shift, K, fn if 4 * d >= n else None)
    return False, torch.linalg.vector_norm(x, dtype=shift.dtype).square()


def _in_worker(inference: bool, *args):
    # Grad and inference modes are per thread: the worker takes the caller's inference mode (writing
    # into an inference tensor needs it) and never records autograd.
    with torch.inference_mode(inference), torch.no_grad():
        return _gram_worker(*args)


def gram_stack(xs: list[torch.Tensor], shift_fn, out: torch.Tensor) -> torch.Tensor | None:
    """Grams of several CPU layers at once into ``out`` (L, n, n), one layer per core; returns the raw
    squared norms ``||x_l||_F^2`` (L,), or None when the layer-parallel path does not apply (then the
    caller runs :func:`sym_gram` per layer). ``shift_fn(x)`` gives a layer's shift in ``out.dtype``.

    Why: at the Gram sizes of CKA (n of a few hundred) MKL's threaded GEMM and ``syrk`` scale poorly
    across cores, while independent layers scale well. Measured on the 2-core development machine
    (interleaved medians): 48 layers of n = 256, d = 1024 take 53 ms as two-thread ``X @ X.T`` one after
    another, 37 ms as single-threaded ``syrk``, two layers at a time (73 ms with one worker). Only the
    products (and the raw-route pre-check, one small GEMM) run in the workers: small torch ops from two
    Python threads at once fight over the GIL (per-layer centring measured 2.9x slower that way than
    batched on the caller's thread), so the exact offset check and everything after the product stay
    on the caller's thread, batched over layers.

    Same results as :func:`sym_gram` with ``centring_only=True``: the raw route's Grams are left without
    the rank-2 shift correction (H K H, U(K) and distances do not see it). Used only when torch runs on
    OpenMP (the per-thread ``omp_set_num_threads`` is what makes a worker single-threaded), torch uses
    at least two threads, there are at least two layers and ``n^2 sum(d) >= PARALLEL_MIN_WORK``.
    ``FASTGUIDE_CPU_LAYER_PARALLEL=0`` turns it off. Each layer is computed by one thread in a fixed
    order, so results do not depend on which worker ran it.
    """
    L, n = len(xs), out.shape[-1]
    acc = out.dtype
    if not out.is_contiguous() or not _parallel(out.device, L, float(n * n * sum(x.shape[1] for x in xs))):
        return None
    fn = _load_openblas().get(acc) or _load().get(acc)
    xs = [x.detach() for x in xs]
    eligible = [
        (x.shape[1] >= n or (fn is not None and 4 * x.shape[1] >= n)) and _can_raw(x, acc) for x in xs
    ]
    pool = _layer_pool(torch.get_num_threads())
    inference = torch.is_inference_mode_enabled()
    # Largest products first (longest-processing-time order): the pool's FIFO queue then balances
    # the cores when layer sizes differ (e.g. a guide's 16384-wide maps next to 1024-wide layers).
    order = sorted(range(L), key=lambda l: -xs[l].shape[1])
    futs = {l: pool.submit(_in_worker, inference, xs[l], out[l], shift_fn, fn, eligible[l]) for l in order}
    res = [futs[l].result() for l in range(L)]
    sqs = [r[1] for r in res]
    if any(r[0] for r in res):
        # Exact offset check of the raw route, batched (see sym_gram); a layer that fails it is
        # recomputed from shifted features.
        _, mu2, tr_shifted = _offset_terms(out)
        bound = torch.tensor([rho_max(x.shape[1]) for x in xs], dtype=acc)
        good = (n * mu2 <= bound * tr_shifted).tolist()  # NaN: recomputed (and propagated)
        for l, (raw, _) in enumerate(res):
            if raw and not good[l]:  # on this thread: MKL (OpenBLAS would start its own threads here)
                sqs[l] = _gram_worker(xs[l], out[l], shift_fn, _load().get(acc), False)[1]
    tr = out.diagonal(dim1=-2, dim2=-1).sum(-1)
    return torch.stack([tr[l] if sqs[l] is None else sqs[l] for l in range(L)])


def describe_layer_parallel() -> str:
    """One line for benchmark records: how this process computes the Grams of several CPU layers."""
    if os.environ.get("FASTGUIDE_CPU_LAYER_PARALLEL", "1") == "0":
        return "off (FASTGUIDE_CPU_LAYER_PARALLEL=0)"
    if not _omp_set_num_threads():
        return "off (torch does not run on OpenMP)"
    if torch.get_num_threads() < 2:
        return "off (one torch thread)"
    ob = _load_openblas()
    if torch.float32 in ob:
        kernel = "SciPy's OpenBLAS ssyrk"
    else:
        kernel = "MKL ssyrk" if syrk_available() else "torch.mm"
    return f"one layer per core ({torch.get_num_threads()} workers), single-threaded {kernel}"
