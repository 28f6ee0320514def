"""Benchmark harness: ``python -m fastguide bench [--device cpu|cuda] [--quick]``.

Times fastguide against the ways CKA is usually computed on the workloads of DESIGN.md section 6,
prints one comparison table and writes every record as JSON (default ``benchmarks/results/``). The
pytest-benchmark suite in ``benchmarks/`` runs the same cases through the same measuring function.
How to run it, the providers, workloads and the latest table: ``benchmarks/README.md``; how it
measures and why: ``docs/benchmark-harness.md``.

Modules, in the order a run uses them:

* :mod:`.cases` -- the workloads (:func:`build_cases`), each a :class:`Case` of shared inputs and
  providers (:class:`Runner`), checked against the float64 oracle :mod:`fastguide._reference`;
* :mod:`.baselines` -- careful torch, the naive per-pair code, the peer libraries;
* :mod:`.measure` -- :func:`measure_provider`, the one measuring function of both front ends, over
  :mod:`.timing` (samples, interleaved rounds, roofline floor) and :mod:`.memory` (peak memory);
* :mod:`.run` -- a case and the suite; :mod:`.goals`; :mod:`.report` (table, plot); :mod:`.cli`;
* :mod:`.env` -- versions and device; :mod:`._lib` -- the private fastguide names the harness uses.
"""

from __future__ import annotations

from .baselines import careful_matrix, careful_pairs, naive_linear_cka
from .cases import SCALES, Case, Runner, build_cases
from .cli import main
from .env import env_info
from .goals import evaluate_goals
from .measure import Measured, add_floor, add_rates, measure_provider, provider_available
from .memory import cpu_tensor_peak, malloc_steady_state, peak_memory
from .report import format_table, plot_results
from .run import run_case, run_suite
from .timing import do_bench_ms, measure_peaks, roofline_floor_s, run_synced

__all__ = [
    "main",
    "build_cases",
    "run_case",
    "run_suite",
    "measure_provider",
    "Measured",
    "provider_available",
    "add_rates",
    "add_floor",
    "do_bench_ms",
    "roofline_floor_s",
    "run_synced",
    "Case",
    "Runner",
    "SCALES",
    "env_info",
    "careful_pairs",
    "careful_matrix",
    "naive_linear_cka",
    "format_table",
    "plot_results",
    "evaluate_goals",
    "cpu_tensor_peak",
    "peak_memory",
    "malloc_steady_state",
    "measure_peaks",
]
