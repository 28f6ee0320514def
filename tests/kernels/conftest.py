"""Fixtures of the kernel tests. The environment (Triton interpreter on machines without CUDA,
autotune skip), the ``gpu``/``slow`` markers and seeding are the shared pytest plugin in the
repository's root conftest.py; oracles live in kernel_oracle.py, tolerances in
``fastguide._reference.TOLERANCES`` (``tests/helpers.py::assert_close``)."""

from __future__ import annotations

import pytest
import torch
from kernel_oracle import device


@pytest.fixture
def dev() -> torch.device:
    return device()


@pytest.fixture
def highest_precision():
    """fp32 matmuls at IEEE precision for the duration of a test (the accuracy contract)."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)
