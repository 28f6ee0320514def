"""Float64 oracles of the kernel tests: the shared ones of ``fastguide._reference``, in the shapes the
kernel tests unpack.

Tolerances are the shared table (``fastguide._reference.TOLERANCES``, applied by
``tests/helpers.py::assert_close``) wherever a kind of it fits; the kernel tests keep explicit
elementwise bounds relative to the largest magnitude for intermediate matrices (C, h, s), which the
table does not cover. Also here: :func:`prune_gram`, the Gram forward's config pruning on the W1
tile (the call ``test_configs.py`` and ``test_gram.py`` share).
"""

from __future__ import annotations

import torch
import triton.language as tl
from fastguide.kernels import _configs

from fastguide import _reference as ref


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def oracle_stats(x: torch.Tensor, estimator: str):
    """Float64 (C, s, ok, h) of one (n, d) layer: :func:`fastguide._reference.layer_oracle` (exact
    column centring, ``H K H`` / ``U(K)``, the degeneracy rule of DESIGN.md section 3)."""
    o = ref.layer_oracle(x.detach().cpu(), estimator)
    return o.C, o.s, o.ok, o.h


def prune_gram(configs=None, esize: int = 4, **kw):
    """``_configs.prune_gram_fwd`` of ``configs`` (default: ``_configs.gram_fwd_configs()``) for a
    128-row, aligned, row-major TF32 launch on inputs of ``esize`` bytes; ``kw`` overrides."""
    args = dict(BLOCK_M=128, ACC=tl.float32, ALIGNED=True, LAYOUT=0, DOT_LOW=False, INPUT_PRECISION="tf32")
    args.update(kw)
    x = torch.empty(1, dtype={2: torch.bfloat16, 4: torch.float32, 8: torch.float64}[esize])
    return _configs.prune_gram_fwd(
        _configs.gram_fwd_configs() if configs is None else configs, {"x_ref_ptr": x}, **args
    )
