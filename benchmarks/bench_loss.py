"""Guidance loss on mapped pairs (CKALoss), forward / backward / forward+backward.

W1: FCN target layers vs ResNet-18 block outputs, 8 pairs; W3: 24 one-to-one pairs.
Providers: fastguide-triton, fastguide-torch, torch-careful, torch-compile, naive (see fastguide.bench).
"""

from conftest import run_bench

CASES = ["W1 loss fwd+bwd", "W1 loss fwd", "W1 loss bwd", "W3 loss fwd+bwd"]


def test_loss(benchmark, case_provider, case_inputs, device):
    run_bench(benchmark, case_provider, case_inputs, device)
