"""Whole guided training steps: W1 (FCN 8 x d vs ResNet-18's 9 block outputs) and W4 (the paper's
deep FCN vs ResNet-18's 21 hooked maps, ``layers="auto"``), SGD.

Providers: the parts of a step (``unguided`` target step, ``guide-fwd``, ``gram-gemms``: ``X @ X.T`` of
every paired layer) and three guided steps -- :class:`fastguide.Guidance` (``fastguide-*``), hooks plus
the careful loss (``torch-careful``), and the paper code's step (``paper-step``: a second target forward
to collect activations, naive CKA per pair). Each guided step's alignment loss is checked against the
float64 oracle on the activations of the same forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ... import Guidance
from ...experiments.models import DeepFCN, paper_deep_fcn, resnet18
from .._lib import auto_pairs, first_tensor
from .._lib import reference as R
from ..baselines import careful_pairs, naive_linear_cka
from .base import Case, Runner, no_state, sync

__all__ = ["Capture", "StepInputs", "step_case"]

_EST = "biased"


class Capture:
    """Forward hooks storing module outputs (first tensor) by name; removable."""

    def __init__(self, model: nn.Module, names: list[str], detach: bool = False):
        self.acts: dict[str, torch.Tensor] = {}
        mods = dict(model.named_modules())
        self.handles = [mods[nm].register_forward_hook(partial(self._store, nm, detach)) for nm in names]

    def _store(self, name: str, detach: bool, module, inputs, out) -> None:
        t = first_tensor(out)
        self.acts[name] = t.detach() if detach else t

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.acts = {}


@dataclass
class StepInputs:
    """Models, batch and optimiser of a step case, and which layers are paired."""

    target: nn.Module
    guide: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    opt: torch.optim.Optimizer
    mapping: list[tuple[str, str]]  # (target module, guide module) per pair
    t_names: list[str]
    g_names: list[str]
    pairs: list[tuple[int, int]]  # indices into t_names, g_names
    t_shapes: list[tuple[int, ...]]
    g_shapes: list[tuple[int, ...]]


def _make_inputs(c: dict, which: str, device) -> StepInputs:
    n, img = c["n"], c["img"]
    in_features = 3 * img * img
    torch.manual_seed(0)
    if which == "W1step":
        target = DeepFCN(in_features, 10, hidden=c["hidden"], dropout=0.0)
    elif c.get("small_fcn"):
        target = DeepFCN(in_features, 10, hidden=[128] + [64] * 11, dropout=0.1)
    else:
        target = paper_deep_fcn(in_features, 10, dropout=0.1)
    guide = resnet18(num_classes=10)
    target.to(device).train()
    guide.to(device).eval().requires_grad_(False)
    x = torch.randn(n, 3, img, img, device=device)
    y = torch.randint(0, 10, (n,), device=device)
    if which == "W1step":
        t_names = [f"features.{k}" for k in range(1, len(c["hidden"]) + 1)]
        g_names = ["maxpool"] + [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
        mapping = [(t_names[i], g_names[j]) for i, j in auto_pairs(len(t_names), len(g_names))]
    else:
        with Guidance(target, guide, layers="auto", estimator=_EST, example=x[:4]) as gd:
            mapping = gd.pairs
    opt = torch.optim.SGD(target.parameters(), lr=1e-4)
    t_names = list(dict.fromkeys(t for t, _ in mapping))
    g_names = list(dict.fromkeys(g for _, g in mapping))
    pairs = [(t_names.index(t), g_names.index(g)) for t, g in mapping]
    # Shapes of the paired activations (for the gram-gemms provider and the records).
    cap_t, cap_g = Capture(target, t_names, detach=True), Capture(guide, g_names, detach=True)
    with torch.no_grad():
        target(x)
        guide(x)
    t_shapes = [tuple(cap_t.acts[k].shape) for k in t_names]
    g_shapes = [tuple(cap_g.acts[k].shape) for k in g_names]
    cap_t.close()
    cap_g.close()
    return StepInputs(target, guide, x, y, opt, mapping, t_names, g_names, pairs, t_shapes, g_shapes)


# --------------------------------------------------------------------------- pieces of a step
def _task_loss(inp: StepInputs) -> torch.Tensor:
    return F.cross_entropy(inp.target(inp.x), inp.y)


def _finish_step(inp: StepInputs, loss: torch.Tensor) -> None:
    loss.backward()
    inp.opt.step()
    inp.opt.zero_grad(set_to_none=True)


def _check_alignment(inp: StepInputs, values) -> dict:
    """``values()`` -> (alignment loss, target acts, guide acts) of one forward; loss vs the oracle's."""
    val, t_acts, g_acts = values()
    ref = R.cka_pairs([a.detach() for a in t_acts], list(g_acts), inp.pairs, _EST)
    err = abs(float(val) - float((1 - ref).sum()))
    return {"align_loss_abs_err": err, "ok": err <= 1e-5 * len(ref)}


