"""pytest-benchmark suites for fastguide (run by explicit path: ``pytest benchmarks``).

* Collects ``bench_*.py`` (pyproject's testpaths only covers ``tests/``).
* ``--fg-scale {full,cpu,quick,smoke}`` picks the workload sizes of :mod:`fastguide.bench`; the default
  is ``smoke`` under ``--benchmark-disable`` (the CI harness smoke test), else ``full`` on CUDA and
  ``cpu`` otherwise.
* Every (case, provider) is one test, grouped by case; Triton providers carry the ``gpu`` marker and
  are skipped without CUDA. Each provider is checked against the float64 oracle before timing.

Examples::

    pytest benchmarks --benchmark-disable -m "not gpu"          # CI smoke test (tiny sizes)
    pytest benchmarks --fg-scale cpu -k "W1" --benchmark-json=benchmarks/results/pytest_cpu.json
    pytest benchmarks -m gpu --benchmark-json=benchmarks/results/pytest_gpu.json   # on a GPU box
"""

from __future__ import annotations

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
        help="include torch.compile providers at smoke scale too (each compile takes ~30 s on CPU)",
    )


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped otherwise)")
    if config.getoption("benchmark_disable", False) and not torch.cuda.is_available():
        # Smoke run of tiny ops: one thread avoids OpenMP barrier stalls on shared CI cores.
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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


def run_bench(benchmark, case_provider, case_inputs, device, rounds: int | None = None):
    """Check one provider against the oracle, then time it with ``benchmark.pedantic``."""
    case, prov = case_provider
    why = fb._provider_available(prov, device)
    if why:
        pytest.skip(why)
    runner = case.providers[prov](case_inputs, device)
    if runner.check is not None:
        chk = runner.check()
        assert chk.get("ok"), f"{prov} failed the correctness check on {case.key}: {chk}"
        benchmark.extra_info["check"] = chk
    benchmark.group = case.key
    env = fb.env_info(device)
    benchmark.extra_info.update(
        {
            "case": case.key,
            "provider": prov,
            "title": case.title,
            "device": env["device_name"],
            "torch": env["torch"],
            "triton": env["triton"],
            "dtype": case.dtype,
            "estimator": case.estimator,
            "shapes": repr(case.shapes),
            "model_flops": case.model_flops,
            "model_bytes": case.model_bytes,
        }
    )
    if not benchmark.disabled:
        benchmark.extra_info["peak_extra_bytes"] = fb.peak_memory(runner, device)
        if device.type == "cpu":
            benchmark.extra_info["peak_tensor_bytes"] = fb.cpu_tensor_peak(runner)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def target(state):
        runner.run(state)
        sync()

    if rounds is None:
        rounds = 1 if benchmark.disabled else (10 if device.type == "cuda" else 5)
    benchmark.pedantic(
        target,
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
        if case.model_flops:
            benchmark.extra_info["achieved_TFLOPs"] = case.model_flops / med / 1e12
        if case.model_bytes:
            benchmark.extra_info["achieved_GBps"] = case.model_bytes / med / 1e9
    if device.type == "cuda" and case.mode in ("fwd", "fwd+bwd", "update"):
        from triton.testing import do_bench

        benchmark.extra_info["do_bench_median_ms"] = do_bench(lambda: runner.run(None), return_mode="median")
        peaks = _peaks(device)
        if case.model_flops and peaks:
            floor = max(
                case.model_bytes / (peaks["copy_GBps"] * 1e9),
                case.model_flops / (peaks["gemm_fp32_TFLOPs"] * 1e12),
            )
            benchmark.extra_info["floor_ms"] = floor * 1e3
            benchmark.extra_info["floor_ratio"] = benchmark.extra_info["do_bench_median_ms"] / 1e3 / floor
    return math.nan if med is None else med


_PEAKS: dict = {}


def _peaks(device):
    if "p" not in _PEAKS:
        _PEAKS["p"] = fb.measure_peaks(device)
    return _PEAKS["p"]
