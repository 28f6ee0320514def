"""The Triton backend: the functions of :mod:`fastguide._torch_backend` on the fused kernels.

Same five entry points (``gram_table``, ``pair_dots``, ``layer_grad``, ``feature_fwd``,
``feature_bwd``), so the ops pick a backend and never branch on it. It wraps the launchers of
``fastguide.kernels`` (imported lazily by :func:`load_kernels`: Triton is needed on this path only):
``gram_fwd`` for the Gram statistics, ``hsic_pairs`` for the pair dots, ``grad_x`` for the per-layer
gradient. The feature route is plain GEMMs on (n, d) matrices, so it runs the torch
implementation here too. Linear kernel only (``kernel="rbf"`` is refused when the backend is chosen).
"""

from __future__ import annotations

import torch

from . import _torch_backend as tb
from ._utils import hsic_norm, pair_index, shift_of

__all__ = [
    "load_kernels",
    "gram_table",
    "pair_dots",
    "layer_grad",
    "feature_fwd",
    "feature_bwd",
    "group_gram",
    "group_grad",
]

_KERNELS = None
_LAUNCHERS = ("gram_fwd", "hsic_pairs", "grad_x")


def load_kernels():
    """The ``fastguide.kernels`` package (launchers ``gram_fwd``, ``hsic_pairs``, ``grad_x``).

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


def _kernel_stats(xs: list[torch.Tensor], estimator: str) -> tuple[torch.Tensor, ...]:
    """The launcher's (C, s, ok, h, sig), plus the torch-side parts of the degeneracy rule the kernel
    does not apply yet (docs/numerics.md, "Degenerate layers"; to move into kernels/gram.py).

    * the vanishing test ``||centred K||_F <= VANISH_UNITS eps tr(X^ X^T)``, with the trace of the
      shifted Gram from O(nd) column sums (``||x||^2 - 2 c.(x^T 1) + n ||c||^2``, c the shift);
    * for fp16/bf16 layers, the trace test with ``degenerate_factor`` (eps^2, where the kernel uses
      (4 eps)^2): ``tr(HKH)`` from the same column sums, and the C of a layer that the kernel flagged
      but that passes is rescaled from ``s = 1`` to ``s = tr(HKH) / n``.
    """
    C, s, ok, h, sig = load_kernels().gram_fwd(list(xs), estimator)
    n = xs[0].shape[0]
    N = hsic_norm(n, estimator)
    acc = C.dtype
    sq, ref, t = [], [], []
    for x in xs:
        c = shift_of(x).to(acc)
        sq.append(torch.linalg.vector_norm(x, dtype=acc).square())
        col = x.sum(dim=0, dtype=acc) - n * c  # sum of the shifted rows
        ref.append(sq[-1] - 2.0 * (c @ x.sum(dim=0, dtype=acc)) + n * (c @ c))
        t.append(ref[-1] - col @ col / n)
    sq, ref, t = torch.stack(sq), torch.stack(ref).clamp_min(0.0), torch.stack(t)
    norm = s * (h * N).sqrt()  # ||centred K||: the kernel divided by s (1 where it flagged the layer)
    if any(x.dtype in (torch.float16, torch.bfloat16) for x in xs):
        thr = torch.tensor([tb.degenerate_factor(x.dtype) for x in xs], dtype=acc, device=C.device) * sq
        trace_ok = ~(t <= thr)
        s_new = torch.where(trace_ok & ~ok, t / n, s)
        f = s / s_new
        C = C * f[:, None, None]
        h = h * f * f
        s = s_new
        ok = trace_ok & ~(norm <= 0)
    ok = ok & ~tb.vanishes(norm, ref)
    return C, torch.where(ok, s, torch.ones_like(s)), ok, h, sig


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
        out = _kernel_stats(list(xs), estimator)
    else:
        parts = [_kernel_stats([xs[k] for k in g], estimator) for g in groups]
        order = torch.tensor([k for g in groups for k in g], device=xs[0].device).argsort()
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
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    Cs = [c.to(acc) for c in Cs]
    return load_kernels().grad_x(x, Cs, w.to(acc), (2.0 / s).to(acc))


feature_fwd = tb.feature_fwd
feature_bwd = tb.feature_bwd


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
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return _group_kernels().group_grad_bwd(
        W.to(acc).contiguous(), x, tb.group_shift(x).contiguous(), scale.to(acc).contiguous()
    )
