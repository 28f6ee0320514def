"""Symmetric Gram products on CPU: half the flops of ``X @ X.T`` through BLAS ``?syrk``.

The CPU path is GEMM-bound (DESIGN.md section 6), so the lever is fewer flops: ``K = X^ X^T`` is
symmetric and ``syrk`` computes one triangle (n^2 d flops instead of 2 n^2 d).

Which ``syrk``. torch's CPU wheel links MKL statically into ``libtorch_cpu.so`` and exports its
``mkl_blas_ssyrk`` / ``mkl_blas_dsyrk`` entry points (Fortran calling convention). Calling those runs
the product on MKL's threading layer, which is torch's own OpenMP pool, so it interleaves with torch
ops without the thread fight measured for SciPy's OpenBLAS ``ssyrk`` (torch's OpenMP workers spin
after each parallel region and starve OpenBLAS's pthreads: 284 ms vs 51 ms for a 10 x 10 all-pairs
CKA; see DESIGN.md section 6). Measured on the 2-core dev machine, interleaved with torch ops, median
of paired ratios: 1.3-2.0x faster than ``X @ X.T`` for (n, d) = (256, 2048) ... (1024, 1024).

The entry point is found once with ctypes and checked against ``X @ X.T`` on a small matrix before
first use; if the symbol is missing (a torch build without MKL, e.g. aarch64 or OpenBLAS builds), the
check fails, or ``FASTGUIDE_CPU_SYRK=0`` is set, :func:`sym_gram` uses ``torch.mm`` instead, with the
same chunking. MKL's Fortran ``?syrk`` takes integer arguments by reference; they are passed as int64,
which reads as the same value under an LP64 (int32) interface for sizes < 2^31 on little-endian CPUs.

Memory: the shift (DESIGN.md section 2) must be applied before the product (fp32 cancellation), but a
full shifted copy of a conv activation (n x 802,816 fp32 = 822 MB at n = 256) is far more than the
Gram it produces. The shifted features are therefore formed in column chunks of at most
``CHUNK_ELEMS`` elements and the Gram is accumulated chunk by chunk (``beta = 1``), so the transient
is one chunk, not a copy of the activation.
"""

from __future__ import annotations

import ctypes
import os
import threading

import torch

__all__ = ["sym_gram", "shifted_matmul", "syrk_available", "CHUNK_ELEMS"]

#: Largest shifted-feature chunk (elements) formed at once: 4 Mi elements = 16 MiB in fp32.
CHUNK_ELEMS = 1 << 22
#: Never make chunks narrower than this many columns (GEMM efficiency along the reduction dim).
MIN_CHUNK_COLS = 1024

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
        ctypes.byref(ctypes.c_char(b"U")), ctypes.byref(ctypes.c_char(b"T")),
        ctypes.byref(i64(n)), ctypes.byref(i64(k)), ctypes.byref(real(1.0)),
        ctypes.c_void_p(X.data_ptr()), ctypes.byref(i64(k)), ctypes.byref(real(beta)),
        ctypes.c_void_p(C.data_ptr()), ctypes.byref(i64(n)),
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
    return bool(torch.isfinite(got).all()) and bool(((got - ref).abs().max() <= 1e-3 * ref.abs().max()).item())


def syrk_available(dtype: torch.dtype = torch.float32) -> bool:
    return dtype in _load()


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


def sym_gram(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``K = (x - shift)(x - shift)^T`` in ``shift.dtype`` (the accumulation dtype), full (n, n).

    ``x`` is (n, d) of any float dtype and strides; ``shift`` is (d,) in the accumulation dtype.
    No autograd: callers use it for the forward statistics (analytic backward) only. CPU tensors with
    an MKL ``syrk`` go through it (one triangle, then mirrored); everything else uses ``torch.mm``.
    Both accumulate over column chunks of the shifted features (see the module docstring).
    """
    acc = shift.dtype
    n, d = x.shape
    step = _chunk_cols(n, d)
    fn = _load().get(acc) if x.device.type == "cpu" else None
    if fn is None:
        K = None
        for c0 in range(0, d, step):
            Xc = _shifted_chunk(x, shift, c0, min(d, c0 + step), acc)
            K = Xc @ Xc.T if K is None else K.addmm_(Xc, Xc.T)
        return K
    C = torch.empty((n, n), dtype=acc)
    for c0 in range(0, d, step):
        Xc = _shifted_chunk(x, shift, c0, min(d, c0 + step), acc)
        _call(fn, Xc, C, 0.0 if c0 == 0 else 1.0)
        del Xc
    # Mirror the lower triangle; the upper one was never written (whatever it holds is not read).
    return torch.where(_upper_mask(n), C.T, C)


def shifted_matmul(G: torch.Tensor, x: torch.Tensor, shift: torch.Tensor, scale, out_dtype: torch.dtype) -> torch.Tensor:
    """``scale * G @ (x - shift)`` as an (n, d) tensor of ``out_dtype``, formed in column chunks.

    The product is one GEMM per chunk written straight into its column slice of the output (a
    strided BLAS destination), so the only transient is one shifted chunk.
    """
    acc = shift.dtype
    n, d = x.shape
    Gs = G * scale
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
