"""Timing: one sample of a provider, interleaved shuffled rounds over a case's providers, summaries,
``triton.testing.do_bench`` medians and the roofline floor (CUDA).

CPU timings on a shared machine swing several-fold between runs, so providers are interleaved in
shuffled order every round in one process and compared by medians of per-round paired ratios
(DESIGN.md section 6). CPU samples are wall-clock; CUDA samples are CUDA-event times after an L2
flush, as ``triton.testing.do_bench`` takes them.
"""

from __future__ import annotations

import random
import statistics
import time

import torch

from .cases.base import Case, Runner, sync

__all__ = [
    "Timer",
    "do_bench_ms",
    "interleaved_rounds",
    "measure_peaks",
    "roofline_floor_s",
    "run_synced",
    "summarise",
]

_FLUSH: dict = {}


class Timer:
    """One timed sample of ``run(state)``: wall clock on CPU, CUDA events after an L2 flush on GPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            key = str(device)
            if key not in _FLUSH:
                _FLUSH[key] = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.float32, device=device)
            self._flush = _FLUSH[key]

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def __call__(self, run, state) -> float:
        if self.cuda:
            self._flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            run(state)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        run(state)
        return time.perf_counter() - t0


def run_synced(runner: Runner, device: torch.device, state) -> None:
    """``runner.run(state)`` and wait for the device (the callable a wall-clock timer may time)."""
    runner.run(state)
    sync(device)


def interleaved_rounds(
    runners: dict[str, Runner], warm_s: dict[str, float], case: Case, rounds: int, device: torch.device
) -> tuple[dict[str, list[float | None]], int]:
    """Time every runner in ``rounds`` shuffled rounds, fitted to ``case.budget_s``.

    ``warm_s``: each provider's warm call time. A provider slower than a sixth of the budget (or in
    ``case.capped``) does not count when the rounds are fitted to the budget and is timed in fewer
    rounds (``None`` samples). Returns the samples (seconds) by provider and the number of rounds.
    """
    budget = case.budget_s
    per_round = sum(warm_s[k] for k in runners if warm_s[k] <= budget / 6 and k not in case.capped)
    target = max(2, min(rounds, int(budget / max(per_round, 1e-9))))
    cap = {k: max(1, min(target, int(budget / 3 / max(warm_s[k], 1e-9)))) for k in runners}
    for k in case.capped:
        if k in cap:
            cap[k] = min(cap[k], 3)
    timer = Timer(device)
    times: dict[str, list[float | None]] = {k: [] for k in runners}
    for rnd in range(target):
        order = list(runners)
        random.shuffle(order)
        for k in order:
            if rnd >= cap[k]:
                times[k].append(None)
                continue
            r = runners[k]
            state = r.prepare()
            times[k].append(timer(r.run, state))
            r.finish(state)
    return times, target


def summarise(ts: list[float]) -> dict:
    """Median, quartiles and minimum (ms) of one provider's samples (seconds)."""
    q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0], ts[0], ts[0]]
    return {
        "median_ms": statistics.median(ts) * 1e3,
        "p25_ms": q[0] * 1e3,
        "p75_ms": q[2] * 1e3,
        "min_ms": min(ts) * 1e3,
        "rounds": len(ts),
    }


def do_bench_ms(runner: Runner, case: Case, device: torch.device) -> float | None:
    """``triton.testing.do_bench`` median (ms) of a stateless call on CUDA; None elsewhere or on failure."""
    if device.type != "cuda" or case.mode not in ("fwd", "fwd+bwd", "update"):
        return None
    try:
        from triton.testing import do_bench

        return do_bench(lambda: runner.run(None), warmup=10, rep=50, return_mode="median")
    except Exception:
        return None


def measure_peaks(device: torch.device, quick: bool = False) -> dict:
    """Measured copy bandwidth (GB/s) and GEMM rate (TFLOP/s, fp32 at the current matmul precision,
    and bf16) for the roofline floors. CUDA only (uses ``triton.testing.do_bench``)."""
    if device.type != "cuda":
        return {}
    from triton.testing import do_bench

    out = {}
    nbytes = (256 if quick else 1024) * 1024 * 1024
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = do_bench(lambda s=src, d=dst: d.copy_(s), warmup=25, rep=100, return_mode="median") / 1e3
    out["copy_GBps"] = 2 * nbytes / t / 1e9
    del src, dst
    m = 4096 if quick else 8192
    for dt, key in ((torch.float32, "gemm_fp32_TFLOPs"), (torch.bfloat16, "gemm_bf16_TFLOPs")):
        a = torch.randn(m, m, device=device, dtype=dt)
        b = torch.randn(m, m, device=device, dtype=dt)
        t = do_bench(lambda a=a, b=b: a @ b, warmup=25, rep=100, return_mode="median") / 1e3
        out[key] = 2 * m**3 / t / 1e12
    out["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    return out


def roofline_floor_s(case: Case, peaks: dict | None) -> float | None:
    """The case's useful work at the measured peaks: ``max(bytes / copy rate, flops / GEMM rate)``."""
    if not peaks or not case.model_flops:
        return None
    gemm, bw = peaks.get("gemm_fp32_TFLOPs"), peaks.get("copy_GBps")
    if not gemm or not bw:
        return None
    return max(case.model_bytes / (bw * 1e9), case.model_flops / (gemm * 1e12))
