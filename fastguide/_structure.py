"""Grouped CKA: many independent small CKAs per layer pair, batched over a group dimension.

Two modes view an activation as G groups of an (n, d) examples matrix:

* ``"positions"`` — the paper's per-position CKA: for (B, T, D) activations, CKA at each position t
  over the batch (G = T groups of n = B examples); (B, C, H, W) maps give G = H*W, d = C.
* ``"structure"`` — per-sample structure: each sample's token x token (or spatial) Gram
  (G = B groups of n = T examples, d = D; (B, C, H, W) maps give n = H*W, d = C).

Per group the numerics are those of the layer ops (DESIGN.md sections 2-3): shift by the mean of the
first min(n, 32) rows, Gram by a batched GEMM, centring (H K H or U(K)) batched over groups, division
by the mean diagonal s, self-HSIC h, the degeneracy test per group; CKA per group with two square
roots, exactly 0 for a degenerate group. The analytic backward is the layer backward batched over
groups: ``dX_g = (2 / s_g) G_g X^_g``. Both are ``torch.library`` custom ops (fakes, autograd).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._torch_backend import center_gram_, degenerate_factor
from ._utils import acc_dtype, hsic_norm

__all__ = ["GROUP_MODES", "GroupStats", "group_view", "group_stats", "group_cka", "reduce_groups"]

GROUP_MODES = ("positions", "structure")
SHIFT_ROWS = 32


def group_view(x: torch.Tensor, mode: str, name: str) -> torch.Tensor:
    """The (G, n, d) grouped view of a (B, T, D) or (B, C, H, W) activation (no copy)."""
    if x.dim() == 3:
        return x.transpose(0, 1) if mode == "positions" else x
    if x.dim() == 4:
        seq = x.flatten(2)  # (B, C, HW)
        return seq.permute(2, 0, 1) if mode == "positions" else seq.transpose(1, 2)
    raise ValueError(
        f"tokens={mode!r} needs (B, T, D) sequence or (B, C, H, W) map activations; "
        f"{name} has shape {tuple(x.shape)}"
    )


@dataclass(frozen=True)
class GroupStats:
    """Precomputed grouped statistics of one (guide) layer: C (G, n, n), s, ok, h (each (G,))."""

    C: torch.Tensor
    s: torch.Tensor
    ok: torch.Tensor
    h: torch.Tensor
    mode: str
    estimator: str

    @property
    def groups(self) -> int:
        return self.C.shape[0]

    @property
    def n(self) -> int:
        return self.C.shape[1]

    def to(self, device) -> GroupStats:
        return GroupStats(
            self.C.to(device),
            self.s.to(device),
            self.ok.to(device),
            self.h.to(device),
            self.mode,
            self.estimator,
        )


def _shifted(X: torch.Tensor) -> torch.Tensor:
    """``X^ = X - mean(X[:, :min(n, 32)])`` per group, in the accumulation dtype (G, n, d)."""
    acc = acc_dtype(X.dtype)
    return X.to(acc) - X[:, :SHIFT_ROWS].to(acc).mean(dim=1, keepdim=True)


def _shift(X: torch.Tensor) -> torch.Tensor:
    """Per-group column shift, the mean of the first min(n, 32) rows (G, d), accumulation dtype."""
    return X[:, :SHIFT_ROWS].to(acc_dtype(X.dtype)).mean(dim=1)


def _kernels():
    from .kernels import group  # Triton is only needed on that path

    return group


def group_stats(X: torch.Tensor, estimator: str, backend: str = "torch") -> tuple[torch.Tensor, ...]:
    """Per-group statistics of one layer (G, n, d): C (G, n, n), s, ok, h (each (G,)). No autograd.

    ``backend="triton"``: the Grams come from one launch of the grouped Gram kernel (shift on load,
    the strided view read in place); the rest is batched torch ops over the (G, n, n) stack.
    """
    G, n, _ = X.shape
    acc = acc_dtype(X.dtype)
    if backend == "triton":
        K = _kernels().group_gram_fwd(X, _shift(X).contiguous())
    else:
        Xh = _shifted(X)
        K = torch.bmm(Xh, Xh.transpose(1, 2))
    sq = X.to(acc).square().sum(dim=(1, 2))
    K, t = center_gram_(K, estimator)
    # NaN-propagating comparisons (a NaN trace keeps ok True, so NaN reaches the output).
    ok = ~(t <= degenerate_factor(X.dtype) * sq)
    s = torch.where(ok, t / n, torch.ones_like(t))
    K.div_(s[:, None, None])
    h = K.square().sum(dim=(1, 2)) / hsic_norm(n, estimator)
    ok = ok & ~(h <= 0)
    return K, s, ok, h


def _pair_index(pairs: list[int]) -> list[tuple[int, int]]:
    return list(zip(pairs[0::2], pairs[1::2], strict=True))


@torch.library.custom_op("fastguide::group_cka_fwd", mutates_args=())
def _group_cka_fwd(
    layers: list[torch.Tensor],
    pre_C: torch.Tensor,
    pre_s: torch.Tensor,
    pre_ok: torch.Tensor,
    pre_h: torch.Tensor,
    pairs: list[int],
    estimator: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cka (P, G), C (L, G, n, n), s, ok, h (each (L, G))) for raw layers (G, n, d) + precomputed ones."""
    stats = [group_stats(X, estimator, backend) for X in layers]
    C = torch.stack([st[0] for st in stats])
    s = torch.stack([st[1] for st in stats])
    ok = torch.stack([st[2] for st in stats])
    h = torch.stack([st[3] for st in stats])
    L = C.shape[0]
    n = C.shape[2]
    pre = pre_C.to(C.dtype)
    h_all = torch.cat([h, pre_h.to(h.dtype)])
    ok_all = torch.cat([ok, pre_ok])
    N = hsic_norm(n, estimator)
    vals = []
    for i, j in _pair_index(pairs):
        Ci = C[i] if i < L else pre[i - L]
        Cj = C[j] if j < L else pre[j - L]
        vals.append((Ci * Cj).sum(dim=(1, 2)) / N)
    hsic = torch.stack(vals)
    pi = torch.tensor(pairs[0::2], device=C.device)
    pj = torch.tensor(pairs[1::2], device=C.device)
    valid = ok_all[pi] & ok_all[pj]
    root = torch.where(ok_all, h_all, torch.ones_like(h_all)).sqrt()
    cka = torch.where(valid, hsic / (root[pi] * root[pj]), torch.zeros_like(hsic))
    return cka, C, s, ok, h


