"""pytest-benchmark suites for fastguide (run by explicit path: ``pytest benchmarks``).

* Collects ``bench_*.py`` (pyproject's testpaths only covers ``tests/``).
* ``--fg-scale {full,cpu,quick,smoke}`` picks the workload sizes of :mod:`fastguide.bench`; the default
  is ``smoke`` under ``--benchmark-disable`` (the CI harness smoke test), else ``full`` on CUDA and
  ``cpu`` otherwise.
* Every (case, provider) is one test, grouped by case; Triton providers carry the ``gpu`` marker and
  are skipped without CUDA (the root conftest.py, shared with tests/: interpreter set-up, markers,
  GPU skip, seeding). Cases, providers, the oracle check, warm-up, peak memory, rates and the
  roofline floor are those of ``python -m fastguide bench`` (:func:`fastguide.bench.measure_provider`);
  only the timed samples come from pytest-benchmark (``benchmark.pedantic``), one provider at a time.

Examples::

    pytest benchmarks --benchmark-disable -m "not gpu"          # CI smoke test (tiny sizes)
    pytest benchmarks --fg-scale cpu -k "W1" --benchmark-json=benchmarks/results/pytest_cpu.json
    pytest benchmarks -m gpu --benchmark-json=benchmarks/results/pytest_gpu.json   # on a GPU box
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from fastguide import bench as fb


def pytest_addoption(parser):
    parser.addoption(
        "--fg-scale",
        default=None,
        choices=sorted(fb.SCALES),
        help="fastguide benchmark workload sizes (default: smoke with --benchmark-disable, "
        "full on CUDA, cpu otherwise)",
    )
    parser.addoption(
        "--fg-compile",
        action="store_true",
        help="include torch.compile providers at smoke scale too (slow: docs/benchmark-harness.md)",
    )


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    if config.getoption("benchmark_disable", False) and not torch.cuda.is_available():
        # Smoke run of tiny ops: one thread avoids OpenMP barrier stalls on shared CI cores.
        torch.set_num_threads(1)


def fg_scale(config) -> str:
    s = config.getoption("--fg-scale")
    if s:
        return s
    if config.getoption("benchmark_disable", False):
        return "smoke"
    return "full" if torch.cuda.is_available() else "cpu"


def fg_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_generate_tests(metafunc):
    if "case_provider" not in metafunc.fixturenames:
        return
    keys = metafunc.module.CASES
    scale = fg_scale(metafunc.config)
    with_compile = scale != "smoke" or metafunc.config.getoption("--fg-compile")
    params = []
    for case in fb.build_cases(scale, compile_=with_compile, slow_peers=True):
        if case.key not in keys:
            continue
        for prov in case.providers:
            marks = [pytest.mark.gpu] if "triton" in prov else []
            params.append(pytest.param((case, prov), id=f"{case.key.replace(' ', '_')}-{prov}", marks=marks))
    metafunc.parametrize("case_provider", params)


_INPUTS: dict = {}


@pytest.fixture(scope="session")
def device() -> torch.device:
    return fg_device()


@pytest.fixture
def case_inputs(case_provider, device):
    """Inputs shared by every provider of a case (built once per session)."""
    case, _ = case_provider
    if case.key not in _INPUTS:
        _INPUTS.clear()  # one case's inputs alive at a time (they can be large)
        torch.manual_seed(0)
        _INPUTS[case.key] = case.make(device)
    return _INPUTS[case.key]


def _env(device) -> dict:
    if "env" not in _ENV:
        _ENV["env"] = fb.env_info(device)
    return _ENV["env"]


def _peaks(device) -> dict:
    if "peaks" not in _ENV:
        _ENV["peaks"] = fb.measure_peaks(device)
    return _ENV["peaks"]


_ENV: dict = {}


def run_bench(benchmark, case_provider, case_inputs, device, rounds: int | None = None):
    """One provider through the harness's measuring function (:func:`fastguide.bench.measure_provider`:
    availability, oracle check, warm-up, peak memory), then timed by ``benchmark.pedantic``."""
    case, prov = case_provider
    enabled = not benchmark.disabled
    m = fb.measure_provider(case, prov, case_inputs, device, warm=enabled, memory=enabled)
    if m.error is not None:
        raise m.error
    if m.failed_check:
        pytest.fail(f"{prov} failed the correctness check on {case.key}: {m.record['check']}")
    if m.runner is None:
        pytest.skip(m.record["skipped"])
    runner = m.runner
    env = _env(device)
    benchmark.group = case.key
    benchmark.extra_info.update(m.record)
    benchmark.extra_info.update(
        {"device_name": env["device_name"], "torch": env["torch"], "triton": env["triton"]}
    )
    if rounds is None:
        rounds = 1 if benchmark.disabled else (10 if device.type == "cuda" else 5)
    benchmark.pedantic(
        functools.partial(fb.run_synced, runner, device),
        setup=lambda: ((runner.prepare(),), {}),
        teardown=runner.finish,
        rounds=rounds,
        warmup_rounds=0 if benchmark.disabled else 3,
        iterations=1,
    )
    stats = getattr(benchmark, "stats", None)
    med = None
    if stats is not None and getattr(stats, "stats", None) is not None:
        med = stats.stats.median
    if med:
        fb.add_rates(benchmark.extra_info, case, med)
    db = fb.do_bench_ms(runner, case, device)
    if db is not None:
        benchmark.extra_info["do_bench_median_ms"] = db
        fb.add_floor(benchmark.extra_info, case, _peaks(device), db / 1e3)
    return math.nan if med is None else med
