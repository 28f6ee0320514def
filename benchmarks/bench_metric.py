"""MinibatchCKA.update on W3-shaped batches, against careful torch and pytorch-cka's per-batch HSIC."""

from conftest import run_bench

CASES = ["W3 MinibatchCKA update"]


def test_metric_update(benchmark, case_provider, case_inputs, device):
    run_bench(benchmark, case_provider, case_inputs, device)
