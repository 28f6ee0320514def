"""The test-support layer: one comparison against the tolerance table, and CPU-path switches.

Tolerances come from :data:`fastguide._reference.TOLERANCES` (DESIGN.md section 3), the one table
shared with the benchmark harness; :func:`assert_close` applies them by kind. The pytest set-up
(interpreter, markers, GPU skip, seeding) is the root ``conftest.py``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from fastguide import _reference
from fastguide._reference import TOLERANCES

__all__ = [
    "TOLERANCES",
    "tolerance",
    "assert_close",
    "layer_parallel_forced",
    "mlp",
    "mlp_pair",
    "assert_same_grads",
]

#: Kinds compared in norm (relative error of the whole tensor); the others elementwise, absolute.
NORM_KINDS = ("grad", "gram")


def tolerance(kind: str, dtype: torch.dtype, length: float = 1.0) -> float:
    """:func:`fastguide._reference.tolerance`."""
    return _reference.tolerance(kind, dtype, length)


def _f64(t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        return torch.tensor(t, dtype=torch.float64)  # Python floats are float64 (not torch's default)
    return t.detach().to(torch.float64).cpu()


def _at(shape, flat: int) -> tuple:
    return tuple(int(v) for v in torch.unravel_index(torch.tensor(flat), shape)) if len(shape) else ()


def assert_close(
    actual, expected, kind: str, dtype: torch.dtype | None = None, *, length=1.0, floor=0.0, what=""
):
    """Assert ``actual`` matches the (float64) ``expected`` within the tolerance of ``kind`` for
    inputs of ``dtype`` (default: ``actual``'s dtype); ``length`` scales it (:func:`tolerance`).

    Elementwise kinds (``cka``, ``hsic``, ``value``, ``loss``, ``exact64``): ``|a - e| <= tol`` everywhere.
    Norm kinds (``grad``, ``gram``): ``||a - e|| <= tol max(||e||, floor)``; ``floor`` is the natural
    scale below which a relative error is ill-posed (e.g. a parameter whose gradient CKA's shift
    invariance makes 0: pass the norm of the whole model's gradient); with ``floor=0`` an exactly zero
    ``expected`` must come out exactly zero. NaN must match NaN position for position. The message
    gives the number of mismatches, the worst index and values, and the NaN mismatches.
    """
    if dtype is None:
        dtype = actual.dtype if isinstance(actual, torch.Tensor) else torch.float64
    tol = tolerance(kind, dtype, length)
    label = f"{what}: " if what else ""
    _compare(actual, expected, tol, kind in NORM_KINDS, f"{kind}, {dtype}", label, float(floor))


def _compare(actual, expected, tol: float, norm: bool, how: str, label: str, floor: float = 0.0) -> None:
    a, e = _f64(actual), _f64(expected)
    if a.shape != e.shape:
        raise AssertionError(f"{label}shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        where = (nan_a != nan_e).nonzero()
        first = tuple(int(v) for v in where[0])
        raise AssertionError(
            f"{label}NaN mismatch at {where.shape[0]}/{a.numel()} positions, first at {first} "
            f"(actual NaN: {int(nan_a.sum())}, expected NaN: {int(nan_e.sum())})"
        )
    diff = (a - e).abs().nan_to_num(0.0)
    worst = int(diff.flatten().argmax()) if a.numel() else 0
    detail = ""
    if a.numel():
        got, want = a.flatten()[worst].item(), e.flatten()[worst].item()
        detail = f"worst at {_at(a.shape, worst)}: {got:.10g} vs {want:.10g}"
    if norm:
        if not torch.isfinite(a[~nan_a]).all():
            raise AssertionError(f"{label}non-finite values where finite were expected ({how})")
        en, err = max(float(e.nan_to_num(0.0).norm()), floor), float(diff.norm())
        if en == 0.0:
            if err != 0.0:
                raise AssertionError(f"{label}expected exactly zero ({how}), got norm {err:.3g}; {detail}")
            return
        if err > tol * en:
            bad = int((diff > tol * en / max(a.numel(), 1) ** 0.5).sum())
            raise AssertionError(
                f"{label}relative error {err / en:.3g} > {tol:g} ({how}); {bad}/{a.numel()} "
                f"elements above their share; {detail}"
            )
        return
    bad = diff > tol
    if bad.any():
        raise AssertionError(
            f"{label}{int(bad.sum())}/{a.numel()} elements differ by more than {tol:g} ({how}); "
            f"{detail} (|diff| {diff.max().item():.3g})"
        )


def assert_same_grads(got: torch.Tensor, want: torch.Tensor, inputs, what: str) -> None:
    """``got.sum()`` gives every tensor of ``inputs`` the gradient that ``want.sum()`` gives it (fp32
    ``grad`` tolerance); both are backpropagated (``.grad`` is left holding ``want``'s gradients)."""
    got.sum().backward()
    first = [x.grad.clone() for x in inputs]
    for x in inputs:
        x.grad = None
    want.sum().backward()
    for a, x in zip(first, inputs, strict=True):
        assert_close(a, x.grad, "grad", torch.float32, what=what)


def assert_close_verbose(actual, expected, atol: float, what: str = "") -> None:
    """Former interface (tests/kernels/ only): elementwise ``|a - e| <= atol``, verbose message."""
    _compare(actual, expected, atol, False, f"atol {atol:g}", f"{what}: " if what else "")


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


def mlp(d_in=12, width=16, depth=3, d_out=5, *, flatten=False) -> nn.Sequential:
    """The tests' small MLP: ``depth`` Linear + Tanh blocks and a Linear head (after an ``nn.Flatten``
    with ``flatten=True``, which shifts every module index by one)."""
    layers, prev = ([nn.Flatten()] if flatten else []), d_in
    for _ in range(depth):
        layers += [nn.Linear(prev, width), nn.Tanh()]
        prev = width
    layers.append(nn.Linear(prev, d_out))
    return nn.Sequential(*layers)


def mlp_pair() -> tuple[nn.Sequential, nn.Sequential]:
    """The guidance tests' usual (target, guide): a 3 x 16 MLP and a 4 x 20 MLP (current RNG state)."""
    return mlp(), mlp(width=20, depth=4)
