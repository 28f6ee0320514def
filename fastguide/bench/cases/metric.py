"""``MinibatchCKA.update`` on W3-shaped batches, against careful torch and pytorch-cka's per-batch HSIC.

Each provider's check accumulates one batch and compares the resulting CKA matrix with the oracle's.
"""

from __future__ import annotations

from functools import partial

from ... import MinibatchCKA
from ..baselines import careful_metric_update, have, pytorch_cka_metric_update
from .base import Case, Runner, no_state
from .matrix import matrix_case

__all__ = ["metric_case"]

_EST = "unbiased"


def _check_fastguide(backend: str, inp) -> dict:
    m = MinibatchCKA(_EST, backend=backend)
    m.update(inp["xs"], inp["ys"])
    err = float((m.compute().cpu() - inp["ref"]).abs().max())
    return {"cka_max_abs_err": err, "ok": err <= 1e-5}


def _update_fastguide(m: MinibatchCKA, inp, _state) -> None:
    m.update(inp["xs"], inp["ys"])


def fastguide_metric(backend: str, inp, device) -> Runner:
    m = MinibatchCKA(_EST, backend=backend)
    return Runner(no_state, partial(_update_fastguide, m, inp), check=partial(_check_fastguide, backend, inp))


def _check_accumulated(update, inp, tol: float) -> dict:
    acc: dict = {}
    update(acc, inp)
    got = acc["c"].double() / (acc["x"].double().sqrt()[:, None] * acc["y"].double().sqrt()[None, :])
    err = float((got.cpu() - inp["ref"]).abs().max())
    return {"cka_max_abs_err": err, "ok": err <= tol}


def _careful_update(acc: dict, inp, _state=None) -> None:
    careful_metric_update(acc, inp["xs"], inp["ys"], _EST)


def _pytorch_cka_update(acc: dict, inp, _state=None) -> None:
    pytorch_cka_metric_update(acc, inp["xs"], inp["ys"])


def careful_metric(inp, device) -> Runner:
    check = partial(_check_accumulated, _careful_update, inp, 1e-5)
    return Runner(no_state, partial(_careful_update, {}, inp), check=check)


def pytorch_cka_metric(inp, device) -> Runner:
    check = partial(_check_accumulated, _pytorch_cka_update, inp, 1e-4)
    return Runner(
        no_state,
        partial(_pytorch_cka_update, {}, inp),
        check=check,
        note="its per-batch accumulation (cka.hsic.hsic on torch.mm Grams)",
    )


def metric_case(sc) -> Case:
    c = sc["W3"]
    n, d, L = c["n"], c["d"], c["layers"]
    providers = {
        "fastguide-triton": partial(fastguide_metric, "triton"),
        "fastguide-torch": partial(fastguide_metric, "torch"),
        "torch-careful": careful_metric,
    }
    if have("cka"):
        providers["pytorch-cka"] = pytorch_cka_metric
    return matrix_case(
        n,
        d,
        d,
        L,
        _EST,
        5,
        key="W3 MinibatchCKA update",
        workload="W3",
        op="metric",
        mode="update",
        title=f"MinibatchCKA.update (W3 shape): n={n}, {L}x{L} layers, d={d}, unbiased, float64 sums",
        shapes={"n": n, "d": d, "layers": L},
        providers=providers,
    )
