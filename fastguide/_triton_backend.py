"""The Triton backend: the backend interface of :mod:`fastguide._torch_backend` on the fused kernels.

The five basic entries (``gram_table``, ``pair_dots``, ``layer_grad``, ``feature_fwd``,
``feature_bwd``) plus the two optional fused ones the ops prefer when a backend has them:

* :func:`fused_fwd` -- the forward of a Gram-route call in a fixed number of launches:
  ``gram_fwd`` of the raw layers (4 launches, the degeneracy rule included), then ONE
  ``cka_pairs_fwd`` (pair HSICs and the CKA epilogue, precomputed ``LayerStats`` as its second
  stack, no concatenation) or, for an all-pairs block (``cka_matrix``), ONE ``cka_matrix_fwd``;
* :func:`fused_bwd` -- ONE ``cka_pairs_bwd`` launch for every layer that needs a gradient (pair
  weights, degenerate masks, 1/N and 2/s computed in the kernel).

So ``CKALoss`` forward+backward on W1 is 6 Triton launches and no torch op of its own
(kernels/README.md). The ops pick a backend module and call whichever entries it has; they never
branch on its name. ``pair_dots``/``layer_grad`` (``hsic_pairs``/``grad_x``) remain for the calls
the fused entries do not take: statistics-only plans (``MinibatchCKA``'s ``batch_hsic``). The
launchers come from ``fastguide.kernels`` (imported lazily by :func:`load_kernels`: Triton is needed
on this path only). The feature route is plain GEMMs on (n, d) matrices, so it runs the torch
implementation here too. Linear kernel only (``kernel="rbf"`` is refused when the backend is chosen).
No host synchronisation anywhere: index and pointer tables are cached device tensors
(``fastguide.kernels._common.device_table``).
"""

from __future__ import annotations

import functools

import torch

from . import _torch_backend as tb
from ._utils import acc_dtype, pair_index

__all__ = [
    "load_kernels",
    "gram_table",
    "pair_dots",
    "layer_grad",
    "feature_fwd",
    "feature_bwd",
    "fused_fwd",
    "fused_bwd",
    "group_gram",
    "group_grad",
]

_KERNELS = None
_LAUNCHERS = ("gram_fwd", "hsic_pairs", "grad_x", "cka_pairs_fwd", "cka_matrix_fwd", "cka_pairs_bwd")


def load_kernels():
    """The ``fastguide.kernels`` package (the launchers named in ``_LAUNCHERS``).

    Imported on first use; raises RuntimeError saying why when Triton or the kernels cannot be
    imported here (the benchmark harness calls this to report availability).
    """
    global _KERNELS
    if _KERNELS is None:
        try:
            from . import kernels  # lazy: Triton is only needed on this path

            missing = [f for f in _LAUNCHERS if not callable(getattr(kernels, f, None))]
            if missing:
                raise ImportError(f"fastguide.kernels lacks {', '.join(missing)}")
        except Exception as e:  # depends on the install (Triton, a GPU driver or TRITON_INTERPRET)
            raise RuntimeError(
                f"backend='triton' is not available: importing fastguide.kernels failed ({e})"
            ) from e
        _KERNELS = kernels
    return _KERNELS


def gram_table(
    xs: list[torch.Tensor], estimator: str, kernel: str = "linear", sigma: float | None = None
) -> tuple[torch.Tensor, ...]:
    """Per-layer statistics C (L, n, n), s, ok, h, sigma, klog of L layers, one grouped launch per
    accumulation dtype (float64 layers and the others are launched apart and joined in float64)."""
    if kernel != "linear":
        raise ValueError(
            "backend='triton' implements the linear kernel; use backend='torch' for kernel='rbf'"
        )
    groups = [[k for k, x in enumerate(xs) if (x.dtype == torch.float64) == f64] for f64 in (False, True)]
    groups = [g for g in groups if g]
    if len(groups) == 1:
        return load_kernels().gram_fwd(list(xs), estimator, with_klog=True)
    parts = [load_kernels().gram_fwd([xs[k] for k in g], estimator) for g in groups]
    from .kernels._common import device_table

    # Where each layer landed in the concatenation (host-computed; cached device table).
    where = [0] * len(xs)
    for pos, k in enumerate(k for g in groups for k in g):
        where[k] = pos
    order = device_table(where, torch.int64, xs[0].device)
    out = tuple(
        torch.cat([p[i].to(torch.float64) if p[i].is_floating_point() else p[i] for p in parts])[order]
        for i in range(5)
    )
    return (*out, torch.zeros_like(out[1]))


