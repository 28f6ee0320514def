"""Analytic CKA backward for one target layer: ``dX = scale * (sum_k w_k C_k) X^``.

DESIGN.md section 2: with ``G_a = sum_b W[a, b] C_b`` (the pair weights of the caller's
``pair_weights``, already divided by N) the gradient of a target layer is
``dX_a = (2 / s_a) G_a X^_a``, where ``X^ = x - shift`` is the same shifted input as the forward
(the shift is the mean of the first min(n, 32) rows). ``G_a 1 = 0`` for both estimators, so the
centring adjoint vanishes and the shift's value is immaterial; it is applied so the GEMM sees
small numbers. G is never materialised: the weighted combination of the (few) C's happens on the
GEMM's A-operand load. Guide layers get no call at all.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    SHIFT_ROWS,
    _column_shift,
    acc_dtype,
    check_float,
    input_precision,
    on_input_device,
    pow2_bucket,
    tl_dtype,
)
from ._configs import grad_x_blocks, grad_x_configs

# C matrices fused into one launch; more are folded into one extra operand with torch.
MAX_FUSED_C = 4


@triton.autotune(configs=grad_x_configs(), key=["N_BUCKET", "D_BUCKET", "NUM_C"])
@triton.jit(do_not_specialize=["n", "d", "n_shift"])
def _grad_x_bwd_kernel(
    dx_ptr,
    x_ptr,
    c0_ptr,
    c1_ptr,
    c2_ptr,
    c3_ptr,
    w_ptr,
    scale_ptr,
    stride_dxm,
    stride_dxk,
    stride_xm,
    stride_xk,
    stride_c0m,
    stride_c0k,
    stride_c1m,
    stride_c1k,
    stride_c2m,
    stride_c2k,
    stride_c3m,
    stride_c3k,
    n,
    d,
    n_shift,
    N_BUCKET,
    D_BUCKET,
    NUM_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr,
    SHIFT_ROWS: tl.constexpr,
    ACC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``dX[I, F] = scale * sum_j (sum_k w_k C_k[I, j]) X^[j, F]`` with ``X^ = x - shift``.

    Pointers:
      dx_ptr: (n, d) output in x's dtype; x_ptr: (n, d) input, any strides.
      c0_ptr .. c3_ptr: (n, n) matrices in ACC (the first NUM_C are used; the rest are dummies).
      w_ptr: (NUM_C,) weights; scale_ptr: 0-d scale (e.g. 2 / s_a).
    Grid: (cdiv(d, BLOCK_N), cdiv(n, BLOCK_M)); a program owns a BLOCK_M x BLOCK_N tile of dX and
    loops over the examples j in BLOCK_J steps. Feature blocks vary fastest, so the programs that
    share a row block of the C's (BLOCK_M x n each) run together and read it from DRAM once.
    The shift of its BLOCK_N columns is computed once per program.
    """
    pid_n = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask_m = offs_m < n
    mask_n = offs_n < d
    col = offs_n * stride_xk
    shift = _column_shift(x_ptr, col, mask_n, stride_xm, n_shift, SHIFT_ROWS, ACC)  # (BLOCK_N,)

    w0 = tl.load(w_ptr).to(ACC)
    if NUM_C > 1:
        w1 = tl.load(w_ptr + 1).to(ACC)
    if NUM_C > 2:
        w2 = tl.load(w_ptr + 2).to(ACC)
    if NUM_C > 3:
        w3 = tl.load(w_ptr + 3).to(ACC)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for j in range(0, n, BLOCK_J):
        offs_j = j + tl.arange(0, BLOCK_J).to(tl.int64)
        mask_j = offs_j < n
        mask_g = mask_m[:, None] & mask_j[None, :]
        # G tile formed on load: the weighted sum of the C tiles, never stored.
        g = w0 * tl.load(
            c0_ptr + offs_m[:, None] * stride_c0m + offs_j[None, :] * stride_c0k, mask=mask_g, other=0.0
        ).to(ACC)
        if NUM_C > 1:
            g += w1 * tl.load(
                c1_ptr + offs_m[:, None] * stride_c1m + offs_j[None, :] * stride_c1k, mask=mask_g, other=0.0
            ).to(ACC)
        if NUM_C > 2:
            g += w2 * tl.load(
                c2_ptr + offs_m[:, None] * stride_c2m + offs_j[None, :] * stride_c2k, mask=mask_g, other=0.0
            ).to(ACC)
        if NUM_C > 3:
            g += w3 * tl.load(
                c3_ptr + offs_m[:, None] * stride_c3m + offs_j[None, :] * stride_c3k, mask=mask_g, other=0.0
            ).to(ACC)
        g = tl.where(mask_g, g, 0.0)  # (BLOCK_M, BLOCK_J)
        mask_x = mask_j[:, None] & mask_n[None, :]
        xh = tl.load(x_ptr + offs_j[:, None] * stride_xm + col[None, :], mask=mask_x, other=0.0).to(ACC)
        xh = tl.where(mask_x, xh - shift[None, :], 0.0)  # (BLOCK_J, BLOCK_N)
        acc = tl.dot(g, xh, acc, input_precision=INPUT_PRECISION, out_dtype=ACC)
    scale = tl.load(scale_ptr).to(ACC)
    out = dx_ptr + offs_m[:, None] * stride_dxm + offs_n[None, :] * stride_dxk
    tl.store(out, (acc * scale).to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@on_input_device
def grad_x(x: torch.Tensor, Cs: list[torch.Tensor], w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Gradient of one target layer: ``scale * (sum_k w[k] Cs[k]) @ (x - shift)`` in x's dtype.

    Args:
      x: (n, d) activation (float16/bfloat16/float32/float64, any strides).
      Cs: k matrices (n, n) in the accumulation dtype of x (fp64 for fp64, else fp32); any strides.
      w: (k,) weights on x's device (any float dtype); scale: 0-d (or 1-element) tensor.
    Returns (n, d) in x.dtype (a new contiguous tensor). One launch for k <= 4; for k > 4 the C's
    after the third are first combined with torch into one extra operand. No host sync.
    """
    check_float(x, "x")
    if x.dim() != 2 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty 2-D (n, d) tensor; got shape {tuple(x.shape)}")
    n, d = x.shape
    acc = acc_dtype(x.dtype)
    Cs = list(Cs)
    for i, c in enumerate(Cs):
        check_float(c, f"Cs[{i}]")
        if c.shape != (n, n):
            raise ValueError(f"Cs[{i}] must have shape ({n}, {n}); got {tuple(c.shape)}")
        if c.dtype != acc:
            raise TypeError(f"Cs[{i}] must have dtype {acc} (the accumulation dtype of x); got {c.dtype}")
        if c.device != x.device:
            raise ValueError(f"Cs[{i}] must be on {x.device}; got {c.device}")
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.shape[0] != len(Cs):
        raise ValueError(f"w must be a 1-D tensor with one weight per C ({len(Cs)})")
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1:
        raise ValueError("scale must be a 0-d (one-element) tensor")
    if w.device != x.device or scale.device != x.device:
        raise ValueError(f"w and scale must be on {x.device}")
    dx = torch.empty((n, d), dtype=x.dtype, device=x.device)
    if not Cs:
        return dx.zero_()
    if len(Cs) > MAX_FUSED_C:
        k = MAX_FUSED_C - 1
        rest = torch.stack(Cs[k:]).reshape(len(Cs) - k, n * n)
        folded = (w[k:].to(acc) @ rest).view(n, n)
        Cs = Cs[:k] + [folded]
        w = torch.cat([w[:k].to(acc), torch.ones(1, dtype=acc, device=x.device)])
    num_c = len(Cs)
    ptrs = Cs + [Cs[0]] * (MAX_FUSED_C - num_c)
    BM, BN = grad_x_blocks(n, d, acc == torch.float64)
    grid = (triton.cdiv(d, BN), triton.cdiv(n, BM))
    _grad_x_bwd_kernel[grid](
        dx,
        x,
        *ptrs,
        w,
        scale,
        dx.stride(0),
        dx.stride(1),
        x.stride(0),
        x.stride(1),
        *[s for c in ptrs for s in (c.stride(0), c.stride(1))],
        n,
        d,
        min(n, SHIFT_ROWS),
        pow2_bucket(n),
        pow2_bucket(d),
        NUM_C=num_c,
        BLOCK_M=BM,
        BLOCK_N=BN,
        SHIFT_ROWS=SHIFT_ROWS,
        ACC=tl_dtype(acc),
        INPUT_PRECISION=input_precision(acc),
    )
    return dx


__all__ = ["grad_x"]
