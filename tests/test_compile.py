"""torch.library registration: opcheck, and torch.compile(fullgraph=True) of a step using the ops."""

import dataclasses

import pytest
import torch
from helpers import assert_close

import fastguide as fg
from fastguide import _ops
from fastguide._validate import Options


def _plan(route="gram", estimator="unbiased", kernel="linear", sigma=None, dtype=torch.float64):
    xs = [torch.randn(10, d, dtype=dtype, requires_grad=True) for d in (4, 6)]
    ys = [torch.randn(10, 5, dtype=dtype)]
    opts = Options(estimator=estimator, kernel=kernel, sigma=sigma, backend="torch", route=route)
    return _ops.build_plan(xs + ys, [], [(0, 2), (1, 2), (0, 1)], opts)


@pytest.mark.parametrize(
    "kw",
    [{"route": "gram"}, {"route": "feature"}, {"kernel": "rbf"}, {"kernel": "rbf", "sigma": 2.0}],
    ids=["gram", "feature", "rbf-median", "rbf-sigma"],
)
def test_opcheck_forward_op(kw):
    plan = _plan(**kw)
    assert plan.route == ("feature" if kw.get("route") == "feature" else "gram")
    torch.library.opcheck(torch.ops.fastguide.cka_fwd.default, plan.args())


def test_opcheck_with_precomputed_stats():
    xs = [torch.randn(10, 4, dtype=torch.float64, requires_grad=True)]
    st = [fg.layer_stats(torch.randn(10, 3, dtype=torch.float64), estimator="biased")]
    plan = _ops.build_plan(xs, st, [(0, 1)], Options(estimator="biased", backend="torch"))
    assert plan.pre_C.shape == (1, 10, 10)
    torch.library.opcheck(torch.ops.fastguide.cka_fwd.default, plan.args())


def test_schemas_follow_the_plan():
    """The op schemas are generated from the plan's fields: no sentinel, sigma is Optional[float]."""
    fwd = str(torch.ops.fastguide.cka_fwd.default._schema)
    bwd = str(torch.ops.fastguide.cka_bwd.default._schema)
    plan_part = "Tensor[] layers, Tensor pre_C, Tensor pre_s, Tensor pre_ok, Tensor pre_h, int[] pairs, "
    plan_part += "str estimator, str kernel, float? sigma, str route, str backend"
    assert f"({plan_part})" in fwd
    assert bwd.startswith("fastguide::cka_bwd(Tensor grad, int[] which, Tensor cka, Tensor C, Tensor s,")
    assert bwd.endswith(f"{plan_part}) -> Tensor[]")
    plan = _plan()
    same = _ops.Plan(*plan.args()).args()
    assert all(a is b for a, b in zip(same, plan.args(), strict=True))
    back = _ops.Plan.restore(plan.saved(), plan.static()).args()
    assert all(a is b for a, b in zip(back[1:], plan.args()[1:], strict=True))
    assert all(a is b for a, b in zip(back[0], plan.layers, strict=True))


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
    assert_close(got, eager, "loss", torch.float32, length=2, what="aot_eager loss")
    for p, g in zip(net.parameters(), g_eager, strict=False):
        assert_close(p.grad, g, "grad", torch.float32, what="aot_eager gradient")

    torch._dynamo.reset()
    net.zero_grad()
    inductor = torch.compile(step, fullgraph=True)
    got = inductor(x)
    got.backward()
    assert_close(got, eager, "loss", torch.float32, length=2, what="inductor loss")
    for p, g in zip(net.parameters(), g_eager, strict=False):
        assert_close(p.grad, g, "grad", torch.float32, what="inductor gradient")


@pytest.mark.parametrize("kw", [{"route": "gram"}, {"route": "feature"}, {"kernel": "rbf"}], ids=str)
def test_opcheck_backward_op(kw):
    plan = _plan(**kw)
    cka, *table = torch.ops.fastguide.cka_fwd.default(*plan.args())
    detached = dataclasses.replace(plan, layers=[x.detach() for x in plan.layers])
    bwd_args = (torch.randn_like(cka), [0, 1], cka, *table, *detached.args())
    torch.library.opcheck(
        torch.ops.fastguide.cka_bwd.default, bwd_args, test_utils=("test_schema", "test_faketensor")
    )
