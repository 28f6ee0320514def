"""The demo gives the same numbers for a seed whichever processor code paths the libraries pick.

Other processor generations are emulated with the libraries' own dispatch controls
(``MKL_ENABLE_INSTRUCTIONS``, ``ATEN_CPU_CAPABILITY``), each run in a fresh process because the
libraries read them once. docs/reproducibility.md has the measurements behind the settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastguide.experiments.reproducibility import REPRODUCIBLE_CPU_ENV

# fresh processes that import torch and train: ~10 s each on 2 cores
pytestmark = pytest.mark.slow

_DEMO = """
import json, sys
from fastguide.experiments import demo
if __name__ == "__main__":
    r = demo.run_demo(sys.argv[1], quick=True, tasks=["digits"], progress=False, verbose=False, workers=1)
    print(json.dumps(dict(runs=[(x["arm"], x["curve"]) for x in r["runs"]], settings=r["reproducible"])))
"""

_JOB = """
import json
from dataclasses import asdict, replace
from fastguide.experiments import demo
task = replace(demo.default_tasks(quick=True)[0], steps=12, eval_every=6, arms=("baseline",))
r = demo.run_job(dict(task=asdict(task), arm="baseline", seed=0, threads=1))
print(json.dumps(r["curve"]))
"""


def _run(code: str, env: dict, *args) -> dict:
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in REPRODUCIBLE_CPU_ENV and k != "MKL_ENABLE_INSTRUCTIONS"
    }
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# an AVX2-only processor's MKL (the README's run was on an AVX2 EPYC, the on an AVX-512 one)
AVX2_MKL = {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def test_demo_same_numbers_on_other_mkl_code_paths(tmp_path):
    native = _run(_DEMO, {}, str(tmp_path / "a"))
    other = _run(_DEMO, AVX2_MKL, str(tmp_path / "b"))
    assert native["settings"]["MKL_CBWR"] == REPRODUCIBLE_CPU_ENV["MKL_CBWR"]
    assert len(native["runs"]) == 6
    differ = [a[0] for a, b in zip(native["runs"], other["runs"], strict=True) if a != b]
    assert not differ, f"arms that changed with MKL's AVX2 code path: {differ}"


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="needs an AVX-512 processor")
def test_without_the_settings_the_code_paths_change_the_numbers():
    """The emulation is real: the digits baseline (no CKA code) moves with ATen's and MKL's code paths."""
    native = _run(_JOB, {})
    avx2 = _run(_JOB, {"ATEN_CPU_CAPABILITY": "avx2", **AVX2_MKL})
    assert native != avx2
