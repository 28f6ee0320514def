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
