"""Float64 oracles of the kernel tests: the shared ones of ``fastguide._reference``, in the shapes the
kernel tests unpack.

Tolerances are the shared table (``fastguide._reference.TOLERANCES``, applied by
``tests/helpers.py::assert_close``) wherever a kind of it fits; the kernel tests keep explicit
elementwise bounds relative to the largest magnitude for intermediate matrices (C, h, s), which the
table does not cover.
"""

from __future__ import annotations

import torch

from fastguide import _reference as ref


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def oracle_stats(x: torch.Tensor, estimator: str):
    """Float64 (C, s, ok, h) of one (n, d) layer: :func:`fastguide._reference.layer_oracle` (exact
    column centring, ``H K H`` / ``U(K)``, the degeneracy rule of DESIGN.md section 3)."""
    o = ref.layer_oracle(x.detach().cpu(), estimator)
    return o.C, o.s, o.ok, o.h
