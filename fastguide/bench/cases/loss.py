"""Guidance-loss cases (``CKALoss`` on mapped layer pairs): W1, W3 and the token-level loss.

Modes ``fwd`` / ``bwd`` / ``fwd+bwd``; every provider is checked against the float64 oracle
(:mod:`fastguide._reference`): the loss value, and for backward modes the input gradients against a
float64 autograd gradient through the oracle.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from ... import CKALoss
from .._lib import auto_pairs, feature_cost
from .._lib import reference as R
from ..baselines import careful_pairs, compiled, naive_pairs
from .base import Case, Runner, latent_layers, no_state, resnet18_block_dims

__all__ = ["clear_input_cache", "loss_runner", "tokens_case", "w1_loss_case", "w3_loss_case"]


# --------------------------------------------------------------------------- one provider in one mode
def _clear_grads(xs) -> None:
    for x in xs:
        x.grad = None


def _run_fwd(fn, inp, _state):
    with torch.no_grad():
        return fn(inp["xs"], inp["ys"])


def _prepare_bwd(fn, inp):
    _clear_grads(inp["xs"])
    return fn(inp["xs"], inp["ys"])


def _run_bwd(loss) -> None:
    loss.backward()


def _prepare_fwd_bwd(inp) -> None:
    _clear_grads(inp["xs"])


def _run_fwd_bwd(fn, inp, _state) -> None:
    fn(inp["xs"], inp["ys"]).backward()


def _finish(inp, _state) -> None:
    _clear_grads(inp["xs"])


def loss_runner(fn, inp, mode: str, check=None) -> Runner:
    """A loss provider ``fn(xs, ys) -> scalar`` in one of the modes fwd / bwd / fwd+bwd."""
    if mode == "fwd":
        prepare, run = no_state, partial(_run_fwd, fn, inp)
    elif mode == "bwd":
        prepare, run = partial(_prepare_bwd, fn, inp), _run_bwd
    else:
        prepare, run = partial(_prepare_fwd_bwd, inp), partial(_run_fwd_bwd, fn, inp)
    return Runner(prepare, run, partial(_finish, inp), check)


def _check_loss(fn, inp, mode: str, num_pairs: int, grad_ref: bool) -> dict:
    """Loss against the oracle's ``sum(1 - CKA)``; for backward modes, the input gradients too."""
    xs, ys = inp["xs"], inp["ys"]
    _clear_grads(xs)
    loss = fn(xs, ys)
    want = (1 - inp["ref_cka"]).sum()
    res = {"loss_abs_err": abs(float(loss.detach().double()) - float(want))}
    fp32 = xs[0].dtype == torch.float32
    ok = res["loss_abs_err"] <= (1e-5 if fp32 else 1e-2) * num_pairs
    if mode != "fwd" and grad_ref:
        loss.backward()
        worst = 0.0
        for x, g in zip(xs, inp["ref_grads"](), strict=False):
            if g is None:
                continue
            got = torch.zeros_like(x) if x.grad is None else x.grad
            worst = max(worst, float((got.double() - g).norm() / g.norm().clamp_min(1e-300)))
        res["grad_rel_err"] = worst
        ok = ok and worst <= (1e-4 if fp32 else 2e-2)
    _clear_grads(xs)
    res["ok"] = bool(ok)
    return res


# --------------------------------------------------------------------------- the providers
def _careful_loss(pairs, estimator: str, tokens: str):
    def fn(xs, ys):
        if tokens == "samples":
            xs = [x.reshape(-1, x.shape[-1]) for x in xs]
            ys = [y.reshape(-1, y.shape[-1]) for y in ys]
        return (1 - careful_pairs(xs, ys, pairs, estimator)).sum()

    return fn


def _naive_loss(pairs):
    def fn(xs, ys):
        return (1 - naive_pairs(xs, ys, pairs)).sum()

    return fn


def _provider(make_fn, mode: str, num_pairs: int, grad_ref: bool, inp, device) -> Runner:
    fn = make_fn()
    return loss_runner(fn, inp, mode, partial(_check_loss, fn, inp, mode, num_pairs, grad_ref))


