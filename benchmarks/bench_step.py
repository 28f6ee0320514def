"""Whole guided training steps (W1 and the paper's W4 setting) and their components.

``unguided`` + ``guide-fwd`` is the denominator of the guided-step ratio; ``python -m fastguide bench``
reports the ratio as a median of per-round paired ratios (interleaved), which pytest-benchmark cannot.
"""

from conftest import run_bench

CASES = ["W1 guided step", "W4 guided step"]


def test_step(benchmark, case_provider, case_inputs, device):
    run_bench(benchmark, case_provider, case_inputs, device)
