"""Gram numerics of one layer: ``K = (x - shift)(x - shift)^T`` with half the flops where it pays.

Two routes (docs/cpu-path.md has the measurements behind every threshold here):

* raw: the product of the raw x (no copy) when x is C-contiguous in the accumulation dtype and its
  offset is small against its spread (:func:`rho_max`, checked on the first rows before and exactly
  on the Gram after); the shift is then applied as an exact rank-2 correction taken from the Gram;
* shifted: the shifted features formed in column chunks of at most ``CHUNK_ELEMS`` elements and
  accumulated, so the transient is one chunk, never a copy of the activation.

Either route runs ``syrk`` (one triangle, then a mirror) or ``torch.mm``, by the fixed rule of
:func:`syrk_for`. Used on every device; only CPU tensors reach the BLAS bindings.
"""

from __future__ import annotations

import math
import threading

import torch

from .. import _config
from .._utils import SHIFT_ROWS
from .blas import blas_mirror, mkl_syrk, openblas, syrk

__all__ = ["sym_gram", "shifted_matmul", "syrk_for", "rho_max", "CHUNK_ELEMS"]

#: Largest shifted-feature chunk (elements) formed at once: 1 Mi elements = 4 MiB in fp32.
CHUNK_ELEMS = 1 << 20
#: Never make chunks narrower than this many columns (GEMM efficiency along the reduction dim).
MIN_CHUNK_COLS = 512
#: Raw route allowed while the offset energy n ||mu||^2 is at most this multiple of the centred energy.
RHO_MAX = 4.0
#: ... and at most ``RHO_SQRT_D / sqrt(d)`` (the raw route's rounding also grows with the width).
RHO_SQRT_D = 1000.0
#: Below this n^2 d a single-layer product uses ``torch.mm``: syrk's fixed cost outweighs its saving.
SYRK_MIN_WORK = 1 << 27


# --------------------------------------------------------------------------- which product
def syrk_for(dtype: torch.dtype, n: int, d: int, threads: int, worker: bool = False):
    """The ``syrk`` entry point for an (n, d) product run on ``threads`` threads, or None (``torch.mm``).

    The fixed rule of docs/cpu-path.md, no timing: never when ``4 d < n`` (the mirror costs more than
    the half product saves); with ``cpu_syrk="auto"`` only single-threaded (one torch thread, or a layer
    worker: where syrk beats ``X @ X.T``, while threaded MKL syrk loses to its GEMM); ``"on"`` whenever
    the shape allows, ``"off"`` never. Workers (``worker=True``) prefer SciPy's OpenBLAS. Callers on
    the single-layer path add ``n^2 d >= SYRK_MIN_WORK``.
    """
    mode = _config.get().cpu_syrk
    if mode == "off" or 4 * d < n or (mode == "auto" and threads > 1):
        return None
    return (openblas().get(dtype) if worker else None) or mkl_syrk(dtype)


# --------------------------------------------------------------------------- the offset checks
def rho_max(d: int) -> float:
    """Largest offset ratio the raw route accepts for a layer of width d (see ``RHO_MAX``)."""
    return min(RHO_MAX, RHO_SQRT_D / math.sqrt(max(d, 1)))


