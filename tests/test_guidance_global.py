"""Guidance(gather=True) on two Gloo ranks: all-reduced cross products once they are cheaper than
gathering, gathered grouped modes, and per-sample structure CKA without any exchange."""

import gc
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_close
from torch import nn

import fastguide as fg

SIZES = [24, 40]  # uneven; wide enough batches that all-reducing 16 x 20 products beats gathering


def _models():
    torch.manual_seed(0)
    target = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    guide = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 8))
    return target, guide


def _data(shape=(12,)):
    g = torch.Generator().manual_seed(1)
    return torch.randn(sum(SIZES), *shape, generator=g)


def _reference(estimator, tokens="flatten", shape=(12,)):
    x_all = _data(shape)
    target, guide = _models()
    gd = fg.Guidance(target, guide, layers={"0": "0", "2": "2"}, estimator=estimator, tokens=tokens)
    target(x_all)
    loss = gd.loss(x_all)
    loss.backward()
    return loss.detach(), gd.last_cka, [p.grad for p in target.parameters()]


def _body(rank):
    torch.set_num_threads(1)
    off = sum(SIZES[:rank])
    res = {}
    for estimator in ("biased", "unbiased"):
        x = _data()[off : off + SIZES[rank]]
        target, guide = _models()
        ddp = nn.parallel.DistributedDataParallel(target)
        gd = fg.Guidance(
            ddp, guide, layers={"module.0": "0", "module.2": "2"}, gather=True, estimator=estimator
        )
        steps = []
        for _ in range(2):  # step 0 gathers and decides; step 1 all-reduces
            target.zero_grad()
            y = ddp(x)
            loss = gd.loss(x)
            (loss + 0.0 * y.sum()).backward()
            steps.append((loss.detach(), gd.last_cka, [p.grad.clone() for p in target.parameters()]))
        res[estimator] = (steps, gd._route_choice)
        gd.close()
        del ddp, gd
    # A grouped mode is gathered (per-position CKA needs every rank's examples at each position).
    x = _data((5, 12))[off : off + SIZES[rank]]
    target, guide = _models()
    ddp = nn.parallel.DistributedDataParallel(target)
    gd = fg.Guidance(ddp, guide, layers={"module.0": "0", "module.2": "2"}, gather=True, tokens="positions")
    y = ddp(x)
    loss = gd.loss(x)
    (loss + 0.0 * y.sum()).backward()
    res["positions"] = (loss.detach(), gd.last_cka, [p.grad.clone() for p in target.parameters()])
    gd.close()
    return res


def _worker(rank, world, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        res = _body(rank)
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
        del res
    finally:
        # The teardown order of tests/test_distributed.py (Gloo destroys its group safely only after
        # everything holding it is gone and every rank is past its collectives).
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def _grad_norm(grads) -> float:
    """Norm of a model's whole gradient: the natural scale of each parameter's (None: no gradient)."""
    return float(torch.cat([g.detach().double().flatten() for g in grads if g is not None]).norm())


def test_two_ranks_allreduce_route_and_gathered_positions(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    refs = {est: _reference(est) for est in ("biased", "unbiased")}
    ref_pos = _reference("unbiased", tokens="positions", shape=(5, 12))
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt")
        for est, (ref_loss, ref_cka, ref_grads) in refs.items():
            steps, choice = res[est]
            assert choice == "allreduce", (est, choice)
            for loss, cka, grads in steps:
                assert_close(loss, ref_loss, "loss", torch.float32, length=cka.numel(), what=f"{est} loss")
                assert_close(cka, ref_cka, "cka", torch.float32, what=f"{est} cka")
                scale = _grad_norm(ref_grads)  # biases of hooked layers get ~0 (CKA is shift invariant)
                for got, want in zip(grads, ref_grads, strict=True):
                    want = torch.zeros_like(got) if want is None else want
                    assert_close(got, want, "grad", torch.float32, floor=scale, what=f"{est} gradient")
        loss, cka, grads = res["positions"]
        assert_close(loss, ref_pos[0], "loss", torch.float32, length=cka.numel(), what="positions loss")
        assert_close(cka, ref_pos[1], "cka", torch.float32, what="positions cka")
        scale = _grad_norm(ref_pos[2])
        for got, want in zip(grads, ref_pos[2], strict=True):
            want = torch.zeros_like(got) if want is None else want
            assert_close(got, want, "grad", torch.float32, floor=scale, what="positions gradient")
