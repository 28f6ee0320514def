"""The pytest plugin shared by ``tests/`` and ``benchmarks/`` (pytest loads this root conftest for
``pytest`` and for ``pytest benchmarks`` run from the repository root).

* Triton's interpreter on machines without CUDA: ``TRITON_INTERPRET=1`` must be set before any
  module decorates a ``@triton.jit`` kernel, i.e. before ``fastguide.kernels`` is imported, so it is
  set here at import time, before any other conftest or test module imports fastguide; likewise
  ``FASTGUIDE_SKIP_AUTOTUNE=1`` (one known-good config per kernel: multi-config autotune needs a GPU).
  A value the user set wins.
* Markers ``gpu`` and ``slow`` (declared in pyproject.toml): ``gpu`` items are skipped without CUDA.
* Every test starts from ``torch.manual_seed(0)``.

tests/kernels/ uses this plugin too (its own conftest.py only adds fixtures).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTGUIDE_SKIP_AUTOTUNE", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
