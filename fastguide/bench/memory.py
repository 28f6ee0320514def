"""Peak memory of one provider call, above the level at call start.

* CUDA: ``torch.cuda.max_memory_allocated``.
* CPU, allocator level (:func:`cpu_tensor_peak`): every allocation and free of torch's CPU allocator
  during the call, from the profiler's memory events -- the CPU analogue of ``max_memory_allocated``.
* CPU, resident set (:func:`peak_memory` on CPU, Linux): ``VmHWM`` after resetting it, with glibc's
  malloc set so that frees are seen (:func:`malloc_steady_state` restores the state timing runs under).

Why two CPU figures and how noisy the resident-set one is: docs/benchmark-harness.md.
"""

from __future__ import annotations

import ctypes
import json
import os
import tempfile

import torch

from ._lib import layer_parallel_off
from .cases.base import Case, Runner

__all__ = ["cpu_tensor_peak", "malloc_steady_state", "memory_record", "peak_memory"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def _libc():
    return ctypes.CDLL("libc.so.6")


def malloc_steady_state() -> None:
    """glibc's malloc as a long-running tensor program ends up (Linux; a no-op elsewhere).

    By default glibc raises its mmap threshold to the largest block freed (at most 32 MiB) and its trim
    threshold to twice that, so in steady state tensors are reused from the heap. Any ``mallopt`` of
    those settings (the resident-set pass uses one) turns the adaptation off for the rest of the process,
    so the suite sets this state at its start and after each memory pass: every provider is then timed
    under one allocator state whatever the case order and whether memory was measured.
    """
    try:
        libc = _libc()
    except OSError:  # pragma: no cover - not glibc
        return
    libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)
    libc.mallopt(M_TRIM_THRESHOLD, 64 * 1024 * 1024)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def _cpu_peak_rss(runner: Runner, repeats: int, warmup: bool = True) -> int:
    """Peak resident memory above the level at call start (Linux): VmHWM after resetting it.

    glibc is told to serve every block of >= 128 KiB by its own mapping (``mallopt``) during the
    measurement, so freed tensors leave the resident set at once and the high-water mark is the peak of
    live memory (to page granularity); afterwards :func:`malloc_steady_state`. With ``warmup`` one
    unmeasured run under the same setting comes first, so that buffers a library keeps between calls
    (BLAS workspaces, worker threads' malloc arenas) are in place as in steady-state training; then the
    smallest of ``repeats`` measured runs (every run allocates the same tensors; noise only adds).
    """
    libc = _libc()
    libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    vals = []
    try:
        for k in range(int(not warmup), repeats + 1):
            state = runner.prepare()
            try:
                libc.malloc_trim(0)
                base = _rss_kib("VmRSS")
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current RSS
                runner.run(state)
                if k:
                    vals.append(max(0, _rss_kib("VmHWM") - base) * 1024)
            finally:
                runner.finish(state)
    finally:
        malloc_steady_state()
    return min(vals)


def _memory_events(runner: Runner, warmup: bool) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    if warmup:
        state = runner.prepare()
        try:
            runner.run(state)
        finally:
            runner.finish(state)
    state = runner.prepare()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            runner.run(state)
    finally:
        runner.finish(state)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]


def cpu_tensor_peak(runner: Runner, warmup: bool = True) -> int | None:
    """CPU: peak bytes of live tensors allocated above the level at call start during one ``run``.

    The profiler's memory events of the call in time order (exported trace; its aggregated events net
    the frees inside an op against its allocations), summed to a running total whose maximum is the
    peak. Exact and repeatable; tensors only, and only those allocated on the calling thread, so
    fastguide's layer-parallel Gram path is switched off for the measurement. With ``warmup`` one
    unmeasured run comes first, so that buffers kept between calls (fastguide's per-thread n x n scratch,
    like a BLAS workspace) are in place, as with ``max_memory_allocated`` after a warm-up on CUDA.
    None if the profiler is unavailable.
    """
    try:
        with layer_parallel_off():
            events = _memory_events(runner, warmup)
    except Exception:
        return None
    events.sort(key=lambda e: e["ts"])
    live = peak = 0
    for e in events:
        live += int(e["args"]["Bytes"])
        peak = max(peak, live)
    return peak


def peak_memory(runner: Runner, device: torch.device, repeats: int = 3, warmup: bool = True) -> int | None:
    """Peak bytes allocated above the level at call start during one ``run`` (after ``prepare``).

    CUDA: ``torch.cuda.max_memory_allocated``. CPU (Linux): the resident-set high-water mark (smallest
    of ``repeats`` runs, after one warm-up run with ``warmup``). None if it cannot be measured.
    """
    try:
        if device.type != "cuda":
            return _cpu_peak_rss(runner, repeats, warmup)
        state = runner.prepare()
        try:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            runner.run(state)
            torch.cuda.synchronize(device)
            return int(torch.cuda.max_memory_allocated(device) - base)
        finally:
            runner.finish(state)
    except Exception:
        return None


def memory_record(rec: dict, runner: Runner, device: torch.device, case: Case, repeats: int, warmup: bool):
    """Add the peak figures of one provider to its record, and their ratio to the case's Gram budget."""
    pk = peak_memory(runner, device, repeats=repeats, warmup=warmup)
    rec["peak_extra_bytes"] = pk
    if not case.gram_bytes:
        return
    rec["gram_bytes"], rec["grad_bytes"] = case.gram_bytes, case.grad_bytes
    if pk is not None:
        rec["peak_extra_minus_grads_bytes"] = pk - case.grad_bytes
        rec["peak_extra_per_gram_budget"] = (pk - case.grad_bytes) / case.gram_bytes
    if device.type == "cpu":
        tp = cpu_tensor_peak(runner, warmup=warmup)  # allocator level, like max_memory_allocated on CUDA
        rec["peak_tensor_bytes"] = tp
        if tp is not None:
            rec["peak_tensor_per_gram_budget"] = (tp - case.grad_bytes) / case.gram_bytes
