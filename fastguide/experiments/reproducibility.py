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

#: Library settings that pin a CPU job's kernels to one code path on any x86 processor with AVX2:
#: MKL's conditional numerical reproducibility (GEMMs; Intel documents it for Intel processors, other
#: vendors may get its AUTO branch), ATen's vectorised kernels (BatchNorm, cross-entropy backward,
#: Adam, ...), oneDNN (off in the jobs anyway) and SciPy's OpenBLAS (CKA Grams) on AVX2. They must be
#: in a process's environment before those libraries first run, so CPU jobs run in spawned workers
#: that inherit them; settings the user already made win (e.g. MKL_CBWR=COMPATIBLE, vendor
#: independent and about 2x slower on the copy task). Measurements: docs/reproducibility.md.
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
