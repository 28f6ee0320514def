"""Grouped CKA loss cases: per-position CKA (``tokens="positions"``) and per-sample structure CKA
(``tokens="structure"``) of (B, T, D) activations, forward and forward+backward.

Providers: ``fastguide-triton`` / ``fastguide-torch`` (``CKALoss`` with the grouped ``tokens=``) against
the code users write today (:mod:`fastguide.bench.baselines`): ``loop`` (a Python loop over positions
or samples calling a careful per-layer CKA) and ``einsum`` (all groups' Grams batched with einsum);
both take their backward from autograd. Each provider is checked against the float64 per-group oracle
(:func:`fastguide._reference.cka_pairs_grouped`): the loss, and for fwd+bwd the input gradients.
"""

from __future__ import annotations

from functools import partial

import torch

from ... import CKALoss
from .._lib import reference as R
from ..baselines import einsum_group_cka, loop_group_cka
from .base import Case
from .loss import loss_runner

__all__ = ["SIZES", "structure_cases"]

# Per scale and mode: B examples, T tokens, D features per layer, P one-to-one layer pairs.
SIZES = {
    # DiT/REPA-like: 256 tokens; the paper's per-position CKA on a sequence model's batch.
    "full": {
        "positions": {"B": 128, "T": 256, "D": 512, "P": 2},
        "structure": {"B": 64, "T": 256, "D": 768, "P": 2},
    },
    "cpu": {
        "positions": {"B": 64, "T": 64, "D": 128, "P": 2},
        "structure": {"B": 16, "T": 256, "D": 128, "P": 2},
    },
    "quick": {
        "positions": {"B": 32, "T": 32, "D": 64, "P": 2},
        "structure": {"B": 8, "T": 64, "D": 64, "P": 2},
    },
    "smoke": {"positions": {"B": 8, "T": 6, "D": 8, "P": 2}, "structure": {"B": 4, "T": 8, "D": 8, "P": 2}},
}
_EST = {"positions": "biased", "structure": "unbiased"}  # the paper's estimator; the library default


def _layers(B, T, D, count, device, gen, rank=8):
    """Layers sharing a per-token latent (B, T, rank): realistic per-position and per-sample CKAs."""
    u = torch.randn(B, T, rank, generator=gen)
    out = []
    for _ in range(count):
        W = torch.randn(rank, D, generator=gen) / rank**0.5
        out.append((u @ W + 0.5 * torch.randn(B, T, D, generator=gen)).to(device))
    return out


_INPUTS: dict = {}


def _reference_grads(cache: dict, xs, ys, pairs, tokens, estimator) -> list:
    """Float64 autograd gradients of ``sum(1 - CKA)`` through the per-group oracle (cached)."""
    if "g" not in cache:
        xd = [x.detach().double().requires_grad_(True) for x in xs]
        yd = [y.detach().double() for y in ys]
        loss = (1 - R.cka_pairs_grouped(xd, yd, pairs, tokens, estimator)).sum()
        cache["g"] = list(torch.autograd.grad(loss, xd))
    return cache["g"]


def _inputs(device, *, tokens, B, T, D, P, seed) -> dict:
    key = (tokens, B, T, D, P, str(device), seed)
    if key not in _INPUTS:
        _INPUTS.clear()
        g = torch.Generator().manual_seed(seed)
        layers = _layers(B, T, D, 2 * P, device, g)
        xs = [x.requires_grad_(True) for x in layers[:P]]
        ys = layers[P:]
        pairs = [(k, k) for k in range(P)]
        ref = R.cka_pairs_grouped([x.detach() for x in xs], ys, pairs, tokens, _EST[tokens])
        grads = partial(_reference_grads, {}, xs, ys, pairs, tokens, _EST[tokens])
        _INPUTS[key] = {"xs": xs, "ys": ys, "ref_cka": ref, "ref_grads": grads}
    return _INPUTS[key]


def _check(fn, inp, mode: str) -> dict:
    xs, ys = inp["xs"], inp["ys"]
    for x in xs:
        x.grad = None
    loss = fn(xs, ys)
    want = float((1 - inp["ref_cka"]).sum())
    res = {"loss_abs_err": abs(float(loss.detach().double()) - want)}
    ok = res["loss_abs_err"] <= 1e-5 * len(xs)
    if mode != "fwd":
        loss.backward()
        res["grad_rel_err"] = max(
            float((x.grad.double() - g).norm() / g.norm().clamp_min(1e-300))
            for x, g in zip(xs, inp["ref_grads"](), strict=True)
        )
        ok = ok and res["grad_rel_err"] <= 1e-4
    for x in xs:
        x.grad = None
    res["ok"] = bool(ok)
    return res


def _baseline_loss(group_fn, tokens: str, estimator: str):
    def fn(xs, ys):
        return sum(1 - group_fn(x, y, tokens, estimator) for x, y in zip(xs, ys, strict=True))

    return fn


def _provider(make_fn, mode: str, inp, device):
    fn = make_fn()
    return loss_runner(fn, inp, mode, partial(_check, fn, inp, mode))


def _providers(tokens: str, P: int, mode: str) -> dict:
    est = _EST[tokens]
    pairs = [(k, k) for k in range(P)]
    fns = {
        "fastguide-triton": partial(CKALoss, pairs, estimator=est, backend="triton", tokens=tokens),
        "fastguide-torch": partial(CKALoss, pairs, estimator=est, backend="torch", tokens=tokens),
        "loop": partial(_baseline_loss, loop_group_cka, tokens, est),
        "einsum": partial(_baseline_loss, einsum_group_cka, tokens, est),
    }
    return {name: partial(_provider, make, mode) for name, make in fns.items()}


def structure_case(scale: str, tokens: str, mode: str) -> Case:
    c = SIZES[scale][tokens]
    B, T, D, P = c["B"], c["T"], c["D"], c["P"]
    G, n = (T, B) if tokens == "positions" else (B, T)
    est = _EST[tokens]
    # Useful work (as the layer loss cases): symmetric Grams n^2 d per group and layer, the pair dots,
    # backward 2 n^2 d per group of each target layer; inputs read once, gradients written once.
    f_fwd = 2 * P * G * n * n * D + 2 * P * G * n * n
    f_bwd = 2 * P * G * n * n * D
    b_in = 2 * P * B * T * D * 4
    b_grad = P * B * T * D * 4
    what = "per-position CKA over the batch" if tokens == "positions" else "per-sample T x T structure CKA"
    return Case(
        key=f"{tokens} loss {mode}",
        workload=tokens,
        op="loss",
        mode=mode,
        title=(
            f"{tokens} loss {mode}: {what}, (B, T, D) = ({B}, {T}, {D}), G={G} groups of n={n}, "
            f"{P} pairs, {est}"
        ),
        shapes={"B": B, "T": T, "D": D, "pairs": P, "groups": G, "n": n},
        estimator=est,
        dtype="float32",
        make=partial(_inputs, tokens=tokens, B=B, T=T, D=D, P=P, seed=7 if tokens == "positions" else 8),
        providers=_providers(tokens, P, mode),
        model_flops=f_fwd if mode == "fwd" else f_fwd + f_bwd,
        model_bytes=b_in if mode == "fwd" else b_in + b_grad,
        gram_bytes=2 * P * G * n * n * 4,
        grad_bytes=0 if mode == "fwd" else b_grad,
    )


def structure_cases(scale: str) -> list[Case]:
    """The four grouped cases of one scale: positions / structure x fwd / fwd+bwd."""
    return [structure_case(scale, t, m) for t in ("positions", "structure") for m in ("fwd", "fwd+bwd")]
