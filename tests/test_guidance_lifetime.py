"""Guidance lifetime: copies and pickles of guided models, garbage collection, shared guides (also from
threads), modules called several times, and failed loss() calls that change nothing."""

import copy
import gc
import io
import pickle
import threading
import warnings
import weakref

import pytest
import torch
from helpers import assert_close, mlp, mlp_pair
from torch import nn

import fastguide
from fastguide._capture import InertHook, ModuleHook


def _hooks(*nets):
    out = []
    for net in nets:
        for m in net.modules():
            out += list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values())
    return out


LAYERS = {"0": "0", "2": "4"}


@pytest.fixture
def nets():
    torch.manual_seed(0)
    return mlp_pair()


def _reference(target, guide, x, **kw):
    """Loss and target gradients of one guided step on fresh copies."""
    t, g = copy.deepcopy(target), copy.deepcopy(guide)
    with fastguide.Guidance(t, g, layers=LAYERS, **kw) as gd:
        t(x)
        loss = gd.loss(x)
        loss.backward()
    return loss.detach(), [p.grad for p in t.parameters()]


def test_deepcopy_of_guided_target_neither_captures_nor_keeps_hooks(nets):
    target, guide = nets
    x, x_other = torch.randn(16, 12), torch.randn(16, 12)
    ref_loss, ref_grads = _reference(target, guide, x)
    gd = fastguide.Guidance(target, guide, layers=LAYERS)
    ema = copy.deepcopy(target)  # an EMA copy, made while guided
    assert _hooks(ema) and all(isinstance(h, InertHook) for h in _hooks(ema))
    target(x)
    ema(x_other)  # a grad-enabled forward of the copy must not replace the original's activations
    assert _hooks(ema) == []  # the inert stand-ins removed themselves
    loss = gd.loss(x)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss)
    for p, want in zip(target.parameters(), ref_grads, strict=True):
        torch.testing.assert_close(p.grad, want)
    assert all(p.grad is None for p in ema.parameters())
    gd.close()
    assert _hooks(target, guide) == []


def test_shallow_copy_sharing_hooks_is_ignored(nets):
    target, guide = nets
    with fastguide.Guidance(target, guide, layers={"0": "0"}) as gd:
        twin = copy.copy(target[0])  # shares target[0]'s hooks dict
        twin(torch.randn(16, 12))
        assert gd._t_acts == {}


def test_guided_target_pickles_and_saves(nets):
    target, guide = nets
    x = torch.randn(16, 12)
    with fastguide.Guidance(target, guide, layers=LAYERS) as gd:
        target(x)
        blob = pickle.dumps(target)
        buf = io.BytesIO()
        torch.save(target, buf)
        gd.loss(x).backward()  # the original is still guided
    for loaded in (pickle.loads(blob), torch.load(io.BytesIO(buf.getvalue()), weights_only=False)):
        assert all(isinstance(h, InertHook) for h in _hooks(loaded))
        torch.testing.assert_close(loaded(x), target(x))
        assert _hooks(loaded) == []


def test_unclosed_guidance_is_freed_with_its_hooks(nets):
    target, guide = nets
    x = torch.randn(16, 12)
    gc.disable()  # reference counting alone must free it: no cycle through the hooks
    try:
        gd = fastguide.Guidance(target, guide, layers=LAYERS)
        opt = torch.optim.SGD(target.parameters(), lr=0.1)
        gd.attach_optimizer(opt)
        target(x)
        gd.loss(x).backward()
        opt.step()
        target(x)  # leave captured activations behind
        ref = weakref.ref(gd)
        assert any(isinstance(h, ModuleHook) for h in _hooks(target, guide))
        del gd
        assert ref() is None
        assert _hooks(target, guide) == []
        assert opt._optimizer_step_post_hooks == {}
    finally:
        gc.enable()


def test_two_guidances_share_one_guide(nets):
    target, guide = nets
    target2 = copy.deepcopy(target)
    x1, x2 = torch.randn(16, 12), torch.randn(10, 12)
    ref1, _ = _reference(target, guide, x1)
    ref2, _ = _reference(target2, guide, x2)
    g1 = fastguide.Guidance(target, guide, layers=LAYERS)
    g2 = fastguide.Guidance(target2, guide, layers=LAYERS)
    target(x1)
    target2(x2)
    l1 = g1.loss(x1)  # g2's guide hooks stay idle during g1's guide forward
    assert g2._call is None
    l2 = g2.loss(x2)
    torch.testing.assert_close(l1.detach(), ref1)
    torch.testing.assert_close(l2.detach(), ref2)
    g1.close()
    g2.close()


def test_shared_guide_from_two_threads(nets):
    target, guide = nets
    targets = [target, copy.deepcopy(target)]
    xs = [torch.randn(16, 12, generator=torch.Generator().manual_seed(s)) for s in range(8)]
    ys = [torch.randn(10, 12, generator=torch.Generator().manual_seed(100 + s)) for s in range(8)]
    inputs = [xs, ys]  # different batch sizes: a mixed-up guide batch would also fail loudly
    want = [[_reference(targets[k], guide, b)[0] for b in inputs[k]] for k in range(2)]
    gds = [fastguide.Guidance(t, guide, layers=LAYERS) for t in targets]
    got: list[list] = [[], []]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run(k):
        try:
            barrier.wait()
            for b in inputs[k]:
                targets[k](b)
                got[k].append(gds[k].loss(b).detach())
        except BaseException as e:  # reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in range(2):
        for a, b in zip(got[k], want[k], strict=True):
            torch.testing.assert_close(a, b)
    for gd in gds:
        gd.close()


