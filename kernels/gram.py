"""Fused centred Gram matrices of many layers: shift on load, symmetric tiles, centring epilogue.

Per layer ``x`` of shape (n, d) (DESIGN.md section 2, same algorithm as the torch backend's
``gram_fwd``):

* ``X^ = x - shift`` with ``shift`` the mean of the first ``min(n, 32)`` rows (subtracted on load);
* ``K = X^ X^T`` (upper-triangle tiles only; fp32 accumulate, fp64 for fp64 inputs);
* row sums ``r = K 1``, diagonal ``a = diag K``, ``tr = 1'a``, ``tot = 1'r``;
* ``t = tr(HKH) = tr - tot / n``; ``thr = (k eps)^2 ||x||_F^2`` (raw input, summed while loading;
  k = 4, or 1 for fp16/bf16: :func:`~fastguide.kernels._common.degenerate_factor`);
  ``ok = ~(t <= thr)``; ``s = where(ok, t / n, 1)``;
* biased ``C = (K - m 1' - 1 m' + g) / s`` with ``m = r / n``, ``g = tot / n^2`` (= H K H / s);
  unbiased ``C = U(K) / s``: with ``r~ = r - a``, ``tot~ = tot - tr``,
  ``U_ij = K_ij - (r~_i + r~_j) / (n - 2) + tot~ / ((n - 1)(n - 2))`` off the diagonal, 0 on it;
* ``h = <C, C>_F / N`` (N = n(n-3) unbiased, (n-1)^2 biased); ``ok &= ~(h <= 0)`` and ``ok &= ~(s sqrt(h N)
  <= 64 eps tr)`` (the centred Gram vanishes at the rounding level of K); ``s = 1`` where not ok.

Three passes, each one launch for all layers (the first one launch per dtype/layout/alignment
group), plus a one-program-per-layer finish (h, final ok, sig):

1. ``_gram_fwd_kernel``: one program per (layer, upper tile (ti, tj), feature split). Reads its
   rows of x once per tile (shift on load), writes the upper tile of K (split partials to a side
   buffer) and, in the epilogue, the tile's row sums and column sums (symmetry), diagonal and the
   raw-norm threshold partial -- O(n) values per tile, so no later pass re-reads K for them.
2. ``_gram_rowsum_kernel``: one program per (row block, layer); sums those partials into r, a and
   per-block partials of tr and tot (reads O(S * T * n) values, not n^2).
3. ``_gram_center_kernel``: one program per (upper centring tile, layer); t, ok, s from the
   partials, then sums the split partials of the tile, centres it, divides by s and writes C in
   place of K, tile and mirror, plus the tile's share of <C, C>.

K traffic: written once (upper half), read once (upper half), C written once (full).
No host synchronisation: every table is built from shapes, strides and data pointers and cached.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    SHIFT_ROWS,
    VANISH_UNITS,
    _cast,
    _column_shift,
    _x_offsets,
    aligned_2d,
    degenerate_factor,
    device_table,
    input_precision,
    layout_2d,
    needs_int64,
    on_input_device,
    pow2_bucket,
    tl_dtype,
)
from ._configs import (
    gram_block_m,
    gram_center_block,
    gram_fwd_configs,
    gram_rowsum_block,
    interpreting,
    prune_gram_fwd,
)
from ._tables import _check_layers, _dot_dtype, _program_table, _split_plan


@triton.autotune(
    configs=gram_fwd_configs(),
    key=["N_BUCKET", "D_BUCKET", "BLOCK_M", "LAYOUT", "ALIGNED", "DOT_LOW", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": prune_gram_fwd},
)
@triton.jit(do_not_specialize=["num_tiles", "thr_coef", "N_BUCKET", "D_BUCKET"])
def _gram_fwd_kernel(
    k_ptr,
    kx_ptr,
    rp_ptr,
    dp_ptr,
    thr_ptr,
    x_ref_ptr,
    xp_ptr,
    xs_ptr,
    prog_ptr,
    n,
    n_shift,
    num_tiles,
    thr_coef,
    N_BUCKET,
    D_BUCKET,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SHIFT_ROWS: tl.constexpr,
    LAYOUT: tl.constexpr,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
    IDX: tl.constexpr,
    ACC: tl.constexpr,
    DOT_LOW: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Partial Gram tiles ``K_s[l, I, J] = sum_{k in split s} X^[I, k] X^[J, k]`` (upper tiles only)
    of a layer group, with the epilogue statistics the centring needs.

    Pointers:
      k_ptr: (L, n, n) main Gram buffer: split 0 of every layer, upper tiles (ti <= tj) only;
        the centring pass completes the lower triangle.
      kx_ptr: (S_x, n, n) upper tiles of the extra split partials (k_ptr itself when none).
      rp_ptr: (slots, num_tiles, n) row-sum partials: rp[slot, c, i] = sum_{j in column block c}
        K_s[i, j]; tile (ti, tj) writes its row sums at c = tj and, off the diagonal, its column
        sums at c = ti (symmetry), so every entry is written exactly once.
      dp_ptr: (slots, n) diagonal partials (diagonal tiles).
      thr_ptr: (slots, num_tiles) threshold partials ``thr_coef sum x^2`` of the raw input over the
        rows of tile ti and the split's features (diagonal tiles).
      x_ref_ptr: the group's first layer: only its element type is used (the pointer witness).
      xp_ptr: (G,) int64 data pointers of the group's layers, each an (n, d_g) matrix.
      xs_ptr: (G, 2) int64 strides (row, feature) of those layers.
      prog_ptr: (P, 8) int32 program table (see ``_tables._PROG_COLS``).
    Constexprs: LAYOUT 0 row-major / 1 column-major / 2 general strides (every layer of the group);
      ALIGNED: the host checked 16-byte alignment (``aligned_2d``) of every layer (VEC elements
      per 16 bytes); IDX: int32 in-tile
      offsets, or int64 where the host found they could overflow.
    Grid: (P,), one program per (layer, upper-triangle tile, feature split).
    """
    pid = tl.program_id(0)
    row = prog_ptr + pid * 8
    layer = tl.load(row + 0)
    ti = tl.load(row + 1)
    tj = tl.load(row + 2)
    # Chunk starts are multiples of the feature granule (64); ends too, or the layer's width d.
    k0 = tl.multiple_of(tl.load(row + 3), 16)
    k1 = tl.load(row + 4)
    to_extra = tl.load(row + 5)
    kslot = tl.load(row + 6).to(tl.int64)
    slot = tl.load(row + 7).to(tl.int64)

    x_ptr = tl.load(xp_ptr + layer).to(tl.pointer_type(x_ref_ptr.dtype.element_ty))
    stride_xm = tl.load(xs_ptr + layer * 2)
    stride_xk = tl.load(xs_ptr + layer * 2 + 1)
    # (n itself is specialised by Triton when it is a multiple of 16: then K's rows vectorise.)
    n_vec = n
    if ALIGNED:
        # Host-checked (aligned_2d): 16-byte aligned pointer, strides and extents of VEC elements.
        x_ptr = tl.multiple_of(x_ptr, 16)
        if LAYOUT == 0:
            stride_xm = tl.multiple_of(stride_xm, VEC)
            k1 = tl.multiple_of(k1, VEC)
        if LAYOUT == 1:
            stride_xk = tl.multiple_of(stride_xk, VEC)

    offs_r = tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_K)
    offs_s = tl.arange(0, SHIFT_ROWS)
    mask_i = ti * BLOCK_M + offs_r < n_vec
    mask_j = tj * BLOCK_M + offs_r < n_vec
    mask_s = offs_s < n_shift
    # In-tile offsets (IDX: int32 unless the host found they could overflow) relative to int64
    # per-program bases; a unit stride is a compile-time 1 so the compiler sees the contiguity.
    if LAYOUT == 0:
        stride_xk = 1
    elif LAYOUT == 1:
        stride_xm = 1
    # (BLOCK_M, BLOCK_K) tile and (SHIFT_ROWS, BLOCK_K) shift-row offsets.
    off_t, off_s = _x_offsets(offs_r, offs_c, offs_s, stride_xm, stride_xk, LAYOUT, IDX)
    xa_ptr = x_ptr + (ti * BLOCK_M).to(tl.int64) * stride_xm
    xb_ptr = x_ptr + (tj * BLOCK_M).to(tl.int64) * stride_xm

    off_diag = ti != tj
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=ACC)
    acc_sq = tl.zeros((BLOCK_M,), dtype=ACC)
    for k in range(k0, k1, BLOCK_K):
        col = _cast(k, tl.int64) * stride_xk
        mask_k = k + offs_c < k1
        shift = _column_shift(x_ptr + col, off_s, mask_s[:, None] & mask_k[None, :], n_shift, ACC)
        mask_a = mask_i[:, None] & mask_k[None, :]
        a = tl.load(xa_ptr + col + off_t, mask=mask_a, other=0.0).to(ACC)  # (BLOCK_M, BLOCK_K)
        acc_sq += tl.sum(a * a, axis=1)
        # Shift on load; masked lanes must stay exactly 0 (else -shift leaks into K).
        a = tl.where(mask_a, a - shift[None, :], 0.0)
        # A diagonal tile's second operand is its first: skip that load (no L2/DRAM traffic).
        mask_b = (mask_j[:, None] & mask_k[None, :] & off_diag) != 0
        b = tl.load(xb_ptr + col + off_t, mask=mask_b, other=0.0).to(ACC)
        b = tl.where(mask_b, b - shift[None, :], tl.where(off_diag, 0.0, a))  # (BLOCK_M, BLOCK_K)
        if DOT_LOW:
            # 16-bit operands on the tensor cores, fp32 accumulation.
            acc = tl.dot(a.to(DOT_DTYPE), tl.trans(b.to(DOT_DTYPE)), acc, out_dtype=ACC)
        else:
            acc = tl.dot(a, tl.trans(b), acc, input_precision=INPUT_PRECISION, out_dtype=ACC)

    # Masked rows/columns of acc are exactly 0 (zeroed operands), so the sums below are exact.
    # One store: the destination buffer (K or the split partials) is picked per program.
    nn = n_vec.to(tl.int64) * n_vec
    dst = (
        tl.where(to_extra != 0, kx_ptr, k_ptr)
        + kslot * nn
        + (ti * BLOCK_M).to(tl.int64) * n_vec
        + tj * BLOCK_M
    )
    off_o = offs_r[:, None] * n_vec + offs_r[None, :]  # (BLOCK_M, BLOCK_M); n * BLOCK_M < 2**31 (host)
    tl.store(dst + off_o, acc, mask=mask_i[:, None] & mask_j[None, :])
    # (The `!= 0` keeps masks boolean: the 3.9 interpreter turns `block & scalar` into int32.)
    rp = rp_ptr + slot * num_tiles * n
    tl.store(rp + tj * n + ti * BLOCK_M + offs_r, tl.sum(acc, axis=1), mask=mask_i)
    tl.store(rp + ti * n + tj * BLOCK_M + offs_r, tl.sum(acc, axis=0), mask=(mask_j & (ti != tj)) != 0)
    diag = tl.sum(tl.where(offs_r[:, None] == offs_r[None, :], acc, 0.0), axis=1)
    tl.store(dp_ptr + slot * n + ti * BLOCK_M + offs_r, diag, mask=(mask_i & (ti == tj)) != 0)
    tl.store(thr_ptr + slot * num_tiles + ti, thr_coef * tl.sum(acc_sq, axis=0), mask=ti == tj)