def _dots(SA: torch.Tensor, SB: torch.Tensor, li: list[int], lj: list[int]) -> torch.Tensor:
    """Pair inner products of one (stack, stack) group through the Triton kernel (one launch)."""
    gi, gj = pair_index([v for ab in zip(li, lj, strict=True) for v in ab], SA.device)
    return load_kernels().hsic_pairs(SA, SB, gi, gj).to(SA.dtype)


def pair_dots(
    stacks: list[torch.Tensor], index: list[tuple[int, int]], pairs: list[tuple[int, int]]
) -> torch.Tensor:
    """``<C_i, C_j>`` of each pair: one pair-kernel launch per (stack, stack) group."""
    return tb.block_dots(stacks, index, pairs, _dots)


def layer_grad(
    x: torch.Tensor,
    Cs: list[torch.Tensor],
    w: torch.Tensor,
    s: torch.Tensor,
    sig: torch.Tensor,
    klog: torch.Tensor,
    kernel: str,
    estimator: str,
) -> torch.Tensor:
    """``(2 / s) (sum_k w_k C_k) X^`` for one layer, fused (linear kernel: sig, klog unused).

    The launcher takes the C's in x's accumulation dtype: a float32 layer of a call with float64
    layers gets its partners' matrices rounded to float32 (its own contract).
    """
    acc = acc_dtype(x.dtype)
    Cs = [c.to(acc) for c in Cs]
    return load_kernels().grad_x(x, Cs, w.to(acc), (2.0 / s).to(acc))


feature_fwd = tb.feature_fwd
feature_bwd = tb.feature_bwd


# --------------------------------------------------------------------------- fused entries
@functools.lru_cache(maxsize=256)
def _matrix_block(pairs: tuple[tuple[int, int], ...], L1: int, L2: int):
    """``(r0, a, c0, b)`` when ``pairs`` is the row-major all-pairs block rows [r0, r0 + a) x columns
    [c0, c0 + b) of the layer space (raw layers [0, L1), precomputed [L1, L1 + L2)), each range
    inside one stack and at least 2 x 2 (what ``cka_matrix`` builds); else None (a single row or
    column is a handful of pairs: the exact elementwise pair kernel, not a padded GEMM)."""
    if not pairs:
        return None
    r0, c0 = pairs[0]
    b = next((k for k, (i, _) in enumerate(pairs) if i != r0), len(pairs))
    a = len(pairs) // b
    if min(a, b) < 2 or a * b != len(pairs):
        return None
    if pairs != tuple((r0 + i, c0 + j) for i in range(a) for j in range(b)):
        return None
    for lo, hi in ((r0, r0 + a), (c0, c0 + b)):
        if not (hi <= L1 or lo >= L1) or hi > L1 + L2:
            return None
    return r0, a, c0, b


def _rows(lo: int, size: int, L1: int, stacks):
    """(C, h, ok) views of global layers [lo, lo + size) from the (raw, precomputed) stacks."""
    k, off = (0, lo) if lo < L1 else (1, lo - L1)
    return tuple(t[off : off + size] for t in stacks[k])


