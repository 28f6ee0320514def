"""Triton kernels of fastguide, imported as ``fastguide.kernels`` (see kernels/README.md).

This folder is top-level in the repository but installed as the subpackage ``fastguide.kernels``
(``setup.py``'s ``package_dir`` maps it): PyPI already has an unrelated package named ``kernels``, so
there is no top-level ``kernels`` to import. Nothing here does autograd; the ops reach these launchers
through :mod:`fastguide._triton_backend`, which imports this package lazily.

Launchers (host functions) and the public op each one mirrors:

* :func:`fastguide.kernels.gram.gram_fwd` -- normalised centred Grams C, s, ok, h of many layers:
  the statistics :func:`fastguide.layer_stats` returns, and the Gram stage of every public op
  (``cka``, ``cka_pairs``, ``cka_matrix``, ``CKALoss``) with ``backend="triton"``;
* :func:`fastguide.kernels.cka.hsic_pairs` -- Frobenius inner products of the C's for selected
  pairs: the pair stage of those ops with ``backend="triton"`` (an all-pairs ``cka_matrix`` included);
  :func:`fastguide.kernels.cka.hsic_matrix` -- the same for all pairs of two stacks as one GEMM
  (``cka_matrix``'s table; the ops do not call it);
* :func:`fastguide.kernels.cka.cka_pairs` / :func:`fastguide.kernels.cka.cka_matrix` -- the same
  with the CKA epilogue fused (HSIC and CKA, exactly 0 for degenerate layers): the values of
  :func:`fastguide.cka_pairs` / :func:`fastguide.cka_matrix` computed from *precomputed Gram
  statistics* (C stacks, self-HSICs, flags), not from activations -- the names mirror the public ops,
  the signatures do not;
* :func:`fastguide.kernels.backward.grad_x` -- ``scale (sum_k w_k C_k) X^`` for one layer: the
  per-layer backward of every public op with ``backend="triton"``.

Set ``TRITON_INTERPRET=1`` before importing this package to run the kernels on CPU tensors.
"""

from .backward import cka_pairs_bwd, grad_x
from .cka import cka_matrix_fwd, cka_pairs_fwd, hsic_matrix, hsic_pairs
from .gram import gram_fwd

__all__ = [
    "gram_fwd",
    "hsic_pairs",
    "hsic_matrix",
    "cka_pairs_fwd",
    "cka_matrix_fwd",
    "cka_pairs_bwd",
    "grad_x",
]
