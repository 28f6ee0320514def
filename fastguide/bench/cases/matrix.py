"""All-pairs CKA matrix cases (forward): W2 (token activations) and W3 (many equal-width layers).

Every provider is checked against the oracle's float64 matrix of the estimator it computes (the naive
code and the peers have a fixed one) before it is timed.
"""

from __future__ import annotations

from functools import partial

import torch

from ... import cka_matrix
from .._lib import reference as R
from ..baselines import careful_matrix, ckatorch_matrix, compiled, have, naive_matrix, pytorch_cka_matrix
from .base import Case, Runner, latent_layers, no_state

__all__ = ["matrix_case", "matrix_inputs", "matrix_model", "w2_case", "w3_matrix_case"]


def _matrix_inputs(device, *, n, dx, dy, L, estimator, seed) -> dict:
    g = torch.Generator().manual_seed(seed)
    layers = latent_layers(n, [(dx,)] * L + [(dy,)] * L, device, g)
    xs, ys = layers[:L], layers[L:]
    return {"xs": xs, "ys": ys, "ref": R.cka_matrix_centred(xs, ys, estimator)}


def matrix_inputs(n, dx, dy, L, estimator, seed):
    """``make(device)`` of a matrix-shaped case: ``xs``, ``ys`` and the oracle's matrix ``ref``."""
    return partial(_matrix_inputs, n=n, dx=dx, dy=dy, L=L, estimator=estimator, seed=seed)


def matrix_model(n, dx, dy, L, elt=4):
    """Useful-work model: symmetric Grams (n^2 d per layer) and the L x L pair products; inputs read once."""
    return L * n * n * (dx + dy) + 2 * L * L * n * n, L * n * (dx + dy) * elt


def matrix_case(n: int, dx: int, dy: int, layers: int, estimator: str, seed: int, **fields) -> Case:
    """A float32 :class:`Case` on ``layers`` + ``layers`` layers of ``n`` examples (widths ``dx`` / ``dy``):
    the inputs, useful-work model and Gram bytes of the matrix-shaped workloads; ``fields``: the rest."""
    fl, by = matrix_model(n, dx, dy, layers)
    return Case(
        estimator=estimator,
        dtype="float32",
        make=matrix_inputs(n, dx, dy, layers, estimator, seed),
        model_flops=fl,
        model_bytes=by,
        gram_bytes=2 * layers * n * n * 4,
        **fields,
    )


def _check_matrix(fn, inp, est_of_provider: str, estimator: str) -> dict:
    got = fn(inp["xs"], inp["ys"]).detach().double().cpu()
    ref = (
        inp["ref"]
        if est_of_provider == estimator
        else R.cka_matrix_centred(inp["xs"], inp["ys"], est_of_provider)
    )
    err = float((got - ref).abs().max())
    return {
        "cka_max_abs_err": err,
        "ok": err <= 1e-5 or (inp["xs"][0].dtype != torch.float32 and err <= 1e-2),
    }


def _run_matrix(fn, inp, _state):
    with torch.no_grad():
        return fn(inp["xs"], inp["ys"])


def _provider(make_fn, est_of_provider: str, estimator: str, inp, device) -> Runner:
    fn = make_fn()
    check = partial(_check_matrix, fn, inp, est_of_provider, estimator)
    return Runner(no_state, partial(_run_matrix, fn, inp), check=check)


def _fastguide(backend: str, estimator: str):
    return partial(cka_matrix, estimator=estimator, backend=backend)


def _careful(estimator: str):
    def fn(xs, ys):
        return careful_matrix(xs, ys, estimator)

    return fn


def _matrix_providers(estimator: str, *, compile_=True, ckatorch=True, naive=False) -> dict:
    # name -> (builder of fn(xs, ys), the estimator the provider computes)
    fns = {
        "fastguide-triton": (partial(_fastguide, "triton", estimator), estimator),
        "fastguide-torch": (partial(_fastguide, "torch", estimator), estimator),
        "torch-careful": (partial(_careful, estimator), estimator),
    }
    if compile_:
        fns["torch-compile"] = (lambda: compiled(_careful(estimator)), estimator)
    if naive:
        fns["naive"] = (lambda: naive_matrix, "biased")
    if have("cka"):
        fns["pytorch-cka"] = (lambda: pytorch_cka_matrix, "unbiased")
    if ckatorch and have("ckatorch"):
        fns["ckatorch"] = (lambda: ckatorch_matrix, "unbiased")
    return {name: partial(_provider, make, est, estimator) for name, (make, est) in fns.items()}


def w2_case(sc, compile_: bool) -> Case:
    c = sc["W2"]
    n, dx, dy, L = c["n"], c["dx"], c["dy"], c["layers"]
    return matrix_case(
        n,
        dx,
        dy,
        L,
        "unbiased",
        2,
        key="W2 matrix fwd",
        workload="W2",
        op="matrix",
        mode="fwd",
        title=f"W2 all-pairs CKA matrix: n={n} tokens, {L}x{L} layers, d={dx}/{dy}, unbiased",
        shapes={"n": n, "dx": dx, "dy": dy, "layers": L},
        providers=_matrix_providers("unbiased", compile_=compile_, ckatorch=False),
    )


def w3_matrix_case(sc, compile_: bool, slow_peers: bool) -> Case:
    c = sc["W3"]
    n, d, L = c["n"], c["d"], c["layers"]
    return matrix_case(
        n,
        d,
        d,
        L,
        "unbiased",
        3,
        key="W3 matrix fwd",
        workload="W3",
        op="matrix",
        mode="fwd",
        title=f"W3 all-pairs CKA matrix: n={n}, {L}x{L} layers, d={d}, unbiased",
        shapes={"n": n, "d": d, "layers": L},
        providers=_matrix_providers("unbiased", compile_=compile_, ckatorch=slow_peers),
        budget_s=15.0,
    )
