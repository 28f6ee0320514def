"""Settings that make the demo's CPU jobs reproducible across processor generations.

A seed fixes the data, the initialisation and the batch order, but not the last bits of the kernels:
MKL, ATen, oneDNN and OpenBLAS each pick code paths by the processor's instruction set (AVX2,
AVX-512, ...), and training amplifies a last-bit difference into points of accuracy. Measurements and
what is and is not covered: docs/reproducibility.md.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["REPRODUCIBLE_CPU_ENV", "environment"]

#: Library settings that make a CPU job's results independent of the processor generation, for any
#: x86 processor with AVX2 (Intel or AMD): MKL's conditional numerical reproducibility (GEMMs),
#: ATen's vectorised kernels (BatchNorm, cross-entropy backward, Adam, ...), oneDNN (convolutions)
#: and SciPy's OpenBLAS (CKA Grams) pinned to their AVX2 code paths. They must be in a process's
#: environment before those libraries first run, so CPU jobs run in spawned workers that inherit
#: them; settings the user already made win. Measurements: docs/reproducibility.md.
REPRODUCIBLE_CPU_ENV = {
    "MKL_CBWR": "AVX2,STRICT",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",
}


@contextlib.contextmanager
def environment(settings: dict[str, str]):
    """Add ``settings`` (where unset) to os.environ while worker processes are started.

    Yields the effective values of those variables (the user's where already set).
    """
    added = {k: v for k, v in settings.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield {k: os.environ[k] for k in settings}
    finally:
        for k in added:
            os.environ.pop(k, None)
