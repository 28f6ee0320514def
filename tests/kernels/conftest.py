"""Fixtures and oracles of the kernel tests (tests/conftest.py sets TRITON_INTERPRET on CPU).

Oracles and tolerances live in kernel_oracle.py (imported by the test modules).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Same rule as tests/conftest.py (kept here so this folder also runs on its own).
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTGUIDE_SKIP_AUTOTUNE", "1")

from kernel_oracle import device  # noqa: E402


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