@triton.jit(do_not_specialize=["num_rblocks", "num_tiles"])
def _gram_rowsum_kernel(
    r_ptr,
    dg_ptr,
    tp_ptr,
    rp_ptr,
    dp_ptr,
    lmeta_ptr,
    n,
    num_rblocks,
    num_tiles,
    BLOCK_R: tl.constexpr,
):
    """Row sums and diagonal of each Gram from the epilogue partials of ``_gram_fwd_kernel``.

    Pointers:
      r_ptr, dg_ptr: (L, n) row sums ``K 1`` and diagonal of K (output).
      tp_ptr: (L, num_rblocks, 2) per-row-block partials of ``tot = 1'K1`` and ``tr = tr K``.
      rp_ptr: (slots, num_tiles, n) row-sum partials; dp_ptr: (slots, n) diagonal partials.
      lmeta_ptr: (L, 3) int32: first extra slot, number of splits S, first slot; the layer's
        slots are [first, first + S).
    Grid: (cdiv(n, BLOCK_R), L). Reads S * num_tiles * BLOCK_R values per program (no n x n pass).
    """
    pid_r = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < n
    nsplit = tl.load(lmeta_ptr + layer * 3 + 1)
    slot0 = tl.load(lmeta_ptr + layer * 3 + 2).to(tl.int64)
    acc_r = tl.zeros((BLOCK_R,), dtype=r_ptr.dtype.element_ty)
    acc_d = tl.zeros((BLOCK_R,), dtype=r_ptr.dtype.element_ty)
    for sidx in range(0, nsplit):
        base = rp_ptr + (slot0 + sidx) * num_tiles * n
        for c in range(0, num_tiles):
            acc_r += tl.load(base + c * n + offs_r, mask=mask_r, other=0.0)
        acc_d += tl.load(dp_ptr + (slot0 + sidx) * n + offs_r, mask=mask_r, other=0.0)
    tl.store(r_ptr + layer * n + offs_r, acc_r, mask=mask_r)
    tl.store(dg_ptr + layer * n + offs_r, acc_d, mask=mask_r)
    tpo = tp_ptr + (layer * num_rblocks + pid_r) * 2
    tl.store(tpo, tl.sum(acc_r, axis=0))
    tl.store(tpo + 1, tl.sum(acc_d, axis=0))


