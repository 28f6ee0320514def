"""The CPU BLAS layer: symmetric Gram products with half the flops of ``X @ X.T`` (BLAS ``?syrk``).

One concern per module: :mod:`.blas` (ctypes bindings of MKL's and SciPy's OpenBLAS entry points and
their self-tests), :mod:`.gram` (the numerics of one layer's Gram: shift, raw and shifted routes,
offset checks, the fixed syrk rule), :mod:`.pool` (the layer-parallel worker pool). Settings come from
:mod:`fastguide._config`; why each threshold is what it is: docs/cpu-path.md.
"""

from .blas import syrk_available
from .gram import shifted_matmul, sym_gram, syrk_for
from .pool import describe_layer_parallel, gram_stack

__all__ = [
    "syrk_available",
    "describe_layer_parallel",
    "sym_gram",
    "gram_stack",
    "shifted_matmul",
    "syrk_for",
]