def fused_fwd(
    layers: list[torch.Tensor],
    pre: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    pairs: list[tuple[int, int]],
    estimator: str,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Backend entry (optional, fused): CKA of ``pairs`` and the raw layers' table in a fixed number
    of launches, ``(cka (P,), (C, s, ok, h, sig, klog))``.

    ``gram_fwd`` of the raw layers (4 launches), then ``cka_pairs_fwd`` with the precomputed
    statistics ``pre = (C, h, ok)`` as its second stack (one launch: HSIC and CKA epilogue), or
    ``cka_matrix_fwd`` when the pairs are an all-pairs block (``cka_matrix``). ``dtype``: the call's
    accumulation dtype (the stacks are in it). Linear kernel, Gram route. No host synchronisation.
    """
    K = load_kernels()
    table = tuple(t.to(dtype) if t.is_floating_point() else t for t in gram_table(layers, estimator))
    C, _, ok, h, _, _ = table
    L1, L2 = C.shape[0], pre[0].shape[0]
    stacks = ((C, h, ok), pre)
    block = _matrix_block(tuple(pairs), L1, L2)
    if block is not None:
        r0, a, c0, b = block
        cka = K.cka_matrix_fwd(*_pair_args(_rows(r0, a, L1, stacks), _rows(c0, b, L1, stacks)), estimator)[0]
        return cka.reshape(-1), table
    two = {"C2": pre[0], "h2": pre[1], "ok2": pre[2]} if L2 else {}
    return K.cka_pairs_fwd(C, h, ok, pairs, estimator, **two)[0], table


def _pair_args(A, B):
    """``cka_matrix_fwd``'s (A, B, h_a, h_b, ok_a, ok_b) from two (C, h, ok) row sets."""
    return A[0], B[0], A[1], B[1], A[2], B[2]


def fused_bwd(
    grad: torch.Tensor,
    cka: torch.Tensor,
    layers: list[torch.Tensor],
    which: list[int],
    table: tuple[torch.Tensor, ...],
    pre: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    pairs: list[tuple[int, int]],
    estimator: str,
) -> list[torch.Tensor]:
    """Backend entry (optional, fused): gradients of ``layers[a]`` for a in ``which`` (in that order)
    from the forward's CKA and table: ONE ``cka_pairs_bwd`` launch for all of them (pair weights,
    degenerate masks, 1/N and 2/s inside the kernel).

    Layers of a call whose accumulation dtype is not their own (float32 layers of a call with
    float64 ones) are launched apart, with the stacks rounded to their dtype (the per-layer
    contract of ``grad_x``); the usual single-dtype call is one launch.
    """
    K = load_kernels()
    C, s, ok, h = table[:4]
    groups: dict[torch.dtype, list[int]] = {}
    for a in which:
        groups.setdefault(acc_dtype(layers[a].dtype), []).append(a)
    out: dict[int, torch.Tensor] = {}
    for acc, idx in groups.items():
        Ca, sa, ha, pa = (t.to(acc) for t in (C, s, h, pre[0]))
        two = {"C2": pa, "h2": pre[1].to(acc), "ok2": pre[2]} if pre[0].shape[0] else {}
        xs = [layers[a] for a in idx]
        gs = K.cka_pairs_bwd(grad, cka, xs, idx, Ca, sa, ha, ok, pairs, estimator, **two)
        out.update(zip(idx, gs, strict=True))
    return [out[a] for a in which]


# --------------------------------------------------------------------------- grouped Grams
def _group_kernels():
    load_kernels()  # the same availability check and message
    from .kernels import group

    return group


def group_gram(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Grams of the shifted groups of a (G, n, d) view into ``out``, one launch; returns ``||x_g||^2``."""
    return _group_kernels().group_gram_fwd(x, tb.group_shift(x).contiguous(), out)[1]


def group_grad(W: torch.Tensor, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale_g W_g X^_g`` per group of a (G, n, d) view, one launch, in x's dtype."""
    acc = acc_dtype(x.dtype)
    return _group_kernels().group_grad_bwd(
        W.to(acc).contiguous(), x, tb.group_shift(x).contiguous(), scale.to(acc).contiguous()
    )