def _loss_providers(
    pairs,
    estimator: str,
    mode: str,
    *,
    naive=True,
    compile_=True,
    tokens="flatten",
    gram_route_variant=False,
    grad_ref=True,
    careful=True,
) -> dict:
    fns = {
        "fastguide-triton": partial(CKALoss, pairs, estimator=estimator, backend="triton", tokens=tokens),
        "fastguide-torch": partial(CKALoss, pairs, estimator=estimator, backend="torch", tokens=tokens),
    }
    if gram_route_variant:
        fns["fastguide-torch:gram-route"] = partial(
            CKALoss, pairs, estimator=estimator, backend="torch", route="gram", tokens=tokens
        )
    if careful:
        fns["torch-careful"] = partial(_careful_loss, pairs, estimator, tokens)
    if compile_:
        fns["torch-compile"] = lambda: compiled(_careful_loss(pairs, estimator, tokens))
    if naive:
        fns["naive"] = partial(_naive_loss, pairs)
    return {name: partial(_provider, make, mode, len(pairs), grad_ref) for name, make in fns.items()}


# --------------------------------------------------------------------------- inputs and the oracle
def _loss_model(n, dts_t, dts_g, pairs, mode, elt=4):
    """Useful-work model of a loss call: Gram flops (symmetric, n^2 d per layer), backward GEMMs."""
    used_t = sorted({i for i, _ in pairs})
    used_g = sorted({j for _, j in pairs})
    f_fwd = (
        sum(n * n * dts_t[i] for i in used_t) + sum(n * n * dts_g[j] for j in used_g) + 2 * len(pairs) * n * n
    )
    b_fwd = sum(n * dts_t[i] * elt for i in used_t) + sum(n * dts_g[j] * elt for j in used_g)
    f_bwd = sum(2 * n * n * dts_t[i] for i in used_t)
    b_bwd = sum(2 * n * dts_t[i] * elt for i in used_t)
    if mode == "fwd":
        return f_fwd, b_fwd
    if mode == "bwd":
        return f_bwd, b_bwd
    return f_fwd + f_bwd, b_fwd + b_bwd


def _reference_grads(xs, ys, pairs, estimator: str) -> list:
    """Float64 autograd gradient of ``sum(1 - CKA)`` w.r.t. ``xs`` through the oracle (None if unused)."""
    xd = [x.detach().double().requires_grad_(True) for x in xs]
    yd = [y.detach().double() for y in ys]
    loss = (1 - R.cka_pairs(xd, yd, pairs, estimator)).sum()
    used = sorted({i for i, _ in pairs})
    out = [None] * len(xs)
    for i, g in zip(used, torch.autograd.grad(loss, [xd[i] for i in used]), strict=False):
        out[i] = g
    return out


def _cached_reference_grads(cache: dict, rx, ry, xs, pairs, estimator: str) -> list:
    if "g" not in cache:
        gs = _reference_grads(rx, ry, pairs, estimator)
        cache["g"] = [
            None if g is None else g.reshape(x.shape).to(x.device) for g, x in zip(gs, xs, strict=False)
        ]
    return cache["g"]


# The fwd / bwd / fwd+bwd cases of one workload share inputs and oracle (one entry kept).
_INPUT_CACHE: dict = {}


def clear_input_cache() -> None:
    _INPUT_CACHE.clear()


def _loss_inputs(device, *, xs_shapes, ys_shapes, n, pairs, estimator, seed=0, tokens="flatten") -> dict:
    key = (tuple(xs_shapes), tuple(ys_shapes), n, tuple(pairs), estimator, str(device), seed, tokens)
    if key in _INPUT_CACHE:
        return _INPUT_CACHE[key]
    _INPUT_CACHE.clear()
    g = torch.Generator().manual_seed(seed)
    # Built on the device: the float64 oracle then runs there too (fast on a GPU).
    layers = latent_layers(n, list(xs_shapes) + list(ys_shapes), device, g)
    xs, ys = layers[: len(xs_shapes)], layers[len(xs_shapes) :]
    if tokens == "samples":
        rx = [x.reshape(-1, x.shape[-1]) for x in xs]
        ry = [y.reshape(-1, y.shape[-1]) for y in ys]
    else:
        rx, ry = xs, ys
    ref_cka = R.cka_pairs(rx, ry, pairs, estimator)
    xs = [x.requires_grad_(True) for x in xs]
    ref_grads = partial(_cached_reference_grads, {}, rx, ry, xs, pairs, estimator)
    _INPUT_CACHE[key] = inp = {"xs": xs, "ys": ys, "ref_cka": ref_cka, "ref_grads": ref_grads}
    return inp


