"""Smoke test of the benchmark harness (the package ``fastguide.bench``): ``python -m fastguide bench`` on
tiny sizes writes valid JSON; the measuring function both front ends share; the oracle it checks against."""

import json

import pytest
import torch
from helpers import assert_close

from fastguide import _config, bench
from fastguide import _reference as R
from fastguide.bench import _lib
from fastguide.bench.cases import Case, Runner


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny ops on a shared 2-core machine: one thread avoids OpenMP barrier stalls (keeps this < 30 s).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_bench_main_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    md = tmp_path / "table.md"
    rc = bench.main(
        [
            "--device",
            "cpu",
            "--scale",
            "smoke",
            "--rounds",
            "2",
            "--no-compile",
            "--no-memory",
            "--only",
            "W1 loss fwd+bwd",
            "W3 matrix",
            "W1 guided step",
            "--out",
            str(out),
            "--markdown",
            str(md),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["env"]["torch"] and res["env"]["device"] == "cpu"
    cases = {r["case"] for r in res["records"]}
    assert cases == {"W1 loss fwd+bwd", "W3 matrix fwd", "W1 guided step"}
    timed = [r for r in res["records"] if "median_ms" in r]
    assert {r["provider"] for r in timed} >= {"fastguide-torch", "torch-careful", "naive", "unguided"}
    for r in timed:
        assert r["median_ms"] > 0 and r["dtype"] == "float32" and r["shapes"]
        assert r.get("check", {"ok": True})["ok"]
    assert any(r["provider"] == "fastguide-triton" and r.get("skipped") for r in res["records"])
    step = next(r for r in timed if r["case"] == "W1 guided step" and r["provider"] == "fastguide-torch")
    assert step["step_ratio"] > 0
    assert [g["goal"] for g in res["goals"]]
    printed = capsys.readouterr().out
    assert "fastguide-torch" in printed and "Goals" in printed
    assert "| provider |" in md.read_text()


def test_format_table_handles_skips():
    recs = [{"case": "c", "op": "loss", "title": "t", "provider": "p", "skipped": "needs CUDA"}]
    assert "skipped: needs CUDA" in bench.format_table(recs)


def test_cpu_tensor_peak_is_exact():
    # A call that allocates 1 MiB, frees it, then holds 256 KiB: the peak is the 1 MiB (+ nothing).
    def run(_):
        a = torch.ones(256, 1024)
        del a
        return torch.ones(256, 256)

    peak = bench.cpu_tensor_peak(Runner(lambda: None, run))
    assert peak == 256 * 1024 * 4
    # Two live at once: the sum.
    peak2 = bench.cpu_tensor_peak(Runner(lambda: None, lambda _: (torch.ones(512), torch.ones(1024))))
    assert peak2 == (512 + 1024) * 4


def test_memory_goal_uses_tensor_peak(tmp_path):
    """The W1 loss memory pass records both figures; the goal reads the allocator-level one."""
    res = bench.run_suite(
        "cpu", scale="smoke", rounds=2, compile_=False, only=["W1 loss fwd+bwd"], log=lambda s: None
    )
    rec = next(r for r in res["records"] if r["provider"] == "fastguide-torch")
    assert rec["peak_tensor_bytes"] > rec["grad_bytes"] > 0
    goal = next(g for g in res["goals"] if "memory" in g["goal"])
    want = (rec["peak_tensor_bytes"] - rec["grad_bytes"]) / rec["gram_bytes"]
    assert goal["measured"] == pytest.approx(want)
    # Grams plus at most one n x n scratch (and small vectors): the design's bound at any size.
    n = 16  # smoke scale W1
    assert goal["measured"] <= 1.0 + (n * n * 4 + 4096) / rec["gram_bytes"]


def _toy_case(check_ok: bool) -> Case:
    calls = []

    def provider(inp, device):
        return Runner(lambda: None, lambda s: calls.append(1), check=lambda: {"x_err": 0.5, "ok": check_ok})

    case = Case(
        key="toy",
        workload="toy",
        op="loss",
        mode="fwd",
        title="toy",
        shapes={},
        estimator="biased",
        dtype="float32",
        make=lambda device: None,
        providers={"p": provider, "fastguide-triton": provider},
    )
    return case, calls


def test_measure_provider_checks_before_timing():
    """A provider that fails its oracle check is never run; one that passes is warmed up and returned."""
    cpu = torch.device("cpu")
    case, calls = _toy_case(check_ok=False)
    m = bench.measure_provider(case, "p", None, cpu, memory=False, log=lambda s: None)
    assert m.runner is None and m.failed_check and m.record["skipped"] == "failed the correctness check"
    assert calls == []
    case, calls = _toy_case(check_ok=True)
    m = bench.measure_provider(case, "p", None, cpu, memory=False)
    assert m.runner is not None and m.record["check"]["ok"] and m.record["warm_call_s"] >= 0
    assert len(calls) == 2  # first call and warm call
    m = bench.measure_provider(case, "fastguide-triton", None, cpu)
    assert m.runner is None and m.record["skipped"] == "needs CUDA"


def test_layer_parallel_off_restores():
    before = _config.get().cpu_layer_parallel
    with _lib.layer_parallel_off():
        assert _config.get().cpu_layer_parallel is False
    assert _config.get().cpu_layer_parallel == before


def test_pytest_front_end_uses_the_harness():
    """benchmarks/conftest.py measures through fastguide.bench (no timing or memory code of its own)."""
    from pathlib import Path

    src = (Path(__file__).resolve().parents[1] / "benchmarks" / "conftest.py").read_text()
    assert "fb.measure_provider(" in src and "fb.add_floor(" in src
    for own in ("max_memory_allocated", "profile_memory", "VmHWM", "copy_GBps", "gemm_fp32_TFLOPs"):
        assert own not in src


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_reference_centred_forms_match_closed_forms(estimator):
    """The harness's oracle (the <C_x, C_y> form) agrees with the closed-form float64 oracle."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(12, d, generator=g) for d in (5, 9)]
    ys = [torch.randn(12, 3, 2, generator=g), torch.ones(12, 4)]  # the second is degenerate
    pairs = [(0, 0), (1, 0), (0, 1)]
    want = torch.stack([R.cka(xs[i], ys[j], estimator) for i, j in pairs])
    assert_close(R.cka_pairs(xs, ys, pairs, estimator), want, "exact64", what="cka_pairs")
    got = R.cka_matrix_centred(xs, ys[:1], estimator)
    assert_close(got, R.cka_matrix(xs, ys[:1], estimator), "exact64", what="cka_matrix_centred")
