"""Pair inner products of the stored centred Grams, and CKA with the epilogue fused in the same launch.

With ``C_a`` the normalised centred Grams of :func:`fastguide.kernels.gram.gram_fwd`,
``HSIC(a, b) = <C_a, C_b>_F / N`` and ``CKA(a, b) = HSIC(a, b) / (sqrt(h_a) sqrt(h_b))``, exactly 0
when either layer is degenerate (DESIGN.md section 2). Every launcher here is ONE launch: the
flattened n*n axis is split across programs, each program stores its partial product, and the
last program of each output (an arrival counter, :func:`fastguide.kernels._common._arrive`) sums
the partials in a fixed order and applies the epilogue -- deterministic, no float atomics, no
torch op afterwards.

* :func:`cka_pairs_fwd` -- selected pairs of a layer space of one or two stacks (the loss's
  pairs), elementwise fp32/fp64 products (never TF32): ``(cka (P,), hsic (P,))``.
* :func:`cka_matrix_fwd` -- all La x Lb pairs of two stacks, a GEMM over the flattened n*n axis
  (tensor cores for fp16 stacks and under TF32): ``(cka (La, Lb), hsic (La, Lb))``.
* :func:`hsic_pairs` / :func:`hsic_matrix` -- the raw inner products ``<A[i], B[j]>_F`` (no 1/N,
  no epilogue), two-sided indices; the same kernels without the epilogue.

Public ops these mirror (``fastguide``): ``cka_pairs``/``CKALoss`` use :func:`cka_pairs_fwd` and
:func:`fastguide.kernels.backward.cka_pairs_bwd`; ``cka_matrix`` uses :func:`cka_matrix_fwd`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._common import (
    _arrive,
    acc_dtype,
    arrival_counters,
    input_precision,
    on_input_device,
    pow2_bucket,
    tl_dtype,
)
from ._configs import (
    MATRIX_GRANULE,
    matrix_blocks,
    matrix_configs,
    pair_chunks,
    pairs_block,
    prune_matrix,
)
from ._tables import (
    _aligned_stacks,
    _check_index,
    _check_pair,
    _check_self,
    _check_space,
    _is_flat,
    _norm,
    check_pairs,
    pair_index,
)


@triton.jit
def _resolve(g, L1, L2, a_ptr, b_ptr, stride_a0, stride_b0, TWO_STACKS: tl.constexpr):
    """Layer ``g`` of the space [stack A (L1 layers), stack B (L2 layers)]: (its base pointer,
    whether g is in range). Without TWO_STACKS, ``g`` indexes A only."""
    if TWO_STACKS:
        in_a = g < L1
        gb = tl.minimum(tl.maximum(g - L1, 0), L2 - 1)
        ga = tl.minimum(tl.maximum(g, 0), L1 - 1)
        ptr = tl.where(in_a, a_ptr + ga * stride_a0, b_ptr + gb * stride_b0)
        valid = (g >= 0) & (g < L1 + L2)
    else:
        ga = tl.minimum(tl.maximum(g, 0), L1 - 1)
        ptr = a_ptr + ga * stride_a0
        valid = (g >= 0) & (g < L1)
    return ptr, valid


@triton.jit
def _self_hsic(g, L1, L2, ha_ptr, hb_ptr, oka_ptr, okb_ptr, TWO_STACKS: tl.constexpr):
    """(h, ok) of layer ``g`` of the same space (range-clamped; the caller masks invalid ones)."""
    if TWO_STACKS:
        in_a = g < L1
        ga = tl.minimum(tl.maximum(g, 0), L1 - 1)
        gb = tl.minimum(tl.maximum(g - L1, 0), L2 - 1)
        h = tl.where(in_a, tl.load(ha_ptr + ga), tl.load(hb_ptr + gb))
        ok = tl.where(in_a, tl.load(oka_ptr + ga) != 0, tl.load(okb_ptr + gb) != 0)
    else:
        ga = tl.minimum(tl.maximum(g, 0), L1 - 1)
        h = tl.load(ha_ptr + ga)
        ok = tl.load(oka_ptr + ga) != 0
    return h, ok


@triton.jit
def _cka_value(hs, h_i, h_j, ok_i, ok_j, valid):
    """CKA from the normalised HSIC and the two self-HSICs: two separate square roots, exactly 0
    for a degenerate layer or an invalid index (NaN still propagates through hs)."""
    ra = tl.sqrt(tl.where(ok_i, h_i, 1.0))
    rb = tl.sqrt(tl.where(ok_j, h_j, 1.0))
    return tl.where((ok_i & ok_j & valid) != 0, hs / (ra * rb), 0.0)


@triton.jit(do_not_specialize=["num_pairs", "num_chunks", "L1", "L2"])
def _cka_pairs_fwd_kernel(
    cka_ptr,
    hsic_ptr,
    part_ptr,
    cnt_ptr,
    a_ptr,
    b_ptr,
    pi_ptr,
    pj_ptr,
    ha_ptr,
    hb_ptr,
    oka_ptr,
    okb_ptr,
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
    num_chunks,
    L1,
    L2,
    inv_norm,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    FLAT: tl.constexpr,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
    GLOBAL: tl.constexpr,
    EPILOGUE: tl.constexpr,
    ACC: tl.constexpr,
):
    """Pair products ``hsic[p] = <X[pi[p]], Y[pj[p]]>_F * inv_norm`` and, with EPILOGUE, ``cka[p]``.

    Pointers:
      cka_ptr, hsic_ptr: (P,) outputs in ACC (cka only with EPILOGUE).
      part_ptr: (num_chunks, P) partial products; cnt_ptr: (P,) int32 arrival counters (0 on entry,
        left at 0).
      a_ptr (L1, n, n), b_ptr (L2, n, n): the stacks, with their strides; FLAT: both have
        contiguous last two dims (flat position q = i * n + j is the offset).
      pi_ptr, pj_ptr: (P,) integer layer indices. GLOBAL: both index the space [A, B] (B may be
        empty: L2 = 0 and b_ptr = a_ptr); otherwise pi indexes A and pj indexes B. An index out of
        range gives 0 for its pair (never an out-of-bounds read).
      ha_ptr/hb_ptr, oka_ptr/okb_ptr: (L1,)/(L2,) self-HSICs and bool flags of A's and B's layers
        (EPILOGUE only).
    Grid: (P, num_chunks); pairs vary fastest so the programs of one chunk run together and share
    its tiles through L2. The last of an output's num_chunks programs sums the partials in chunk
    order (deterministic) and writes the output.
    """
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    gi = tl.load(pi_ptr + pid_p).to(tl.int64)
    gj = tl.load(pj_ptr + pid_p).to(tl.int64)
    if GLOBAL:
        pa, va = _resolve(gi, L1, L2, a_ptr, b_ptr, stride_a0, stride_b0, True)
        pb, vb = _resolve(gj, L1, L2, a_ptr, b_ptr, stride_a0, stride_b0, True)
    else:
        pa, va = _resolve(gi, L1, L1, a_ptr, a_ptr, stride_a0, stride_a0, False)
        pb, vb = _resolve(gj, L2, L2, b_ptr, b_ptr, stride_b0, stride_b0, False)
    valid = va & vb
    end_all = numel
    if ALIGNED:
        # Host-checked: 16-byte aligned matrices of a multiple of VEC elements.
        pa = tl.multiple_of(pa, 16)
        pb = tl.multiple_of(pb, 16)
        end_all = tl.multiple_of(numel, VEC)
    start = pid_c.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, end_all)
    offs = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_K,), dtype=ACC)
    for k in range(start, end, BLOCK_K):
        mask = k + offs < end
        if FLAT:
            a = tl.load(pa + k + offs, mask=mask, other=0.0)
            b = tl.load(pb + k + offs, mask=mask, other=0.0)
        else:
            q = k + offs
            a = tl.load(pa + (q // n) * stride_a1 + (q % n) * stride_a2, mask=mask, other=0.0)
            b = tl.load(pb + (q // n) * stride_b1 + (q % n) * stride_b2, mask=mask, other=0.0)
        acc += a.to(ACC) * b.to(ACC)
    tl.store(part_ptr + pid_c * num_pairs + pid_p, tl.sum(acc, axis=0))
    if _arrive(cnt_ptr + pid_p, num_chunks):
        offs_c = tl.arange(0, BLOCK_P)
        tot = tl.zeros((BLOCK_P,), dtype=ACC)
        for c0 in range(0, num_chunks, BLOCK_P):
            m = c0 + offs_c < num_chunks
            tot += tl.load(
                part_ptr + (c0 + offs_c) * num_pairs + pid_p, mask=m, other=0.0, cache_modifier=".cg"
            )
        hs = tl.where(valid, tl.sum(tot, axis=0), 0.0) * inv_norm
        tl.store(hsic_ptr + pid_p, hs)
        if EPILOGUE:
            if GLOBAL:
                h_i, ok_i = _self_hsic(gi, L1, L2, ha_ptr, hb_ptr, oka_ptr, okb_ptr, True)
                h_j, ok_j = _self_hsic(gj, L1, L2, ha_ptr, hb_ptr, oka_ptr, okb_ptr, True)
            else:
                h_i, ok_i = _self_hsic(gi, L1, L1, ha_ptr, ha_ptr, oka_ptr, oka_ptr, False)
                h_j, ok_j = _self_hsic(gj, L2, L2, hb_ptr, hb_ptr, okb_ptr, okb_ptr, False)
            tl.store(cka_ptr + pid_p, _cka_value(hs, h_i.to(ACC), h_j.to(ACC), ok_i, ok_j, valid))
        tl.atomic_xchg(cnt_ptr + pid_p, 0)


@triton.autotune(
    configs=matrix_configs(),
    key=["LA_BUCKET", "LB_BUCKET", "NUMEL_BUCKET", "DOT_LOW", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": prune_matrix},
)
@triton.jit(do_not_specialize=["num_chunks", "LA", "LB", "LA_BUCKET", "LB_BUCKET", "NUMEL_BUCKET"])
def _cka_matrix_fwd_kernel(
    cka_ptr,
    hsic_ptr,
    part_ptr,
    cnt_ptr,
    a_ptr,
    b_ptr,
    ha_ptr,
    hb_ptr,
    oka_ptr,
    okb_ptr,
    stride_a0,
    stride_a1,
    stride_a2,
    stride_b0,
    stride_b1,
    stride_b2,
    n,
    numel,
    chunk,
    num_chunks,
    LA,
    LB,
    inv_norm,
    LA_BUCKET,
    LB_BUCKET,
    NUMEL_BUCKET,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    A_FLAT: tl.constexpr,
    B_FLAT: tl.constexpr,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
    EPILOGUE: tl.constexpr,
    ACC: tl.constexpr,
    DOT_LOW: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """All-pairs products ``hsic[i, j] = <A[i], B[j]>_F * inv_norm`` and, with EPILOGUE, ``cka[i, j]``.

    Pointers:
      cka_ptr, hsic_ptr: (LA, LB) outputs in ACC; part_ptr: (num_chunks, LA, LB) partials;
      cnt_ptr: (tiles,) int32 arrival counters, one per (BLOCK_A x BLOCK_B) output tile.
      a_ptr: (LA, n, n) with strides (stride_a0, stride_a1, stride_a2); b_ptr: (LB, n, n) likewise.
        A_FLAT / B_FLAT: contiguous last two dims. DOT_LOW: fp16 stacks dotted as fp16 (the products
        are exact in the fp32 accumulator), else operands in ACC with INPUT_PRECISION.
      ha_ptr (LA,), hb_ptr (LB,), oka_ptr, okb_ptr: self-HSICs and flags (EPILOGUE only).
    Grid: (num_chunks, cdiv(LA, BLOCK_A), cdiv(LB, BLOCK_B)); chunk c covers flat positions
    [c*chunk, min((c+1)*chunk, n*n)); each program reads its chunk of BLOCK_A + BLOCK_B matrices
    once and accumulates the outer products with tl.dot. The last program of each output tile sums
    the tile's partials in chunk order.
    """
    pid_c = tl.program_id(0)
    pid_a = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_a = offs_a < LA
    mask_b = offs_b < LB
    rows_a = a_ptr + offs_a.to(tl.int64) * stride_a0  # (BLOCK_A,) pointers
    rows_b = b_ptr + offs_b.to(tl.int64) * stride_b0
    end_all = numel
    if ALIGNED:
        rows_a = tl.multiple_of(rows_a, 16)
        rows_b = tl.multiple_of(rows_b, 16)
        end_all = tl.multiple_of(numel, VEC)
    start = pid_c.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, end_all)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=ACC)
    for k in range(start, end, BLOCK_K):
        q = k + offs_k
        mask_k = q < end
        if A_FLAT:
            col_a = q
        else:
            col_a = (q // n) * stride_a1 + (q % n) * stride_a2
        if B_FLAT:
            col_b = q
        else:
            col_b = (q // n) * stride_b1 + (q % n) * stride_b2
        a = tl.load(rows_a[:, None] + col_a[None, :], mask=mask_a[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(rows_b[:, None] + col_b[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0)
        if DOT_LOW:
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=ACC)
        else:
            acc = tl.dot(a.to(ACC), tl.trans(b.to(ACC)), acc, input_precision=INPUT_PRECISION, out_dtype=ACC)
    out_ij = offs_a[:, None] * LB + offs_b[None, :]  # (BLOCK_A, BLOCK_B)
    mask_ab = mask_a[:, None] & mask_b[None, :]
    nab = LA * LB
    tl.store(part_ptr + pid_c.to(tl.int64) * nab + out_ij, acc, mask=mask_ab)
    tile = pid_a * tl.num_programs(2) + pid_b
    if _arrive(cnt_ptr + tile, num_chunks):
        tot = tl.zeros((BLOCK_A, BLOCK_B), dtype=ACC)
        for c in range(0, num_chunks):
            tot += tl.load(part_ptr + c * nab + out_ij, mask=mask_ab, other=0.0, cache_modifier=".cg")
        hs = tot * inv_norm
        tl.store(hsic_ptr + out_ij, hs, mask=mask_ab)
        if EPILOGUE:
            ia = tl.minimum(offs_a, LA - 1)
            jb = tl.minimum(offs_b, LB - 1)
            h_a = tl.load(ha_ptr + ia).to(ACC)
            h_b = tl.load(hb_ptr + jb).to(ACC)
            ok_a = tl.load(oka_ptr + ia) != 0
            ok_b = tl.load(okb_ptr + jb) != 0
            cka = _cka_value(
                hs, h_a[:, None], h_b[None, :], ok_a[:, None], ok_b[None, :], mask_ab
            )  # (BLOCK_A, BLOCK_B)
            tl.store(cka_ptr + out_ij, cka, mask=mask_ab)
        tl.atomic_xchg(cnt_ptr + tile, 0)


# --------------------------------------------------------------------------- host side
def _chunking(numel: int, granule: int, programs: int) -> tuple[int, int]:
    """(chunk, number of chunks) of the flattened n*n axis: chunks are multiples of ``granule``."""
    nch = pair_chunks(numel, granule, programs)
    chunk = triton.cdiv(triton.cdiv(numel, nch), granule) * granule
    return chunk, triton.cdiv(numel, chunk)


def _outputs(shape: tuple, nch: int, acc: torch.dtype, device, epilogue: bool):
    """(partials (nch, *shape), hsic, cka) of a launch; cka is hsic itself without the epilogue."""
    part = torch.empty((nch, *shape), dtype=acc, device=device)
    hsic = torch.empty(shape, dtype=acc, device=device)
    cka = torch.empty(shape, dtype=acc, device=device) if epilogue else hsic
    return part, hsic, cka


def _stack_args(A: torch.Tensor, B: torch.Tensor, n: int, numel: int, chunk: int) -> tuple:
    """The launch arguments ``stride_a0 .. stride_b2, n, numel, chunk`` of both kernels."""
    return (*A.stride(), *B.stride(), n, numel, chunk)


def _epilogue_args(epilogue: bool, hsic, cnt, h1, h2, ok1, ok2) -> tuple:
    """``ha_ptr, hb_ptr, oka_ptr, okb_ptr``: without the epilogue, tensors of the launch stand in
    (the kernel does not read them)."""
    if epilogue:
        return h1, h2, ok1, ok2
    return hsic, hsic, cnt, cnt


def _pairs_launch(A, B, pi, pj, L1, L2, h1, h2, ok1, ok2, inv_norm, glob: bool, epilogue: bool):
    """One launch of ``_cka_pairs_fwd_kernel``; returns (cka or None, hsic)."""
    n = A.shape[1]
    P = pi.shape[0]
    acc = acc_dtype(A.dtype)
    numel = n * n
    BK = pairs_block()
    chunk, nch = _chunking(numel, BK, P)
    part, hsic, cka = _outputs((P,), nch, acc, A.device, epilogue)
    cnt = arrival_counters(A.device, P)
    flat = _is_flat(A) and _is_flat(B)
    _cka_pairs_fwd_kernel[(P, nch)](
        cka,
        hsic,
        part,
        cnt,
        A,
        B,
        pi,
        pj,
        *_epilogue_args(epilogue, hsic, cnt, h1, h2, ok1, ok2),
        *_stack_args(A, B, n, numel, chunk),
        P,
        nch,
        L1,
        L2,
        inv_norm,
        BLOCK_K=BK,
        BLOCK_P=min(1024, triton.next_power_of_2(nch)),
        FLAT=flat,
        ALIGNED=flat and _aligned_stacks(A, B),
        VEC=16 // A.element_size(),
        GLOBAL=glob,
        EPILOGUE=epilogue,
        ACC=tl_dtype(acc),
    )
    return (cka if epilogue else None), hsic


def _matrix_launch(A, B, h_a, h_b, ok_a, ok_b, inv_norm, epilogue: bool):
    La, n, _ = A.shape
    Lb = B.shape[0]
    acc = acc_dtype(A.dtype)
    numel = n * n
    BA, BB = matrix_blocks(La, Lb)
    grid_ab = triton.cdiv(La, BA) * triton.cdiv(Lb, BB)
    chunk, nch = _chunking(numel, MATRIX_GRANULE, grid_ab)
    part, hsic, cka = _outputs((La, Lb), nch, acc, A.device, epilogue)
    cnt = arrival_counters(A.device, grid_ab)
    dot_low = A.dtype == torch.float16
    a_flat, b_flat = _is_flat(A), _is_flat(B)
    grid = (nch, triton.cdiv(La, BA), triton.cdiv(Lb, BB))
    _cka_matrix_fwd_kernel[grid](
        cka,
        hsic,
        part,
        cnt,
        A,
        B,
        *_epilogue_args(epilogue, hsic, cnt, h_a, h_b, ok_a, ok_b),
        *_stack_args(A, B, n, numel, chunk),
        nch,
        La,
        Lb,
        inv_norm,
        pow2_bucket(La),
        pow2_bucket(Lb),
        pow2_bucket(numel),
        BLOCK_A=BA,
        BLOCK_B=BB,
        A_FLAT=a_flat,
        B_FLAT=b_flat,
        ALIGNED=a_flat and b_flat and _aligned_stacks(A, B),
        VEC=16 // A.element_size(),
        EPILOGUE=epilogue,
        ACC=tl_dtype(acc),
        DOT_LOW=dot_low,
        INPUT_PRECISION=input_precision(A.dtype),
    )
    return (cka if epilogue else None), hsic


@on_input_device
def hsic_matrix(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """All-pairs Frobenius products ``out[i, j] = <A[i], B[j]>_F`` (no 1/N).

    Args: A (La, n, n), B (Lb, n, n), one float dtype (fp16/fp32/fp64), one device, any strides.
    Returns (La, Lb) in the accumulation dtype (fp64 for fp64, else fp32). One launch. The dot
    honours ``torch.get_float32_matmul_precision()`` ("highest" -> IEEE fp32); fp16 stacks are
    dotted as fp16 with fp32 accumulation (exact products).
    """
    _check_pair(A, B)
    return _matrix_launch(A, B, None, None, None, None, 1.0, epilogue=False)[1]


@on_input_device
def hsic_pairs(A: torch.Tensor, B: torch.Tensor, pi: torch.Tensor, pj: torch.Tensor) -> torch.Tensor:
    """Selected-pair Frobenius products ``out[p] = <A[pi[p]], B[pj[p]]>_F`` (no 1/N).

    Args: A (La, n, n), B (Lb, n, n) (one float dtype and device, any strides); pi, pj (P,) integer
    tensors on the same device. Indices are not range-checked on the host (that would sync); an
    out-of-range index yields 0 for its pair.
    Returns (P,) in the accumulation dtype. Exact elementwise products (no TF32). One launch.
    """
    _check_pair(A, B)
    _check_index(A, pi, pj)
    if pi.shape[0] == 0:
        return torch.zeros((0,), dtype=acc_dtype(A.dtype), device=A.device)
    return _pairs_launch(A, B, pi, pj, A.shape[0], B.shape[0], None, None, None, None, 1.0, False, False)[1]


@on_input_device
def cka_pairs_fwd(
    C: torch.Tensor,
    h: torch.Tensor,
    ok: torch.Tensor,
    pairs: Sequence[tuple[int, int]],
    estimator: str,
    *,
    C2: torch.Tensor | None = None,
    h2: torch.Tensor | None = None,
    ok2: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CKA of selected pairs, products and epilogue in one launch: ``(cka (P,), hsic (P,))``.

    The layer space is ``C`` (L1, n, n) followed by the optional second stack ``C2`` (L2, n, n)
    (e.g. a target stack from :func:`~fastguide.kernels.gram.gram_fwd` and a guide stack built from
    per-hook Grams, with no concatenation); ``h``/``ok`` (and ``h2``/``ok2``) are their self-HSICs
    and flags from ``gram_fwd``. ``pairs``: host-side (i, j) indices into that space (range-checked
    here; the device table is cached). ``hsic[p] = <C_i, C_j> / N`` and
    ``cka[p] = hsic[p] / (sqrt(h_i) sqrt(h_j))``, exactly 0 when either layer is degenerate -- what
    the torch backend's ``cka_from_hsic`` computes. Stacks must be flat (contiguous last two dims);
    any other layout is copied once. No host synchronisation.
    """
    L1, L2, acc = _check_space(C, h, ok, C2, h2, ok2)
    two = C2 is not None
    C = C if _is_flat(C) else C.contiguous()
    if two:
        C2 = C2 if _is_flat(C2) else C2.contiguous()
    inv = _norm(C.shape[1], estimator)
    pairs = check_pairs(pairs, L1 + L2)
    if not pairs:
        empty = torch.zeros((0,), dtype=acc, device=C.device)
        return empty, empty.clone()
    pi, pj = pair_index(pairs, C.device)
    return _pairs_launch(
        C,
        C2 if two else C,
        pi,
        pj,
        L1,
        L2,
        h,
        h2 if two else h,
        ok,
        ok2 if two else ok,
        inv,
        True,
        True,
    )


@on_input_device
def cka_matrix_fwd(
    A: torch.Tensor,
    B: torch.Tensor,
    h_a: torch.Tensor,
    h_b: torch.Tensor,
    ok_a: torch.Tensor,
    ok_b: torch.Tensor,
    estimator: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-pairs CKA with the epilogue fused, one launch: ``(cka (La, Lb), hsic (La, Lb))``.

    Same quantities as :func:`cka_pairs_fwd` for every (i, j) of A x B; the inner products come from
    the all-pairs GEMM (tensor cores for fp16 stacks and under TF32; IEEE under "highest").
    """
    _check_pair(A, B)
    acc = acc_dtype(A.dtype)
    _check_self(h_a, ok_a, A.shape[0], acc, A.device, "_a")
    _check_self(h_b, ok_b, B.shape[0], acc, A.device, "_b")
    inv = _norm(A.shape[1], estimator)
    return _matrix_launch(A, B, h_a, h_b, ok_a, ok_b, inv, epilogue=True)


__all__ = ["hsic_matrix", "hsic_pairs", "cka_pairs_fwd", "cka_matrix_fwd", "check_pairs", "pair_index"]
