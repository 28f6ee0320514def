"""Public CKA ops: each validates its arguments, builds the plan and runs the op (:mod:`fastguide._ops`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from . import _ops, _structure
from ._structure import GroupCKA, GroupStats
from ._torch_backend import group_shift
from ._utils import acc_dtype, shifted
from ._validate import (
    GROUP_TOKENS,
    TOKENS,
    Options,
    as_examples,
    check_group_layers,
    check_group_stats,
    check_layers,
    check_option,
    check_pairs,
    check_tensor,
    group_list,
    group_view,
    layer_list,
)

__all__ = [
    "LayerStats",
    "GroupStats",
    "GroupCKA",
    "layer_stats",
    "gram",
    "cka",
    "cka_matrix",
    "cka_pairs",
    "cka_groups",
]


@dataclass(frozen=True)
class LayerStats:
    """Precomputed per-layer statistics of one (guide) layer, for :func:`cka_pairs` / ``CKALoss``.

    ``C`` is the (n, n) centred Gram normalised by its mean diagonal ``s``; ``h`` the self-HSIC;
    ``ok`` False for a degenerate layer. They are constants: no gradient flows back through them.
    Made by :func:`layer_stats`; holds no reference to the activation it came from.
    """

    C: torch.Tensor
    s: torch.Tensor
    ok: torch.Tensor
    h: torch.Tensor
    estimator: str
    kernel: str

    @property
    def n(self) -> int:
        return self.C.shape[0]

    def to(self, device) -> LayerStats:
        return replace(self, **{k: getattr(self, k).to(device) for k in ("C", "s", "ok", "h")})


def layer_stats(
    y: torch.Tensor,
    *,
    estimator: str = "unbiased",
    kernel: str = "linear",
    sigma: float | None = None,
    tokens: str = "flatten",
    backend: str = "auto",
) -> LayerStats | GroupStats:
    """Reduce one activation to its :class:`LayerStats` (no gradient; the activation can be freed).

    This is what a guide's forward hook calls, so that guide memory is one activation at a time plus
    one n x n matrix per layer. With ``tokens="positions"`` or ``"structure"`` it returns the grouped
    :class:`GroupStats` (one n x n matrix per position or per sample), which :func:`cka_pairs` and
    :func:`cka_groups` take in ``ys`` with the same ``tokens``.
    """
    Options(estimator=estimator, kernel=kernel, sigma=sigma, backend=backend, tokens=tokens, route="gram")
    check_tensor(y, "y")
    if tokens in GROUP_TOKENS:
        Y = group_view(y, tokens, "y")
        check_group_layers([Y], ["y"], tokens, estimator)
        return _structure.make_group_stats(Y, estimator, tokens, _group_backend(backend, Y.device))
    y2 = as_examples(y, tokens, "y")
    check_layers([y2], ["y"], estimator)
    with torch.no_grad():
        y2 = y2.detach()
        be = _ops.backend_module(backend, y2.device, kernel)
        C, s, ok, h, *_ = be.gram_table([y2], estimator, kernel, sigma)
    return LayerStats(C[0], s[0], ok[0], h[0], estimator, kernel)


def cka_pairs(
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor | LayerStats | GroupStats],
    pairs: Sequence[tuple[int, int]] | None = None,
    *,
    estimator: str = "unbiased",
    kernel: str = "linear",
    sigma: float | None = None,
    backend: str = "auto",
    tokens: str = "flatten",
    route: str = "auto",
) -> torch.Tensor:
    """CKA of selected layer pairs ``(i, j)`` -> ``CKA(xs[i], ys[j])``, a (len(pairs),) tensor.

    ``pairs=None`` pairs ``xs[k]`` with ``ys[k]``. Each layer's Gram is computed once however many
    pairs use it. Elements of ``ys`` may be precomputed :class:`LayerStats` (constants). Differentiable
    in every tensor that requires grad, through an analytic backward.

    ``tokens="positions"`` / ``"structure"`` (linear kernel, (B, T, D) or (B, C, H, W) activations): one
    CKA per position over the batch, or per sample between token x token Grams; each pair's value is
    the mean over its valid (non-degenerate) groups, 0 if none (:func:`cka_groups` gives the per-group
    values; docs/structure.md). ``ys`` may then hold :class:`GroupStats` from :func:`layer_stats`.
    """
    opts = Options(
        estimator=estimator, kernel=kernel, sigma=sigma, backend=backend, tokens=tokens, route=route
    )
    if opts.tokens in GROUP_TOKENS:
        return _structure.reduce_groups(*_group_pairs(xs, ys, pairs, opts))
    layers, pre, glob, _ = _select(xs, ys, pairs, opts, LayerStats, layer_list)
    return _ops.run(_ops.build_plan(layers, pre, glob, opts))


def _select(xs, ys, pairs, opts: Options, stats_type, to_layers):
    """The layers a pair call computes: (raw layer views, precomputed stats, global pairs, names).

    Raw layers are the used ``xs`` then the used raw ``ys`` (views by ``to_layers``); precomputed
    ``ys`` (``stats_type``) come after them; ``names`` (``"xs[i]"``, ``"ys[j]"``) follow the same order,
    for error messages. Only layers that appear in a pair are computed (and only they get a gradient).
    """
    if isinstance(ys, torch.Tensor) or not isinstance(ys, Sequence) or len(ys) == 0:
        raise TypeError(f"ys must be a non-empty list or tuple of tensors or {stats_type.__name__}")
    other = GroupStats if stats_type is LayerStats else LayerStats
    for k, y in enumerate(ys):
        if isinstance(y, other):
            raise TypeError(
                f"ys[{k}] is a precomputed {other.__name__}, which this call (tokens={opts.tokens!r}) cannot "
                f"use: make it with fastguide.layer_stats(..., tokens={opts.tokens!r})"
            )
    xs2 = to_layers(xs, "xs", opts.tokens)
    if pairs is None:
        if len(xs2) != len(ys):
            raise ValueError(f"pairs=None pairs xs[k] with ys[k]; got {len(xs2)} xs and {len(ys)} ys")
        pairs = [(k, k) for k in range(len(xs2))]
    plist = check_pairs(pairs, len(xs2), len(ys))
    used_x = sorted({i for i, _ in plist})
    used_y = sorted({j for _, j in plist})
    raw_y = [k for k in used_y if not isinstance(ys[k], stats_type)]
    pre_y = [k for k in used_y if isinstance(ys[k], stats_type)]
    ys_raw = to_layers([ys[k] for k in raw_y], "ys", opts.tokens) if raw_y else []
    A, B = len(used_x), len(ys_raw)
    where_x = {k: r for r, k in enumerate(used_x)}
    where_y = {k: A + r for r, k in enumerate(raw_y)}
    where_y.update({k: A + B + r for r, k in enumerate(pre_y)})
    glob = [(where_x[i], where_y[j]) for i, j in plist]
    names = [f"xs[{k}]" for k in used_x] + [f"ys[{k}]" for k in raw_y + pre_y]
    return [xs2[k] for k in used_x] + ys_raw, [ys[k] for k in pre_y], glob, names


# --------------------------------------------------------------------------- grouped modes
def _group_backend(backend: str, device: torch.device) -> str:
    return "triton" if _ops.use_triton(backend, device, "linear") else "torch"


def _run_groups(layers: list[torch.Tensor], pre: list, glob, opts: Options, names: list[str]) -> GroupCKA:
    """Check grouped views and precomputed GroupStats against each other, then run the grouped op.

    ``names``: the raw layers' then the precomputed statistics' argument names (for the messages).
    """
    L = len(layers)
    check_group_layers(layers, names[:L], opts.tokens, opts.estimator)
    G, n = layers[0].shape[:2]
    check_group_stats(pre, opts, G, n, names[0], names[L:], layers[0].device)
    return _structure.group_cka(
        layers, pre, glob, opts.estimator, _group_backend(opts.backend, layers[0].device)
    )


def _group_pairs(xs, ys, pairs, opts: Options) -> GroupCKA:
    layers, pre, glob, names = _select(xs, ys, pairs, opts, GroupStats, group_list)
    return _run_groups(layers, pre, glob, opts, names)


def cka_groups(
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor | GroupStats],
    pairs: Sequence[tuple[int, int]] | None = None,
    *,
    tokens: str = "positions",
    estimator: str = "unbiased",
    backend: str = "auto",
) -> GroupCKA:
    """Per-group CKAs of selected layer pairs: ``GroupCKA(cka, valid)``, both (len(pairs), G).

    ``tokens="positions"``: G = T positions (H*W for (B, C, H, W) maps), each CKA over the batch;
    ``tokens="structure"``: G = B samples, each CKA between the two layers' token x token (spatial)
    Grams of that sample. ``valid`` is False where either side's group is degenerate (its CKA is then
    exactly 0, with zero gradient). :func:`cka_pairs` with the same ``tokens`` returns the mean over
    the valid groups of each pair; this is for other reductions (e.g. the paper's sum over positions,
    ``(1 - c.cka).where(c.valid, 0).sum(-1)``). Differentiable in ``xs`` and raw ``ys``; ``ys`` may hold
    precomputed :class:`GroupStats`. Linear kernel.
    """
    opts = Options(estimator=estimator, backend=backend, tokens=tokens)
    if tokens not in GROUP_TOKENS:
        raise ValueError(f"cka_groups needs tokens in {GROUP_TOKENS}; got {tokens!r}")
    return _group_pairs(xs, ys, pairs, opts)


def cka_matrix(
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor] | None = None,
    *,
    estimator: str = "unbiased",
    kernel: str = "linear",
    sigma: float | None = None,
    backend: str = "auto",
    tokens: str = "flatten",
    route: str = "auto",
) -> torch.Tensor:
    """All-pairs CKA, a (len(xs), len(ys)) tensor; ``ys=None`` compares xs with itself.

    One Gram per layer and one GEMM over the flattened centred Grams for all pairs. Differentiable.
    With ``tokens="positions"`` / ``"structure"``: each entry is the mean over the valid groups, as in
    :func:`cka_pairs`.
    """
    opts = Options(
        estimator=estimator, kernel=kernel, sigma=sigma, backend=backend, tokens=tokens, route=route
    )
    grouped = opts.tokens in GROUP_TOKENS
    to_layers = group_list if grouped else layer_list
    xs2 = to_layers(xs, "xs", tokens)
    A = len(xs2)
    if ys is None:
        layers = xs2
        pairs = [(i, j) for i in range(A) for j in range(A)]
        B = A
    else:
        ys2 = to_layers(ys, "ys", tokens)
        B = len(ys2)
        layers = xs2 + ys2
        pairs = [(i, A + j) for i in range(A) for j in range(B)]
    if grouped:
        names = [f"xs[{i}]" for i in range(A)] + ([] if ys is None else [f"ys[{j}]" for j in range(B)])
        return _structure.reduce_groups(*_run_groups(layers, [], pairs, opts, names)).view(A, B)
    return _ops.run(_ops.build_plan(layers, [], pairs, opts)).view(A, B)


def cka(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    estimator: str = "unbiased",
    kernel: str = "linear",
    sigma: float | None = None,
    backend: str = "auto",
    tokens: str = "flatten",
    route: str = "auto",
) -> torch.Tensor:
    """CKA of two activations with the same number of examples, a 0-d tensor (differentiable).

    ``tokens="positions"`` / ``"structure"``: the mean per-position / per-sample CKA (:func:`cka_pairs`).
    """
    check_tensor(x, "x")
    check_tensor(y, "y")
    return cka_pairs(
        [x],
        [y],
        [(0, 0)],
        estimator=estimator,
        kernel=kernel,
        sigma=sigma,
        backend=backend,
        tokens=tokens,
        route=route,
    )[0]


def gram(x: torch.Tensor, *, center: bool = True, tokens: str = "flatten") -> torch.Tensor:
    """The (n, n) Gram ``X X^T`` of the flattened features, column-mean-centred by default.

    Accumulates in fp32 for fp16/bf16/fp32 inputs (fp64 stays fp64) and returns that dtype.
    Centring subtracts a shift (mean of the first 32 rows) and then the exact column mean, so large
    offsets do not cancel catastrophically in fp32. Differentiable through plain autograd.
    ``tokens="positions"`` / ``"structure"``: the (G, n, n) stack of each group's Gram (centred per group).
    """
    check_tensor(x, "x")
    check_option(tokens, "tokens", TOKENS)
    if tokens in GROUP_TOKENS:
        X = group_view(x, tokens, "x")
        if center:
            Xh = X.to(acc_dtype(X.dtype)) - group_shift(X).unsqueeze(1)
            X = Xh - Xh.mean(dim=1, keepdim=True)
        else:
            X = X.to(acc_dtype(X.dtype))
        return X @ X.transpose(1, 2)
    X = as_examples(x, tokens, "x")
    if center:
        Xh = shifted(X)
        X = Xh - Xh.mean(dim=0)
    else:
        X = X.to(acc_dtype(X.dtype))
    return X @ X.T
