"""Grouped CKA: many independent small CKAs per layer pair, batched over a group dimension.

Two ``tokens=`` modes view an activation as G groups of an (n, d) examples matrix
(:func:`fastguide._validate.group_view`, a view, no copy):

* ``"positions"`` -- the paper's per-position CKA: for (B, T, D) activations, CKA at each position t
  over the batch (G = T groups of n = B examples, d = D); (B, C, H, W) maps give G = H*W, d = C.
* ``"structure"`` -- per-sample structure: each sample's token x token (or spatial) Gram
  (G = B groups of n = T examples, d = D; (B, C, H, W) maps give n = H*W, d = C).

Per group the numerics are those of the layer ops (DESIGN.md sections 2-3): shift by the mean of the
group's first min(n, 32) rows, Gram by one batched GEMM (or one grouped Triton launch) per layer,
centring (H K H or U(K)) and normalisation by the mean diagonal s batched over all groups of all
layers, self-HSIC h, the degeneracy test per group; CKA per group with two square roots, exactly 0
for a degenerate group ("invalid"). The analytic backward is the layer backward batched over groups:
``dX_g = (2 / s_g) G_g X^_g``. Both are ``torch.library`` custom ops (fakes, autograd), like
:mod:`fastguide._ops`; the arithmetic of the Grams and of the backward GEMM is the backend's
(``group_gram`` / ``group_grad`` of :mod:`fastguide._torch_backend` / :mod:`fastguide._triton_backend`).

Reduction (:func:`reduce_groups`): a pair's CKA is the mean of its per-group CKAs over the *valid*
groups (both sides non-degenerate); invalid groups are left out (they get no gradient), and a pair
with no valid group is 0 -- the rule of a degenerate layer, applied per group.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from . import _torch_backend, _triton_backend
from ._torch_backend import center_gram_, degenerate_factor, stack_dtype, vanishes
from ._utils import hsic_norm, pair_index

__all__ = ["GroupStats", "GroupCKA", "group_stats", "make_group_stats", "group_cka", "reduce_groups"]

_BACKENDS = {"torch": _torch_backend, "triton": _triton_backend}


@dataclass(frozen=True)
class GroupStats:
    """Precomputed grouped statistics of one (guide) layer, the grouped :class:`fastguide.LayerStats`.

    ``C`` (G, n, n): each group's centred Gram divided by its mean diagonal ``s``; ``h`` the self-HSICs;
    ``ok`` False for a degenerate group (each (G,)). Constants: no gradient flows back through them.
    Made by :func:`fastguide.layer_stats` with ``tokens="positions"`` or ``"structure"``.
    """

    C: torch.Tensor
    s: torch.Tensor
    ok: torch.Tensor
    h: torch.Tensor
    estimator: str
    tokens: str

    @property
    def groups(self) -> int:
        """G: positions (``"positions"``) or samples (``"structure"``)."""
        return self.C.shape[0]

    @property
    def n(self) -> int:
        """Examples per group: the batch size (``"positions"``) or tokens per sample (``"structure"``)."""
        return self.C.shape[1]

    def to(self, device) -> GroupStats:
        return replace(self, **{k: getattr(self, k).to(device) for k in ("C", "s", "ok", "h")})


class GroupCKA(NamedTuple):
    """Per-group CKAs of P pairs: ``cka`` (P, G), exactly 0 where ``valid`` (P, G) is False."""

    cka: torch.Tensor
    valid: torch.Tensor


def group_stats(layers: list[torch.Tensor], estimator: str, backend: str) -> tuple[torch.Tensor, ...]:
    """Grouped statistics of L layers (G, n, d_l): C (L, G, n, n), s, ok, h (each (L, G)). No autograd.

    One Gram pass per layer into its slot of the stack, then centring and normalisation of the whole
    stack at once; self-HSICs one layer at a time (a (G, n, n) transient, not the whole stack's).
    """
    be = _BACKENDS[backend]
    G, n = layers[0].shape[:2]
    C = torch.empty((len(layers), G, n, n), dtype=stack_dtype(layers), device=layers[0].device)
    # Threshold (4 eps)^2 ||x_g||^2 of each group, eps of the layer's input dtype (DESIGN.md section 3).
    thr = torch.stack([be.group_gram(X, C[l]) * degenerate_factor(X.dtype) for l, X in enumerate(layers)])
    ref = C.diagonal(dim1=-2, dim2=-1).sum(-1)  # rounding reference of the vanishing test
    C, t = center_gram_(C, estimator)
    # NaN-propagating comparisons (a NaN trace keeps ok True, so NaN reaches the output).
    ok = ~(t <= thr)
    s = torch.where(ok, t / n, torch.ones_like(t))
    C.div_(s[..., None, None])
    N = hsic_norm(n, estimator)
    h = torch.stack([(c * c).sum(dim=(-2, -1)) for c in C]) / N
    # The layer rule per group, the vanishing centred Gram included (U(K) = 0: issue 14 item 2).
    ok = ok & ~(h <= 0) & ~vanishes(s * (h * N).sqrt(), ref)
    s = torch.where(ok, s, torch.ones_like(s))
    return C, s, ok, h


def make_group_stats(X: torch.Tensor, estimator: str, tokens: str, backend: str) -> GroupStats:
    """:class:`GroupStats` of one (G, n, d) view (no gradient)."""
    with torch.no_grad():
        C, s, ok, h = group_stats([X.detach()], estimator, backend)
    return GroupStats(C[0], s[0], ok[0], h[0], estimator, tokens)


def _mat(C: torch.Tensor, pre: torch.Tensor, k: int) -> torch.Tensor:
    """Global layer k's (G, n, n) stack: raw layers first, then the precomputed ones."""
    L = C.shape[0]
    return C[k] if k < L else pre[k - L]


def _pair_list(pairs: list[int]) -> list[tuple[int, int]]:
    return list(zip(pairs[0::2], pairs[1::2], strict=True))


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fastguide::group_cka_fwd", mutates_args=())
def _group_cka_fwd(
    layers: list[torch.Tensor],
    pre_C: torch.Tensor,
    pre_ok: torch.Tensor,
    pre_h: torch.Tensor,
    pairs: list[int],
    estimator: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cka (P, G), valid (P, G), C (L, G, n, n), s, ok, h (each (L, G))).

    ``layers``: raw (G, n, d) views; ``pre_*``: stacked precomputed :class:`GroupStats` (M, G, ...);
    ``pairs``: flat ``[i0, j0, i1, j1, ...]`` of global layer indices (raw first, then precomputed).
    """
    C, s, ok, h = group_stats(layers, estimator, backend)
    pre = pre_C.to(C.dtype)
    h_all = torch.cat([h, pre_h.to(h.dtype)])
    ok_all = torch.cat([ok, pre_ok])
    hsic = torch.stack([(_mat(C, pre, i) * _mat(C, pre, j)).sum(dim=(-2, -1)) for i, j in _pair_list(pairs)])
    hsic = hsic / hsic_norm(C.shape[-1], estimator)
    pi, pj = pair_index(pairs, C.device)
    valid = ok_all[pi] & ok_all[pj]
    root = torch.where(ok_all, h_all, torch.ones_like(h_all)).sqrt()
    cka = torch.where(valid, hsic / (root[pi] * root[pj]), torch.zeros_like(hsic))
    return cka, valid, C, s, ok, h


@_group_cka_fwd.register_fake
def _(layers, pre_C, pre_ok, pre_h, pairs, estimator, backend):
    ref = layers[0]
    G, n = ref.shape[0], ref.shape[1]
    dt = stack_dtype(layers)
    L, P = len(layers), len(pairs) // 2
    return (
        ref.new_empty((P, G), dtype=dt),
        ref.new_empty((P, G), dtype=torch.bool),
        ref.new_empty((L, G, n, n), dtype=dt),
        ref.new_empty((L, G), dtype=dt),
        ref.new_empty((L, G), dtype=torch.bool),
        ref.new_empty((L, G), dtype=dt),
    )


@torch.library.custom_op("fastguide::group_cka_bwd", mutates_args=())
def _group_cka_bwd(
    grad: torch.Tensor,
    cka: torch.Tensor,
    layers: list[torch.Tensor],
    C: torch.Tensor,
    s: torch.Tensor,
    ok: torch.Tensor,
    h: torch.Tensor,
    pre_C: torch.Tensor,
    pre_ok: torch.Tensor,
    pre_h: torch.Tensor,
    pairs: list[int],
    which: list[int],
    estimator: str,
    backend: str,
) -> list[torch.Tensor]:
    """Gradients of ``layers[a]`` for each ``a`` in ``which`` (contiguous (G, n, d), the layer's dtype).

    Per group, as the layer backward (DESIGN.md section 2): ``alpha_p = g_p / sqrt(h_i h_j)``,
    ``beta = g_p CKA_p / h_a``, ``G_a = (sum_p alpha_p C_b - beta C_a) / N``, ``dX_a = (2 / s_a) G_a X^_a``;
    invalid groups are masked before G is formed (else NaN).
    """
    be = _BACKENDS[backend]
    N = hsic_norm(C.shape[-1], estimator)
    pre = pre_C.to(C.dtype)
    ok_all = torch.cat([ok, pre_ok])
    hs = torch.where(ok_all, torch.cat([h, pre_h.to(h.dtype)]), torch.ones_like(ok_all, dtype=h.dtype))
    root = hs.sqrt()
    pi, pj = pair_index(pairs, C.device)
    valid = ok_all[pi] & ok_all[pj]
    grad = grad.to(h.dtype)
    zero = torch.zeros_like(grad)
    alpha = torch.where(valid, grad / (root[pi] * root[pj]), zero)[..., None, None]  # (P, G, 1, 1)
    beta = (
        torch.where(valid, grad * cka / hs[pi], zero)[..., None, None],
        torch.where(valid, grad * cka / hs[pj], zero)[..., None, None],
    )
    plist = _pair_list(pairs)
    out = []
    for a in which:
        Gm = None  # one (G, n, n) buffer per layer, accumulated in place
        for p, (i, j) in enumerate(plist):
            for side, (u, v) in enumerate(((i, j), (j, i))):
                if u != a:
                    continue
                if Gm is None:
                    Gm = _mat(C, pre, v) * alpha[p]
                else:
                    Gm.addcmul_(_mat(C, pre, v), alpha[p])
                Gm.addcmul_(C[a], beta[side][p], value=-1.0)
        x = layers[a]
        if Gm is None:
            out.append(x.new_zeros(x.shape))
        else:
            out.append(be.group_grad(Gm.div_(N), x, 2.0 / s[a]))
    return out


@_group_cka_bwd.register_fake
def _(grad, cka, layers, C, s, ok, h, pre_C, pre_ok, pre_h, pairs, which, estimator, backend):
    return [layers[a].new_empty(layers[a].shape) for a in which]


def _setup_context(ctx, inputs, output):
    layers, pre_C, pre_ok, pre_h, pairs, estimator, backend = inputs
    cka, _valid, C, s, ok, h = output
    ctx.which = [a for a, x in enumerate(layers) if x.requires_grad]
    ctx.n_layers = len(layers)
    ctx.args = (pairs, estimator, backend)
    # Only the CKA output is differentiable; no zero gradient the size of the Gram stack.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(cka, C, s, ok, h, pre_C, pre_ok, pre_h, *layers)


def _backward(ctx, grad_cka, *_unused):
    grads = [None] * ctx.n_layers
    if ctx.which and grad_cka is not None:
        cka, C, s, ok, h, pre_C, pre_ok, pre_h, *layers = ctx.saved_tensors
        pairs, estimator, backend = ctx.args
        gs = _group_cka_bwd(
            grad_cka, cka, layers, C, s, ok, h, pre_C, pre_ok, pre_h, pairs, ctx.which, estimator, backend
        )
        for a, g in zip(ctx.which, gs, strict=True):
            grads[a] = g
    return grads, None, None, None, None, None, None


torch.library.register_autograd("fastguide::group_cka_fwd", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- entry points
def group_cka(
    layers: list[torch.Tensor],
    pre: list[GroupStats],
    pairs: list[tuple[int, int]],
    estimator: str,
    backend: str,
) -> GroupCKA:
    """Per-group CKA (P, G) of in-range pairs of global layer indices (raw (G, n, d) views first, then
    ``pre``) and the (P, G) validity mask. Differentiable in the raw layers. Arguments already checked."""
    ref = layers[0]
    G, n = ref.shape[:2]
    if pre:
        pre_C = torch.stack([st.C for st in pre])
        pre_ok = torch.stack([st.ok for st in pre])
        pre_h = torch.stack([st.h for st in pre])
    else:
        dt = stack_dtype(layers)
        pre_C = ref.new_empty((0, G, n, n), dtype=dt)
        pre_ok = ref.new_empty((0, G), dtype=torch.bool)
        pre_h = ref.new_empty((0, G), dtype=dt)
    flat = [v for p in pairs for v in p]
    cka, valid, *_ = _group_cka_fwd(list(layers), pre_C, pre_ok, pre_h, flat, estimator, backend)
    return GroupCKA(cka, valid)


def reduce_groups(cka: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the valid groups of each pair, (P,); 0 for a pair with no valid group. No host sync."""
    count = valid.sum(dim=-1)
    total = torch.where(valid, cka, torch.zeros_like(cka)).sum(dim=-1)
    return torch.where(count > 0, total / count.clamp_min(1).to(cka.dtype), torch.zeros_like(total))
