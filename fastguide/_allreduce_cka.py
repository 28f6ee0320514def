"""Exact global-batch CKA under torch.distributed from all-reduced sums (no activation gather).

Kept in its own module (``fastguide.distributed`` holds the gather route); the two could share a
namespace later. For the linear kernel, CKA over the global batch needs only sums over examples.
With a per-column shift c and a per-layer scale lambda common to all ranks (``X^ = (X - c) /
sqrt(lambda)``; CKA is invariant to both), and N = sum_r n_r:

    Xc^T Yc = sum_r X^_r^T Y^_r - u_x u_y^T / N,        u = sum_r X^_r^T 1,

and the biased estimator is ``||Xc^T Yc||_F^2 / (N - 1)^2``. The unbiased one (Song et al. 2012) in
terms of centred features is ``[||Xc^T Yc||^2 + tr_x tr_y / ((N-1)(N-2)) - N/(N-2) a^T b] / (N(N-3))``
with a, b the squared row norms of the centred features; ``a^T b`` expands into sums over examples of
the shifted rows (``sum alpha_i beta_i``, ``sum alpha_i y^_i``, ``sum beta_i x^_i``, with alpha, beta the
shifted rows' squared norms) and the global means, so the same single all-reduce carries it.

So every rank all-reduces, per pair, the d_x x d_y matrix ``X^_r^T Y^_r`` and, per layer, the upper
triangle of ``X^_r^T X^_r``, ``X^_r^T 1`` and ``||X_r||^2`` (+ 1 + d_x + d_y numbers per pair and 1 + d
per layer for the unbiased estimator), plus n_r -- instead of all-gathering world * n * d values per
layer and forming (world n)^2 Grams. Two collectives: the shift and scale (d + 1 numbers per layer),
then all sums in one flat buffer. The products run in the inputs' accumulation dtype (fp32) and the
post-processing after the all-reduce in float64 (d x d-sized, cheap), so the differences of large terms
in the unbiased form do not cost fp32 digits.

The all-reduce is differentiable: its backward all-reduces the gradient, so each rank's activations
get the sum over ranks of every rank's loss gradient -- ``world_size`` times the gradient of the
(identical) global loss -- which DDP/FSDP gradient averaging brings back to exactly the global-batch
gradient: the convention of :func:`fastguide.distributed.all_gather_batch`.

Numerics as the layer ops: the shift (the ranks' average of each rank's first-min(n, 32)-row mean)
removes large offsets before the products, the scale (the ranks' average spread of those rows) keeps
every sum O(N d^2) of unit-scale numbers (fp32 overflows neither at activation scale 1e6 nor underflows
at 1e-6), each centred self product is divided by its mean diagonal; a layer whose centred signal is
below its rounding level, ``tr <= (4 eps)^2 ||X||^2`` over the global batch, is degenerate and all its
CKAs are exactly 0 (zero gradient). A global batch below the estimator's minimum (N < 4 unbiased,
N < 2 biased) gives NaN (checking it would need a host sync).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist

from ._torch_backend import degenerate_factor, feature_cost, stack_dtype
from ._utils import SHIFT_ROWS, acc_dtype
from ._validate import (
    ESTIMATORS,
    GROUP_TOKENS,
    KERNELS,
    LAYER_TOKENS,
    TOKENS,
    check_option,
    check_pairs,
    layer_list,
    min_examples,
)

__all__ = ["allreduce_feature_cka", "allreduce_cost", "gather_cost", "choose_global_route", "cost_table"]


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; backward sums the gradient over ranks (the sum of every rank's loss)."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        t = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    @staticmethod
    def backward(ctx, g):
        g = g.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g, None


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    return t if _world(group) == 1 else _AllReduceSum.apply(t, group)


def _triu(d: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    iu = torch.triu_indices(d, d, device=device)
    return iu[0], iu[1]


def _unpack_sym(t: torch.Tensor, d: int) -> torch.Tensor:
    """The symmetric (d, d) matrix from its packed upper triangle (row-major ``triu_indices`` order)."""
    r, c = _triu(d, t.device)
    upper = t.new_zeros((d, d)).index_put((r, c), t)
    return upper + upper.T - torch.diag_embed(upper.diagonal())


def _check_inputs(xs, ys, pairs, estimator: str, tokens: str):
    check_option(estimator, "estimator", ESTIMATORS)
    check_option(tokens, "tokens", TOKENS)
    if tokens in GROUP_TOKENS:
        raise ValueError(
            f"allreduce_feature_cka compares one examples matrix per layer; tokens must be one of "
            f"{LAYER_TOKENS}, got {tokens!r}"
        )
    xs2 = layer_list(xs, "xs", tokens)
    ys2 = layer_list(ys, "ys", tokens)
    if pairs is None:
        if len(xs2) != len(ys2):
            raise ValueError(f"pairs=None pairs xs[k] with ys[k]; got {len(xs2)} xs and {len(ys2)} ys")
        pairs = [(k, k) for k in range(len(xs2))]
    plist = check_pairs(pairs, len(xs2), len(ys2))
    names = [f"xs[{k}]" for k in range(len(xs2))] + [f"ys[{k}]" for k in range(len(ys2))]
    layers = xs2 + ys2
    for x, name in zip(layers, names, strict=True):
        if x.shape[0] != layers[0].shape[0]:
            raise ValueError(
                f"all layers must have this rank's number of examples; {names[0]} has n={layers[0].shape[0]} "
                f"but {name} has n={x.shape[0]}"
            )
        if x.device != layers[0].device:
            raise ValueError(
                f"all layers must be on one device; {names[0]} is on {layers[0].device}, {name} on {x.device}"
            )
    return layers, len(xs2), plist


def _common_frame(
    layers: list[torch.Tensor], dt: torch.dtype, group
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Round 1: per layer, the shift c (d,) and scale lambda (0-d) shared by every rank (no autograd)."""
    with torch.no_grad():
        parts = []
        for x in layers:
            head = x[:SHIFT_ROWS].to(dt)
            mu = head.mean(dim=0)
            parts += [mu, (head - mu).square().sum(dim=1).mean().reshape(1)]
        loc = torch.cat(parts)
        world = _world(group)
        if world > 1:
            dist.all_reduce(loc, op=dist.ReduceOp.SUM, group=group)
            loc = loc / world
    out, off = [], 0
    for x in layers:
        d = x.shape[1]
        lam = loc[off + d]
        # No spread in the first rows anywhere (or NaN): no scaling; the degeneracy test decides.
        lam = torch.where(lam > 0, lam, torch.ones_like(lam))
        out.append((loc[off : off + d], lam))
        off += d + 1
    return out


