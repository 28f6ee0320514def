"""Settings that make the demo's CPU jobs reproducible across processor generations, and the job
runner and provenance lines that the demo and the guidability grid share.

A seed fixes the data, the initialisation and the batch order, but not the last bits of the kernels:
MKL, ATen, oneDNN and OpenBLAS each pick code paths by the processor's instruction set (AVX2,
AVX-512, ...), and training amplifies a last-bit difference into points of accuracy. Measurements and
what is and is not covered: docs/reproducibility.md.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import platform
import subprocess
from collections.abc import Callable

import torch

from .. import __version__
from .._utils import cpu_name

__all__ = [
    "REPRODUCIBLE_CPU_ENV",
    "environment",
    "run_jobs",
    "default_workers",
    "machine_line",
    "code_version",
]

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


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def default_workers(device: str) -> int:
    """Worker processes when the caller gives none: one on CUDA, else up to two CPU cores."""
    return 1 if device.startswith("cuda") else min(2, os.cpu_count() or 1)


def run_jobs(
    run_job: Callable[[dict], dict],
    jobs: list[dict],
    done: Callable[[dict], None],
    *,
    workers: int,
    spawn: bool,
    env: dict[str, str] | None = None,
) -> dict[str, str] | None:
    """Run ``jobs`` and hand each result to ``done`` as it finishes.

    ``spawn``: in up to ``workers`` spawned single-threaded processes that start with ``env`` in their
    environment (:func:`environment`); returns the effective values of ``env``. Otherwise in this
    process, in order; returns None. ``run_job`` must be a top-level function (spawn pickles it).
    """
    if not spawn:
        for j in jobs:
            done(run_job(j))
        return None
    with environment(env or {}) as effective:
        pool = mp.get_context("spawn").Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=(1,))
        with pool:
            for r in pool.imap_unordered(run_job, jobs):
                done(r)
    return effective


def machine_line(device: str) -> str:
    """CPU, cores, device, torch, Python and OS of this run, in one line (for results files)."""
    dev = device
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = torch.cuda.get_device_name(torch.device(device))
    return (
        f"{cpu_name()}, {os.cpu_count()} logical cores; device {dev}; torch {torch.__version__}; "
        f"Python {platform.python_version()}; {platform.system()} {platform.release()}"
    )


def code_version() -> str:
    """fastguide's version, plus the git commit (and '+dirty') when run from a source checkout."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return f"{__version__} ({commit}{'+dirty' if dirty else ''})" if commit else __version__