@_group_cka_fwd.register_fake
def _(layers, pre_C, pre_s, pre_ok, pre_h, pairs, estimator, backend):
    ref = layers[0]
    G, n = ref.shape[0], ref.shape[1]
    dt = acc_dtype(ref.dtype)
    L, P = len(layers), len(pairs) // 2
    return (
        ref.new_empty((P, G), dtype=dt),
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
    pre_C: torch.Tensor,
    s: torch.Tensor,
    ok: torch.Tensor,
    pre_ok: torch.Tensor,
    h: torch.Tensor,
    pre_h: torch.Tensor,
    pairs: list[int],
    which: list[int],
    estimator: str,
    backend: str,
) -> list[torch.Tensor]:
    """Gradients of ``layers[a]`` for each ``a`` in ``which``: ``(2 / s) G X^`` batched over groups."""
    L = C.shape[0]
    n = C.shape[2]
    N = hsic_norm(n, estimator)
    pre = pre_C.to(C.dtype)
    h_all = torch.cat([h, pre_h.to(h.dtype)])
    ok_all = torch.cat([ok, pre_ok])
    hs = torch.where(ok_all, h_all, torch.ones_like(h_all))
    root = hs.sqrt()
    grad = grad.to(h.dtype)
    zero = torch.zeros_like(grad[0])
    # Per layer needing a gradient: G_a = sum over its pairs of (alpha C_b - beta C_a) / N, (G, n, n).
    acc: dict[int, torch.Tensor] = {}
    for p, (i, j) in enumerate(_pair_index(pairs)):
        valid = ok_all[i] & ok_all[j]
        g = grad[p]
        alpha = torch.where(valid, g / (root[i] * root[j]), zero)
        for a, b in ((i, j), (j, i)):
            if a not in which:
                continue
            beta = torch.where(valid, g * cka[p] / hs[a], zero)
            Cb = C[b] if b < L else pre[b - L]
            term = alpha[:, None, None] * Cb - beta[:, None, None] * C[a]
            acc[a] = term if a not in acc else acc[a] + term
    out = []
    for a in which:
        X = layers[a]
        Gm = acc.get(a)
        if Gm is None:
            out.append(torch.zeros_like(X))
            continue
        scale = 2.0 / s[a]
        if backend == "triton":
            out.append(_kernels().group_grad_bwd((Gm / N).contiguous(), X, _shift(X).contiguous(), scale))
        else:
            out.append((torch.bmm(Gm / N, _shifted(X)) * scale[:, None, None]).to(X.dtype))
    return out