def allreduce_feature_cka(
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor],
    pairs: Sequence[tuple[int, int]] | None = None,
    *,
    estimator: str = "biased",
    tokens: str = "flatten",
    group=None,
) -> torch.Tensor:
    """Linear CKA over the global batch of each ``(i, j)`` pair of ``xs[i]``, ``ys[j]``, a (P,) tensor.

    ``xs``/``ys``: this rank's activations (n_r, ...), viewed as examples by ``tokens`` as in
    :func:`fastguide.cka_pairs` (``"flatten"``, ``"mean"``, ``"samples"``); ``pairs=None`` pairs them one
    to one. Every rank of ``group`` must call it with the same layer widths and pairs (it is a
    collective); batch sizes n_r may differ. Without a process group of two or more ranks it computes
    the same quantity locally. Differentiable in every input that requires grad (module docstring for
    the gradient convention under DDP). Returns the accumulation dtype (fp32, fp64 for fp64 inputs).
    """
    layers, A, plist = _check_inputs(xs, ys, pairs, estimator, tokens)
    unbiased = estimator == "unbiased"
    dt = stack_dtype(layers)
    dev = layers[0].device
    frame = _common_frame(layers, dt, group)
    used = sorted({i for i, _ in plist} | {A + j for _, j in plist})
    Xh, alpha = {}, {}
    for l in used:
        c, lam = frame[l]
        Xh[l] = (layers[l].to(dt) - c) / lam.sqrt()
        if unbiased:
            alpha[l] = Xh[l].square().sum(dim=1)
    # Round 2: this rank's sums in one flat buffer.
    parts = [torch.full((1,), float(layers[0].shape[0]), dtype=dt, device=dev)]
    for l in used:
        X = Xh[l]
        raw_sq = torch.linalg.vector_norm(layers[l].detach(), dtype=dt).square() / frame[l][1]
        r, c = _triu(X.shape[1], dev)
        parts += [X.sum(dim=0), raw_sq.reshape(1), (X.T @ X)[r, c]]
        if unbiased:
            parts += [alpha[l].square().sum().reshape(1), X.T @ alpha[l]]
    for i, j in plist:
        X, Y = Xh[i], Xh[A + j]
        parts.append((X.T @ Y).flatten())
        if unbiased:
            a, b = alpha[i], alpha[A + j]
            parts += [(a * b).sum().reshape(1), Y.T @ a, X.T @ b]
    flat = _all_reduce(torch.cat(parts), group).double()
    # Global statistics, in float64.
    N = flat[0]
    off = 1

    def take(k: int) -> torch.Tensor:
        nonlocal off
        off += k
        return flat[off - k : off]

    stats = {}
    for l in used:
        d = Xh[l].shape[1]
        u, sq, Q = take(d), take(1)[0], _unpack_sym(take(d * (d + 1) // 2), d)
        m = u / N
        mu = m @ m
        tr = Q.diagonal().sum() - u @ u / N
        ok = ~(tr <= degenerate_factor(layers[l].dtype) * sq)
        s = torch.where(ok, tr / N, torch.ones_like(tr))
        h = ((Q - torch.outer(u, u) / N) / s).square().sum()
        if unbiased:
            S, v = take(1)[0], take(d)
            aa = S - 4 * (m @ v) + 4 * (m @ Q @ m) + 2 * mu * Q.diagonal().sum() - 3 * N * mu * mu
            h = h + (tr / s) ** 2 / ((N - 1) * (N - 2)) - N / (N - 2) * aa / (s * s)
        ok = ok & ~(h <= 0)
        stats[l] = (u, m, mu, Q.diagonal().sum(), tr, s, ok, torch.where(ok, h, torch.ones_like(h)))
    out = []
    for i, j in plist:
        ux, mx, mux, Ax, trx, sx, okx, hx = stats[i]
        uy, my, muy, Ay, try_, sy, oky, hy = stats[A + j]
        P = take(ux.numel() * uy.numel()).view(ux.numel(), uy.numel())
        hxy = ((P - torch.outer(ux, uy) / N) / (sx.sqrt() * sy.sqrt())).square().sum()
        if unbiased:
            S, vy, vx = take(1)[0], take(uy.numel()), take(ux.numel())
            ab = (
                S
                - 2 * (my @ vy)
                - 2 * (mx @ vx)
                + 4 * (mx @ P @ my)
                + muy * Ax
                + mux * Ay
                - 3 * N * mux * muy
            )
            hxy = hxy + (trx / sx) * (try_ / sy) / ((N - 1) * (N - 2)) - N / (N - 2) * ab / (sx * sy)
        val = hxy / (hx.sqrt() * hy.sqrt())
        out.append(torch.where(okx & oky, val, torch.zeros_like(val)))
    res = torch.stack(out)
    res = torch.where(N >= min_examples(estimator), res, torch.full_like(res, float("nan")))
    return res.to(acc_dtype(dt))


# --------------------------------------------------------------------------- costs and the route
class Cost(NamedTuple):
    """Per rank and per step (forward + backward): bytes each rank sends, and flops it computes."""

    bytes: float
    flops: float


def _used(ds_x, ds_y, pairs):
    return [ds_x[i] for i in sorted({i for i, _ in pairs})], [ds_y[j] for j in sorted({j for _, j in pairs})]


def allreduce_cost(
    ds_x: Sequence[int],
    ds_y: Sequence[int],
    pairs: Sequence[tuple[int, int]],
    n: int,
    world: int,
    estimator: str = "biased",
    elt: int = 4,
) -> Cost:
    """Cost of :func:`allreduce_feature_cka` (target layers ``ds_x`` need a gradient, guide layers not).

    Bytes: a ring all-reduce of M numbers sends 2 (w - 1) / w * M per rank; the sums are all-reduced
    forward and their gradient backward, plus the small first round. Flops (2 per multiply-add):
    forward ``X^T X`` (2 n d^2) per layer and ``X^T Y`` (2 n d_x d_y) per pair; backward
    ``X (G + G^T)`` (4 n d^2) per target layer and ``Y G^T`` (2 n d_x d_y) per pair; O(nd) terms dropped.
    """
    tx, gy = _used(ds_x, ds_y, pairs)
    extra_l = (lambda d: 1 + d) if estimator == "unbiased" else (lambda d: 0)
    extra_p = (lambda a, b: 1 + a + b) if estimator == "unbiased" else (lambda a, b: 0)
    M = 1 + sum(d * (d + 1) // 2 + d + 1 + extra_l(d) for d in tx + gy)
    M += sum(ds_x[i] * ds_y[j] + extra_p(ds_x[i], ds_y[j]) for i, j in pairs)
    first = sum(d + 1 for d in tx + gy)
    ring = 2.0 * (world - 1) / world
    by = ring * (first + 2 * M) * elt
    fl = sum(2 * n * d * d for d in tx + gy) + sum(4 * n * d * d for d in tx)
    fl += sum(4 * n * ds_x[i] * ds_y[j] for i, j in pairs)
    return Cost(by, fl)


def gather_cost(
    ds_x: Sequence[int],
    ds_y: Sequence[int],
    pairs: Sequence[tuple[int, int]],
    n: int,
    world: int,
    elt: int = 4,
) -> Cost:
    """Cost of gathering every used layer and computing CKA on the global batch (``Guidance(gather=True)``).

    Bytes: an all-gather sends (w - 1) n d per rank per layer; backward, each target layer's gathered
    gradient (w n d) is all-reduced (:func:`fastguide.distributed.all_gather_batch`). Flops: every rank
    computes the global-batch CKA on N = w n examples, on the route ``cka_pairs`` takes (Gram: N^2 d per
    layer forward, 2 N^2 d per target layer backward; feature route when fewer counted flops).
    """
    tx, gy = _used(ds_x, ds_y, pairs)
    N = world * n
    by = (
        sum((world - 1) * n * d for d in tx + gy) + sum(2.0 * (world - 1) / world * N * d for d in tx)
    ) * elt
    ds = list(tx) + list(gy)
    # Local (i, j) pairs over the used layers, for the counted-flop model of the route choice.
    ix = {v: k for k, v in enumerate(sorted({i for i, _ in pairs}))}
    jy = {v: len(tx) + k for k, v in enumerate(sorted({j for _, j in pairs}))}
    feat, gram = feature_cost(ds, [(ix[i], jy[j]) for i, j in pairs], N)
    if feat < gram:  # the feature route: X^T Y products on N rows, backward of the same order
        fl = 2 * feat + sum(4 * N * ds_x[i] * ds_y[j] + 2 * N * ds_x[i] ** 2 for i, j in pairs)
    else:
        fl = 2 * gram + sum(2 * N * N * d for d in tx)
    return Cost(by, fl)


def choose_global_route(
    ds_x: Sequence[int],
    ds_y: Sequence[int],
    pairs: Sequence[tuple[int, int]],
    n: int,
    world: int,
    estimator: str,
    kernel: str,
    tokens: str = "flatten",
) -> str:
    """How a ``gather=True`` loss should reach the global batch: ``"allreduce"``, ``"gather"`` or ``"local"``.

    ``ds_x``/``ds_y``: per-example feature sizes of the target / guide layers (as ``tokens`` views
    them); ``n``: examples per rank as ``tokens`` views them (B, or B*T for ``"samples"``), the same
    number on every rank (the largest rank's, if they differ) so that all ranks choose alike.
    ``"local"``: nothing to exchange -- one rank, or ``tokens="structure"``, whose per-sample CKAs need no
    other rank's examples (DDP's gradient averaging of the per-rank means is the global mean for equal
    batch sizes).
    ``"allreduce"`` (:func:`allreduce_feature_cka`) for the linear kernel with ``"flatten"``,
    ``"mean"`` or ``"samples"`` tokens when it sends fewer bytes than gathering; else ``"gather"``.
    """
    check_option(estimator, "estimator", ESTIMATORS)
    check_option(kernel, "kernel", KERNELS)
    check_option(tokens, "tokens", TOKENS)
    if world <= 1 or tokens == "structure":
        return "local"
    if kernel != "linear" or tokens in GROUP_TOKENS:
        return "gather"
    a = allreduce_cost(ds_x, ds_y, pairs, n, world, estimator)
    g = gather_cost(ds_x, ds_y, pairs, n, world)
    return "allreduce" if a.bytes < g.bytes else "gather"


def cost_table(ns=(64, 256, 1024), ds=(64, 256, 1024, 4096), worlds=(2, 8), estimator: str = "biased") -> str:
    """The docs/distributed.md table: one target layer vs one guide layer of width d, one pair."""
    rows = [
        "| world | n / rank | d | all-reduce MB | gather MB | all-reduce GFLOP | gather GFLOP | chosen |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for w in worlds:
        for n in ns:
            for d in ds:
                a = allreduce_cost([d], [d], [(0, 0)], n, w, estimator)
                g = gather_cost([d], [d], [(0, 0)], n, w)
                pick = choose_global_route([d], [d], [(0, 0)], n, w, estimator, "linear")
                rows.append(
                    f"| {w} | {n} | {d} | {a.bytes / 2**20:.2f} | {g.bytes / 2**20:.2f} | "
                    f"{a.flops / 1e9:.3f} | {g.flops / 1e9:.3f} | {pick} |"
                )
    return "\n".join(rows)