@triton.jit(do_not_specialize=["num_rblocks", "num_tiles", "num_upper"])
def _gram_center_kernel(
    k_ptr,
    s_ptr,
    ok_ptr,
    hp_ptr,
    kx_ptr,
    r_ptr,
    dg_ptr,
    tp_ptr,
    thr_ptr,
    lmeta_ptr,
    tiles_ptr,
    n,
    num_rblocks,
    num_tiles,
    num_upper,
    BLOCK_C: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HAS_SPLIT: tl.constexpr,
    UNBIASED: tl.constexpr,
):
    """Centre and normalise each Gram in place, ``C = centred(K) / s``, one upper tile at a time.

    Pointers:
      k_ptr: (L, n, n) upper tiles of K (split 0) on input; the full symmetric C on output.
      s_ptr: (L,) s = tr(HKH)/n, or 1 for a degenerate layer. ok_ptr: (L,) int8 trace test.
      hp_ptr: (L, num_upper) partial sums of C*C (off-diagonal tiles counted twice).
      kx_ptr: (S_x, n, n) upper tiles of the extra split partials, summed in on load.
      r_ptr, dg_ptr: (L, n) row sums and diagonal of K. tp_ptr: (L, num_rblocks, 2) tot/tr partials.
      thr_ptr: (slots, num_tiles) threshold partials. lmeta_ptr: (L, 3) int32 per-layer slots.
      tiles_ptr: (num_upper, 2) int32 upper-triangle coordinates (ci <= cj) of BLOCK_C tiles; every
        such tile lies in an upper BLOCK_M tile of K (BLOCK_C divides BLOCK_M).
    Grid: (num_upper, L); every program recomputes the layer's scalars t, ok, s from the partials
    (O(num_rblocks + S * num_tiles) loads), then rewrites tile (ci, cj) and its mirror.
    """
    pid_t = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    ACC = k_ptr.dtype.element_ty
    nf = n.to(ACC)
    nn = n.to(tl.int64) * n

    offs_t = tl.arange(0, BLOCK_T)
    acc_tot = tl.zeros((BLOCK_T,), dtype=ACC)
    acc_tr = tl.zeros((BLOCK_T,), dtype=ACC)
    for t0 in range(0, num_rblocks, BLOCK_T):
        m = (t0 + offs_t) < num_rblocks
        tpo = tp_ptr + (layer * num_rblocks + t0 + offs_t) * 2
        acc_tot += tl.load(tpo, mask=m, other=0.0)
        acc_tr += tl.load(tpo + 1, mask=m, other=0.0)
    tot = tl.sum(acc_tot, axis=0)
    tr = tl.sum(acc_tr, axis=0)
    ext0 = tl.load(lmeta_ptr + layer * 3).to(tl.int64)
    nsplit = tl.load(lmeta_ptr + layer * 3 + 1)
    slot0 = tl.load(lmeta_ptr + layer * 3 + 2).to(tl.int64)
    acc_thr = tl.zeros((BLOCK_T,), dtype=ACC)
    total = nsplit * num_tiles
    for t0 in range(0, total, BLOCK_T):
        m = (t0 + offs_t) < total
        acc_thr += tl.load(thr_ptr + slot0 * num_tiles + t0 + offs_t, mask=m, other=0.0)
    thr = tl.sum(acc_thr, axis=0)

    t = tr - tot / nf
    # NaN-propagating: a NaN trace keeps ok so the NaN reaches the outputs.
    ok = tl.where(t <= thr, 0, 1)
    s = tl.where(ok != 0, t / nf, 1.0)
    tl.store(s_ptr + layer, s, mask=pid_t == 0)
    tl.store(ok_ptr + layer, ok.to(tl.int8), mask=pid_t == 0)

    ci = tl.load(tiles_ptr + pid_t * 2)
    cj = tl.load(tiles_ptr + pid_t * 2 + 1)
    offs_r = tl.arange(0, BLOCK_C)
    offs_i = ci * BLOCK_C + offs_r
    offs_j = cj * BLOCK_C + offs_r
    mask_i = offs_i < n
    mask_j = offs_j < n
    mask = mask_i[:, None] & mask_j[None, :]
    # int32 in-tile offsets (n * BLOCK_C < 2**31, host-checked) from int64 tile bases.
    off_c = offs_r[:, None] * n + offs_r[None, :]  # (BLOCK_C, BLOCK_C)
    corner = (ci * BLOCK_C).to(tl.int64) * n + cj * BLOCK_C
    mirror = (cj * BLOCK_C).to(tl.int64) * n + ci * BLOCK_C
    base = k_ptr + layer * nn
    kt = tl.load(base + corner + off_c, mask=mask, other=0.0)  # (BLOCK_C, BLOCK_C)
    if HAS_SPLIT:
        for sidx in range(0, nsplit - 1):
            kt += tl.load(kx_ptr + (ext0 + sidx) * nn + corner + off_c, mask=mask, other=0.0)
    r_i = tl.load(r_ptr + layer * n + offs_i, mask=mask_i, other=0.0)
    r_j = tl.load(r_ptr + layer * n + offs_j, mask=mask_j, other=0.0)
    if UNBIASED:
        r_i = r_i - tl.load(dg_ptr + layer * n + offs_i, mask=mask_i, other=0.0)
        r_j = r_j - tl.load(dg_ptr + layer * n + offs_j, mask=mask_j, other=0.0)
        inv_den = 1.0 / (nf - 2.0)
        c0 = (tot - tr) / ((nf - 1.0) * (nf - 2.0))
    else:
        inv_den = 1.0 / nf
        c0 = tot / (nf * nf)
    cu = kt - (r_i[:, None] + r_j[None, :]) * inv_den + c0
    if UNBIASED:
        cu = tl.where(offs_i[:, None] == offs_j[None, :], 0.0, cu)
    cu = tl.where(mask, cu / s, 0.0)
    tl.store(base + corner + off_c, cu, mask=mask)
    # Mirror tile (J, I): C is stored full for the pair and backward kernels.
    tl.store(base + mirror + off_c, tl.trans(cu), mask=(tl.trans(mask) & (ci != cj)) != 0)
    weight = tl.where(ci == cj, 1.0, 2.0)
    tl.store(hp_ptr + layer * num_upper + pid_t, weight * tl.sum(tl.sum(cu * cu, axis=1), axis=0))


