"""Guidance under torch.compile: a compiled target, a compiled guided step (graph breaks allowed) and
fullgraph=True over target forward + guidance.loss, each against eager (aot_eager: dynamo + AOTAutograd,
the parts that see the wrapper; inductor only changes code generation)."""

import copy

import pytest
import torch
from helpers import assert_close
from torch import nn

import fastguide

LAYERS = {"0": "0", "2": "2"}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _counter(backend):
    # Imported here, not at collection: an early torch._dynamo import changes how dynamo sees the
    # conftest's patched torch.empty for the other test modules.
    from torch._dynamo.testing import CompileCounterWithBackend

    return CompileCounterWithBackend(backend)


def _nets():
    torch.manual_seed(0)
    target = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))
    guide = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 8))
    return target, guide


def _batches(k):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(16, 12, generator=g) for _ in range(k)]


def _eager(target, guide, xs, **kw):
    target, guide = copy.deepcopy(target), copy.deepcopy(guide)
    gd = fastguide.Guidance(target, guide, **kw)
    out = []
    for x in xs:
        target.zero_grad()
        loss = target(x).square().mean() + gd.loss(x)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in target.parameters()]))
    return out


def _close(got, want, target):
    loss, grads = want
    assert_close(got, loss, "loss", torch.float32, length=2, what="compiled loss")
    scale = float(torch.cat([g.flatten() for g in grads]).norm())  # biases: ~0 (shift invariance)
    for p, g in zip(target.parameters(), grads, strict=True):
        assert_close(p.grad, g, "grad", torch.float32, floor=scale, what="compiled gradient")


def test_compiled_target_hooks_on_orig_mod():
    target, guide = _nets()
    xs = _batches(2)
    want = _eager(target, guide, xs, layers=LAYERS)
    compiled = torch.compile(target, backend="aot_eager")
    # Names resolve through the compile wrapper; no false in-place error from traced versions.
    with fastguide.Guidance(compiled, guide, layers=LAYERS) as gd:
        assert gd.pairs == [("_orig_mod.0", "0"), ("_orig_mod.2", "2")]
        for x, w in zip(xs, want, strict=True):
            target.zero_grad()
            loss = compiled(x).square().mean() + gd.loss(x)
            loss.backward()
            _close(loss, w, target)
    # layers="auto" on a compiled target resolves from the compiled forward's captures.
    with fastguide.Guidance(compiled, guide) as gd:
        compiled(xs[0])
        gd.loss(xs[0])
        assert gd.pairs == [("_orig_mod.0", "0")]


def test_compiled_guided_step_with_graph_breaks_keeps_the_schedule():
    target, guide = _nets()
    xs = _batches(4)
    kw = dict(layers=LAYERS, until=2, weight=lambda s: 1.0 + s)
    want = _eager(target, guide, xs, **kw)
    gd = fastguide.Guidance(target, guide, **kw)
    counter = _counter("aot_eager")

    @torch.compile(backend=counter)
    def step(x):
        return target(x).square().mean() + gd.loss(x)

    frames = []
    for x, w in zip(xs, want, strict=True):
        target.zero_grad()
        loss = step(x)
        loss.backward()
        _close(loss, w, target)
        frames.append(counter.frame_count)
    assert gd.step == 4  # counted in eager code at the graph break
    # No recompilation per step: the weight schedule enters as a tensor, the schedule as a bool.
    assert frames[1] == frames[0] and frames[3] == frames[2]
    gd.close()


def test_fullgraph_forward_and_loss():
    target, guide = _nets()
    xs = _batches(3)
    want = _eager(target, guide, xs, layers=LAYERS)
    gd = fastguide.Guidance(target, guide, layers=LAYERS, step_on="optimizer")
    opt = torch.optim.SGD(target.parameters(), lr=0.0)
    gd.attach_optimizer(opt)
    counter = _counter("aot_eager")

    @torch.compile(backend=counter, fullgraph=True)
    def step(x):
        return target(x).square().mean() + gd.loss(x)

    for x, w in zip(xs, want, strict=True):
        target.zero_grad()
        loss = step(x)
        loss.backward()
        _close(loss, w, target)
        opt.step()
    assert counter.frame_count == 1 and gd.step == 3  # one graph, no recompiles as the step moves
    want = fastguide.cka_pairs(
        [target[0](xs[-1]), target[2](target[1](target[0](xs[-1])))],
        [guide[0](xs[-1]), guide[2](guide[1](guide[0](xs[-1])))],
    )
    assert_close(gd.last_cka, want, "cka", torch.float32, what="last_cka")

    # Counting loss() calls needs eager code: fullgraph says so.
    gd2 = fastguide.Guidance(target, guide, layers=LAYERS)
    with pytest.raises(Exception, match="step_on='optimizer'"):
        torch.compile(lambda x: target(x).sum() + gd2.loss(x), fullgraph=True, backend="eager")(xs[0])
    gd.close()
    gd2.close()


def test_compiled_inplace_needs_clone_inplace():
    # Eager raises on an in-place rewrite of a hooked output; compiled code cannot see versions, and
    # clone_inplace=True is what keeps the values right there.
    torch.manual_seed(0)
    target = nn.Sequential(nn.Linear(12, 16), nn.ReLU(inplace=True), nn.Linear(16, 5))
    guide = nn.Sequential(nn.Linear(12, 20))
    x = _batches(1)[0]
    with torch.no_grad():
        want = fastguide.cka(target[0](x), guide[0](x))
    compiled = torch.compile(target, backend="aot_eager")
    with fastguide.Guidance(target, guide, layers={"0": "0"}, clone_inplace=True) as gd:
        compiled(x)
        gd.loss(x).backward()
        assert_close(gd.last_cka[0], want, "cka", torch.float32, what="last_cka")
