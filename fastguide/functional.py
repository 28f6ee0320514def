"""Public CKA ops: each validates its arguments, builds the plan and runs the op (:mod:`fastguide._ops`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import _ops
from ._utils import acc_dtype, shifted
from ._validate import (
    TOKENS,
    Options,
    as_examples,
    check_layers,
    check_option,
    check_pairs,
    check_tensor,
    layer_list,
)

__all__ = ["LayerStats", "layer_stats", "gram", "cka", "cka_matrix", "cka_pairs"]


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
        return LayerStats(
            self.C.to(device),
            self.s.to(device),
            self.ok.to(device),
            self.h.to(device),
            self.estimator,
            self.kernel,
        )


def layer_stats(
    y: torch.Tensor,
    *,
    estimator: str = "unbiased",
    kernel: str = "linear",
    sigma: float | None = None,
    tokens: str = "flatten",
    backend: str = "auto",
) -> LayerStats:
    """Reduce one activation to its :class:`LayerStats` (no gradient; the activation can be freed).

    This is what a guide's forward hook calls, so that guide memory is one activation at a time plus
    one n x n matrix per layer.
    """
    Options(estimator=estimator, kernel=kernel, sigma=sigma, backend=backend, tokens=tokens, route="gram")
    check_tensor(y, "y")
    y2 = as_examples(y, tokens, "y")
    check_layers([y2], ["y"], estimator)
    with torch.no_grad():
        y2 = y2.detach()
        be = _ops.backend_module(backend, y2.device, kernel)
        C, s, ok, h, _ = be.gram_fwd([y2], estimator, kernel, sigma)
    return LayerStats(C[0], s[0], ok[0], h[0], estimator, kernel)


def cka_pairs(
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor | LayerStats],
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
    """
    opts = Options(
        estimator=estimator, kernel=kernel, sigma=sigma, backend=backend, tokens=tokens, route=route
    )
    if isinstance(ys, torch.Tensor) or not isinstance(ys, Sequence) or len(ys) == 0:
        raise TypeError("ys must be a non-empty list or tuple of tensors or LayerStats")
    xs2 = layer_list(xs, "xs", tokens)
    if pairs is None:
        if len(xs2) != len(ys):
            raise ValueError(f"pairs=None pairs xs[k] with ys[k]; got {len(xs2)} xs and {len(ys)} ys")
        pairs = [(k, k) for k in range(len(xs2))]
    plist = check_pairs(pairs, len(xs2), len(ys))
    # Only layers that appear in a pair are computed (and only they get a gradient).
    used_x = sorted({i for i, _ in plist})
    used_y = sorted({j for _, j in plist})
    raw_y = [k for k in used_y if not isinstance(ys[k], LayerStats)]
    pre_y = [k for k in used_y if isinstance(ys[k], LayerStats)]
    ys_raw = layer_list([ys[k] for k in raw_y], "ys", tokens) if raw_y else []
    A, B = len(used_x), len(ys_raw)
    where_x = {k: r for r, k in enumerate(used_x)}
    where_y = {k: A + r for r, k in enumerate(raw_y)}
    where_y.update({k: A + B + r for r, k in enumerate(pre_y)})
    glob = [(where_x[i], where_y[j]) for i, j in plist]
    layers = [xs2[k] for k in used_x] + ys_raw
    return _ops.run(_ops.build_plan(layers, [ys[k] for k in pre_y], glob, opts))


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
    """
    opts = Options(
        estimator=estimator, kernel=kernel, sigma=sigma, backend=backend, tokens=tokens, route=route
    )
    xs2 = layer_list(xs, "xs", tokens)
    A = len(xs2)
    if ys is None:
        layers = xs2
        pairs = [(i, j) for i in range(A) for j in range(A)]
        B = A
    else:
        ys2 = layer_list(ys, "ys", tokens)
        B = len(ys2)
        layers = xs2 + ys2
        pairs = [(i, A + j) for i in range(A) for j in range(B)]
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
    """CKA of two activations with the same number of examples, a 0-d tensor (differentiable)."""
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
    """
    check_tensor(x, "x")
    check_option(tokens, "tokens", TOKENS)
    X = as_examples(x, tokens, "x")
    if center:
        Xh = shifted(X)
        X = Xh - Xh.mean(dim=0)
    else:
        X = X.to(acc_dtype(X.dtype))
    return X @ X.T