@triton.jit(do_not_specialize=["n", "num_upper", "num_rblocks", "vanish_coef"])
def _gram_finish_kernel(
    h_ptr,
    ok_ptr,
    sig_ptr,
    klog_ptr,
    s_ptr,
    hp_ptr,
    ok8_ptr,
    tp_ptr,
    n,
    num_upper,
    num_rblocks,
    vanish_coef,
    BLOCK_U: tl.constexpr,
    BLOCK_T: tl.constexpr,
    UNBIASED: tl.constexpr,
):
    """Self-HSIC and final flags: ``h = sum(hp) / N``; ``ok = ok8 & ~(h <= 0) & ~vanishes`` with
    ``vanishes = s sqrt(h N) <= vanish_coef tr(K)`` (the centred Gram is zero up to the rounding of
    the Gram it was centred from: DESIGN.md section 3, docs/numerics.md "Degenerate layers");
    ``s = 1`` where not ok; ``sig = 1``; ``klog = 0`` (the op table's RBF-scale column).

    Pointers: h_ptr (L,) ACC; ok_ptr (L,) bool; sig_ptr, klog_ptr (L,) ACC; s_ptr (L,) ACC, read and
    rewritten; hp_ptr (L, num_upper) partials of <C, C> from the centring pass; ok8_ptr (L,) int8
    trace test; tp_ptr (L, num_rblocks, 2) tot/tr partials of the row-sum pass.
    Grid: (L,). (One launch instead of a handful of tiny torch ops: the W1 loss is launch-bound.)
    """
    layer = tl.program_id(0).to(tl.int64)
    ACC = h_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK_U)
    acc = tl.zeros((BLOCK_U,), dtype=ACC)
    for u0 in range(0, num_upper, BLOCK_U):
        acc += tl.load(hp_ptr + layer * num_upper + u0 + offs, mask=(u0 + offs) < num_upper, other=0.0)
    offs_t = tl.arange(0, BLOCK_T)
    acc_tr = tl.zeros((BLOCK_T,), dtype=ACC)
    for t0 in range(0, num_rblocks, BLOCK_T):
        m = (t0 + offs_t) < num_rblocks
        acc_tr += tl.load(tp_ptr + (layer * num_rblocks + t0 + offs_t) * 2 + 1, mask=m, other=0.0)
    tr = tl.sum(acc_tr, axis=0)
    nf = n.to(ACC)
    if UNBIASED:
        N = nf * (nf - 3.0)
    else:
        N = (nf - 1.0) * (nf - 1.0)
    h = tl.sum(acc, axis=0) / N
    s = tl.load(s_ptr + layer)
    # NaN-propagating comparisons: a NaN h or trace keeps ok, so the NaN reaches the outputs.
    gone = s * tl.sqrt(tl.where(h < 0.0, 0.0, h * N)) <= vanish_coef * tr
    ok = (tl.load(ok8_ptr + layer) != 0) & (tl.where(h <= 0.0, 0, 1) != 0) & (tl.where(gone, 0, 1) != 0)
    tl.store(h_ptr + layer, h)
    tl.store(ok_ptr + layer, ok)
    tl.store(s_ptr + layer, tl.where(ok, s, 1.0))
    tl.store(sig_ptr + layer, nf * 0.0 + 1.0)  # exactly 1 in ACC (n is finite)
    tl.store(klog_ptr + layer, nf * 0.0)


