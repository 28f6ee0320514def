"""torch.library registration: opcheck, and torch.compile(fullgraph=True) of a step using the ops."""

import pytest
import torch

import fastguide as fg
from fastguide import functional as F


def _args(route="gram", estimator="unbiased", dtype=torch.float64):
    xs = [torch.randn(10, d, dtype=dtype, requires_grad=True) for d in (4, 6)]
    ys = [torch.randn(10, 5, dtype=dtype)]
    return F._plan(xs + ys, [], [(0, 2), (1, 2), (0, 1)], estimator, "linear", None, "torch", route)


@pytest.mark.parametrize("route", ["gram", "feature"])
def test_opcheck_forward_op(route):
    torch.library.opcheck(torch.ops.fastguide.cka_fwd.default, _args(route))


def test_opcheck_with_precomputed_stats():
    xs = [torch.randn(10, 4, dtype=torch.float64, requires_grad=True)]
    st = [fg.layer_stats(torch.randn(10, 3, dtype=torch.float64), estimator="biased")]
    args = F._plan(xs, st, [(0, 1)], "biased", "linear", None, "torch", "auto")
    torch.library.opcheck(torch.ops.fastguide.cka_fwd.default, args)


@pytest.mark.slow
def test_compile_fullgraph_training_step_matches_eager():
    torch._dynamo.reset()
    net = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
    guide = torch.randn(32, 20)
    loss_fn = fg.CKALoss([(0, 0), (1, 0)], estimator="biased")

    def step(x):
        h1 = net[1](net[0](x))
        out = net[2](h1)
        return out.square().mean() + loss_fn([h1, out], [guide])

    x = torch.randn(32, 12)
    eager = step(x)
    eager.backward()
    g_eager = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    got.backward()
    assert abs(got.item() - eager.item()) < 1e-5
    for p, g in zip(net.parameters(), g_eager, strict=False):
        assert torch.allclose(p.grad, g, atol=1e-5, rtol=1e-4)

    torch._dynamo.reset()
    net.zero_grad()
    inductor = torch.compile(step, fullgraph=True)
    got = inductor(x)
    got.backward()
    assert abs(got.item() - eager.item()) < 1e-5
    for p, g in zip(net.parameters(), g_eager, strict=False):
        assert torch.allclose(p.grad, g, atol=1e-5, rtol=1e-4)


def test_opcheck_backward_op():
    args = _args("gram")
    out = torch.ops.fastguide.cka_fwd.default(*args)
    cka, C, s, ok, h, sig = out
    layers, pre_C, pre_s, pre_ok, pre_h, pairs, est, kern, sigma, route, backend = args
    bwd_args = (
        torch.randn_like(cka),
        cka,
        [x.detach() for x in layers],
        C,
        pre_C,
        s,
        ok,
        pre_ok,
        h,
        pre_h,
        sig,
        pairs,
        [0, 1],
        est,
        kern,
        sigma,
        route,
        backend,
    )
    torch.library.opcheck(
        torch.ops.fastguide.cka_bwd.default, bwd_args, test_utils=("test_schema", "test_faketensor")
    )
