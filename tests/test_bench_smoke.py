"""Smoke test of the benchmark harness: ``python -m fastguide bench`` on tiny sizes writes valid JSON."""

import json

import pytest
import torch

from fastguide import bench


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

    peak = bench.cpu_tensor_peak(bench.Runner(lambda: None, run))
    assert peak == 256 * 1024 * 4
    # Two live at once: the sum.
    peak2 = bench.cpu_tensor_peak(bench.Runner(lambda: None, lambda _: (torch.ones(512), torch.ones(1024))))
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