def offset_terms(K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From raw Grams K (..., n, n) of x with shift mu = mean of the first m0 = min(n, 32) rows:
    ``u = x mu - ||mu||^2 / 2`` (..., n), ``||mu||^2`` (...) and the trace of the shifted Gram
    ``tr(K) - 2 sum(u)`` (...), for the exact offset check on all rows (the first rows could be
    unrepresentative) and the rank-2 shift correction ``K - u 1^T - 1 u^T``."""
    m0 = min(K.shape[-1], SHIFT_ROWS)
    v = K[..., :m0].mean(dim=-1)  # x mu
    mu2 = v[..., :m0].mean(dim=-1)  # mu^T mu
    u = v - 0.5 * mu2.unsqueeze(-1)
    return u, mu2, K.diagonal(dim1=-2, dim2=-1).sum(-1) - 2.0 * u.sum(-1)


def raw_ok(x: torch.Tensor, shift: torch.Tensor) -> bool:
    """Cheap pre-check from the first rows: is ``||mu||^2 <= rho_max(d) * (mean sq. distance to mu)``?

    ``shift`` is the mean ``mu`` of the first ``min(n, 32)`` rows, so their mean squared distance to it
    is ``mean ||x_r||^2 - ||mu||^2`` (cancellation there only makes a large offset look larger: safe).
    A host read on a CPU tensor (no device sync); never called for other devices.
    """
    m0 = min(x.shape[0], SHIFT_ROWS)
    off = float(shift.square().sum())
    head = float(torch.linalg.vector_norm(x[:m0], dtype=shift.dtype).square()) / m0
    return off <= rho_max(x.shape[1]) * (head - off)


def can_raw(x: torch.Tensor, acc: torch.dtype) -> bool:
    """Whether the raw route may read x as it is: a C-contiguous CPU matrix in the accumulation dtype."""
    return (
        x.device.type == "cpu"
        and x.dtype == acc
        and x.dim() == 2
        and x.stride(1) == 1
        and x.stride(0) == x.shape[1]
    )


# --------------------------------------------------------------------------- the mirror
_MASKS: dict[int, torch.Tensor] = {}
_SCRATCH = threading.local()


def _upper_mask(n: int) -> torch.Tensor:
    m = _MASKS.get(n)
    if m is None:
        m = torch.ones(n, n, dtype=torch.bool).triu_(1)
        if len(_MASKS) > 16:
            _MASKS.clear()
        _MASKS[n] = m
    return m


def _scratch(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread (n, n) buffer for the mirror (n <= 1024: at most 4 MiB fp32 kept per thread)."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.shape[0] != n or buf.dtype != dtype:
        buf = _SCRATCH.buf = torch.empty((n, n), dtype=dtype)
    return buf


def mirror_lower_(C: torch.Tensor, tile: int = 256) -> torch.Tensor:
    """Copy the lower triangle of a row-major (n, n) C onto its upper one, in place.

    Two BLAS/LAPACK calls through a per-thread scratch for 64 <= n <= 1024 when SciPy's OpenBLAS is
    there (no GIL, no torch dispatch), else tile by tile in torch (transposed reads stay in cache).
    """
    n = C.shape[0]
    fns = openblas().get(("mirror", C.dtype)) if 64 <= n <= 1024 and C.is_contiguous() else None
    if fns is not None:
        blas_mirror(fns, C, _scratch(n, C.dtype))
        return C
    for i0 in range(0, n, tile):
        i1 = min(n, i0 + tile)
        d = C[i0:i1, i0:i1]
        d.copy_(torch.where(_upper_mask(i1 - i0), d.T, d))
        for j0 in range(i1, n, tile):
            j1 = min(n, j0 + tile)
            C[i0:i1, j0:j1].copy_(C[j0:j1, i0:i1].T)
    return C


# --------------------------------------------------------------------------- the products
def _chunk_cols(n: int) -> int:
    return max(MIN_CHUNK_COLS, CHUNK_ELEMS // max(n, 1))


def _shifted_chunk(x: torch.Tensor, shift: torch.Tensor, c0: int, c1: int, acc: torch.dtype) -> torch.Tensor:
    """C-contiguous ``x[:, c0:c1] - shift[c0:c1]`` in the accumulation dtype (any strides of x)."""
    out = torch.empty((x.shape[0], c1 - c0), dtype=acc, device=x.device)
    return torch.sub(x[:, c0:c1], shift[c0:c1], out=out)


def raw_gram(x: torch.Tensor, K: torch.Tensor, fn) -> torch.Tensor:
    """``x x^T`` of the raw x into K: ``syrk`` (``fn``) + mirror, or ``torch.mm`` when fn is None."""
    if fn is None:
        return torch.mm(x, x.T, out=K)
    syrk(fn, x, K, 0.0)
    return mirror_lower_(K)


def shifted_gram(x: torch.Tensor, shift: torch.Tensor, out: torch.Tensor | None, fn) -> torch.Tensor:
    """``(x - shift)(x - shift)^T``, the shifted features formed in column chunks (never a full copy).

    ``fn``: a syrk entry point (accumulated with ``beta = 1``, then mirrored) or None for ``torch.mm``.
    """
    acc = shift.dtype
    n, d = x.shape
    step = _chunk_cols(n)
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
        syrk(fn, Xc, K, 0.0 if c0 == 0 else 1.0)
        del Xc
    return mirror_lower_(K)


def sym_gram(
    x: torch.Tensor,
    shift: torch.Tensor,
    out: torch.Tensor | None = None,
    centring_only: bool = False,
    sq: list | None = None,
) -> torch.Tensor:
    """``K = (x - shift)(x - shift)^T`` in ``shift.dtype`` (the accumulation dtype), full (n, n).

    ``x`` is (n, d) of any float dtype and strides; ``shift`` is (d,) in the accumulation dtype
    (:func:`fastguide._utils.shift_of`). ``out`` (optional, (n, n) of ``shift.dtype``) receives the
    result. No autograd (the ops have an analytic backward). ``centring_only=True``: the caller only
    uses ``H K H``, ``U(K)`` or pairwise distances, which are exactly invariant to the rank-2 shift
    terms ``a 1^T + 1 a^T``, so the raw route skips that correction (two passes over K fewer).

    The raw route runs when it saves flops (syrk) or memory (``d >= n``: a shifted copy would outweigh
    the Gram); small ``d < n`` without syrk keeps the shifted path (one chunk + one GEMM).

    ``sq`` (optional list): receives ``||x||_F^2`` (0-d, accumulation dtype) -- the trace of the raw
    Gram on the raw route (no extra pass over x), ``vector_norm`` otherwise.
    """
    acc = shift.dtype
    n, d = x.shape
    if out is not None and (out.dtype != acc or not out.is_contiguous()):
        return out.copy_(sym_gram(x, shift))
    fn = None
    if x.device.type == "cpu" and n * n * d >= SYRK_MIN_WORK:
        fn = syrk_for(acc, n, d, torch.get_num_threads())
    if (fn is not None or d >= n) and can_raw(x, acc) and raw_ok(x, shift):
        K = out if out is not None else torch.empty((n, n), dtype=acc, device=x.device)
        raw_gram(x, K, fn)
        u, _, tr_shifted = offset_terms(K)
        if float(n * shift.square().sum()) <= rho_max(d) * float(tr_shifted):
            if sq is not None:
                sq.append(K.diagonal().sum())
            if not centring_only:
                K.sub_(u.unsqueeze(1)).sub_(u.unsqueeze(0))
            return K
    if sq is not None:
        sq.append(torch.linalg.vector_norm(x, dtype=acc).square())
    return shifted_gram(x, shift, out, fn)


def shifted_matmul(
    G: torch.Tensor, x: torch.Tensor, shift: torch.Tensor, scale, out_dtype: torch.dtype
) -> torch.Tensor:
    """``scale * G @ (x - shift)`` as an (n, d) tensor of ``out_dtype``, for a G with zero row sums.

    ``G`` is scaled in place (it is the caller's scratch buffer). ``G 1 = 0`` (a combination of
    centred Grams), so ``G (x - 1 mu^T) = G x`` exactly; the shift only matters for rounding. Under
    the offset test of :func:`sym_gram` (CPU), one GEMM on the raw x; otherwise one GEMM per column
    chunk of the shifted features, written straight into its column slice of the output.
    """
    acc = shift.dtype
    n, d = x.shape
    Gs = G.mul_(scale)
    if d >= n and can_raw(x, acc) and out_dtype == acc and raw_ok(x, shift):
        return Gs @ x
    step = _chunk_cols(n)
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
