"""Triton kernels of fastguide (installed as ``fastguide.kernels``; see kernels/README.md).

Launchers (host functions; no autograd here):

* :func:`fastguide.kernels.gram.gram_fwd` -- normalised centred Grams C, s, ok, h of many layers;
* :func:`fastguide.kernels.cka.hsic_pairs` / :func:`fastguide.kernels.cka.hsic_matrix` --
  Frobenius inner products of the C's for selected pairs / all pairs;
* :func:`fastguide.kernels.cka.cka_pairs` / :func:`fastguide.kernels.cka.cka_matrix` -- the same
  with the CKA epilogue fused (HSIC and CKA, exactly 0 for degenerate layers);
* :func:`fastguide.kernels.backward.grad_x` -- ``scale (sum_k w_k C_k) X^`` for one layer.

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
