"""Analytic CKA backward: ``dX_a = scale_a * (sum_k w_k C_k) X^_a`` for one or many target layers.

DESIGN.md section 2: for a target layer a, with g_p the upstream gradient of pair p and h the
self-HSICs, ``alpha_p = g_p / (sqrt(h_i) sqrt(h_j))`` and ``beta_a = sum_p g_p CKA_p / h_a`` over
its pairs; ``G_a = (sum_p alpha_p C_b - beta_a C_a) / N`` and ``dX_a = (2 / s_a) G_a X^_a``, where
``X^ = x - shift`` is the same shifted input as the forward (the shift is the mean of the first
min(n, 32) rows). ``G_a 1 = 0`` for both estimators, so the centring adjoint vanishes and the
shift's value is immaterial; it is applied so the GEMM sees small numbers. G is never stored: the
weighted combination of the C's happens on the GEMM's A-operand load, NUM_C matrices per pass of
the inner loop (more in further passes). Guide layers get no work at all.

* :func:`cka_pairs_bwd` -- every target layer of a pair list in ONE launch; the weights
  (alpha, beta, masks for degenerate layers, 1/N, 2/s) are computed inside the kernel from the
  forward's outputs and the upstream gradient.
* :func:`grad_x` -- one layer with explicit C matrices and weights (the same kernel).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._common import (
    SHIFT_ROWS,
    _cast,
    _column_shift,
    _x_offsets,
    acc_dtype,
    aligned_2d,
    check_float,
    device_table,
    dot_precision,
    layout_2d,
    needs_int64,
    on_input_device,
    pow2_bucket,
    tl_dtype,
)
from ._configs import GRAD_SLOTS, grad_blocks, grad_configs, prune_grad
from ._tables import _check_space, _check_x, _is_flat, _norm, check_pairs, pair_index
from .cka import _resolve, _self_hsic

_ALPHA, _BETA = 0, 1  # contribution kinds: partner term alpha_p C_b, self term -g_p CKA_p / h_a C_a
_LAYER_COLS = 8  # x pointer, stride_xm, stride_xk, d, dx pointer, first slot, slots, global layer
_SLOT_COLS = 5  # C pointer or layer index, first contribution or weight index, contributions, strides


@triton.jit
def _slot(
    k, end, a, row_c, n, offs_r, offs_jj,
    slot_ptr, con_ptr, w_ptr, c1_ptr, c2_ptr, stride_c10, stride_c20, stride_g,
    g_ptr, cka_ptr, pi_ptr, pj_ptr, h1_ptr, h2_ptr, ok1_ptr, ok2_ptr, L1, L2,
    PAIRS: tl.constexpr, TWO_STACKS: tl.constexpr, C_FLAT: tl.constexpr, C_ALIGNED: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """Slot ``k`` of a layer whose slots end at ``end``: (weight, pointer to its C's row block
    ``row_c``, the (BLOCK_M, BLOCK_J) offsets of a tile of it, its column stride, present).

    PAIRS: the slot is a layer of the stack space and its weight is the sum of its contributions
    (alpha_p or -g_p CKA_p / h_a, 0 where a layer of pair p is degenerate). Otherwise the slot
    holds a C pointer, its strides and the index of its weight in ``w_ptr``.
    """
    present = k < end
    row = slot_ptr + tl.minimum(k, end - 1) * 5
    ref = tl.load(row)
    stride_cm = tl.load(row + 3)
    stride_ck = tl.load(row + 4)
    if PAIRS:
        c_ptr, _ = _resolve(ref, L1, L2, c1_ptr, c2_ptr, stride_c10, stride_c20, TWO_STACKS)
        h_a, ok_a = _self_hsic(a, L1, L2, h1_ptr, h2_ptr, ok1_ptr, ok2_ptr, TWO_STACKS)
        h_a = tl.where(ok_a, h_a.to(ACC), 1.0)
        c0 = tl.load(row + 1)
        w = tl.zeros((), dtype=ACC)
        for c in range(c0, c0 + tl.load(row + 2)):
            p = tl.load(con_ptr + c * 2)
            kind = tl.load(con_ptr + c * 2 + 1)
            gi = tl.load(pi_ptr + p).to(tl.int64)
            gj = tl.load(pj_ptr + p).to(tl.int64)
            h_i, ok_i = _self_hsic(gi, L1, L2, h1_ptr, h2_ptr, ok1_ptr, ok2_ptr, TWO_STACKS)
            h_j, ok_j = _self_hsic(gj, L1, L2, h1_ptr, h2_ptr, ok1_ptr, ok2_ptr, TWO_STACKS)
            g = tl.load(g_ptr + p * stride_g).to(ACC)
            r_i = tl.sqrt(tl.where(ok_i, h_i.to(ACC), 1.0))
            alpha = g / (r_i * tl.sqrt(tl.where(ok_j, h_j.to(ACC), 1.0)))
            beta = g * tl.load(cka_ptr + p).to(ACC) / h_a
            term = tl.where(kind == 0, alpha, -beta)
            w += tl.where((ok_i & ok_j) != 0, term, 0.0)
    else:
        c_ptr = ref.to(tl.pointer_type(c1_ptr.dtype.element_ty))
        w = tl.load(w_ptr + tl.load(row + 1)).to(ACC)
    if C_ALIGNED:
        c_ptr = tl.multiple_of(c_ptr, 16)
    if C_FLAT:
        c_ptr = c_ptr + row_c * n
        off_c = offs_r[:, None] * n + offs_jj[None, :]  # (BLOCK_M, BLOCK_J), < BLOCK_M * n (int32)
    else:
        c_ptr = c_ptr + row_c * stride_cm
        off_c = offs_r.to(tl.int64)[:, None] * stride_cm + offs_jj.to(tl.int64)[None, :] * stride_ck
    return tl.where(present, w, 0.0), c_ptr, off_c, stride_ck, present


@triton.jit
def _g_tile(c_ptr, stride_ck, off_c, mask_g, present, j, C_FLAT: tl.constexpr, ACC: tl.constexpr):
    """One (BLOCK_M, BLOCK_J) tile of a C (row block base ``c_ptr``), columns from ``j``; 0 where
    masked or absent."""
    if C_FLAT:
        ptr = c_ptr + j
    else:
        ptr = c_ptr + _cast(j, tl.int64) * stride_ck
    return tl.load(ptr + off_c, mask=(mask_g & present) != 0, other=0.0).to(ACC)


@triton.autotune(
    configs=grad_configs(),
    key=[
        "N_BUCKET",
        "D_BUCKET",
        "NUM_C",
        "BLOCK_M",
        "BLOCK_N",
        "LAYOUT",
        "ALIGNED",
        "N16",
        "INPUT_PRECISION",
    ],
    prune_configs_by={"early_config_prune": prune_grad},
)
@triton.jit(do_not_specialize=["L1", "L2", "inv_norm", "N_BUCKET", "D_BUCKET"])
def _cka_pairs_bwd_kernel(
    dx_ptr,
    x_ref_ptr,
    c1_ptr,
    c2_ptr,
    lay_ptr,
    prog_ptr,
    slot_ptr,
    con_ptr,
    w_ptr,
    scale_ptr,
    g_ptr,
    cka_ptr,
    pi_ptr,
    pj_ptr,
    h1_ptr,
    h2_ptr,
    ok1_ptr,
    ok2_ptr,
    s_ptr,
    stride_c10,
    stride_c20,
    stride_g,
    n,
    n_shift,
    L1,
    L2,
    inv_norm,
    N_BUCKET,
    D_BUCKET,
    NUM_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr,
    SHIFT_ROWS: tl.constexpr,
    LAYOUT: tl.constexpr,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
    N16: tl.constexpr,
    PAIRS: tl.constexpr,
    TWO_STACKS: tl.constexpr,
    C_FLAT: tl.constexpr,
    C_ALIGNED: tl.constexpr,
    IDX: tl.constexpr,
    ACC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``dX_a[I, F] = scale_a * sum_j (sum_k w_k C_k[I, j]) X^_a[j, F]`` for the layers of a group.

    Pointers:
      dx_ptr: the group's first output (the element-type witness); layer a's (n, d_a) row-major
        gradient is its own tensor, at the dx pointer of its layer row (separate tensors: the
        custom op returning them must not return aliases).
      x_ref_ptr: the group's first layer (the element-type witness of the x's).
      c1_ptr (L1, n, n), c2_ptr (L2, n, n): with PAIRS, the stacks of the layer space (flat; B may be
        absent: TWO_STACKS False); otherwise c1_ptr is only the element-type witness of the C's.
      lay_ptr: (layers, 8) int64 (``_LAYER_COLS``); prog_ptr: (P, 3) int32 (layer, row block,
        feature block); slot_ptr: (slots, 5) int64 (``_SLOT_COLS``); con_ptr: (contributions, 2) int32
        (pair, kind) with PAIRS.
      PAIRS: g_ptr (P,) upstream gradient of each pair's CKA (element stride stride_g: the
        gradient of a sum arrives expanded, stride 0, and is not copied), cka_ptr (P,) the forward's CKA,
        pi_ptr/pj_ptr (P,) pair indices, h*/ok* the self-HSICs and flags of the two stacks, s_ptr
        (L1,) the forward's s; scale_a = 2 / s_a, weights times inv_norm = 1 / N.
      Otherwise: w_ptr (k,) weights, scale_ptr 0-d scale (the caller's G and scale).
    Grid: (P,) from the program table; programs of one (layer, row block) are adjacent so the C row
    blocks (BLOCK_M x n each) they share are read from DRAM about once. The shift of the program's
    BLOCK_N columns is computed once.
    """
    pid = tl.program_id(0)
    t = tl.load(prog_ptr + pid * 3)
    mb = tl.load(prog_ptr + pid * 3 + 1)
    nb = tl.load(prog_ptr + pid * 3 + 2)
    lay = lay_ptr + t.to(tl.int64) * 8
    x_ptr = tl.load(lay).to(tl.pointer_type(x_ref_ptr.dtype.element_ty))
    stride_xm = tl.load(lay + 1)
    stride_xk = tl.load(lay + 2)
    d = tl.load(lay + 3)
    dx_base = tl.load(lay + 4).to(tl.pointer_type(dx_ptr.dtype.element_ty))
    slot0 = tl.load(lay + 5)
    nslots = tl.load(lay + 6)
    a = tl.load(lay + 7)
    # (n itself is specialised by Triton when it is a multiple of 16: then the C rows vectorise.)
    n_vec = n
    if ALIGNED:
        # Host-checked (aligned_2d): 16-byte aligned x, rows (or columns) of VEC elements.
        x_ptr = tl.multiple_of(x_ptr, 16)
        dx_base = tl.multiple_of(dx_base, 16)
        if LAYOUT == 0:
            stride_xm = tl.multiple_of(stride_xm, VEC)
            d = tl.multiple_of(d, VEC)
        if LAYOUT == 1:
            stride_xk = tl.multiple_of(stride_xk, VEC)

    offs_r = tl.arange(0, BLOCK_M)
    offs_f = tl.arange(0, BLOCK_N)
    offs_jj = tl.arange(0, BLOCK_J)
    offs_s = tl.arange(0, SHIFT_ROWS)
    mask_m = mb * BLOCK_M + offs_r < n_vec
    mask_n = nb * BLOCK_N + offs_f < d
    # x tiles: int32 (IDX) offsets inside the tile from int64 bases.
    if LAYOUT == 0:
        stride_xk = 1
    elif LAYOUT == 1:
        stride_xm = 1
    # (BLOCK_J, BLOCK_N) tile and (SHIFT_ROWS, BLOCK_N) shift-row offsets.
    off_x, off_s = _x_offsets(offs_jj, offs_f, offs_s, stride_xm, stride_xk, LAYOUT, IDX)
    xcol_ptr = x_ptr + (nb * BLOCK_N).to(tl.int64) * stride_xk
    mask_sh = (offs_s < n_shift)[:, None] & mask_n[None, :]
    shift = _column_shift(xcol_ptr, off_s, mask_sh, n_shift, ACC)  # (BLOCK_N,)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    row_c = (mb * BLOCK_M).to(tl.int64)
    for k0 in range(slot0, slot0 + nslots, NUM_C):
        end = slot0 + nslots
        # fmt: off
        w0, p0, off_c0, sk0, h0 = _slot(
            k0, end, a, row_c, n_vec, offs_r, offs_jj, slot_ptr, con_ptr, w_ptr,
            c1_ptr, c2_ptr, stride_c10, stride_c20, stride_g, g_ptr, cka_ptr, pi_ptr, pj_ptr,
            h1_ptr, h2_ptr, ok1_ptr, ok2_ptr, L1, L2, PAIRS, TWO_STACKS, C_FLAT, C_ALIGNED, ACC)
        if NUM_C > 1:
            w1, p1, off_c1, sk1, h1 = _slot(
                k0 + 1, end, a, row_c, n_vec, offs_r, offs_jj, slot_ptr, con_ptr, w_ptr,
                c1_ptr, c2_ptr, stride_c10, stride_c20, stride_g, g_ptr, cka_ptr, pi_ptr, pj_ptr,
                h1_ptr, h2_ptr, ok1_ptr, ok2_ptr, L1, L2, PAIRS, TWO_STACKS, C_FLAT, C_ALIGNED, ACC)
        if NUM_C > 2:
            w2, p2, off_c2, sk2, h2 = _slot(
                k0 + 2, end, a, row_c, n_vec, offs_r, offs_jj, slot_ptr, con_ptr, w_ptr,
                c1_ptr, c2_ptr, stride_c10, stride_c20, stride_g, g_ptr, cka_ptr, pi_ptr, pj_ptr,
                h1_ptr, h2_ptr, ok1_ptr, ok2_ptr, L1, L2, PAIRS, TWO_STACKS, C_FLAT, C_ALIGNED, ACC)
        if NUM_C > 3:
            w3, p3, off_c3, sk3, h3 = _slot(
                k0 + 3, end, a, row_c, n_vec, offs_r, offs_jj, slot_ptr, con_ptr, w_ptr,
                c1_ptr, c2_ptr, stride_c10, stride_c20, stride_g, g_ptr, cka_ptr, pi_ptr, pj_ptr,
                h1_ptr, h2_ptr, ok1_ptr, ok2_ptr, L1, L2, PAIRS, TWO_STACKS, C_FLAT, C_ALIGNED, ACC)
        # fmt: on
        for j in range(0, n, BLOCK_J):
            mask_j = j + offs_jj < n_vec
            mask_g = mask_m[:, None] & mask_j[None, :]
            # G tile formed on load: the weighted sum of the C tiles, never stored.
            g = w0 * _g_tile(p0, sk0, off_c0, mask_g, h0, j, C_FLAT, ACC)  # (BLOCK_M, BLOCK_J)
            if NUM_C > 1:
                g += w1 * _g_tile(p1, sk1, off_c1, mask_g, h1, j, C_FLAT, ACC)
            if NUM_C > 2:
                g += w2 * _g_tile(p2, sk2, off_c2, mask_g, h2, j, C_FLAT, ACC)
            if NUM_C > 3:
                g += w3 * _g_tile(p3, sk3, off_c3, mask_g, h3, j, C_FLAT, ACC)
            mask_x = mask_j[:, None] & mask_n[None, :]
            xh = tl.load(xcol_ptr + _cast(j, tl.int64) * stride_xm + off_x, mask=mask_x, other=0.0).to(ACC)
            xh = tl.where(mask_x, xh - shift[None, :], 0.0)  # (BLOCK_J, BLOCK_N)
            acc = tl.dot(g, xh, acc, input_precision=INPUT_PRECISION, out_dtype=ACC)
    if PAIRS:
        s_a = tl.load(s_ptr + tl.minimum(a, L1 - 1)).to(ACC)
        scale = 2.0 * inv_norm / s_a
    else:
        scale = tl.load(scale_ptr).to(ACC)
    # A layer without pairs gets an exact 0 (also when its s is NaN).
    out = tl.where(nslots > 0, acc * scale, 0.0)
    dx_tile = dx_base + (mb * BLOCK_M).to(tl.int64) * d + nb * BLOCK_N
    off_o = offs_r.to(IDX)[:, None] * _cast(d, IDX) + offs_f.to(IDX)[None, :]  # (BLOCK_M, BLOCK_N)
    tl.store(dx_tile + off_o, out.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _run(xs, metas, slot_rows, con_rows, num_c, c1, c2, c_flat, c_aligned, mode_args, two, pairs, inv_norm):
    """Launch the backward kernel once per (dtype, layout, alignment, offset width) group of the
    target layers ``xs``; returns their gradients (one new (n, d) tensor each).

    metas: per layer (first slot, number of slots, global layer index).
    """
    n = xs[0].shape[0]
    device = xs[0].device
    acc = acc_dtype(xs[0].dtype)
    max_bj = max(c.kwargs["BLOCK_J"] for c in grad_configs())
    slot_t = device_table(slot_rows, torch.int64, device) if slot_rows else None
    con_t = device_table(con_rows, torch.int32, device) if con_rows else None
    # One tensor per layer (the custom op returning them must not return views of one buffer).
    outs = [torch.empty((n, x.shape[1]), dtype=x.dtype, device=device) for x in xs]
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(xs):
        # Largest tiles any config uses (128 x 128, max BLOCK_J rows): int32 offsets if they fit.
        idx64 = needs_int64(max(max_bj, SHIFT_ROWS), x.stride(0), 128, x.stride(1)) or needs_int64(
            128, x.shape[1], 128, 1
        )
        aligned = aligned_2d(x) and outs[i].data_ptr() % 16 == 0
        groups.setdefault((x.dtype, layout_2d(x), aligned, idx64), []).append(i)
    for (dtype, layout, aligned, idx64), idx in groups.items():
        vector = aligned and layout == 0 and n % 16 == 0
        BM, BN = grad_blocks(n, dot_precision(dtype) == "ieee", vector)
        lay_rows = []
        for i in idx:
            x = xs[i]
            lay_rows += [x.data_ptr(), x.stride(0), x.stride(1), x.shape[1], outs[i].data_ptr(), *metas[i]]
        shapes = tuple(xs[i].shape[1] for i in idx)
        prog_t = device_table(
            lambda shapes=shapes, BM=BM, BN=BN: [
                v
                for t, d in enumerate(shapes)
                for mb in range(triton.cdiv(n, BM))
                for nb in range(triton.cdiv(d, BN))
                for v in (t, mb, nb)
            ],
            torch.int32,
            device,
            key=("grad_prog", n, BM, BN, shapes),
        )
        num_programs = sum(triton.cdiv(n, BM) * triton.cdiv(d, BN) for d in shapes)
        lay_t = device_table(lay_rows, torch.int64, device)
        x0 = xs[idx[0]]
        _cka_pairs_bwd_kernel[(num_programs,)](
            outs[idx[0]],
            x0,
            c1,
            c2,
            lay_t,
            prog_t,
            slot_t if slot_t is not None else lay_t,
            con_t if con_t is not None else prog_t,
            *mode_args,
            c1.stride(0) if pairs else 0,
            c2.stride(0) if pairs else 0,
            mode_args[2].stride(0) if pairs else 0,  # g_ptr's element stride
            n,
            min(n, SHIFT_ROWS),
            c1.shape[0] if pairs else 1,
            c2.shape[0] if two else 0,
            inv_norm,
            pow2_bucket(n),
            pow2_bucket(max(shapes)),
            NUM_C=num_c,
            BLOCK_M=BM,
            BLOCK_N=BN,
            SHIFT_ROWS=SHIFT_ROWS,
            LAYOUT=layout,
            ALIGNED=aligned,
            VEC=16 // x0.element_size(),
            N16=n % 16 == 0,
            PAIRS=pairs,
            TWO_STACKS=two,
            C_FLAT=c_flat,
            C_ALIGNED=c_aligned,
            IDX=tl.int64 if idx64 else tl.int32,
            ACC=tl_dtype(acc),
            INPUT_PRECISION=dot_precision(dtype),
        )
    return outs


@on_input_device
def grad_x(x: torch.Tensor, Cs: list[torch.Tensor], w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Gradient of one target layer: ``scale * (sum_k w[k] Cs[k]) @ (x - shift)`` in x's dtype.

    Args:
      x: (n, d) activation (float16/bfloat16/float32/float64, any strides).
      Cs: k matrices (n, n) in the accumulation dtype of x (fp64 for fp64, else fp32); any strides.
      w: (k,) weights on x's device (any float dtype); scale: 0-d (or 1-element) tensor.
    Returns (n, d) in x.dtype (a new contiguous tensor). One launch for any k (the C's are combined
    4 per pass of the inner loop). No host sync.
    """
    _check_x(x, "x")
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
    if not Cs:
        return torch.zeros((n, d), dtype=x.dtype, device=x.device)
    c_flat = all(_is_flat(c) for c in Cs)
    c_aligned = c_flat and all(c.data_ptr() % 16 == 0 for c in Cs) and (n * Cs[0].element_size()) % 16 == 0
    slot_rows = [v for k, c in enumerate(Cs) for v in (c.data_ptr(), k, 0, c.stride(0), c.stride(1))]
    num_c = min(GRAD_SLOTS, len(Cs))
    witness = Cs[0]
    args = (w, scale.reshape(()), w, w, w, w, w, w, w, w, w)
    (dx,) = _run(
        [x],
        [(0, len(Cs), 0)],
        slot_rows,
        None,
        num_c,
        witness,
        witness,
        c_flat,
        c_aligned,
        args,
        False,
        False,
        1.0,
    )
    return dx


@on_input_device
def cka_pairs_bwd(
    grad: torch.Tensor,
    cka: torch.Tensor,
    xs: Sequence[torch.Tensor],
    which: Sequence[int],
    C: torch.Tensor,
    s: torch.Tensor,
    h: torch.Tensor,
    ok: torch.Tensor,
    pairs: Sequence[tuple[int, int]],
    estimator: str,
    *,
    C2: torch.Tensor | None = None,
    h2: torch.Tensor | None = None,
    ok2: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Gradients of the CKAs of :func:`~fastguide.kernels.cka.cka_pairs_fwd` w.r.t. target layers, in
    ONE launch (per dtype/layout group of the targets; one for the usual contiguous list).

    Args:
      grad: (P,) upstream gradient of each pair's CKA; cka: (P,) the forward's CKA.
      xs: the target activations (n, d_t) to differentiate (any strides, the forward's inputs).
      which: their indices in the layer space (each < L1: targets belong to the first stack).
      C, s, h, ok: the first stack (L1, n, n) and its s, h, ok from ``gram_fwd``; C2, h2, ok2: the
        optional second stack (e.g. the guide's), as in ``cka_pairs_fwd``.
      pairs: the forward's host-side (i, j) pair list; estimator: its estimator.
    Returns one (n, d_t) gradient per target, in its dtype (a new contiguous tensor each). A pair
    with a degenerate layer contributes exactly 0; a target without pairs gets an exact 0. The
    weights alpha/beta, 1/N and 2/s are computed in the kernel: no torch op, no host sync.
    """
    L1, L2, acc = _check_space(C, h, ok, C2, h2, ok2, gram_dtype=True)
    two = C2 is not None
    n = C.shape[1]
    if not isinstance(s, torch.Tensor) or s.shape != (L1,) or s.dtype != acc:
        raise ValueError(f"s must be a ({L1},) tensor of dtype {acc}")
    inv = _norm(n, estimator)
    pairs = check_pairs(pairs, L1 + L2)
    P = len(pairs)
    for name, t in (("grad", grad), ("cka", cka)):
        if not isinstance(t, torch.Tensor) or t.shape != (P,) or not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a ({P},) float tensor (one value per pair)")
        if t.device != C.device:
            raise ValueError(f"{name} must be on {C.device}; got {t.device}")
    xs = list(xs)
    which = [int(a) for a in which]
    if len(which) != len(xs):
        raise ValueError(f"which must name one layer per x; got {len(which)} for {len(xs)} tensors")
    if len(set(which)) != len(which) or any(not 0 <= a < L1 for a in which):
        raise ValueError(f"which must hold distinct layer indices of the first stack (< {L1}); got {which}")
    for t, x in enumerate(xs):
        _check_x(x, f"xs[{t}]")
        if x.shape[0] != n:
            raise ValueError(f"xs[{t}] must have n={n} rows (the Grams'); got {x.shape[0]}")
        if acc_dtype(x.dtype) != acc:
            raise TypeError(f"xs[{t}] has dtype {x.dtype}; the stacks' accumulation dtype is {acc}")
        if x.device != C.device:
            raise ValueError(f"xs[{t}] must be on {C.device}; got {x.device}")
    if not xs:
        return []
    C = C if _is_flat(C) else C.contiguous()
    if two:
        C2 = C2 if _is_flat(C2) else C2.contiguous()
    slot_rows, con_rows, metas, num_c = _pair_tables(pairs, which, n)
    pi, pj = pair_index(pairs, C.device)
    vec_c = 16 // C.element_size()
    c_aligned = C.data_ptr() % 16 == 0 and n % vec_c == 0 and (not two or C2.data_ptr() % 16 == 0)
    args = (grad, grad, grad, cka, pi, pj, h, h2 if two else h, ok, ok2 if two else ok, s)
    return _run(
        xs, metas, slot_rows, con_rows, num_c, C, C2 if two else C, True, c_aligned, args, two, True, inv
    )


def _pair_tables(pairs, which, n):
    """Host tables of :func:`cka_pairs_bwd` (cached by the callers' device_table on content).

    Per target layer a: its slots are [a] + the other layers it is paired with (first appearance
    order); a slot's contributions are (pair, alpha) for the partner side and (pair, beta) for the
    self term, once per side a appears on (a self pair counts both sides).
    """
    slot_rows, con_rows, metas = [], [], []
    widest = 1
    for a in which:
        slots: dict[int, list[tuple[int, int]]] = {a: []}
        for p, (i, j) in enumerate(pairs):
            for me, other in ((i, j), (j, i)):
                if me == a:
                    slots.setdefault(other, []).append((p, _ALPHA))
                    slots[a].append((p, _BETA))
        if len(slots) == 1 and not slots[a]:
            metas.append((len(slot_rows) // _SLOT_COLS, 0, a))
            continue
        metas.append((len(slot_rows) // _SLOT_COLS, len(slots), a))
        widest = max(widest, len(slots))
        for b, cons in slots.items():
            slot_rows += [b, len(con_rows) // 2, len(cons), n, 1]
            for p, kind in cons:
                con_rows += [p, kind]
    return slot_rows, con_rows, metas, min(GRAD_SLOTS, widest)


__all__ = ["grad_x", "cka_pairs_bwd"]
