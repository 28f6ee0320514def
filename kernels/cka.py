"""Pair inner products of the stored centred Grams: ``HSIC`` numerators for all or selected pairs.

With ``C_a`` the normalised centred Grams of :func:`fastguide.kernels.gram.gram_fwd`,
``HSIC(a, b) = <C_a, C_b>_F / N``. These launchers return the un-divided inner products
``<A[i], B[j]>_F`` in the accumulation dtype; the CKA epilogue
(``hsic / (sqrt(h_a) sqrt(h_b))``, exactly 0 for degenerate layers) is the caller's
``cka_from_hsic`` on the (P,) or (La, Lb) result.

* :func:`hsic_matrix`: all La x Lb pairs in one pass over the Gram tiles -- a GEMM over the
  flattened n*n axis, split across programs into per-program partials summed on the host
  (deterministic, no atomics).
* :func:`hsic_pairs`: selected pairs (the loss's mapped pairs); one program per (pair, chunk of the
  n*n axis), elementwise fp32/fp64 products (no TF32), per-program partials.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import input_precision, on_input_device, pow2_bucket, tl_dtype
from ._configs import hsic_chunks, hsic_matrix_configs, hsic_pairs_block


@triton.autotune(configs=hsic_matrix_configs(), key=["LA", "LB", "NUMEL_BUCKET"])
@triton.jit(do_not_specialize=["n", "numel", "chunk"])
def _hsic_matrix_fwd_kernel(
    out_ptr,
    a_ptr,
    b_ptr,
    stride_a0,
    stride_a1,
    stride_a2,
    stride_b0,
    stride_b1,
    stride_b2,
    n,
    numel,
    chunk,
    LA,
    LB,
    NUMEL_BUCKET,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    A_FLAT: tl.constexpr,
    B_FLAT: tl.constexpr,
    ACC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Partial all-pairs products ``out[c, i, j] = sum_{p in chunk c} A[i].flat[p] * B[j].flat[p]``.

    Pointers:
      out_ptr: (num_chunks, LA, LB) per-program partials (summed over chunks on the host).
      a_ptr: (LA, n, n) with strides (stride_a0, stride_a1, stride_a2); b_ptr: (LB, n, n) likewise.
      A_FLAT / B_FLAT: the last two dims are contiguous (flat position p = i*n + j is the offset).
    Grid: (num_chunks, cdiv(LA, BLOCK_A), cdiv(LB, BLOCK_B)); chunk c covers flat positions
    [c*chunk, min((c+1)*chunk, n*n)). Each program reads its chunk of BLOCK_A + BLOCK_B matrices
    once and accumulates the BLOCK_A x BLOCK_B outer products with tl.dot.
    """
    pid_c = tl.program_id(0).to(tl.int64)
    pid_a = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A).to(tl.int64)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    mask_a = offs_a < LA
    mask_b = offs_b < LB
    start = pid_c * chunk
    end = tl.minimum(start + chunk, numel)
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=ACC)
    for k in range(start, end, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < end
        if A_FLAT:
            col_a = offs_k
        else:
            col_a = (offs_k // n) * stride_a1 + (offs_k % n) * stride_a2
        if B_FLAT:
            col_b = offs_k
        else:
            col_b = (offs_k // n) * stride_b1 + (offs_k % n) * stride_b2
        a = tl.load(
            a_ptr + offs_a[:, None] * stride_a0 + col_a[None, :],
            mask=mask_a[:, None] & mask_k[None, :],
            other=0.0,
        ).to(ACC)  # (BLOCK_A, BLOCK_K)
        b = tl.load(
            b_ptr + offs_b[:, None] * stride_b0 + col_b[None, :],
            mask=mask_b[:, None] & mask_k[None, :],
            other=0.0,
        ).to(ACC)  # (BLOCK_B, BLOCK_K)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=INPUT_PRECISION, out_dtype=ACC)
    out = out_ptr + pid_c * LA * LB + offs_a[:, None] * LB + offs_b[None, :]
    tl.store(out, acc, mask=mask_a[:, None] & mask_b[None, :])


@triton.jit(do_not_specialize=["n", "numel", "chunk", "num_pairs", "LA", "LB"])
def _hsic_pairs_fwd_kernel(
    out_ptr,
    a_ptr,
    b_ptr,
    pi_ptr,
    pj_ptr,
    stride_a0,
    stride_a1,
    stride_a2,
    stride_b0,
    stride_b1,
    stride_b2,
    n,
    numel,
    chunk,
    num_pairs,
    LA,
    LB,
    BLOCK_K: tl.constexpr,
    A_FLAT: tl.constexpr,
    B_FLAT: tl.constexpr,
    ACC: tl.constexpr,
):
    """Partial pair products ``out[c, p] = sum_{q in chunk c} A[pi[p]].flat[q] * B[pj[p]].flat[q]``.

    Pointers:
      out_ptr: (num_chunks, P) per-program partials (summed over chunks on the host).
      a_ptr: (LA, n, n), b_ptr: (LB, n, n) with their strides; pi_ptr, pj_ptr: (P,) int64 indices.
        An index outside [0, LA) / [0, LB) contributes 0 (never an out-of-bounds read).
    Grid: (P, num_chunks); pairs vary fastest so the programs of one chunk run together and share
    its tiles through the cache.
    """
    pid_p = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    ia = tl.load(pi_ptr + pid_p).to(tl.int64)
    jb = tl.load(pj_ptr + pid_p).to(tl.int64)
    valid = (ia >= 0) & (ia < LA) & (jb >= 0) & (jb < LB)
    ia = tl.minimum(tl.maximum(ia, 0), LA - 1)
    jb = tl.minimum(tl.maximum(jb, 0), LB - 1)
    start = pid_c * chunk
    end = tl.minimum(start + chunk, numel)
    acc = tl.zeros((BLOCK_K,), dtype=ACC)
    for k in range(start, end, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < end
        if A_FLAT:
            col_a = offs_k
        else:
            col_a = (offs_k // n) * stride_a1 + (offs_k % n) * stride_a2
        if B_FLAT:
            col_b = offs_k
        else:
            col_b = (offs_k // n) * stride_b1 + (offs_k % n) * stride_b2
        a = tl.load(a_ptr + ia * stride_a0 + col_a, mask=mask_k, other=0.0).to(ACC)  # (BLOCK_K,)
        b = tl.load(b_ptr + jb * stride_b0 + col_b, mask=mask_k, other=0.0).to(ACC)  # (BLOCK_K,)
        acc += a * b
    total = tl.where(valid, tl.sum(acc, axis=0), 0.0)
    tl.store(out_ptr + pid_c * num_pairs + pid_p, total)


@triton.jit(do_not_specialize=["num_chunks", "num_out", "LA", "LB", "n"])
def _cka_epilogue_kernel(
    cka_ptr,
    hsic_ptr,
    part_ptr,
    ha_ptr,
    hb_ptr,
    oka_ptr,
    okb_ptr,
    pi_ptr,
    pj_ptr,
    num_chunks,
    num_out,
    LA,
    LB,
    n,
    BLOCK: tl.constexpr,
    MATRIX: tl.constexpr,
    UNBIASED: tl.constexpr,
):
    """Deterministic sum of the chunk partials fused with the CKA epilogue (DESIGN.md section 2).

    ``hsic[q] = sum_c part[c, q] / N``; ``cka[q] = hsic[q] / (sqrt(h_a) sqrt(h_b))`` with two
    separate square roots, exactly 0 when either layer is degenerate (or an index is out of range).
    Pointers:
      cka_ptr, hsic_ptr: (num_out,) outputs in ACC; part_ptr: (num_chunks, num_out) partials.
      ha_ptr (LA,), hb_ptr (LB,): self-HSICs ``<C, C> / N`` of A's and B's layers.
      oka_ptr (LA,), okb_ptr (LB,): bool flags. pi_ptr, pj_ptr: (num_out,) pair indices
        (unused with MATRIX, where q = i * LB + j).
    Grid: (cdiv(num_out, BLOCK),).
    """
    pid = tl.program_id(0).to(tl.int64)
    ACC = hsic_ptr.dtype.element_ty
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < num_out
    acc = tl.zeros((BLOCK,), dtype=ACC)
    for c in range(0, num_chunks):
        acc += tl.load(part_ptr + c * num_out + offs, mask=mask, other=0.0)
    nf = n.to(ACC)
    if UNBIASED:
        N = nf * (nf - 3.0)
    else:
        N = (nf - 1.0) * (nf - 1.0)
    hs = acc / N
    if MATRIX:
        ia = offs // LB
        jb = offs % LB
    else:
        ia = tl.load(pi_ptr + offs, mask=mask, other=0).to(tl.int64)
        jb = tl.load(pj_ptr + offs, mask=mask, other=0).to(tl.int64)
    valid = (ia >= 0) & (ia < LA) & (jb >= 0) & (jb < LB) & mask
    ia = tl.minimum(tl.maximum(ia, 0), LA - 1)
    jb = tl.minimum(tl.maximum(jb, 0), LB - 1)
    ha = tl.load(ha_ptr + ia, mask=mask, other=1.0).to(ACC)
    hb = tl.load(hb_ptr + jb, mask=mask, other=1.0).to(ACC)
    oka = tl.load(oka_ptr + ia, mask=mask, other=0) != 0
    okb = tl.load(okb_ptr + jb, mask=mask, other=0) != 0
    ra = tl.sqrt(tl.where(oka, ha, 1.0))
    rb = tl.sqrt(tl.where(okb, hb, 1.0))
    cka = tl.where((oka & okb & valid) != 0, hs / (ra * rb), 0.0)
    tl.store(hsic_ptr + offs, hs, mask=mask)
    tl.store(cka_ptr + offs, cka, mask=mask)


def _check_stack(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() != 3 or t.shape[1] != t.shape[2] or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (L, n, n) stack of Grams; got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float16, torch.float32, torch.float64):
        raise TypeError(f"{name} must be float16, float32 or float64; got {t.dtype}")
    return t


def _check_pair(A: torch.Tensor, B: torch.Tensor) -> None:
    _check_stack(A, "A")
    _check_stack(B, "B")
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"A and B must have the same n; got {A.shape[1]} and {B.shape[1]}")
    if A.dtype != B.dtype:
        raise TypeError(f"A and B must have one dtype; got {A.dtype} and {B.dtype}")
    if A.device != B.device:
        raise ValueError(f"A and B must be on one device; got {A.device} and {B.device}")


def _is_flat(t: torch.Tensor) -> bool:
    n = t.shape[1]
    return t.stride(2) == 1 and (t.stride(1) == n or n == 1)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _matrix_partials(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """(num_chunks, La, Lb) partial products of :func:`hsic_matrix` (inputs already checked)."""
    La, n, _ = A.shape
    Lb = B.shape[0]
    acc = _acc(A.dtype)
    numel = n * n
    granule = max(c.kwargs["BLOCK_K"] for c in hsic_matrix_configs())
    BA = max(16, min(64, triton.next_power_of_2(La)))
    BB = max(16, min(64, triton.next_power_of_2(Lb)))
    nch = hsic_chunks(numel, granule)
    chunk = triton.cdiv(triton.cdiv(numel, nch), granule) * granule
    nch = triton.cdiv(numel, chunk)
    part = torch.empty((nch, La, Lb), dtype=acc, device=A.device)
    grid = (nch, triton.cdiv(La, BA), triton.cdiv(Lb, BB))
    _hsic_matrix_fwd_kernel[grid](
        part,
        A,
        B,
        A.stride(0),
        A.stride(1),
        A.stride(2),
        B.stride(0),
        B.stride(1),
        B.stride(2),
        n,
        numel,
        chunk,
        La,
        Lb,
        pow2_bucket(numel),
        BLOCK_A=BA,
        BLOCK_B=BB,
        A_FLAT=_is_flat(A),
        B_FLAT=_is_flat(B),
        ACC=tl_dtype(acc),
        INPUT_PRECISION=input_precision(A.dtype),
    )
    return part


@on_input_device
def hsic_matrix(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """All-pairs Frobenius products ``out[i, j] = <A[i], B[j]>_F`` (no 1/N).

    Args: A (La, n, n), B (Lb, n, n), one float dtype, one device, any strides.
    Returns (La, Lb) in the accumulation dtype (fp64 for fp64, else fp32). One launch plus a
    deterministic host-side sum of the per-program partials. The dot honours
    ``torch.get_float32_matmul_precision()`` ("highest" -> IEEE fp32).
    """
    _check_pair(A, B)
    part = _matrix_partials(A, B)
    return part.sum(dim=0) if part.shape[0] > 1 else part[0]


@on_input_device
def hsic_pairs(A: torch.Tensor, B: torch.Tensor, pi: torch.Tensor, pj: torch.Tensor) -> torch.Tensor:
    """Selected-pair Frobenius products ``out[p] = <A[pi[p]], B[pj[p]]>_F`` (no 1/N).

    Args: A (La, n, n), B (Lb, n, n) (one float dtype and device, any strides); pi, pj (P,) integer
    tensors on the same device. Indices are not range-checked on the host (that would sync); an
    out-of-range index yields 0 for its pair.
    Returns (P,) in the accumulation dtype. Exact elementwise products (no TF32).
    """
    _check_pair(A, B)
    _check_index(A, pi, pj)
    if pi.shape[0] == 0:
        return torch.zeros((0,), dtype=_acc(A.dtype), device=A.device)
    part = _pairs_partials(A, B, pi, pj)
    return part.sum(dim=0) if part.shape[0] > 1 else part[0]


def _check_index(A: torch.Tensor, pi, pj) -> None:
    for name, t in (("pi", pi), ("pj", pj)):
        if (
            not isinstance(t, torch.Tensor)
            or t.dim() != 1
            or t.dtype.is_floating_point
            or t.dtype == torch.bool
        ):
            raise TypeError(f"{name} must be a 1-D integer tensor")
        if t.device != A.device:
            raise ValueError(f"{name} must be on {A.device}; got {t.device}")
    if pi.shape != pj.shape:
        raise ValueError(f"pi and pj must have the same length; got {pi.shape[0]} and {pj.shape[0]}")


def _pairs_partials(A: torch.Tensor, B: torch.Tensor, pi: torch.Tensor, pj: torch.Tensor) -> torch.Tensor:
    """(num_chunks, P) partial products of :func:`hsic_pairs` (inputs already checked, P > 0)."""
    La, n, _ = A.shape
    Lb = B.shape[0]
    P = pi.shape[0]
    acc = _acc(A.dtype)
    numel = n * n
    BK = hsic_pairs_block()
    nch = hsic_chunks(numel, BK)
    chunk = triton.cdiv(triton.cdiv(numel, nch), BK) * BK
    nch = triton.cdiv(numel, chunk)
    part = torch.empty((nch, P), dtype=acc, device=A.device)
    _hsic_pairs_fwd_kernel[(P, nch)](
        part,
        A,
        B,
        pi,
        pj,
        A.stride(0),
        A.stride(1),
        A.stride(2),
        B.stride(0),
        B.stride(1),
        B.stride(2),
        n,
        numel,
        chunk,
        P,
        La,
        Lb,
        BLOCK_K=BK,
        A_FLAT=_is_flat(A),
        B_FLAT=_is_flat(B),
        ACC=tl_dtype(acc),
    )
    return part


def _check_self(h, ok, L: int, acc: torch.dtype, device, name: str) -> None:
    if not isinstance(h, torch.Tensor) or h.shape != (L,) or h.dtype != acc:
        raise ValueError(f"h_{name} must be a ({L},) tensor of dtype {acc}")
    if not isinstance(ok, torch.Tensor) or ok.shape != (L,) or ok.dtype != torch.bool:
        raise ValueError(f"ok_{name} must be a ({L},) bool tensor")
    if h.device != device or ok.device != device:
        raise ValueError(f"h_{name} and ok_{name} must be on {device}")


def _epilogue(part, h_a, h_b, ok_a, ok_b, pi, pj, n, La, Lb, estimator, matrix: bool):
    if estimator not in ("unbiased", "biased"):
        raise ValueError(f"estimator must be 'unbiased' or 'biased'; got {estimator!r}")
    num_chunks = part.shape[0]
    num_out = part[0].numel()
    cka = torch.empty((num_out,), dtype=part.dtype, device=part.device)
    hsic = torch.empty((num_out,), dtype=part.dtype, device=part.device)
    BLOCK = min(1024, triton.next_power_of_2(num_out))
    _cka_epilogue_kernel[(triton.cdiv(num_out, BLOCK),)](
        cka,
        hsic,
        part,
        h_a,
        h_b,
        ok_a,
        ok_b,
        pi if pi is not None else ok_a,
        pj if pj is not None else ok_a,
        num_chunks,
        num_out,
        La,
        Lb,
        n,
        BLOCK=BLOCK,
        MATRIX=matrix,
        UNBIASED=estimator == "unbiased",
    )
    return cka, hsic


@on_input_device
def cka_pairs(
    A: torch.Tensor,
    B: torch.Tensor,
    h_a: torch.Tensor,
    h_b: torch.Tensor,
    ok_a: torch.Tensor,
    ok_b: torch.Tensor,
    pi: torch.Tensor,
    pj: torch.Tensor,
    estimator: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CKA of selected pairs with the epilogue fused: returns ``(cka (P,), hsic (P,))``.

    ``hsic[p] = <A[pi[p]], B[pj[p]]> / N`` and ``cka[p] = hsic[p] / (sqrt(h_a[pi]) sqrt(h_b[pj]))``,
    exactly 0 when ``ok_a[pi] & ok_b[pj]`` is False (what the torch backend's ``cka_from_hsic``
    computes). A, B: (La, n, n), (Lb, n, n) normalised centred Grams; h_*, ok_*: their self-HSICs
    and flags from :func:`fastguide.kernels.gram.gram_fwd`. Two launches, no torch epilogue.
    """
    _check_pair(A, B)
    _check_index(A, pi, pj)
    La, n, _ = A.shape
    Lb = B.shape[0]
    acc = _acc(A.dtype)
    _check_self(h_a, ok_a, La, acc, A.device, "a")
    _check_self(h_b, ok_b, Lb, acc, A.device, "b")
    if pi.shape[0] == 0:
        empty = torch.zeros((0,), dtype=acc, device=A.device)
        return empty, empty.clone()
    part = _pairs_partials(A, B, pi, pj)
    return _epilogue(part, h_a, h_b, ok_a, ok_b, pi, pj, n, La, Lb, estimator, matrix=False)


@on_input_device
def cka_matrix(
    A: torch.Tensor,
    B: torch.Tensor,
    h_a: torch.Tensor,
    h_b: torch.Tensor,
    ok_a: torch.Tensor,
    ok_b: torch.Tensor,
    estimator: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-pairs CKA with the epilogue fused: returns ``(cka (La, Lb), hsic (La, Lb))``.

    Same quantities as :func:`cka_pairs` for every (i, j); the inner products come from the
    all-pairs GEMM of :func:`hsic_matrix`. Two launches, no torch epilogue.
    """
    _check_pair(A, B)
    La, n, _ = A.shape
    Lb = B.shape[0]
    acc = _acc(A.dtype)
    _check_self(h_a, ok_a, La, acc, A.device, "a")
    _check_self(h_b, ok_b, Lb, acc, A.device, "b")
    part = _matrix_partials(A, B)
    cka, hsic = _epilogue(part, h_a, h_b, ok_a, ok_b, None, None, n, La, Lb, estimator, matrix=True)
    return cka.view(La, Lb), hsic.view(La, Lb)


__all__ = ["hsic_matrix", "hsic_pairs", "cka_pairs", "cka_matrix"]