# --------------------------------------------------------------------------- the parts of a step
def _unguided_run(inp: StepInputs, device, _state) -> None:
    _finish_step(inp, _task_loss(inp))
    sync(device)


def unguided(inp: StepInputs, device) -> Runner:
    return Runner(no_state, partial(_unguided_run, inp, device))


def _guide_fwd_run(inp: StepInputs, device, _state) -> None:
    with torch.no_grad():
        inp.guide(inp.x)
    sync(device)


def guide_fwd(inp: StepInputs, device) -> Runner:
    return Runner(no_state, partial(_guide_fwd_run, inp, device))


def _gemms_run(mats, device, _state) -> None:
    for X in mats:
        X @ X.T
    sync(device)


def gram_gemms(inp: StepInputs, device) -> Runner:
    g = torch.Generator().manual_seed(1)
    n = inp.x.shape[0]
    used_t = sorted({i for i, _ in inp.pairs})
    used_g = sorted({j for _, j in inp.pairs})
    mats = [torch.randn(n, math.prod(inp.t_shapes[i][1:]), generator=g).to(device) for i in used_t]
    mats += [torch.randn(n, math.prod(inp.g_shapes[j][1:]), generator=g).to(device) for j in used_g]
    return Runner(
        no_state, partial(_gemms_run, mats, device), note="X @ X.T of every paired layer (torch.mm)"
    )


# --------------------------------------------------------------------------- fastguide.Guidance
def _guidance(inp: StepInputs, backend: str) -> Guidance:
    return Guidance(inp.target, inp.guide, layers=inp.mapping, estimator=_EST, backend=backend)


def _guidance_run(inp: StepInputs, device, gd: Guidance) -> None:
    loss = _task_loss(inp)
    _finish_step(inp, loss + gd.loss(inp.x))
    sync(device)


def _close_guidance(gd: Guidance) -> None:
    gd.close()


def _guidance_values(inp: StepInputs, backend: str):
    gd = _guidance(inp, backend)
    ct = Capture(inp.target, inp.t_names, detach=True)
    cg = Capture(inp.guide, inp.g_names, detach=True)
    try:
        _task_loss(inp)
        t_acts = [ct.acts[k] for k in inp.t_names]
        val = gd.loss(inp.x).detach()
        g_acts = [cg.acts[k] for k in inp.g_names]
    finally:
        gd.close()
        ct.close()
        cg.close()
    return val, t_acts, g_acts


def fastguide_step(backend: str, inp: StepInputs, device) -> Runner:
    return Runner(
        partial(_guidance, inp, backend),
        partial(_guidance_run, inp, device),
        _close_guidance,
        partial(_check_alignment, inp, partial(_guidance_values, inp, backend)),
    )


# --------------------------------------------------------------------------- hooks + a CKA loss
def _captures(inp: StepInputs) -> tuple[Capture, Capture]:
    return Capture(inp.target, inp.t_names), Capture(inp.guide, inp.g_names)