@on_input_device
def gram_fwd(
    xs: list[torch.Tensor],
    estimator: str,
    *,
    block_m: int | None = None,
    split: int | list[int] | None = None,
    with_klog: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Normalised centred Grams of L layers (linear kernel); the Triton twin of the torch
    backend's ``gram_fwd``.

    Args:
      xs: L tensors (n, d_l) with the same n on one device; float16/bfloat16/float32/float64
        (all float64 or none), any strides.
      estimator: ``"unbiased"`` (U-centring) or ``"biased"`` (H K H).
      block_m, split: tuning overrides (tile size; feature-axis splits per layer) for tests and
        benchmarks; ``None`` picks them from ``kernels/_configs.py``.
      with_klog: also return ``klog`` (L,) zeros, the op table's RBF-scale column, written by the
        last launch (one torch fill fewer per call on the op path).

    Returns (C, s, ok, h, sig): C (L, n, n) in the accumulation dtype (fp64 for fp64 inputs, else
    fp32), s (L,), ok (L,) bool, h (L,), sig (L,) ones. Launches: one per (dtype, layout,
    alignment) group of layers (one for the usual all-contiguous list), plus three; no host
    synchronisation.
    """
    n, device, acc = _check_layers(xs, estimator)
    L = len(xs)
    if block_m is not None and (block_m < 16 or block_m & (block_m - 1)):
        raise ValueError(f"block_m must be a power of two >= 16; got {block_m}")
    fma = acc == torch.float64 or (
        any(x.dtype == torch.float32 for x in xs) and input_precision(torch.float32) == "ieee"
    )
    BM = block_m or gram_block_m(n, fma)
    if n * BM > 2**31 - 1:
        raise ValueError(f"n={n} is too large for the Triton Gram kernels (n * {BM} must fit in int32)")
    T = triton.cdiv(n, BM)
    ds = [x.shape[1] for x in xs]
    S, chunks, split0, ext0 = _split_plan(ds, T, split, n, min(x.element_size() for x in xs))
    ns, ne = sum(S), sum(S) - L

    K = torch.empty((L, n, n), dtype=acc, device=device)
    KX = torch.empty((ne, n, n), dtype=acc, device=device) if ne else K
    rp = torch.empty((ns, T, n), dtype=acc, device=device)
    dp = torch.empty((ns, n), dtype=acc, device=device)
    thr = torch.empty((ns, T), dtype=acc, device=device)

    max_bk = max(c.kwargs["BLOCK_K"] for c in gram_fwd_configs())
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(xs):
        tile64 = needs_int64(max(BM, SHIFT_ROWS), x.stride(0), max_bk, x.stride(1))
        groups.setdefault((x.dtype, layout_2d(x), aligned_2d(x), tile64), []).append(i)
    for (dtype, layout, aligned, tile64), idx in groups.items():
        spec = tuple((g, ds[g], S[g], chunks[g], ext0[g], split0[g]) for g in idx)
        table = device_table(
            lambda spec=spec: _program_table(spec, T), torch.int32, device, key=("gram_fwd", T, spec)
        )
        num_programs = sum(S[g] for g in idx) * (T * (T + 1) // 2)
        # Pointer and stride tables (cached by content: a training loop's activations come back at
        # the same addresses, so steady-state calls copy nothing).
        ptrs = device_table([xs[g].data_ptr() for g in idx], torch.int64, device)
        strides = device_table(
            [v for g in idx for v in (xs[g].stride(0), xs[g].stride(1))], torch.int64, device
        )
        dot_low = _dot_dtype(dtype)
        _gram_fwd_kernel[(num_programs,)](
            K,
            KX,
            rp,
            dp,
            thr,
            xs[idx[0]],
            ptrs,
            strides,
            table,
            n,
            min(n, SHIFT_ROWS),
            T,
            degenerate_factor(dtype),
            pow2_bucket(n),
            pow2_bucket(max(chunks[g] for g in idx)),
            BLOCK_M=BM,
            SHIFT_ROWS=SHIFT_ROWS,
            LAYOUT=layout,
            ALIGNED=aligned,
            VEC=16 // xs[idx[0]].element_size(),
            IDX=tl.int64 if tile64 else tl.int32,
            ACC=tl_dtype(acc),
            DOT_LOW=dot_low is not None,
            DOT_DTYPE=dot_low if dot_low is not None else tl_dtype(acc),
            INPUT_PRECISION=input_precision(acc if dot_low is None else dtype),
        )

    BR = gram_rowsum_block(n)
    R = triton.cdiv(n, BR)
    lmeta = device_table([v for l in range(L) for v in (ext0[l], S[l], split0[l])], torch.int32, device)
    r = torch.empty((L, n), dtype=acc, device=device)
    dg = torch.empty((L, n), dtype=acc, device=device)
    tp = torch.empty((L, R, 2), dtype=acc, device=device)
    _gram_rowsum_kernel[(R, L)](r, dg, tp, rp, dp, lmeta, n, R, T, BLOCK_R=BR)

    BC = gram_center_block(BM, n, acc == torch.float64)
    TC = triton.cdiv(n, BC)
    tiles = device_table(
        lambda: [v for ci in range(TC) for cj in range(ci, TC) for v in (ci, cj)],
        torch.int32,
        device,
        key=("tiles", TC),
    )
    U = TC * (TC + 1) // 2
    s = torch.empty((L,), dtype=acc, device=device)
    ok8 = torch.empty((L,), dtype=torch.int8, device=device)
    hp = torch.empty((L, U), dtype=acc, device=device)
    BT = min(64, triton.next_power_of_2(max(R, T)))
    _gram_center_kernel[(U, L)](
        K,
        s,
        ok8,
        hp,
        KX,
        r,
        dg,
        tp,
        thr,
        lmeta,
        tiles,
        n,
        R,
        T,
        U,
        BLOCK_C=BC,
        BLOCK_T=BT,
        HAS_SPLIT=ne > 0,
        UNBIASED=estimator == "unbiased",
        num_warps=4,
        # Without a register budget ptxas caps some variants at 80 registers and spills.
        maxnreg=None if interpreting() else 255,
    )
    h = torch.empty((L,), dtype=acc, device=device)
    ok = torch.empty((L,), dtype=torch.bool, device=device)
    sig = torch.empty((L,), dtype=acc, device=device)
    klog = torch.empty((L,), dtype=acc, device=device)
    _gram_finish_kernel[(L,)](
        h,
        ok,
        sig,
        klog,
        s,
        hp,
        ok8,
        tp,
        n,
        U,
        R,
        VANISH_UNITS * torch.finfo(acc).eps,
        BLOCK_U=min(1024, triton.next_power_of_2(U)),
        BLOCK_T=BT,
        UNBIASED=estimator == "unbiased",
    )
    return (K, s, ok, h, sig, klog) if with_klog else (K, s, ok, h, sig)


__all__ = ["gram_fwd"]
