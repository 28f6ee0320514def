"""Grouped Grams and their backward: many small Grams of one strided (G, n, d) activation view.

The per-position (G = T groups of n = B examples) and per-sample structure (G = B groups of n = T
tokens) modes of ``fastguide._structure`` view a (B, T, D) or (B, C, H, W) activation as G groups of
an (n, d) examples matrix, WITHOUT a copy: the kernels take the view's three strides.

* :func:`group_gram_fwd`: ``K[g] = X^_g X^_g^T`` with ``X^_g = X_g - shift_g`` subtracted on load
  (``shift_g`` the mean of the group's first min(n, 32) rows, computed by the caller), plus the raw
  ``||X_g||^2`` the degeneracy test needs, summed by the diagonal tiles while they load (no second
  pass). fp32 accumulation (fp64 for fp64 inputs). Grid: (G, cdiv(n, BLOCK_M), cdiv(n, BLOCK_M)).
* :func:`group_grad_bwd`: ``dX[g] = scale_g W_g X^_g`` for the (G, n, n) weight matrices W of the
  grouped CKA backward. Grid: (G, cdiv(n, BLOCK_M), cdiv(d, BLOCK_K)).

Centring, normalisation and the pair dots stay batched torch ops over the (G, n, n) stack (a few
launches per layer, however many groups).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _cast, acc_dtype, check_float, dot_precision, needs_int64, on_input_device, tl_dtype
from ._configs import interpreting


def group_blocks(n: int, d: int, fma: bool = False) -> tuple[int, int]:
    """(BLOCK_M rows / Gram tile side, BLOCK_K features) per program; both >= 16 for ``tl.dot``.

    Small tiles under the interpreter (few programs still cross block edges in tiny tests); on the GPU
    64-row tiles once n reaches 64 (32 below, so a B = 32 position Gram is one tile), 64 features per
    step for wide layers. ``fma``: the dot runs on the FMA units (fp64, or fp32 at "highest"), whose
    register-held operands spill at 64 x 64 (measured by the compile gate): at most 32 x 32 there.
    """
    if interpreting() or fma:
        return (16 if n <= 16 else 32), (16 if d <= 16 else 32)
    return (32 if n <= 32 else 64), (32 if d <= 32 else 64)


def group_launch(block_m: int, block_k: int, precision: str) -> dict:
    """Launch options: 8 warps for 64 x 64 tiles and for 32 x 32 FMA dots (IEEE fp32, fp64; at 4
    warps both spill at 255 registers per thread), else 4; the whole register file (without a
    budget ptxas caps some variants at 80-128 registers and spills). Measured by the compile gate
    on sm_80/sm_90 (tests/kernels/gpu_compile.py)."""
    if interpreting():
        return {}
    big = block_m * block_k >= (32 * 32 if precision == "ieee" else 64 * 64)
    return {"num_warps": 8 if big else 4, "maxnreg": 255}


# Sizes vary per call (batch, sequence length): no recompilation per value.
@triton.jit(do_not_specialize=["n", "d"])
def _group_gram_fwd_kernel(
    k_ptr,
    sq_ptr,
    x_ptr,
    shift_ptr,
    stride_kg,
    stride_km,
    stride_qg,
    stride_xg,
    stride_xm,
    stride_xk,
    stride_sg,
    n,
    d,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IDX: tl.constexpr,
    ACC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``K[g, I, J] = sum_k X^[g, I, k] X^[g, J, k]`` for one (group, row tile, column tile).

    k_ptr: (G, n, n) output, strides (stride_kg, stride_km, 1). sq_ptr: (G, cdiv(n, BLOCK_M)) partial
    raw squared norms, written by the diagonal tiles (I == J) only. x_ptr: (G, n, d) input view with
    strides (stride_xg, stride_xm, stride_xk). shift_ptr: (G, d) per-group column shift (ACC).
    Masked rows and columns load as 0 after the shift, so they add nothing to the dot. In-tile
    offsets are IDX (int32 unless the host found a tile could overflow it), loop-invariant, from
    int64 per-program base pointers that advance by whole feature blocks.
    """
    pid_g = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1)
    pid_j = tl.program_id(2)
    offs_r = tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_K)
    mask_i = pid_i * BLOCK_M + offs_r < n
    mask_j = pid_j * BLOCK_M + offs_r < n
    off_t = offs_r.to(IDX)[:, None] * _cast(stride_xm, IDX) + offs_c.to(IDX)[None, :] * _cast(stride_xk, IDX)
    x_g = x_ptr + pid_g * stride_xg
    xa = x_g + (pid_i * BLOCK_M).to(tl.int64) * stride_xm  # (row block I, feature 0)
    xb = x_g + (pid_j * BLOCK_M).to(tl.int64) * stride_xm
    sh_g = shift_ptr + pid_g * stride_sg
    acc_k = tl.zeros((BLOCK_M, BLOCK_M), dtype=ACC)
    acc_sq = tl.zeros((BLOCK_M,), dtype=ACC)
    for k0 in range(0, d, BLOCK_K):
        mask_k = k0 + offs_c < d
        col = _cast(k0, tl.int64) * stride_xk
        sh = tl.load(sh_g + k0 + offs_c, mask=mask_k, other=0.0).to(ACC)  # (BK,)
        mi = mask_i[:, None] & mask_k[None, :]
        mj = mask_j[:, None] & mask_k[None, :]
        a = tl.load(xa + col + off_t, mask=mi, other=0.0).to(ACC)  # (BM, BK) raw
        b = tl.load(xb + col + off_t, mask=mj, other=0.0)
        # Raw squares ride along (a tile already in registers); only the diagonal tiles store them.
        acc_sq += tl.sum(a * a, axis=1)
        a = tl.where(mi, a - sh[None, :], 0.0)  # (BM, BK)
        b = tl.where(mj, b.to(ACC) - sh[None, :], 0.0)  # (BM, BK)
        acc_k += tl.dot(a, tl.trans(b), input_precision=INPUT_PRECISION)
    k_g = k_ptr + pid_g * stride_kg + (pid_i * BLOCK_M).to(tl.int64) * stride_km + pid_j * BLOCK_M
    off_k = offs_r.to(IDX)[:, None] * _cast(stride_km, IDX) + offs_r.to(IDX)[None, :]  # (BM, BM)
    tl.store(k_g + off_k, acc_k.to(k_ptr.dtype.element_ty), mask=mask_i[:, None] & mask_j[None, :])
    if pid_i == pid_j:
        tl.store(sq_ptr + pid_g * stride_qg + pid_i, tl.sum(acc_sq, axis=0))


