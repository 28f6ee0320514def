"""Float64 oracles of the kernel tests, independent of the fast paths.

Exact column centring (no shift), ``H K H`` from the explicit centring matrix and ``u_center`` of
``fastguide._reference``; tolerances come from tests/helpers.py where it has them.
"""

from __future__ import annotations

import torch

from fastguide import _reference as ref


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def oracle_stats(x: torch.Tensor, estimator: str):
    """Float64 (C, s, ok, h) of one (n, d) layer by the textbook formulas (DESIGN.md sections 2-3)."""
    X = x.detach().to(torch.float64).cpu()
    n = X.shape[0]
    Xc = X - X.mean(0)
    K = Xc @ Xc.T
    if estimator == "biased":
        H = ref.centering_matrix(n)
        Cu = H @ K @ H
        N = float((n - 1) ** 2)
    else:
        Cu = ref.u_center(K)
        N = float(n * (n - 3))
    t = (Xc * Xc).sum()
    eps = torch.finfo(x.dtype).eps
    ok = bool(t > (4 * eps) ** 2 * (X * X).sum())
    s = t / n if ok else torch.ones((), dtype=torch.float64)
    C = Cu / s
    h = (C * C).sum() / N
    ok = ok and bool(h > 0)
    return C, s, ok, h
