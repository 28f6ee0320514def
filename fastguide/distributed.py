"""Global-batch CKA under torch.distributed: gather every rank's examples, with autograd.

CKA of a minibatch is not an average of per-example terms, so under DDP/FSDP each rank's loss sees
only its local batch unless the activations are gathered first. :func:`all_gather_batch` concatenates
the ranks' activations along the batch dimension (ranks may hold different batch sizes) and is
differentiable: the gradient that reaches a rank's activations is the sum over ranks of the gradient
of its rows (as with ``torch.distributed.nn.functional.all_gather``). Every rank computes the same
global loss, so that sum is ``world_size`` times the gradient of the global loss; DDP and FSDP average
parameter gradients over ranks, which brings it back to exactly the gradient of the global-batch loss.
``Guidance(gather=True)`` uses it for target (with autograd) and guide (without) activations.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_gather_batch", "batch_sizes", "gather_ints", "is_distributed"]


def is_distributed(group=None) -> bool:
    """Whether a process group of more than one rank is initialised (else gathering is a no-op)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def gather_ints(values: list[int], device: torch.device, group=None) -> list[list[int]]:
    """Every rank's ``values`` (the same count on each rank), in rank order: one all-gather of a small
    int64 tensor on ``device``, which the group's backend must support (CUDA for NCCL, CPU for Gloo),
    and one host copy of the result."""
    if not is_distributed(group):
        return [[int(v) for v in values]]
    mine = torch.tensor([int(v) for v in values], dtype=torch.int64, device=device)
    out = torch.empty((dist.get_world_size(group), mine.numel()), dtype=torch.int64, device=device)
    dist.all_gather(list(out.unbind(0)), mine, group=group)
    return out.cpu().tolist()


def batch_sizes(n: int, device: torch.device, group=None) -> list[int]:
    """Every rank's batch size (:func:`gather_ints` of one integer)."""
    return [v[0] for v in gather_ints([n], device, group)]


class _GatherBatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        rank = dist.get_rank(group)
        m = max(sizes)
        xp = x.contiguous()
        if xp.shape[0] < m:  # all_gather needs equal shapes: pad, then drop the padding rows
            xp = torch.cat([xp, xp.new_zeros((m - xp.shape[0], *xp.shape[1:]))])
        bufs = [torch.empty_like(xp) for _ in sizes]
        dist.all_gather(bufs, xp, group=group)
        ctx.sizes, ctx.group, ctx.rank = sizes, group, rank
        return torch.cat([b[:s] for b, s in zip(bufs, sizes, strict=True)])

    @staticmethod
    def backward(ctx, g):
        # Sum over ranks of the gradient of this rank's rows. all_reduce rather than reduce_scatter:
        # Gloo has no reduce_scatter, and ranks may hold different batch sizes.
        g = g.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        off = sum(ctx.sizes[: ctx.rank])
        return g[off : off + ctx.sizes[ctx.rank]], None, None


def all_gather_batch(x: torch.Tensor, group=None, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0 in rank order, differentiably.

    Args:
        x: this rank's (n_rank, ...) tensor; the other dimensions must agree across ranks.
        group: the process group (default: the world).
        sizes: every rank's n, if already known (from :func:`batch_sizes`); saves one small collective.

    Returns ``x`` itself when no process group of two or more ranks is initialised. Must be called by
    every rank of the group in the same order (it is a collective). Backward: the gradient of this
    rank's rows summed over ranks (module docstring), one all-reduce of the gathered gradient.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor; got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("x must have a batch dimension (dim 0); got a 0-d tensor")
    if not is_distributed(group):
        return x
    if sizes is None:
        sizes = batch_sizes(x.shape[0], x.device, group)
    rank = dist.get_rank(group)
    if len(sizes) != dist.get_world_size(group) or sizes[rank] != x.shape[0]:
        raise ValueError(
            f"sizes {sizes} do not match this rank's batch ({x.shape[0]} rows on rank {rank} of "
            f"{dist.get_world_size(group)})"
        )
    return _GatherBatch.apply(x, list(sizes), group)