# --------------------------------------------------------------------------- the cases
def w1_loss_case(sc, mode: str, compile_: bool) -> Case:
    c = sc["W1"]
    n = c["n"]
    xs_shapes = [(d,) for d in c["target"]]
    ys_shapes = resnet18_block_dims(c["guide_img"])
    pairs = auto_pairs(len(xs_shapes), len(ys_shapes))
    est = "biased"
    dts_t = [math.prod(s) for s in xs_shapes]
    dts_g = [math.prod(s) for s in ys_shapes]
    fl, by = _loss_model(n, dts_t, dts_g, pairs, mode)
    layers_with_gram = len({i for i, _ in pairs}) + len({j for _, j in pairs})
    return Case(
        key=f"W1 loss {mode}",
        workload="W1",
        op="loss",
        mode=mode,
        title=(
            f"W1 guidance loss {mode}: n={n}, target FCN {len(xs_shapes)}x{dts_t[0]} vs ResNet-18's 9 block "
            f"outputs ({min(dts_g)}..{max(dts_g)} features, {c['guide_img']}px), {len(pairs)} pairs, {est}"
        ),
        shapes={"n": n, "target": xs_shapes, "guide": ys_shapes, "pairs": pairs},
        estimator=est,
        dtype="float32",
        make=partial(_loss_inputs, xs_shapes=xs_shapes, ys_shapes=ys_shapes, n=n, pairs=pairs, estimator=est),
        providers=_loss_providers(pairs, est, mode, compile_=compile_),
        model_flops=fl,
        model_bytes=by,
        gram_bytes=layers_with_gram * n * n * 4,
        grad_bytes=0 if mode == "fwd" else sum(n * d * 4 for d in dts_t),
    )


def w3_loss_case(sc, mode: str, compile_: bool) -> Case:
    c = sc["W3"]
    n, d, L = c["n"], c["d"], c["layers"]
    shapes = [(d,)] * L
    pairs = [(i, i) for i in range(L)]
    est = "biased"
    fl, by = _loss_model(n, [d] * L, [d] * L, pairs, mode)
    return Case(
        key=f"W3 loss {mode}",
        workload="W3",
        op="loss",
        mode=mode,
        title=f"W3 loss {mode}: n={n}, {L} target vs {L} guide layers of d={d}, {L} one-to-one pairs, {est}",
        shapes={"n": n, "target": shapes, "guide": shapes, "pairs": len(pairs)},
        estimator=est,
        dtype="float32",
        make=partial(
            _loss_inputs, xs_shapes=shapes, ys_shapes=shapes, n=n, pairs=pairs, estimator=est, seed=3
        ),
        providers=_loss_providers(pairs, est, mode, compile_=compile_),
        model_flops=fl,
        model_bytes=by,
        gram_bytes=2 * L * n * n * 4,
        grad_bytes=L * n * d * 4,
    )


def tokens_case(sc, mode: str, slow_peers: bool) -> Case:
    c = sc["tokens"]
    B, T, D, P = c["B"], c["T"], c["D"], c["pairs"]
    n = B * T
    shapes = [(T, D)] * P
    pairs = [(i, i) for i in range(P)]
    est = "unbiased"
    feat, gram = feature_cost([D] * (2 * P), [(i, P + i) for i in range(P)], n)
    fl = 2 * feat * (1 if mode == "fwd" else 3)
    by = 2 * P * n * D * 4 + (0 if mode == "fwd" else 2 * P * n * D * 4)
    return Case(
        key=f"tokens loss {mode}",
        workload="tokens",
        op="loss",
        mode=mode,
        title=(
            f"token-level loss {mode}: tokens='samples', n=B*T={B}x{T}={n}, d={D}, {P} pairs, {est} "
            f"(feature route vs Gram route)"
        ),
        shapes={"n": n, "B": B, "T": T, "D": D, "pairs": P},
        estimator=est,
        dtype="float32",
        make=partial(
            _loss_inputs,
            xs_shapes=shapes,
            ys_shapes=shapes,
            n=B,
            pairs=pairs,
            estimator=est,
            seed=4,
            tokens="samples",
        ),
        # Gradients at n = 8192 are checked in tests/ (the float64 autograd oracle needs GBs here);
        # torch-careful (autograd through n x n Grams) only with slow_peers (docs/benchmark-harness.md).
        providers=_loss_providers(
            pairs,
            est,
            mode,
            naive=False,
            compile_=False,
            tokens="samples",
            gram_route_variant=True,
            grad_ref=False,
            careful=slow_peers,
        ),
        model_flops=fl,
        model_bytes=by,
        gram_bytes=2 * P * n * n * 4,
        grad_bytes=P * n * D * 4,
        budget_s=20.0,
        extra={"counted_flops_feature": feat, "counted_flops_gram": gram},
    )
