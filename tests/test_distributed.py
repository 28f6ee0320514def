"""Global-batch CKA under torch.distributed: all_gather_batch and Guidance(gather=True) on two Gloo ranks."""

import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_close
from torch import nn

import fastguide as fg
from fastguide.distributed import all_gather_batch, batch_sizes, is_distributed

SIZES = [6, 10]  # uneven on purpose: ranks of a DDP job may hold different batch sizes


def _models():
    torch.manual_seed(0)
    target = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    guide = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 8))
    return target, guide


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(sum(SIZES), 12, generator=g)


LAYERS = {"0": "0", "2": "2"}


def test_single_process_is_identity():
    x = torch.randn(5, 3, requires_grad=True)
    assert not is_distributed()
    assert all_gather_batch(x) is x
    assert batch_sizes(5, x.device) == [5]
    with pytest.raises(TypeError, match="x must be a tensor"):
        all_gather_batch([1, 2])
    with pytest.raises(ValueError, match="batch dimension"):
        all_gather_batch(torch.tensor(1.0))


def test_gather_flag_without_process_group_matches_local():
    target, guide = _models()
    x = _data()
    losses = []
    for gather in (False, True):
        gd = fg.Guidance(target, guide, layers=LAYERS, gather=gather)
        target(x)
        losses.append(gd.loss(x))
        gd.close()
    assert torch.equal(losses[0], losses[1])
    with pytest.raises(TypeError, match="gather must be a bool"):
        fg.Guidance(target, guide, layers=LAYERS, gather=1)


def _grad_norm(grads) -> float:
    """Norm of a model's whole gradient: the natural scale of each parameter's (None: no gradient)."""
    return float(torch.cat([g.detach().double().flatten() for g in grads if g is not None]).norm())


def _worker(rank, world, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        _ranks_body(rank, out)
    finally:
        # Teardown order matters with Gloo: a process group whose last reference goes (here: DDP's
        # reducer) while a Gloo worker thread still releases a finished collective that holds Python
        # tensors deadlocks (the worker waits for the GIL, the destructor joins it) or, at interpreter
        # exit, aborts ("terminate called without an active exception"). So every object that holds the
        # group is gone (the body's locals; gc for any cycle) and every rank is past its collectives
        # before the group is destroyed.
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def _ranks_body(rank, out):
    torch.set_num_threads(1)
    x_all = _data()
    off = sum(SIZES[:rank])
    x = x_all[off : off + SIZES[rank]]
    res = {}

    # all_gather_batch: forward is the concatenation in rank order; backward sums over ranks.
    xr = x.clone().requires_grad_(True)
    full = all_gather_batch(xr)
    res["gathered"] = full.detach()
    w = torch.linspace(-1, 1, full.numel()).reshape(full.shape)
    (full * w).square().sum().backward()
    res["gather_grad"] = xr.grad

    # Guidance(gather=True) on a DDP-wrapped target: the loss covers the global batch and the
    # averaged parameter gradients are those of the single-process loss on the whole batch.
    target, guide = _models()
    ddp = nn.parallel.DistributedDataParallel(target)
    gd = fg.Guidance(ddp, guide, layers={"module.0": "0", "module.2": "2"}, gather=True)
    y = ddp(x)
    loss = gd.loss(x)
    # DDP waits for a gradient of every parameter the output depends on: a zero task term stands
    # in for the task loss so that the last (unhooked) layer gets one.
    (loss + 0.0 * y.sum()).backward()
    res["loss"] = loss.detach()
    res["cka"] = gd.last_cka
    res["grads"] = [p.grad.clone() for p in target.parameters()]
    step = gd.step

    # A guide fed a different batch than the target raises on every rank, after one small exchange
    # of batch sizes and before any activation is gathered; the failed call changes no state.
    ddp(x)
    try:
        gd.loss(x[:-1])
    except ValueError as e:
        res["mismatch"] = str(e)
    res["step_unchanged"] = gd.step == step and gd.last_cka is res["cka"]
    # The captures are still there: the corrected call succeeds, with the same global-batch loss.
    res["retry"] = gd.loss(x).detach()
    gd.close()
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))


def test_two_ranks_gather_and_guidance(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    x_all = _data()
    target, guide = _models()
    gd = fg.Guidance(target, guide, layers=LAYERS)
    target(x_all)
    ref_loss = gd.loss(x_all)
    ref_loss.backward()
    ref_grads = [p.grad for p in target.parameters()]
    ref_cka = gd.last_cka

    w = torch.linspace(-1, 1, x_all.numel()).reshape(x_all.shape)
    ref_gather_grad = 2 * (x_all * w) * w  # d/dx of sum((x w)^2), the same on both ranks
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt")
        off = sum(SIZES[:r])
        assert torch.equal(res["gathered"], x_all)
        # Each rank's rows get the gradient summed over the two ranks' identical losses.
        torch.testing.assert_close(res["gather_grad"], 2 * ref_gather_grad[off : off + SIZES[r]])
        assert "batch-size mismatch" in res["mismatch"] and "guide layer '0'" in res["mismatch"]
        assert (
            "rank 0: target 6, guide 5" in res["mismatch"] and "rank 1: target 10, guide 9" in res["mismatch"]
        )
        assert res["step_unchanged"]
        assert_close(res["retry"], ref_loss, "loss", torch.float32, length=2, what="retried loss")
        assert_close(res["loss"], ref_loss, "loss", torch.float32, length=2, what="loss")
        assert_close(res["cka"], ref_cka, "cka", torch.float32, what="cka")
        assert sum(g is not None for g in ref_grads) == 4  # the two hooked Linear layers
        scale = _grad_norm(ref_grads)  # biases of hooked layers get 0 (CKA is shift invariant)
        for got, want in zip(res["grads"], ref_grads, strict=True):
            want = torch.zeros_like(got) if want is None else want
            assert_close(got, want, "grad", torch.float32, floor=scale, what="parameter gradient")
