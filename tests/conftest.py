"""Test fixtures: NaN-poisoned torch.empty for fastguide code, both CPU Gram schedules.

The environment set-up (Triton interpreter, autotune skip), the GPU skip and seeding are the shared
plugin in the repository's root conftest.py, which pytest loads before this file.
"""

import inspect

import hypothesis_profiles  # noqa: F401  (hypothesis settings profiles: ci by default, long)
import pytest
import torch

_real_empty = torch.empty
_real_empty_like = torch.empty_like


def _from_fastguide() -> bool:
    # Not while dynamo traces (it cannot trace frame inspection; whether it inlines this patched
    # function depends on when torch._dynamo was first imported).
    if torch.compiler.is_compiling():
        return False
    frame = inspect.currentframe().f_back.f_back
    return frame is not None and frame.f_globals.get("__name__", "").startswith("fastguide")


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() and t.numel() and t.device.type != "meta":
        with torch.no_grad():
            t.fill_(float("nan"))
    return t


def _empty(*args, **kwargs):
    t = _real_empty(*args, **kwargs)
    return _poison(t) if _from_fastguide() else t


def _empty_like(*args, **kwargs):
    t = _real_empty_like(*args, **kwargs)
    return _poison(t) if _from_fastguide() else t


@pytest.fixture(autouse=True)
def _nan_poisoned_empty(monkeypatch):
    """Uninitialised memory handed out to fastguide code is NaN, so a read-before-write shows up."""
    monkeypatch.setattr(torch, "empty", _empty)
    monkeypatch.setattr(torch, "empty_like", _empty_like)
    yield


@pytest.fixture(params=["serial", "layer-parallel"])
def cpu_gram_mode(request, monkeypatch):
    """Run a test under both CPU Gram schedules: layers one after another on all threads, and the
    layer-parallel pool (``fastguide._cpu.gram_stack``), forced on for any size with at least 2 threads."""
    from fastguide import _config
    from fastguide._cpu import blas

    if request.param == "serial":
        with _config.override(cpu_layer_parallel=False):
            yield request.param
        return
    if not blas.omp_set_num_threads():
        pytest.skip("torch does not run on OpenMP here: no layer-parallel path")
    from helpers import layer_parallel_forced

    with layer_parallel_forced(monkeypatch):
        yield request.param
