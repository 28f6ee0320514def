"""Token-level loss (tokens='samples', n = B*T >= 8192 at cpu/full scale, d = 256): the feature route
(fastguide-torch picks it) against the Gram route and careful torch."""

from conftest import run_bench

CASES = ["tokens loss fwd+bwd"]


def test_feature_route(benchmark, case_provider, case_inputs, device):
    run_bench(benchmark, case_provider, case_inputs, device)
