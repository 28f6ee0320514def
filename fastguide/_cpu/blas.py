"""ctypes bindings of the BLAS entry points the CPU Gram path uses, each verified before first use.

* MKL's ``mkl_blas_ssyrk`` / ``mkl_blas_dsyrk``, exported by torch's CPU wheel from
  ``libtorch_cpu.so``: they run on torch's own OpenMP pool, so they interleave with torch ops
  without the OpenBLAS thread fight of DESIGN.md section 6;
* SciPy's OpenBLAS ``?syrk``, ``?omatcopy`` and LAPACK ``?lacpy`` plus
  ``openblas_set_num_threads_local`` (OpenBLAS >= 0.3.27), for the single-threaded layer workers;
* the ``omp_set_num_threads`` of the OpenMP runtime torch runs on.

A missing symbol or a failed self-test leaves that binding out (callers fall back to ``torch.mm``).
Fortran integers are passed by reference as int64, which reads as the same value under an LP64
interface for sizes < 2^31 on little-endian CPUs. Measurements: docs/cpu-path.md.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading

import torch

from .. import _config

__all__ = ["mkl_syrk", "syrk_available", "openblas", "omp_set_num_threads", "syrk", "blas_mirror"]

_lock = threading.Lock()
_OMP_SET = None


def _once(find):
    """``find()`` run on the first call only, under the lock (concurrent first callers wait for it); later
    calls return its result."""
    result = None

    @functools.wraps(find)
    def load():
        nonlocal result
        if result is None:
            with _lock:
                if result is None:
                    result = find()
        return result

    return load


def syrk(fn, X: torch.Tensor, C: torch.Tensor, beta: float) -> None:
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


def _syrk_self_test(fn, dt: torch.dtype) -> bool:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(37, 53, generator=g, dtype=dt)
    C = torch.full((37, 37), float("nan"), dtype=dt)
    try:
        syrk(fn, X[:, :20].contiguous(), C, 0.0)
        syrk(fn, X[:, 20:].contiguous(), C, 1.0)
    except Exception:  # pragma: no cover - depends on the torch build
        return False
    ref = (X.double() @ X.double().T).tril()
    got = C.tril().double()
    return bool(torch.isfinite(got).all()) and bool(
        ((got - ref).abs().max() <= 1e-3 * ref.abs().max()).item()
    )


@_once
def _load_mkl() -> dict:
    """{torch.float32: fn, torch.float64: fn} of verified MKL syrk entry points (possibly empty)."""
    found: dict = {}
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        for dt, name in ((torch.float32, "mkl_blas_ssyrk"), (torch.float64, "mkl_blas_dsyrk")):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype = None
                found[dt] = fn
    except OSError:
        found = {}
    for dt in list(found):
        if not _syrk_self_test(found[dt], dt):
            del found[dt]
    return found


def mkl_syrk(dtype: torch.dtype):
    """MKL's verified ``?syrk`` for ``dtype``, or None (absent, failed its self-test, or switched off)."""
    if _config.get().cpu_syrk == "off":
        return None
    return _load_mkl().get(dtype)


def syrk_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether CPU Grams of ``dtype`` may use MKL's ``syrk`` here (found, verified, not switched off)."""
    return mkl_syrk(dtype) is not None


def _symbol(lib, names: list[str]):
    for name in names:
        fn = getattr(lib, name, None)
        if fn is not None:
            return fn
    return None


def _names(base: str) -> list[str]:
    return [f"scipy_{base}", base, f"scipy_{base}64_", f"{base}64_"]


def blas_mirror(fns, K: torch.Tensor, scratch: torch.Tensor) -> None:
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
        blas_mirror((om, la), K, torch.empty_like(K))
    except Exception:  # pragma: no cover - depends on the library
        return False
    return bool(torch.equal(K, want))


@_once
def _load_openblas() -> dict:
    """``{dtype: syrk, ("mirror", dtype): (omatcopy, lacpy), "local": set_num_threads_local}`` or {}."""
    found: dict = {}
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
        local = _symbol(lib, ["openblas_set_num_threads_local", "scipy_openblas_set_num_threads_local"])
        if local is None:
            continue
        local.restype = ctypes.c_int
        local.argtypes = [ctypes.c_int]
        for dt, c in ((torch.float32, "s"), (torch.float64, "d")):
            fn = _symbol(lib, _names(f"{c}syrk_"))
            if fn is not None:
                fn.restype = None
                if _syrk_self_test(fn, dt):
                    found[dt] = fn
            # The mirror in BLAS too: torch-op mirrors in two workers at once fight over the GIL.
            om, la = _symbol(lib, _names(f"{c}omatcopy_")), _symbol(lib, _names(f"{c}lacpy_"))
            if dt in found and om is not None and la is not None:
                om.restype = la.restype = None
                if _mirror_self_test(om, la, dt):
                    found[("mirror", dt)] = (om, la)
        if found:
            found["local"] = local
            break
    return found


def openblas() -> dict:
    """SciPy's verified OpenBLAS entry points (see :func:`_load_openblas`), or {} when absent or
    switched off (``cpu_openblas=False``). Used by the single-threaded layer workers only."""
    if not _config.get().cpu_openblas:
        return {}
    return _load_openblas()


def omp_set_num_threads():
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
