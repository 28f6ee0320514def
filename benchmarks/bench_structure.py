"""Grouped CKA losses (forward, forward+backward): per-position CKA (tokens="positions") and per-sample
structure CKA (tokens="structure") of (B, T, D) activations.

Providers: fastguide-triton, fastguide-torch, loop (Python loop over positions/samples calling a careful
per-layer CKA), einsum (batched Grams with einsum); see fastguide.bench.cases.structure.
"""

from conftest import run_bench

CASES = ["positions loss fwd", "positions loss fwd+bwd", "structure loss fwd", "structure loss fwd+bwd"]


def test_structure(benchmark, case_provider, case_inputs, device):
    run_bench(benchmark, case_provider, case_inputs, device)
