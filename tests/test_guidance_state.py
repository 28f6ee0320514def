"""Guidance in real training loops: resumable state, schedules in optimizer steps under gradient
accumulation, evaluation under no_grad / inference_mode, and token masks."""

import io

import pytest
import torch
from helpers import assert_close, mlp_pair
from torch import nn

import fastguide


class _Model(nn.Module):
    """A model that holds its Guidance: model.state_dict() carries the schedule."""

    def __init__(self, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.net, self.guide = mlp_pair()
        self.guidance = fastguide.Guidance(self.net, self.guide, **kw)


def _run(model, opt, steps, accumulate=1):
    """Guided micro-batches; returns whether each one was guided (a nonzero guidance loss)."""
    guided = []
    for _ in range(steps):
        for _ in range(accumulate):
            x = torch.randn(16, 12)
            task = model.net(x).square().mean()
            g = model.guidance.loss(x)
            guided.append(bool(g.detach() != 0))
            (task + g).backward()
        opt.step()
        opt.zero_grad()
    return guided


def test_resumed_run_continues_until_where_it_stopped():
    model = _Model(until=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    first = _run(model, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    print(f"before save: guidance.step={model.guidance.step}")

    resumed = _Model(until=5)  # a fresh process: step 0, layers unresolved
    assert resumed.guidance.step == 0 and resumed.guidance._mapping is None
    ckpt = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    print(f"after load: guidance.step={resumed.guidance.step}")
    assert resumed.guidance.step == 3
    assert resumed.guidance.pairs == model.guidance.pairs  # the auto mapping comes back without a step
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.01)
    opt2.load_state_dict(ckpt["opt"])
    rest = _run(resumed, opt2, 4)
    assert first + rest == [True, True, True, True, True, False, False]
    assert resumed.guidance.step == 7


def test_state_dict_conventions():
    model = _Model(layers={"0": "0", "2": "4"}, accumulate=2)
    g = model.guidance
    sd = g.state_dict()
    assert list(sd) == ["_extra_state"] and sd["_extra_state"]["step"] == 0
    assert "guidance._extra_state" in model.state_dict()
    g.step = 4
    g._micro = 1
    other = _Model(layers={"0": "0", "2": "4"}, accumulate=2)
    other.guidance.load_state_dict(g.state_dict())
    assert (other.guidance.step, other.guidance._micro) == (4, 1)
    with pytest.raises(RuntimeError, match="Missing key"):
        other.guidance.load_state_dict({})
    with pytest.raises(ValueError, match="not a Guidance state"):
        other.guidance.load_state_dict({"_extra_state": {"step": 3}})
    mismatched = _Model(layers={"0": "2"})
    with pytest.raises(ValueError, match="differ"):
        mismatched.guidance.load_state_dict(g.state_dict())
    assert mismatched.guidance.step == 0  # a failed load changes nothing
    with pytest.raises(ValueError, match="step must be"):
        g.step = -1


@pytest.mark.parametrize("mode", ["accumulate", "attach", "explicit"])
def test_schedule_counts_optimizer_steps_under_accumulation(mode):
    kw = dict(layers={"0": "0"}, until=2, weight=lambda s: 1.0 + s)
    if mode == "accumulate":
        kw["accumulate"] = 2
    elif mode == "explicit":
        kw["step_on"] = "optimizer"
    model = _Model(**kw)
    g = model.guidance
    opt = torch.optim.SGD(model.net.parameters(), lr=0.01)
    if mode == "attach":
        g.attach_optimizer(opt)
    weights = []
    for _ in range(3):  # 3 optimizer steps of 2 micro-batches each
        for _ in range(2):
            x = torch.randn(16, 12)
            task = model.net(x).square().mean()
            loss = g.loss(x)
            weights.append(
                round(float(loss.detach() / (1 - g.last_cka[0])), 5) if loss.detach() != 0 else 0.0
            )
            (task + loss).backward()
        opt.step()
        if mode == "explicit":
            g.optimizer_step()
    assert g.step == 3
    # until=2 counts optimizer steps: both micro-batches of steps 0 and 1 are guided, at weight(step).
    assert weights == [1.0, 1.0, 2.0, 2.0, 0.0, 0.0]


def test_optimizer_step_needs_step_on_optimizer():
    g = _Model(layers={"0": "0"}).guidance
    with pytest.raises(RuntimeError, match="step_on='optimizer'"):
        g.optimizer_step()
    with pytest.raises(ValueError, match="step_on"):
        _Model(step_on="epoch")
    with pytest.raises(ValueError, match="accumulate"):
        _Model(accumulate=0)
    with pytest.raises(TypeError, match="optimizer"):
        g.attach_optimizer(object())


def test_skipped_optimizer_steps_are_not_counted():
    # GradScaler-style skipping: a step that never calls optimizer.step() does not advance the schedule.
    model = _Model(layers={"0": "0"})
    opt = torch.optim.SGD(model.net.parameters(), lr=0.01)
    model.guidance.attach_optimizer(opt)
    for k in range(4):
        x = torch.randn(16, 12)
        model.net(x)
        model.guidance.loss(x).backward()  # step_on="optimizer": every step here is guided
        if k != 2:
            opt.step()
    assert model.guidance.step == 3


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_evaluation_without_a_guard(ctx):
    model = _Model(layers={"0": "0", "2": "4"}, until=1, estimator="biased")
    g = model.guidance
    x_train, x_val = torch.randn(16, 12), torch.randn(9, 12)
    with torch.no_grad():
        want = fastguide.cka(model.net[0](x_val), model.guide[0](x_val), estimator="biased")
    model.net(x_train)
    train_loss = g.loss(x_train)
    train_loss.backward()
    assert g.step == 1 and not g.active  # until=1: guidance is over for training ...
    with ctx():
        model.net(x_val)
        val = g.loss(x_val)  # ... but evaluation still measures the alignment, for logging
    assert not val.requires_grad and val > 0
    assert_close(g.last_cka[0], want, "cka", torch.float32, what="last_cka")
    assert g.step == 1  # evaluation does not advance the schedule


def test_evaluation_forward_between_training_forward_and_loss():
    model = _Model(layers={"0": "0"})
    g = model.guidance
    x, x_val = torch.randn(16, 12), torch.randn(9, 12)
    model.net(x)
    with torch.no_grad():
        model.net(x_val)  # e.g. a probe or a metric inside the training step
    loss = g.loss(x)  # uses the training forward's activations, with their graph
    assert loss.requires_grad
    loss.backward()
    assert model.net[0].weight.grad is not None
    # The evaluation capture is still there for an evaluation loss.
    with torch.no_grad():
        g.loss(x_val)
        want = fastguide.cka(model.net[0](x_val), model.guide[0](x_val))
    assert_close(g.last_cka[0], want, "cka", torch.float32, what="last_cka")


def test_mask_selects_tokens():
    torch.manual_seed(0)
    target = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))
    guide = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 4))
    x = torch.randn(3, 5, 6)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    keep = mask.reshape(-1).bool()
    with torch.no_grad():
        want = fastguide.cka(target[0](x).reshape(15, 10)[keep], guide[0](x).reshape(15, 7)[keep])
    for route in ("auto", "gram"):
        with fastguide.Guidance(target, guide, layers={"0": "0"}, tokens="samples", route=route) as g:
            target(x)
            g.loss(x, mask=mask).backward()
            assert_close(g.last_cka[0], want, "cka", torch.float32, what="last_cka")
    with fastguide.Guidance(target, guide, layers={"0": "0"}) as g:
        target(x)
        with pytest.raises(ValueError, match="mask needs tokens='samples'"):
            g.loss(x, mask=mask)
    with fastguide.Guidance(target, guide, layers={"0": "0"}, tokens="samples") as g:
        target(x)
        with pytest.raises(ValueError, match="does not fit"):
            g.loss(x, mask=mask[:, :4])
