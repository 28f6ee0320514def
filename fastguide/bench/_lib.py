"""The fastguide names the harness uses that are not public API, each imported here and nowhere else.

When the library moves one of them, this is the file to change. It also holds the compatibility shim
for the CPU-layer split (``fastguide._cpu_blas`` -> the package ``fastguide._cpu``; the lazy Triton
import ``functional._kernels`` -> ``_triton_backend.load_kernels``): once both new names are on main,
delete the ``except ModuleNotFoundError`` branches and :data:`_LEGACY_CPU` with what depends on it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from .. import _config
from .. import _reference as reference
from .._torch_backend import feature_cost
from .._utils import cpu_name
from ..guidance import auto_pairs, first_tensor

try:
    from .._cpu import describe_layer_parallel, syrk_available

    _LEGACY_CPU = False
except ModuleNotFoundError:  # shim: before the CPU-layer split
    from .._cpu_blas import describe_layer_parallel, syrk_available

    _LEGACY_CPU = True

__all__ = [
    "auto_pairs",
    "cpu_name",
    "describe_layer_parallel",
    "feature_cost",
    "first_tensor",
    "layer_parallel_off",
    "load_kernels",
    "reference",
    "syrk_available",
]


def load_kernels():
    """The Triton kernels module; raises RuntimeError saying why when it cannot be imported."""
    try:
        from .._triton_backend import load_kernels as load
    except ModuleNotFoundError:  # shim: before the split
        from ..functional import _kernels as load
    return load()


@contextlib.contextmanager
def layer_parallel_off() -> Iterator[None]:
    """CPU Grams one layer after another on the calling thread (for the allocator-level memory peak)."""
    with _config.override(cpu_layer_parallel=False):
        if not _LEGACY_CPU:
            yield
            return
        # Shim: the pre-split _cpu_blas reads this variable on every call instead of _config.
        name = "FASTGUIDE_CPU_LAYER_PARALLEL"
        old = os.environ.get(name)
        os.environ[name] = "0"
        try:
            yield
        finally:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
