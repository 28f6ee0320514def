"""Input guards, option checks, dtype maps and device/interpreter detection."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence

import torch

ESTIMATORS = ("unbiased", "biased")
KERNELS = ("linear", "rbf")
BACKENDS = ("auto", "torch", "triton")
TOKENS = ("flatten", "mean", "samples")
ROUTES = ("auto", "gram", "feature")

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_option(value, name: str, allowed: Sequence[str]) -> str:
    """Raise a ValueError naming ``name`` unless ``value`` is one of ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")
    return value


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for fp16/bf16/fp32 inputs, fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def min_examples(estimator: str) -> int:
    return 4 if estimator == "unbiased" else 2


def hsic_norm(n: int, estimator: str) -> float:
    """The HSIC denominator N: n(n-3) (unbiased) or (n-1)^2 (biased)."""
    return float(n * (n - 3)) if estimator == "unbiased" else float((n - 1) ** 2)


def check_tensor(x, name: str) -> torch.Tensor:
    """Type, dtype and emptiness checks for one activation tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in _FLOATING:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64); got {x.dtype}"
        )
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension (examples first); got a 0-d tensor")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    return x


def as_examples(x: torch.Tensor, tokens: str, name: str) -> torch.Tensor:
    """View an activation as a 2-D (n, d) matrix of examples.

    (n, ...) flattens everything after dim 0. A 3-D (B, T, D) input follows ``tokens``:
    ``"flatten"`` -> (B, T*D), ``"mean"`` -> (B, D) mean over T, ``"samples"`` -> (B*T, D).
    """
    if x.dim() == 3 and tokens == "mean":
        return x.mean(dim=1)
    if x.dim() == 3 and tokens == "samples":
        return x.reshape(x.shape[0] * x.shape[1], x.shape[2])
    if x.dim() == 1:
        return x.reshape(x.shape[0], 1)
    return x.reshape(x.shape[0], -1)


def check_layers(layers: Sequence[torch.Tensor], names: Sequence[str], estimator: str) -> None:
    """Agreement checks across the 2-D layer views: same n, same device, n large enough."""
    n0 = layers[0].shape[0]
    dev0 = layers[0].device
    for x, name in zip(layers, names, strict=True):
        if x.shape[0] != n0:
            raise ValueError(
                f"all layers must have the same number of examples n; {names[0]} has n={n0} "
                f"but {name} has n={x.shape[0]}"
            )
        if x.device != dev0:
            raise ValueError(
                f"all layers must be on one device; {names[0]} is on {dev0}, {name} on {x.device}"
            )
    need = min_examples(estimator)
    if n0 < need:
        raise ValueError(f"the {estimator} estimator needs n >= {need} examples; got n={n0} (in {names[0]})")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
