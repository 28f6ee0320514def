"""Triton kernels of fastguide, imported as ``fastguide.kernels`` (see kernels/README.md).

This folder is top-level in the repository but installed as the subpackage ``fastguide.kernels``
(``setup.py``'s ``package_dir`` maps it): PyPI already has an unrelated package named ``kernels``, so
there is no top-level ``kernels`` to import. Nothing here does autograd; the ops reach these launchers
through :mod:`fastguide._triton_backend`, which imports this package lazily.

Launchers (host functions) and the public op each one mirrors:

* :func:`fastguide.kernels.gram.gram_fwd` -- normalised centred Grams C, s, ok, h of many layers,
  the degeneracy rule included: the statistics :func:`fastguide.layer_stats` returns, and the Gram
  stage of every public op (``cka``, ``cka_pairs``, ``cka_matrix``, ``CKALoss``) with
  ``backend="triton"``;
* :func:`fastguide.kernels.cka.cka_pairs_fwd` / :func:`fastguide.kernels.cka.cka_matrix_fwd` -- pair
  HSICs with the CKA epilogue fused (one launch, exactly 0 for degenerate layers) from Gram
  statistics (C stacks, self-HSICs, flags; a second stack for precomputed guide statistics): the
  pair stage of those ops (``cka_matrix``'s all-pairs blocks through the matrix kernel);
* :func:`fastguide.kernels.backward.cka_pairs_bwd` -- the gradients of every target layer of a set of
  pairs in one grouped launch, the pair weights (from the CKA values and the upstream gradient)
  computed inside the kernel: the backward of those ops;
* :func:`fastguide.kernels.cka.hsic_pairs` / :func:`fastguide.kernels.cka.hsic_matrix` -- the raw
  Frobenius inner products (no epilogue; ``hsic_pairs`` serves statistics-only calls such as
  ``MinibatchCKA``), :func:`fastguide.kernels.backward.grad_x` -- ``scale (sum_k w_k C_k) X^`` for
  one layer with explicit weights;
* :mod:`fastguide.kernels.group` -- Grams and gradients of the groups of a (G, n, d) view (the
  ``tokens="positions"``/``"structure"`` modes).

Set ``TRITON_INTERPRET=1`` before importing this package to run the kernels on CPU tensors.
"""

if __name__ == "fastguide.kernels":
    from .backward import cka_pairs_bwd, grad_x
    from .cka import cka_matrix_fwd, cka_pairs_fwd, hsic_matrix, hsic_pairs
    from .gram import gram_fwd
# else: this folder was found as a top-level ``kernels`` (the repository root on ``sys.path``, e.g.
# ``python -m pytest`` from a checkout, and a library probing for the unrelated PyPI ``kernels``
# package, as transformers does): import nothing, so that probe sees an empty module without a
# version instead of failing on the kernels' imports of their parent package.

__all__ = [
    "gram_fwd",
    "hsic_pairs",
    "hsic_matrix",
    "cka_pairs_fwd",
    "cka_matrix_fwd",
    "cka_pairs_bwd",
    "grad_x",
]
