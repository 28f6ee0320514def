"""All-pairs CKA matrix (forward): W2 (token activations, 12x12) and W3 (24x24).

Providers: fastguide-triton, fastguide-torch, torch-careful, torch-compile, pytorch-cka, ckatorch (W3).
"""

from conftest import run_bench

CASES = ["W2 matrix fwd", "W3 matrix fwd"]


def test_matrix(benchmark, case_provider, case_inputs, device):
    case, prov = case_provider
    # ckatorch (float64, pair by pair) is far slower than the rest: one round is enough to place it.
    run_bench(benchmark, case_provider, case_inputs, device, rounds=1 if prov == "ckatorch" else None)
