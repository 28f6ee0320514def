"""The fastguide names the harness uses that are not public API, each imported here and nowhere else.

When the library moves one of them, this is the file to change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .. import _config
from .. import _reference as reference
from .._cpu import describe_layer_parallel, syrk_available
from .._torch_backend import feature_cost
from .._triton_backend import load_kernels
from .._utils import cpu_name
from ..guidance import auto_pairs, first_tensor

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


@contextlib.contextmanager
def layer_parallel_off() -> Iterator[None]:
    """CPU Grams one layer after another on the calling thread (for the allocator-level memory peak)."""
    with _config.override(cpu_layer_parallel=False):
        yield
