"""Exact global-batch CKA under torch.distributed from all-reduced cross products (no activation gather).

For the biased estimator with the linear kernel, CKA over the global batch needs only sums over
examples: with a per-column shift c common to all ranks (X^ = X - c),

    Xc^T Yc = sum_r X^_r^T Y^_r - (sum_r X^_r^T 1)(sum_r Y^_r^T 1)^T / N,      N = sum_r n_r,

and ``HSIC_biased(X, Y) = ||Xc^T Yc||_F^2 / (N - 1)^2``. So every rank all-reduces, per pair, the
d_x x d_y matrix ``X^_r^T Y^_r``, per layer ``X^_r^T X^_r``, ``X^_r^T 1`` and ``||X_r||^2``, plus N — instead
of all-gathering world * n * d values per layer and forming (world n)^2 Grams. The all-reduce is
differentiable (``torch.distributed.nn.functional.all_reduce``): its backward all-reduces the
gradient, so each rank's activations get ``world_size`` times the gradient of the (identical) global
loss, which DDP/FSDP gradient averaging brings back to exactly the global-batch gradient — the same
convention as :func:`fastguide.distributed.all_gather_batch`.

Numerics as the layer ops: the shift (mean of each rank's first min(n, 32) rows, averaged over ranks)
removes large offsets before the products; each centred self product is divided by its mean
diagonal ``s = tr(Xc^T Xc) / N`` so nothing overflows fp32 at activation scale 1e6; a layer whose
centred signal is below its rounding level, ``tr <= (4 eps)^2 ||X||^2`` summed over ranks, is
degenerate and all its CKAs are exactly 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._torch_backend import degenerate_factor

__all__ = ["allreduce_feature_cka", "allreduce_cost", "gather_cost"]

SHIFT_ROWS = 32


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; backward sums the gradient over ranks (every rank holds the same loss)."""

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
    if _world(group) == 1:
        return t
    return _AllReduceSum.apply(t, group)


def allreduce_feature_cka(
    xs: list[torch.Tensor], ys: list[torch.Tensor], pairs: list[tuple[int, int]], group=None
) -> torch.Tensor:
    """Biased linear CKA over the global batch of each ``(i, j)`` pair of ``xs[i]``, ``ys[j]`` (P,).

    ``xs``/``ys`` are this rank's (n_r, d) examples matrices (every rank must call with the same
    layer shapes and pairs; n_r may differ). Differentiable in every input that requires grad.
    Two collectives: the shifts (sum of d per layer), then all products in one flat all-reduce.
    """
    layers = list(xs) + list(ys)
    A = len(xs)
    dt = torch.float64 if any(x.dtype == torch.float64 for x in layers) else torch.float32
    world = _world(group)
    # 1. A shift common to all ranks (the products below must be of the same shifted features).
    with torch.no_grad():
        loc = torch.cat([x[:SHIFT_ROWS].to(dt).mean(dim=0) for x in layers])
        if world > 1:
            dist.all_reduce(loc, op=dist.ReduceOp.SUM, group=group)
            loc = loc / world
    shifts = loc.split([x.shape[1] for x in layers])
    Xh = [x.to(dt) - c for x, c in zip(layers, shifts, strict=True)]
    used = sorted({i for i, _ in pairs} | {A + j for _, j in pairs})
    # 2. Local sums, flattened into one buffer: n, then per used layer (u, ||x||^2, X^T X), per pair X^T Y.
    parts = [torch.full((1,), float(layers[0].shape[0]), dtype=dt, device=Xh[0].device)]
    for l in used:
        X = Xh[l]
        parts += [X.sum(dim=0), layers[l].to(dt).square().sum().reshape(1), (X.T @ X).flatten()]
    for i, j in pairs:
        parts.append((Xh[i].T @ Xh[A + j]).flatten())
    flat = _all_reduce(torch.cat(parts), group)
    # 3. Centred products from the global sums.
    N = flat[0]
    off = 1
    stats = {}
    for l in used:
        d = Xh[l].shape[1]
        u = flat[off : off + d]
        sq = flat[off + d]
        M = flat[off + d + 1 : off + d + 1 + d * d].view(d, d) - torch.outer(u, u) / N
        off += d + 1 + d * d
        tr = M.diagonal().sum()
        ok = ~(tr <= degenerate_factor(layers[l].dtype) * sq)
        s = torch.where(ok, tr / N, torch.ones_like(tr))
        h = (M / s).square().sum()
        ok = ok & ~(h <= 0)
        stats[l] = (u, s, ok, torch.where(ok, h, torch.ones_like(h)))
    out = []
    for i, j in pairs:
        b = A + j
        dx, dy = Xh[i].shape[1], Xh[b].shape[1]
        ux, sx, okx, hx = stats[i]
        uy, sy, oky, hy = stats[b]
        M = flat[off : off + dx * dy].view(dx, dy) - torch.outer(ux, uy) / N
        off += dx * dy
        hxy = (M / (sx.sqrt() * sy.sqrt())).square().sum()
        val = hxy / (hx.sqrt() * hy.sqrt())
        out.append(torch.where(okx & oky, val, torch.zeros_like(val)))
    return torch.stack(out)


def allreduce_cost(ds_x: list[int], ds_y: list[int], pairs: list[tuple[int, int]], n: int, elt: int = 4):
    """(bytes on the wire per rank, flops per rank) of :func:`allreduce_feature_cka` (ring all-reduce
    sends about twice the buffer; counted once here, as for the gather)."""
    used_x = sorted({i for i, _ in pairs})
    used_y = sorted({j for _, j in pairs})
    dims = [ds_x[i] for i in used_x] + [ds_y[j] for j in used_y]
    numbers = 1 + sum(d * d + d + 1 for d in dims) + sum(ds_x[i] * ds_y[j] for i, j in pairs)
    flops = sum(2 * n * d * d for d in dims) + sum(2 * n * ds_x[i] * ds_y[j] for i, j in pairs)
    return numbers * elt, flops


def gather_cost(
    ds_x: list[int], ds_y: list[int], pairs: list[tuple[int, int]], n: int, world: int, elt: int = 4
):
    """(bytes received per rank, flops per rank) of gathering every used layer and forming the global
    Grams (``Guidance(gather=True)``): world * n * d values per layer, (world n)^2 d per Gram."""
    used_x = sorted({i for i, _ in pairs})
    used_y = sorted({j for _, j in pairs})
    dims = [ds_x[i] for i in used_x] + [ds_y[j] for j in used_y]
    N = world * n
    return sum(N * d for d in dims) * elt, sum(N * N * d for d in dims) + len(pairs) * 2 * N * N
