"""Shared test helpers: one tolerance table and a verbose comparison."""

from __future__ import annotations

import contextlib

import torch

# CKA absolute tolerance per input dtype (DESIGN.md section 3); gradients: relative norm.
CKA_ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
GRAD_RTOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def assert_close_verbose(actual, expected, atol: float, what: str = "") -> None:
    """Absolute comparison that reports mismatch count, worst index and NaN mismatches."""
    a = torch.as_tensor(actual).detach().to(torch.float64).cpu()
    e = torch.as_tensor(expected).detach().to(torch.float64).cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        raise AssertionError(f"{what}: NaN mismatch at {int((nan_a != nan_e).sum())} positions")
    diff = (a - e).abs().nan_to_num(0.0)
    bad = diff > atol
    if bad.any():
        worst = int(diff.flatten().argmax())
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(worst), a.shape)) if a.dim() else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{a.numel()} elements differ by more than {atol:g}; worst at {idx}: "
            f"{a.flatten()[worst].item():.10g} vs {e.flatten()[worst].item():.10g} "
            f"(|diff| {diff.max().item():.3g})"
        )


def assert_grad_close(actual, expected, rtol: float, what: str = "") -> None:
    """Relative error of a gradient in norm, ||a - e|| <= rtol ||e|| (exact zeros must stay zero)."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite gradient"
    en = e.norm().item()
    err = (a - e).norm().item()
    if en == 0:
        assert err == 0, f"{what}: expected an exactly zero gradient, got norm {a.norm().item():.3g}"
        return
    assert err <= rtol * en, f"{what}: relative gradient error {err / en:.3g} > {rtol:g}"


@contextlib.contextmanager
def layer_parallel_forced(monkeypatch):
    """The layer-parallel CPU Gram path (``fastguide._cpu.gram_stack``) on for any size, with >= 2 threads."""
    from fastguide import _config
    from fastguide._cpu import pool

    monkeypatch.setattr(pool, "PARALLEL_MIN_WORK", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        with _config.override(cpu_layer_parallel=True):
            yield
    finally:
        torch.set_num_threads(threads)