@triton.jit(do_not_specialize=["n", "d"])
def _group_grad_bwd_kernel(
    dx_ptr,
    w_ptr,
    x_ptr,
    shift_ptr,
    scale_ptr,
    stride_dxg,
    stride_dxm,
    stride_dxk,
    stride_wg,
    stride_wm,
    stride_xg,
    stride_xm,
    stride_xk,
    stride_sg,
    n,
    d,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IDX: tl.constexpr,
    ACC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``dX[g, I, K] = scale[g] sum_j W[g, I, j] X^[g, j, K]`` for one (group, row tile, feature tile).

    dx_ptr: (G, n, d) output; w_ptr: (G, n, n) weights (ACC), strides (stride_wg, stride_wm, 1);
    x_ptr/shift_ptr as in the forward; scale_ptr: (G,) per-group scale (ACC). Offsets as in the
    forward: loop-invariant IDX tiles from int64 bases advancing by row blocks.
    """
    pid_g = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_r = tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_K)
    mask_i = pid_i * BLOCK_M + offs_r < n
    mask_k = pid_k * BLOCK_K + offs_c < d
    off_w = offs_r.to(IDX)[:, None] * _cast(stride_wm, IDX) + offs_r.to(IDX)[None, :]  # (BM, BM)
    off_x = offs_r.to(IDX)[:, None] * _cast(stride_xm, IDX) + offs_c.to(IDX)[None, :] * _cast(stride_xk, IDX)
    w_g = w_ptr + pid_g * stride_wg + (pid_i * BLOCK_M).to(tl.int64) * stride_wm
    x_g = x_ptr + pid_g * stride_xg + (pid_k * BLOCK_K).to(tl.int64) * stride_xk
    sh = tl.load(shift_ptr + pid_g * stride_sg + pid_k * BLOCK_K + offs_c, mask=mask_k, other=0.0).to(ACC)
    acc_dx = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
    for j0 in range(0, n, BLOCK_M):
        mask_j = j0 + offs_r < n
        w = tl.load(w_g + j0 + off_w, mask=mask_i[:, None] & mask_j[None, :], other=0.0).to(ACC)  # (BM, BM)
        mx = mask_j[:, None] & mask_k[None, :]
        xv = tl.load(x_g + _cast(j0, tl.int64) * stride_xm + off_x, mask=mx, other=0.0)
        xh = tl.where(mx, xv.to(ACC) - sh[None, :], 0.0)  # (BM, BK)
        acc_dx += tl.dot(w, xh, input_precision=INPUT_PRECISION)
    scale = tl.load(scale_ptr + pid_g).to(ACC)
    out = (acc_dx * scale).to(dx_ptr.dtype.element_ty)
    dx_g = dx_ptr + pid_g * stride_dxg + (pid_i * BLOCK_M).to(tl.int64) * stride_dxm
    dx_g = dx_g + (pid_k * BLOCK_K).to(tl.int64) * stride_dxk
    off_o = offs_r.to(IDX)[:, None] * _cast(stride_dxm, IDX) + offs_c.to(IDX)[None, :] * _cast(
        stride_dxk, IDX
    )
    tl.store(dx_g + off_o, out, mask=mask_i[:, None] & mask_k[None, :])


def _idx(*tiles) -> object:
    """int32 in-tile offsets unless one of the (rows, row stride, cols, col stride) tiles overflows."""
    return tl.int64 if any(needs_int64(*t) for t in tiles) else tl.int32


def _check_view(x: torch.Tensor, shift: torch.Tensor) -> None:
    check_float(x, "x")
    if x.dim() != 3 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty (G, n, d) view; got shape {tuple(x.shape)}")
    G, _, d = x.shape
    acc = acc_dtype(x.dtype)
    if shift.shape != (G, d) or shift.dtype != acc or shift.stride(1) != 1:
        raise ValueError(f"shift must be a ({G}, {d}) {acc} tensor with unit column stride")
    if shift.device != x.device:
        raise ValueError("shift must be on the device of x")


def _view_args(x: torch.Tensor, shift: torch.Tensor) -> tuple:
    """The launch arguments ``stride_xg, stride_xm, stride_xk, stride_sg, n, d`` of both kernels."""
    return (*x.stride(), shift.stride(0), x.shape[1], x.shape[2])


def _meta(block_m: int, block_k: int, idx, acc: torch.dtype, precision: str) -> dict:
    """The constexprs and launch options of both kernels."""
    return dict(
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        IDX=idx,
        ACC=tl_dtype(acc),
        INPUT_PRECISION=precision,
        **group_launch(block_m, block_k, precision),
    )


@on_input_device
def group_gram_fwd(x: torch.Tensor, shift: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(G, n, n) Grams of the shifted groups of a (G, n, d) view (any strides) and the raw ``||x_g||^2``.

    ``out``: an optional (G, n, n) buffer with unit column stride, in the accumulation dtype of x or
    float64 (filled in place; else a new one is made). Returns ``(K, sq)`` with ``sq`` (G,) in K's dtype.
    """
    _check_view(x, shift)
    G, n, d = x.shape
    acc = acc_dtype(x.dtype)
    if out is None:
        out = torch.empty((G, n, n), dtype=acc, device=x.device)
    elif out.shape != (G, n, n) or out.dtype not in (acc, torch.float64) or out.stride(2) != 1:
        raise ValueError(f"out must be a ({G}, {n}, {n}) {acc} (or float64) tensor with unit column stride")
    prec = dot_precision(x.dtype)
    BM, BK = group_blocks(n, d, prec == "ieee")
    tiles = triton.cdiv(n, BM)
    idx = _idx((BM, x.stride(1), BK, x.stride(2)), (BM, out.stride(1), BM, 1))
    sq = torch.empty((G, tiles), dtype=acc, device=x.device)
    _group_gram_fwd_kernel[(G, tiles, tiles)](
        out,
        sq,
        x,
        shift,
        out.stride(0),
        out.stride(1),
        sq.stride(0),
        *_view_args(x, shift),
        **_meta(BM, BK, idx, acc, prec),
    )
    return out, sq.sum(dim=1).to(out.dtype)


@on_input_device
def group_grad_bwd(
    W: torch.Tensor, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """``scale[g] * W[g] @ (x[g] - shift[g])`` per group: the gradient of a (G, n, d) view, in x's dtype.

    W: (G, n, n) in the accumulation dtype of x with unit column stride; scale: (G,) same dtype.
    Returns a new contiguous (G, n, d) tensor.
    """
    _check_view(x, shift)
    G, n, d = x.shape
    acc = acc_dtype(x.dtype)
    if W.shape != (G, n, n) or W.dtype != acc or W.stride(2) != 1:
        raise ValueError(f"W must be a ({G}, {n}, {n}) {acc} tensor with unit column stride")
    if scale.shape != (G,) or scale.dtype != acc:
        raise ValueError(f"scale must be a ({G},) {acc} tensor")
    if W.device != x.device or scale.device != x.device:
        raise ValueError(f"W and scale must be on {x.device}")
    dx = torch.empty((G, n, d), dtype=x.dtype, device=x.device)
    prec = dot_precision(x.dtype)
    BM, BK = group_blocks(n, d, prec == "ieee")
    grid = (G, triton.cdiv(n, BM), triton.cdiv(d, BK))
    idx = _idx(
        (BM, x.stride(1), BK, x.stride(2)), (BM, W.stride(1), BM, 1), (BM, dx.stride(1), BK, dx.stride(2))
    )
    _group_grad_bwd_kernel[grid](
        dx,
        W,
        x,
        shift,
        scale,
        dx.stride(0),
        dx.stride(1),
        dx.stride(2),
        W.stride(0),
        W.stride(1),
        *_view_args(x, shift),
        **_meta(BM, BK, idx, acc, prec),
    )
    return dx