class _Twice(nn.Module):
    """Calls its ``shared`` Linear twice per forward (weight tying across depth)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 16)
        self.shared = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h1 = self.shared(torch.tanh(self.inp(x)))
        h2 = self.shared(torch.tanh(h1))
        return self.head(torch.tanh(h2))


@pytest.mark.parametrize("policy", ["warn", "last", "first", "error"])
def test_module_called_several_times(policy):
    torch.manual_seed(0)
    target, guide = _Twice(), mlp(width=20)
    x = torch.randn(16, 12)
    with torch.no_grad():
        h1 = target.shared(torch.tanh(target.inp(x)))
        h2 = target.shared(torch.tanh(h1))
        g = guide[2](guide[1](guide[0](x)))
    gd = fastguide.Guidance(target, guide, layers={"shared": "2"}, multi_call=policy)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(2):
            target(x)
            if policy == "error":
                with pytest.raises(RuntimeError, match=r"'shared' \(2 calls\) ran several times"):
                    gd.loss(x)
                assert gd.step == 0
                gd._t_acts.clear()
                continue
            gd.loss(x)
            want = h1 if policy == "first" else h2
            assert_close(gd.last_cka[0], fastguide.cka(want, g), "cka", torch.float32, what=policy)
    multi = [w for w in rec if "ran several times" in str(w.message)]
    assert len(multi) == (1 if policy == "warn" else 0)  # warned once, not every step
    with pytest.raises(ValueError, match="multi_call"):
        fastguide.Guidance(target, guide, layers={"shared": "2"}, multi_call="mean")
    gd.close()


def test_two_forwards_before_loss_use_the_last(nets):
    target, guide = nets
    x_old, x = torch.randn(16, 12), torch.randn(16, 12)
    ref, _ = _reference(target, guide, x)
    with fastguide.Guidance(target, guide, layers=LAYERS) as gd, warnings.catch_warnings():
        warnings.simplefilter("error")  # a second forward is not a module called twice in one forward
        target(x_old)
        target(x)
        torch.testing.assert_close(gd.loss(x).detach(), ref)


def test_failed_loss_changes_no_state(nets):
    target, guide = nets
    x = torch.randn(16, 12)
    ref, _ = _reference(target, guide, x, until=3)
    with fastguide.Guidance(target, guide, layers=LAYERS, until=3, accumulate=2) as gd:
        target(x)
        gd.loss(x)  # micro-batch 1 of step 0
        before = (gd.step, gd._micro, gd.last_cka)
        target(x)
        with pytest.raises(ValueError, match="batch-size mismatch"):
            gd.loss(x[:8])
        with pytest.raises(ValueError, match="needs the guide's input"):
            gd.loss()
        assert (gd.step, gd._micro, gd.last_cka) == before
        # The captured activations are still there: the corrected call succeeds on them.
        torch.testing.assert_close(gd.loss(x).detach(), ref)
        assert (gd.step, gd._micro) == (1, 0)


def test_failed_auto_resolution_changes_no_state(nets):
    target, guide = nets
    x = torch.randn(16, 12)
    with fastguide.Guidance(target, guide) as gd:
        n_hooks = len(_hooks(target, guide))
        target(x)
        with pytest.raises(ValueError, match="batch-size mismatch"):
            gd.loss(x[:8])
        assert gd._mapping is None and gd.step == 0 and len(_hooks(target, guide)) == n_hooks
        gd.loss(x)
        assert gd.pairs == [("0", "0"), ("2", "4"), ("4", "6")] and gd.step == 1


class _Holder(nn.Module):
    """A model that owns its target, its guide and the Guidance (as a LightningModule would)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net, self.guide = mlp_pair()
        self.guidance = fastguide.Guidance(self.net, self.guide, layers=LAYERS)


def test_copy_of_a_model_holding_guidance_is_unhooked_until_registered():
    model = _Holder()
    assert model.guidance.state_dict().keys() == {"_extra_state"}
    assert list(model.parameters()) == list(model.net.parameters()) + list(model.guide.parameters())
    x = torch.randn(16, 12)
    model.net(x)
    model.guidance.loss(x)
    twin = copy.deepcopy(model)
    assert twin.guidance.target is twin.net and twin.guidance.step == 1
    assert not any(isinstance(h, ModuleHook) for h in _hooks(twin))
    with pytest.raises(RuntimeError, match="register_hooks"):
        twin.guidance.loss(x)
    twin.guidance.register_hooks()
    twin.net(x)
    model.net(x)
    torch.testing.assert_close(twin.guidance.loss(x), model.guidance.loss(x))
    assert twin.guidance.step == model.guidance.step == 2
    restored = pickle.loads(pickle.dumps(model))
    assert restored.guidance.step == 2 and restored.guidance.pairs == model.guidance.pairs
    assert restored.guidance.target is restored.net
