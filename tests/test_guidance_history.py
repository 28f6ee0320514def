"""Guidance(record_every=k): per-pair CKA every k steps in a CKAHistory, without host syncs."""

import contextlib
import os
import sys

import pytest
import torch
from torch import nn

import fastguide as fg
from fastguide import CKAHistory

LAYERS = {"0": "0", "2": "2"}


def _nets():
    torch.manual_seed(0)
    t = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    g = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 4))
    return t, g


def _train(gd, target, steps, accumulate=1, seen=None):
    opt = torch.optim.SGD(target.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for _ in range(accumulate):
            x = torch.randn(16, 8, generator=gen)
            loss = target(x).square().mean() + gd.loss(x)
            loss.backward()
            if seen is not None and gd.last_cka is not None:
                seen[step] = gd.last_cka.clone()
        opt.step()
        opt.zero_grad()


def test_records_every_k_steps():
    target, guide = _nets()
    gd = fg.Guidance(target, guide, layers=LAYERS, record_every=3)
    seen = {}
    _train(gd, target, 10, seen=seen)
    h = gd.history
    assert isinstance(h, CKAHistory) and h.steps == [0, 3, 6, 9] and len(h) == 4
    assert h.pairs == [("0", "0"), ("2", "2")] and h.record_every == 3
    assert h.cka.dtype == torch.float64 and h.cka.shape == (4, 2)
    assert torch.equal(h.cka, torch.stack([seen[s] for s in (0, 3, 6, 9)]).double())
    assert torch.equal(h.mean(), h.cka.mean(1))
    # Evaluation calls are not training steps: nothing is recorded for them.
    with torch.no_grad():
        x = torch.randn(16, 8)
        target(x)
        gd.loss(x)
    assert gd.history.steps == [0, 3, 6, 9]
    assert len(fg.Guidance(target, guide, layers=LAYERS).history) == 0  # record_every=None
    with pytest.raises(ValueError, match="record_every must be None or a positive int"):
        fg.Guidance(target, guide, layers=LAYERS, record_every=0)


def test_only_guided_steps_and_accumulation():
    target, guide = _nets()
    gd = fg.Guidance(target, guide, layers=LAYERS, record_every=3, every=2)
    _train(gd, target, 13)
    assert gd.history.steps == [0, 6, 12]  # guided (every 2nd) and recorded (every 3rd)

    target, guide = _nets()
    gd = fg.Guidance(target, guide, layers=LAYERS, record_every=2, accumulate=3)
    seen = {}
    _train(gd, target, 5, accumulate=3, seen=seen)
    assert gd.history.steps == [0, 2, 4]
    # One row per optimizer step: the CKA of its last micro-batch.
    assert torch.equal(gd.history.cka, torch.stack([seen[s] for s in (0, 2, 4)]).double())

    # Read in the middle of a step, then the step goes on: still one row for it.
    target, guide = _nets()
    gd = fg.Guidance(target, guide, layers=LAYERS, record_every=1, accumulate=2)
    x = torch.randn(16, 8)
    target(x)
    gd.loss(x)
    assert gd.history.steps == [0]
    first = gd.history.cka.clone()
    target(x + 1)
    gd.loss(x + 1)
    assert gd.history.steps == [0] and not torch.equal(gd.history.cka, first)
    assert torch.equal(gd.history.cka[0], gd.last_cka.double())


def test_follows_a_step_set_from_outside():
    """Integrations set ``guidance.step`` to the trainer's global step (step_on='optimizer')."""
    target, guide = _nets()
    gd = fg.Guidance(target, guide, layers=LAYERS, record_every=5, step_on="optimizer")
    for global_step in (0, 5, 7, 10):
        gd.step = global_step
        x = torch.randn(16, 8)
        target(x)
        gd.loss(x).backward()
    assert gd.history.steps == [0, 5, 10]


_SYNCS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
_OURS = ("_history.py", "guidance.py", "_schedule.py")


@contextlib.contextmanager
def _count_syncs(counts):
    """Count host-sync calls on tensors by (calling file, method)."""
    saved = {name: getattr(torch.Tensor, name) for name in _SYNCS}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            caller = os.path.basename(sys._getframe(1).f_code.co_filename)
            counts[caller, name] = counts.get((caller, name), 0) + 1
            return fn(self, *args, **kwargs)

        return counted

    try:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, wrap(name, fn))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def test_no_host_sync_in_training_steps():
    results = {}
    for record_every in (None, 4):
        target, guide = _nets()
        gd = fg.Guidance(target, guide, layers=LAYERS, record_every=record_every)
        _train(gd, target, 1)  # first step outside the count (one-time setup)
        counts = {}
        with _count_syncs(counts):
            _train(gd, target, 9)  # steps 1..9: recorded at 4 and 8, skipped otherwise
        results[record_every] = counts
        ours = {k: v for k, v in counts.items() if k[0] in _OURS}
        assert not ours, f"host syncs in the Guidance step: {ours}"
        if record_every:
            assert gd._history._steps == [0, 4, 8] and len(gd._history._new) == 3  # still device rows
            on_read = {}
            with _count_syncs(on_read):
                gd.history.cka  # noqa: B018 - the host copy happens on read
            assert on_read == {("_history.py", "cpu"): 1}
    # (The CPU backend makes host-side size choices on CPU tensors; recording adds nothing to them.)
    assert results[4] == results[None], f"recording added host syncs: {results[4]} vs {results[None]}"


