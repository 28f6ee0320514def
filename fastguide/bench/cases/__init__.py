"""The benchmark cases (DESIGN.md section 6 workloads), one module per workload family.

* :mod:`.loss`: guidance loss on mapped pairs (W1, W3, token level), fwd / bwd / fwd+bwd;
* :mod:`.matrix`: all-pairs CKA matrix (W2, W3); :mod:`.metric`: ``MinibatchCKA.update`` (W3);
* :mod:`.step`: whole guided training steps (W1, W4);
* :mod:`.structure`: grouped CKA losses (``tokens="positions"`` / ``"structure"``) vs loop / einsum code;
* :mod:`.base`: :class:`Case`, :class:`Runner`, the sizes of each scale (:data:`SCALES`).
"""

from __future__ import annotations

from .base import SCALES, Case, Runner
from .loss import clear_input_cache, tokens_case, w1_loss_case, w3_loss_case
from .matrix import w2_case, w3_matrix_case
from .metric import metric_case
from .step import step_case
from .structure import structure_cases

__all__ = ["SCALES", "Case", "Runner", "build_cases", "clear_input_cache"]


def build_cases(
    scale: str = "cpu",
    *,
    compile_: bool = True,
    only: list[str] | None = None,
    slow_peers: bool | None = None,
) -> list[Case]:
    """The benchmark cases of one scale (``full`` on GPU, ``cpu``, ``quick``, ``smoke``).

    ``compile_``: torch.compile providers (W1 loss fwd+bwd; also the W3 matrix at full scale, as each
    compile is slow on CPU). ``slow_peers`` (default: at full and smoke scale): ckatorch on the W3
    matrix (float64, per pair) and torch-careful on the token-level case; their cost on the development
    machine is in docs/benchmark-harness.md.
    """
    sc = SCALES[scale]
    if slow_peers is None:
        slow_peers = scale in ("full", "smoke")
    cases = [
        w1_loss_case(sc, "fwd+bwd", compile_),
        w1_loss_case(sc, "fwd", False),
        w1_loss_case(sc, "bwd", False),
        w3_loss_case(sc, "fwd+bwd", False),
        tokens_case(sc, "fwd+bwd", slow_peers),
        w2_case(sc, False),
        w3_matrix_case(sc, compile_ and scale == "full", slow_peers),
        metric_case(sc),
        step_case(sc, "W1step"),
        step_case(sc, "W4step"),
        *structure_cases(scale),
    ]
    if only:
        keys = [o.lower() for o in only]
        cases = [c for c in cases if any(k in c.key.lower() for k in keys)]
    return cases