def _close_captures(caps) -> None:
    for cp in caps:
        cp.close()


def _careful_align(inp: StepInputs, caps):
    """After the target forward: guide forward, then the careful loss on the hooked activations."""
    ct, cg = caps
    with torch.no_grad():
        inp.guide(inp.x)
    xs = [ct.acts[k] for k in inp.t_names]
    ys = [cg.acts[k] for k in inp.g_names]
    return (1 - careful_pairs(xs, ys, inp.pairs, _EST)).sum(), xs, ys


def _paper_align(inp: StepInputs, caps):
    """The paper's code: a second target forward to collect activations, then naive CKA per pair."""
    ct, cg = caps
    inp.target(inp.x)
    with torch.no_grad():
        inp.guide(inp.x)
    xs = [ct.acts[k] for k in inp.t_names]
    ys = [cg.acts[k] for k in inp.g_names]
    return sum(1 - naive_linear_cka(xs[i], ys[j]) for i, j in inp.pairs), xs, ys


def _hooked_run(inp: StepInputs, device, align, caps) -> None:
    loss = _task_loss(inp)
    a, _, _ = align(inp, caps)
    _finish_step(inp, loss + a)
    sync(device)


def _hooked_values(inp: StepInputs, align, task_forward: bool):
    caps = _captures(inp)
    try:
        if task_forward:
            _task_loss(inp)
        a, xs, ys = align(inp, caps)
    finally:
        _close_captures(caps)
    return a.detach(), [t.detach() for t in xs], ys


def _hooked_step(inp: StepInputs, device, align, *, task_forward: bool, note: str = "") -> Runner:
    """A provider whose alignment ``align(inp, caps)`` reads activations captured by forward hooks."""
    values = partial(_hooked_values, inp, align, task_forward)
    return Runner(
        partial(_captures, inp),
        partial(_hooked_run, inp, device, align),
        _close_captures,
        partial(_check_alignment, inp, values),
        note=note,
    )


def careful_step(inp: StepInputs, device) -> Runner:
    return _hooked_step(inp, device, _careful_align, task_forward=True)


def paper_step(inp: StepInputs, device) -> Runner:
    return _hooked_step(
        inp,
        device,
        _paper_align,
        task_forward=False,
        note="second target forward + naive linear_CKA per pair",
    )


# --------------------------------------------------------------------------- the cases
def step_case(sc, which: str) -> Case:
    """``which``: ``"W1step"`` or ``"W4step"``."""
    c = sc[which]
    n, img = c["n"], c["img"]
    if which == "W1step":
        title = (
            f"W1 guided training step: n={n}, {img}px inputs, target FCN {len(c['hidden'])}x{c['hidden'][0]} "
            f"(SGD), guide ResNet-18 (9 block outputs), 8 pairs, {_EST}"
        )
        wl = "W1"
    else:
        title = (
            f"W4 guided training step (paper setting): n={n}, {img}px inputs, target FCN 2048+47x1024 with "
            f"BN/ReLU/Dropout, guide ResNet-18 21 hooked maps (layers='auto'), {_EST}"
        )
        wl = "W4"
    return Case(
        key=f"{wl} guided step",
        workload=wl,
        op="step",
        mode="step",
        title=title,
        shapes={"n": n, "img": img},
        estimator=_EST,
        dtype="float32",
        make=partial(_make_inputs, c, which),
        providers={
            "unguided": unguided,
            "guide-fwd": guide_fwd,
            "gram-gemms": gram_gemms,
            "fastguide-triton": partial(fastguide_step, "triton"),
            "fastguide-torch": partial(fastguide_step, "torch"),
            "torch-careful": careful_step,
            "paper-step": paper_step,
        },
        # Guided-step ratios are the noisiest figures (one round is several model calls): they get
        # the largest budgets; the paper's step (a slow comparison) is timed in at most 3 rounds.
        budget_s=25.0 if which == "W1step" else 35.0,
        capped=("paper-step",),
    )