@_group_cka_bwd.register_fake
def _(grad, cka, layers, C, pre_C, s, ok, pre_ok, h, pre_h, pairs, which, estimator, backend):
    return [torch.empty_like(layers[a]) for a in which]


def _setup_context(ctx, inputs, output):
    layers, pre_C, pre_s, pre_ok, pre_h, pairs, estimator, backend = inputs
    cka, C, s, ok, h = output
    ctx.which = [a for a, x in enumerate(layers) if x.requires_grad]
    ctx.n_layers = len(layers)
    ctx.args = (pairs, estimator, backend)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(cka, C, pre_C, s, ok, pre_ok, h, pre_h, *layers)


def _backward(ctx, grad_cka, _gC, _gs, _gok, _gh):
    cka, C, pre_C, s, ok, pre_ok, h, pre_h, *layers = ctx.saved_tensors
    grads = [None] * ctx.n_layers
    if ctx.which and grad_cka is not None:
        pairs, estimator, backend = ctx.args
        gs = _group_cka_bwd(
            grad_cka, cka, layers, C, pre_C, s, ok, pre_ok, h, pre_h, pairs, ctx.which, estimator, backend
        )
        for a, g in zip(ctx.which, gs, strict=True):
            grads[a] = g
    return grads, None, None, None, None, None, None, None


torch.library.register_autograd("fastguide::group_cka_fwd", _backward, setup_context=_setup_context)


def group_cka(
    layers: list[torch.Tensor],
    pre: list[GroupStats],
    pairs: list[tuple[int, int]],
    estimator: str,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group CKA (P, G) of pairs of global layer indices (raw grouped layers first, then ``pre``),
    and the (P, G) validity mask (both groups non-degenerate)."""
    ref = layers[0]
    G, n = ref.shape[0], ref.shape[1]
    dt = acc_dtype(ref.dtype) if not any(x.dtype == torch.float64 for x in layers) else torch.float64
    if pre:
        pre_C = torch.stack([st.C for st in pre])
        pre_s = torch.stack([st.s for st in pre])
        pre_ok = torch.stack([st.ok for st in pre])
        pre_h = torch.stack([st.h for st in pre])
    else:
        pre_C = ref.new_empty((0, G, n, n), dtype=dt)
        pre_s = ref.new_empty((0, G), dtype=dt)
        pre_ok = ref.new_empty((0, G), dtype=torch.bool)
        pre_h = ref.new_empty((0, G), dtype=dt)
    flat = [v for p in pairs for v in p]
    cka, _, _, ok, _ = _group_cka_fwd(layers, pre_C, pre_s, pre_ok, pre_h, flat, estimator, backend)
    ok_all = torch.cat([ok, pre_ok])
    pi = torch.tensor(flat[0::2], device=cka.device)
    pj = torch.tensor(flat[1::2], device=cka.device)
    return cka, ok_all[pi] & ok_all[pj]


def reduce_groups(cka: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the valid groups of each pair (P,); 0 for a pair with no valid group. No host sync."""
    count = valid.sum(dim=-1)
    total = torch.where(valid, cka, torch.zeros_like(cka)).sum(dim=-1)
    return torch.where(count > 0, total / count.clamp_min(1).to(cka.dtype), torch.zeros_like(total))
