"""Small shared pieces: dtype rules, the HSIC normaliser, the load-time shift, device detection, cpu_name."""

from __future__ import annotations

import platform

import torch

from . import _config

#: Rows averaged for the per-column shift subtracted on load (DESIGN.md section 2).
SHIFT_ROWS = 32


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for fp16/bf16/fp32 inputs, fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def hsic_norm(n: int, estimator: str) -> float:
    """The HSIC denominator N: n(n-3) (unbiased) or (n-1)^2 (biased)."""
    return float(n * (n - 3)) if estimator == "unbiased" else float((n - 1) ** 2)


def shift_of(x: torch.Tensor) -> torch.Tensor:
    """The per-column shift ``mean(x[:min(n, 32)])`` in the accumulation dtype, (d,).

    CKA is invariant to any per-column shift; subtracting this one on load removes the fp32
    cancellation of large offsets in a single read (DESIGN.md section 2).
    """
    return x[:SHIFT_ROWS].to(acc_dtype(x.dtype)).mean(dim=0)


def shifted(x: torch.Tensor) -> torch.Tensor:
    """``X^ = x - mean(x[:min(n, 32)])`` in the accumulation dtype (a new (n, d) tensor)."""
    return x.to(acc_dtype(x.dtype)) - shift_of(x)


def interpreting() -> bool:
    """Whether Triton runs its interpreter (``TRITON_INTERPRET=1``, read through :mod:`fastguide._config`)."""
    return _config.get().triton_interpret


def triton_usable(device: torch.device) -> bool:
    """Triton runs compiled on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's processor/machine string elsewhere)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


_INDEX_CACHE: dict = {}


def pair_index(pairs, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(pi, pj) long index tensors of a flat pair list ``[i0, j0, i1, j1, ...]``, cached per list and
    device (no host-to-device copy per step)."""
    key = (tuple(pairs), device)
    hit = _INDEX_CACHE.get(key)
    if hit is None:
        t = torch.tensor(list(pairs), dtype=torch.long, device=device).view(-1, 2)
        hit = (t[:, 0].contiguous(), t[:, 1].contiguous())
        if len(_INDEX_CACHE) > 256:
            _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = hit
    return hit


def progress_bar(total: int | None, enabled: bool, desc: str, unit: str, **kwargs):
    """A tqdm progress bar, or None when disabled or tqdm (optional) is not installed."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, **kwargs)