def test_plot_save_load(tmp_path):
    target, guide = _nets()
    gd = fg.Guidance(target, guide, layers=LAYERS, record_every=2)
    _train(gd, target, 7)
    h = gd.history
    h.save(tmp_path / "h.json")
    back = CKAHistory.load(tmp_path / "h.json")
    assert torch.equal(back.cka, h.cka) and back.steps == h.steps and back.pairs == h.pairs
    assert back.record_every == 2
    fig = h.plot(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert len(fig.axes[0].lines) == 3  # two pairs and the mean
    with pytest.raises(ValueError, match="not a saved CKAHistory"):
        CKAHistory.from_dict({"steps": []})
    with pytest.raises(ValueError, match="does not fit"):
        CKAHistory([("a", "b")], [0, 1], torch.zeros(1, 1))


def test_resumes_from_state():
    target, guide = _nets()
    gd = fg.Guidance(target, guide, layers=LAYERS, record_every=2)
    _train(gd, target, 5)
    state = gd.state_dict()
    saved = state["_extra_state"]["history"]
    assert saved["steps"] == [0, 2, 4] and saved["cka"].shape == (3, 2)
    other = fg.Guidance(target, guide, layers=LAYERS, record_every=2)
    other.load_state_dict(state)
    assert other.step == 5 and other.history.steps == [0, 2, 4]
    assert torch.equal(other.history.cka, gd.history.cka)
    _train(other, target, 2)  # steps 5 and 6
    assert other.history.steps == [0, 2, 4, 6]
    # States saved before histories existed load, with an empty history.
    old = {"_extra_state": {k: v for k, v in state["_extra_state"].items() if k != "history"}}
    fresh = fg.Guidance(target, guide, layers=LAYERS, record_every=2)
    fresh.load_state_dict(old)
    assert fresh.step == 5 and len(fresh.history) == 0
    # A broken history raises and changes nothing.
    bad = {"_extra_state": dict(state["_extra_state"], history=dict(saved, cka=torch.zeros(2, 2)))}
    with pytest.raises(ValueError, match="history cka must be a"):
        fresh.load_state_dict(bad)
    assert fresh.step == 5 and len(fresh.history) == 0
    # torch.save / torch.load(weights_only=True) of the state.
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    again = fg.Guidance(target, guide, layers=LAYERS, record_every=2)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert again.history.steps == [0, 2, 4]


def test_records_under_fullgraph_compile():
    """The step only keeps a reference: fullgraph compile of forward + loss still gives one graph."""
    from torch._dynamo.testing import CompileCounter

    target, guide = _nets()
    gd = fg.Guidance(target, guide, layers=LAYERS, step_on="optimizer", record_every=2)
    opt = torch.optim.SGD(target.parameters(), lr=0.01)
    gd.attach_optimizer(opt)
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def step(x):
        return target(x).square().mean() + gd.loss(x)

    seen = []
    for k in range(5):
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(k))
        step(x).backward()
        seen.append(gd.last_cka.clone())
        opt.step()
        opt.zero_grad()
    assert counter.frame_count == 1 and gd.history.steps == [0, 2, 4]
    assert torch.equal(gd.history.cka, torch.stack(seen[0::2]).double())
    gd.close()
