"""What the demo and the guidability grid share: jobs run in spawned workers (with the settings of
:mod:`.reproducibility`), the provenance lines of a results file, and the printed result table."""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import subprocess
from collections.abc import Callable

import torch

from .. import __version__
from .._utils import cpu_name
from .reproducibility import environment

__all__ = ["run_jobs", "default_workers", "machine_line", "code_version", "render_table"]


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


def render_table(head: list[str], lines: list[list[str]], markdown: bool = False) -> str:
    """Rows of cells under ``head``: aligned plain-text columns, or a GitHub markdown table."""
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), "  ".join("-" * w for w in widths)]
    return "\n".join(out + [fmt.format(*line) for line in lines])
