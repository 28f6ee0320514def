"""The one measuring function of the harness, used by ``python -m fastguide bench`` and by the
pytest-benchmark suite in ``benchmarks/``: :func:`measure_provider` (availability, the oracle check,
warm-up, peak memory) and :func:`add_rates` / :func:`add_floor` (what a median time means).

Only the timed samples differ between the front ends: the CLI interleaves a case's providers in
shuffled rounds (:func:`.timing.interleaved_rounds`), pytest-benchmark times one with its
``benchmark.pedantic``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ._lib import load_kernels
from .cases.base import Case, Runner
from .memory import memory_record
from .timing import Timer, roofline_floor_s

__all__ = ["Measured", "add_floor", "add_rates", "base_record", "measure_provider", "provider_available"]


def provider_available(name: str, device: torch.device) -> str | None:
    """None if the provider can run here, else the reason it is skipped."""
    if name.endswith("triton") or name == "fastguide-triton":
        if device.type != "cuda":
            return "needs CUDA"
        try:
            load_kernels()
        except Exception as e:  # pragma: no cover - depends on the kernels' state
            return f"fastguide.kernels unavailable: {e}"
    return None


def base_record(case: Case, device: torch.device) -> dict:
    """The fields every record of a case starts with."""
    return {
        "case": case.key,
        "workload": case.workload,
        "op": case.op,
        "mode": case.mode,
        "title": case.title,
        "device": str(device),
        "dtype": case.dtype,
        "estimator": case.estimator,
        "shapes": case.shapes,
        "model_flops": case.model_flops,
        "model_bytes": case.model_bytes,
    }


@dataclass
class Measured:
    """One provider after :func:`measure_provider`: its runner (None if skipped), record and error."""

    runner: Runner | None
    record: dict
    error: Exception | None = None
    failed_check: bool = False


def _timed_call(runner: Runner, timer: Timer) -> float:
    state = runner.prepare()
    t0 = time.perf_counter()
    runner.run(state)
    timer.sync()
    dt = time.perf_counter() - t0
    runner.finish(state)
    return dt


def measure_provider(
    case: Case,
    name: str,
    inp,
    device: torch.device,
    *,
    warm: bool = True,
    memory: bool = True,
    log=print,
) -> Measured:
    """Everything about one provider of ``case`` except its timed samples.

    Skips it if it cannot run here; builds its runner on the shared inputs ``inp``; runs its check
    against the oracle (a provider that fails is not timed); with ``warm``, warms it up (compilation,
    autotuning, allocator) and records the first and warm call times; with ``memory``, records its
    peak memory right after its own warm-up, before another provider runs. Errors are recorded as a
    skip (and returned in ``error``).
    """
    rec = dict(base_record(case, device), provider=name)
    why = provider_available(name, device)
    if why:
        rec["skipped"] = why
        return Measured(None, rec)
    try:
        runner = case.providers[name](inp, device)
        rec["note"] = runner.note or None
        if runner.check is not None:
            chk = runner.check()
            rec["check"] = chk
            if not chk.get("ok", False):
                rec["skipped"] = "failed the correctness check"
                log(f"  {name}: FAILED check {chk}")
                return Measured(None, rec, failed_check=True)
        if warm:
            timer = Timer(device)
            rec["first_call_s"] = rec["warm_call_s"] = _timed_call(runner, timer)
            # A call slower than a third of the case budget (or 1 s) is warm after one run.
            if rec["first_call_s"] < min(1.0, case.budget_s / 3):
                rec["warm_call_s"] = _timed_call(runner, timer)
        if memory:
            warm_s = rec.get("warm_call_s")
            # Memory of slow comparison providers only where it is a goal's reference; a call over
            # 0.3 s gets one measured run (MB-level noise is small against what it allocates).
            if warm_s is None or warm_s <= case.budget_s / 6 or name in (case.baseline, "torch-careful"):
                slow = warm_s is not None and warm_s >= 0.3
                memory_record(rec, runner, device, case, repeats=1 if slow else 3, warmup=not slow)
    except Exception as e:
        rec["skipped"] = f"error: {type(e).__name__}: {e}"[:300]
        log(f"  {name}: {rec['skipped']}")
        return Measured(None, rec, error=e)
    return Measured(runner, rec)


def add_rates(rec: dict, case: Case, seconds: float) -> None:
    """Achieved TFLOP/s and GB/s of the case's useful-work model at ``seconds`` a call."""
    if case.model_flops:
        rec["achieved_TFLOPs"] = case.model_flops / seconds / 1e12
    if case.model_bytes:
        rec["achieved_GBps"] = case.model_bytes / seconds / 1e9


def add_floor(rec: dict, case: Case, peaks: dict | None, seconds: float) -> None:
    """The roofline floor (:func:`.timing.roofline_floor_s`) and ``seconds`` as a multiple of it."""
    floor = roofline_floor_s(case, peaks)
    if floor:
        rec["floor_ms"] = floor * 1e3
        rec["floor_ratio"] = seconds / floor
