"""Global-batch CKA from all-reduced sums: one process, two Gloo ranks (values, gradients, DDP), costs."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_close, assert_same_grads
from torch import nn

import fastguide as fg
from fastguide import _reference as R
from fastguide._allreduce_cka import (
    allreduce_cost,
    allreduce_feature_cka,
    choose_global_route,
    cost_table,
    gather_cost,
)

ESTIMATORS = ["biased", "unbiased"]
SIZES = [6, 10]  # uneven on purpose


def _layers(n=40, dims=(7, 30), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, dtype=torch.float64, generator=g)
    return [
        (
            z @ torch.randn(4, d, dtype=torch.float64, generator=g)
            + 0.5 * torch.randn(n, d, dtype=torch.float64, generator=g)
        ).to(dtype)
        for d in dims
    ]


# --------------------------------------------------------------------------- one process
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_single_process_equals_cka_pairs(estimator):
    xs = [x.float().requires_grad_(True) for x in _layers(dims=(7, 30))]
    ys = [y.float() for y in _layers(dims=(5, 12, 3), seed=1)]
    pairs = [(0, 0), (1, 1), (0, 2), (1, 0)]
    got = allreduce_feature_cka(xs, ys, pairs, estimator=estimator)
    want = fg.cka_pairs(xs, ys, pairs, estimator=estimator)
    assert got.dtype == torch.float32 and got.shape == (4,)
    assert_close(
        got,
        R.cka_global_batch([[x.double() for x in xs]], [[y.double() for y in ys]], pairs, estimator),
        "cka",
        torch.float32,
        what="oracle",
    )
    assert_same_grads(got, want, xs, "grad")


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("case", ["scale 1e-6", "scale 1e6", "offset 1e4", "d >> n", "fp64"])
def test_single_process_numerics(estimator, case):
    n, dims = (24, (300, 120)) if case == "d >> n" else (40, (9, 17))
    x64, y64 = _layers(n=n, dims=dims)
    if case.startswith("scale"):
        s = float(case.split()[1])
        x64, y64 = x64 * s, y64 * s
    if case == "offset 1e4":
        x64 = x64 + 1e4
    dt = torch.float64 if case == "fp64" else torch.float32
    x = x64.to(dt).requires_grad_(True)
    got = allreduce_feature_cka([x], [y64.to(dt)], estimator=estimator)
    xd = x.detach().double().requires_grad_(True)  # the oracle on the same rounded inputs
    want = R.cka(xd, y64.to(dt).double(), estimator)
    assert_close(got, want.reshape(1), "cka", dt, what=case)
    got.sum().backward()
    want.backward()
    assert_close(x.grad, xd.grad, "grad", dt, what=case)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_degenerate_layer_and_tiny_batch(estimator):
    z = torch.full((12, 5), 3333.33, requires_grad=True)
    x, y = (t.float() for t in _layers(n=12, dims=(4, 3)))
    c = allreduce_feature_cka([z, x], [y], [(0, 0), (1, 0)], estimator=estimator)
    assert c[0].item() == 0.0
    assert_close(c[1], fg.cka(x, y, estimator=estimator), "cka", torch.float32, what="the other pair")
    c.sum().backward()
    assert torch.count_nonzero(z.grad) == 0
    # A global batch below the estimator's minimum gives NaN (no host sync to raise).
    small = allreduce_feature_cka([x[:3]], [y[:3]], estimator=estimator)
    assert torch.isnan(small).all() == (estimator == "unbiased")


def test_tokens_and_bad_input():
    x = torch.randn(6, 5, 4)
    y = torch.randn(6, 5, 3)
    for tokens in ("flatten", "mean", "samples"):
        got = allreduce_feature_cka([x], [y], tokens=tokens)
        assert_close(
            got, fg.cka_pairs([x], [y], tokens=tokens, estimator="biased"), "cka", torch.float32, what=tokens
        )
    with pytest.raises(ValueError, match="tokens must be one of"):
        allreduce_feature_cka([x], [y], tokens="positions")
    with pytest.raises(ValueError, match="estimator must be one of"):
        allreduce_feature_cka([x], [y], estimator="debiased")
    with pytest.raises(ValueError, match=r"ys\[0\] has n=5"):
        allreduce_feature_cka([x], [y[:5]])
    with pytest.raises(IndexError, match="out of range"):
        allreduce_feature_cka([x], [y], [(0, 1)])
    with pytest.raises(TypeError, match="floating dtype"):
        allreduce_feature_cka([x.long()], [y])


# --------------------------------------------------------------------------- two Gloo ranks
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 16)
        self.b = nn.Linear(16, 8)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return h, self.b(h)


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(SIZES), 12, generator=g)
    guide = [torch.tanh(x @ torch.randn(12, 10, generator=g)), torch.randn(sum(SIZES), 3, 2, generator=g)]
    return x, guide


def _worker(rank, world, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        off = sum(SIZES[:rank])
        rows = slice(off, off + SIZES[rank])
        res = {}
        xs = [x.float() for x in _layers(n=sum(SIZES), dims=(7, 20))]
        ys = [y.float() for y in _layers(n=sum(SIZES), dims=(5, 9), seed=1)]
        x_all, guide = _data()
        for est in ESTIMATORS:
            # Values and input gradients of the op itself.
            mine = [x[rows].clone().requires_grad_(True) for x in xs]
            c = allreduce_feature_cka(mine, [y[rows] for y in ys], [(0, 0), (1, 1), (0, 1)], estimator=est)
            (c * torch.tensor([1.0, -0.5, 2.0])).sum().backward()
            res[f"{est} cka"] = c.detach()
            res[f"{est} grads"] = [m.grad for m in mine]
            # A DDP-wrapped model: the averaged parameter gradients are those of one process on the batch.
            torch.manual_seed(0)
            net = _Net()
            ddp = nn.parallel.DistributedDataParallel(net)
            h, o = ddp(x_all[rows])
            loss = (1 - allreduce_feature_cka([h, o], [g[rows] for g in guide], estimator=est)).sum()
            loss.backward()
            res[f"{est} loss"] = loss.detach()
            res[f"{est} param grads"] = [p.grad.clone() for p in net.parameters()]
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    xs = [x.float() for x in _layers(n=sum(SIZES), dims=(7, 20))]
    ys = [y.float() for y in _layers(n=sum(SIZES), dims=(5, 9), seed=1)]
    x_all, guide = _data()
    pairs = [(0, 0), (1, 1), (0, 1)]
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for est in ESTIMATORS:
        full = [x.clone().requires_grad_(True) for x in xs]
        want = fg.cka_pairs(full, ys, pairs, estimator=est)
        (want * torch.tensor([1.0, -0.5, 2.0])).sum().backward()
        oracle = R.cka_global_batch([[x.double() for x in xs]], [[y.double() for y in ys]], pairs, est)
        torch.manual_seed(0)
        net = _Net()
        h, o = net(x_all)
        ref_loss = (1 - fg.cka_pairs([h, o], guide, estimator=est)).sum()
        ref_loss.backward()
        for r in range(2):
            rows = slice(sum(SIZES[:r]), sum(SIZES[: r + 1]))
            assert_close(res[r][f"{est} cka"], oracle, "cka", torch.float32, what=f"{est} rank {r} cka")
            # Each rank's rows get world_size x the global gradient (summed over both ranks' losses).
            for k, (got, f) in enumerate(zip(res[r][f"{est} grads"], full, strict=True)):
                assert_close(got, 2 * f.grad[rows], "grad", torch.float32, what=f"{est} rank {r} grad {k}")
            assert_close(res[r][f"{est} loss"], ref_loss, "cka", torch.float32, what=f"{est} loss")
            # All parameters as one vector: the last bias's gradient is 0 up to rounding (CKA is
            # shift-invariant), so a per-tensor relative error would compare noise with noise.
            got = torch.cat([g.flatten() for g in res[r][f"{est} param grads"]])
            ref = torch.cat([p.grad.flatten() for p in net.parameters()])
            assert_close(got, ref, "grad", torch.float32, what=f"{est} rank {r} parameter gradients")


# --------------------------------------------------------------------------- costs and the route
def test_costs_and_route_choice():
    # Narrow layers: d^2 numbers beat (w - 1) n d; wide ones: gathering wins.
    assert choose_global_route([64], [64], [(0, 0)], 256, 8, "biased", "linear") == "allreduce"
    assert choose_global_route([4096], [4096], [(0, 0)], 64, 2, "biased", "linear") == "gather"
    assert choose_global_route([64], [64], [(0, 0)], 256, 8, "unbiased", "linear") == "allreduce"
    assert choose_global_route([64], [64], [(0, 0)], 256, 8, "biased", "rbf") == "gather"
    assert choose_global_route([64], [64], [(0, 0)], 256, 8, "biased", "linear", "positions") == "gather"
    assert choose_global_route([64], [64], [(0, 0)], 256, 8, "biased", "linear", "structure") == "local"
    assert choose_global_route([64], [64], [(0, 0)], 256, 1, "biased", "linear") == "local"
    with pytest.raises(ValueError, match="kernel must be one of"):
        choose_global_route([64], [64], [(0, 0)], 256, 8, "biased", "poly")
    a = allreduce_cost([256], [128], [(0, 0)], 512, 4)
    g = gather_cost([256], [128], [(0, 0)], 512, 4)
    # By hand: M = 1 + (256*257/2 + 257) + (128*129/2 + 129) + 256*128; first round 257 + 129.
    M = 1 + 256 * 257 // 2 + 257 + 128 * 129 // 2 + 129 + 256 * 128
    assert a.bytes == pytest.approx(2 * 3 / 4 * (257 + 129 + 2 * M) * 4)
    assert g.bytes == pytest.approx((3 * 512 * (256 + 128) + 2 * 3 / 4 * 2048 * 256) * 4)
    assert a.flops > 0 and g.flops > a.flops  # every rank does the global batch's work when gathering


def test_docs_table_is_the_cost_model():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "distributed.md").read_text()
    assert cost_table() in doc
