"""Running the suite: every provider of a case measured (:func:`.measure.measure_provider`), then timed
in interleaved rounds, then the records completed (summaries, paired ratios, rates, floors)."""

from __future__ import annotations

import datetime
import random
import statistics
import time
from collections.abc import Callable

import torch

from .cases import SCALES, Case, build_cases, clear_input_cache
from .env import env_info
from .goals import evaluate_goals
from .measure import add_floor, add_rates, measure_provider
from .memory import malloc_steady_state
from .timing import do_bench_ms, interleaved_rounds, measure_peaks, summarise

__all__ = ["run_case", "run_suite"]

# The parts of a guided step: the denominators of its ratios, not compared to fastguide themselves.
STEP_PARTS = ("unguided", "guide-fwd", "gram-gemms")


def _paired_ratio(ts, base) -> float | None:
    ratios = [a / b for a, b in zip(ts, base, strict=False) if a is not None and b is not None]
    return statistics.median(ratios) if ratios else None


def _step_ratios(records: dict, times: dict) -> None:
    """guided / (target step + guide forward), and / (... + Gram GEMMs): medians of per-round ratios."""
    if "unguided" not in times or "guide-fwd" not in times:
        return
    u, g = times["unguided"], times["guide-fwd"]
    gg = times.get("gram-gemms")
    for k, ts in times.items():
        if k in STEP_PARTS:
            continue
        r1 = [a / (b + c) for a, b, c in zip(ts, u, g, strict=False) if None not in (a, b, c)]
        records[k]["step_ratio"] = statistics.median(r1) if r1 else None
        if gg is not None:
            r2 = [
                a / (b + c + d) for a, b, c, d in zip(ts, u, g, gg, strict=False) if None not in (a, b, c, d)
            ]
            records[k]["step_ratio_with_grams"] = statistics.median(r2) if r2 else None


def run_case(
    case: Case,
    device: torch.device,
    *,
    rounds: int,
    peaks: dict | None = None,
    log: Callable[[str], None] = print,
    memory: bool = True,
) -> list[dict]:
    """Check, warm up and time every provider of ``case`` (interleaved, shuffled rounds)."""
    t_start = time.perf_counter()
    inp = case.make(device)
    records: dict[str, dict] = {}
    runners = {}
    for name in case.providers:
        m = measure_provider(case, name, inp, device, memory=memory, log=log)
        records[name] = m.record
        if m.runner is not None:
            runners[name] = m.runner
    if not runners:
        return list(records.values())
    t_rounds = time.perf_counter()
    warm_s = {k: records[k]["warm_call_s"] for k in runners}
    times, target = interleaved_rounds(runners, warm_s, case, rounds, device)
    t_timed = time.perf_counter() - t_rounds
    bl = case.baseline if case.baseline in runners else None
    if device.type == "cuda" and "fastguide-triton" in runners:
        bl = "fastguide-triton"
    for k, ts in times.items():
        rec = records[k]
        rec.update(summarise([t for t in ts if t is not None]))
        if bl is not None:
            rec["baseline"] = bl
            rec["ratio_to_baseline"] = _paired_ratio(ts, times[bl])
        med = rec["median_ms"] / 1e3
        add_rates(rec, case, med)
        add_floor(rec, case, peaks, med)
        db = do_bench_ms(runners[k], case, device)
        if db is not None:
            rec["do_bench_median_ms"] = db
    if case.op == "step":
        _step_ratios(records, times)
    del inp
    total = time.perf_counter() - t_start
    log(f"  [{case.key}: {target} rounds, {t_timed:.1f} s timed, {total:.1f} s in all]")
    case.extra["timed_s"] = t_timed
    return list(records.values())


def run_suite(
    device: str = "cpu",
    *,
    quick: bool = False,
    scale: str | None = None,
    rounds: int | None = None,
    compile_: bool | None = None,
    only: list[str] | None = None,
    memory: bool = True,
    log: Callable[[str], None] = print,
    seed: int = 0,
    slow_peers: bool | None = None,
    time_budget_s: float | None = None,
) -> dict:
    """Run every case of a scale; ``time_budget_s`` shares a wall-clock budget for the timed rounds
    across cases (set-up, oracle checks, warm-up and compilation come on top)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    scale = scale or ("quick" if quick else ("full" if dev.type == "cuda" else "cpu"))
    if compile_ is None:
        compile_ = scale in ("full", "cpu")
    rounds = rounds or SCALES[scale]["rounds"]
    random.seed(seed)
    torch.manual_seed(seed)
    if dev.type == "cpu":
        malloc_steady_state()  # a no-op without glibc
    t0 = time.perf_counter()
    peaks = measure_peaks(dev, quick=scale != "full") if dev.type == "cuda" else {}
    records = []
    cases = build_cases(scale, compile_=compile_, only=only, slow_peers=slow_peers)
    nominal = [c.budget_s for c in cases]
    timed = 0.0
    for i, case in enumerate(cases):
        log(f"[{i + 1}/{len(cases)}] {case.key}")
        if time_budget_s:
            # Share what is left of the suite's budget for timed rounds in proportion to the cases'
            # nominal budgets (set-up, checks, warm-up and memory passes are not charged to it, so a
            # slow set-up early on cannot starve the last cases of rounds).
            left = time_budget_s - timed
            case.budget_s = max(2.0, left * nominal[i] / sum(nominal[i:]))
        records += run_case(case, dev, rounds=rounds, peaks=peaks, log=log, memory=memory)
        timed += case.extra.get("timed_s", 0.0)
    clear_input_cache()
    goals = evaluate_goals(records, dev)
    if scale not in ("cpu", "full"):
        for g in goals:
            g["detail"] = (
                g["detail"] + " " if g["detail"] else ""
            ) + f"[{scale} sizes: goals are set for the cpu/full scale]"
    return {
        "suite": "fastguide-bench",
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "env": env_info(dev),
        "config": {
            "device": device,
            "scale": scale,
            "rounds": rounds,
            "compile": compile_,
            "only": only,
            "timing": (
                "CUDA events after L2 flush, interleaved shuffled rounds; do_bench medians too"
                if dev.type == "cuda"
                else "wall clock, interleaved shuffled rounds"
            ),
            "wall_s": time.perf_counter() - t0,
        },
        "peaks": peaks,
        "records": records,
        "goals": goals,
    }
