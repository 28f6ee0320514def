"""What a benchmark case is: :class:`Case` (shared inputs, providers, useful-work model), :class:`Runner`
(one provider's prepare / run / finish / check), the sizes of each scale, and input builders."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["Case", "Runner", "SCALES", "latent_layers", "no_state", "resnet18_block_dims", "sync"]


def no_state() -> None:
    """``Runner.prepare`` of a provider that needs no per-call state."""
    return None


def _no_finish(state) -> None:
    return None


@dataclass
class Runner:
    """``prepare()`` (untimed) -> state; ``run(state)`` (timed); ``finish(state)`` (untimed);
    ``check()`` -> dict with ``ok`` and error figures (runs before any timing)."""

    prepare: Callable[[], object]
    run: Callable[[object], object]
    finish: Callable[[object], None] = _no_finish
    check: Callable[[], dict] | None = None
    note: str = ""


@dataclass
class Case:
    key: str  # e.g. "W1 loss fwd+bwd"
    workload: str
    op: str
    mode: str
    title: str
    shapes: dict
    estimator: str
    dtype: str
    make: Callable[[torch.device], object]  # builds the inputs shared by every provider
    providers: dict[str, Callable[[object, torch.device], Runner]]
    baseline: str = "fastguide-torch"
    model_flops: float = 0.0
    model_bytes: float = 0.0
    gram_bytes: float = 0.0  # one n x n accumulation-dtype Gram per layer that has one
    grad_bytes: float = 0.0  # bytes of the input gradients the op returns (not "extra")
    budget_s: float = 12.0
    # Comparison providers too slow to time every round (e.g. the paper's step): at most 3 timed rounds,
    # and they do not count when the case's rounds are fitted to its budget.
    capped: tuple = ()
    extra: dict = field(default_factory=dict)


SCALES = {
    # DESIGN.md section 6 sizes (GPU).
    "full": {
        "W1": {"n": 256, "target": [4096] * 8, "guide_img": 224},
        "W2": {"n": 4096, "dx": 1024, "dy": 768, "layers": 12},
        "W3": {"n": 512, "d": 2048, "layers": 24},
        "tokens": {"B": 32, "T": 256, "D": 256, "pairs": 4},
        "W1step": {"n": 256, "img": 224, "hidden": [4096] * 8},
        "W4step": {"n": 256, "img": 224},
        "rounds": 20,
    },
    # Same structure, smaller n and d: the whole CPU table in a few minutes on 2 cores.
    "cpu": {
        "W1": {"n": 256, "target": [1024] * 8, "guide_img": 64},
        "W2": {"n": 1024, "dx": 256, "dy": 192, "layers": 12},
        "W3": {"n": 256, "d": 1024, "layers": 24},
        "tokens": {"B": 32, "T": 256, "D": 256, "pairs": 1},
        "W1step": {"n": 128, "img": 64, "hidden": [1024] * 8},
        "W4step": {"n": 128, "img": 64},
        "rounds": 11,
    },
    "quick": {
        "W1": {"n": 64, "target": [512] * 8, "guide_img": 32},
        "W2": {"n": 512, "dx": 128, "dy": 96, "layers": 6},
        "W3": {"n": 128, "d": 512, "layers": 12},
        "tokens": {"B": 16, "T": 256, "D": 128, "pairs": 2},
        "W1step": {"n": 64, "img": 32, "hidden": [512] * 8},
        "W4step": {"n": 32, "img": 32},
        "rounds": 3,
    },
    # Harness smoke test (tests/test_bench_smoke.py, `pytest benchmarks --benchmark-disable`).
    "smoke": {
        "W1": {"n": 16, "target": [64] * 8, "guide_img": 32},
        "W2": {"n": 64, "dx": 32, "dy": 24, "layers": 3},
        "W3": {"n": 32, "d": 64, "layers": 4},
        "tokens": {"B": 4, "T": 32, "D": 16, "pairs": 2},
        "W1step": {"n": 16, "img": 32, "hidden": [64] * 8},
        "W4step": {"n": 8, "img": 32, "small_fcn": True},
        "rounds": 2,
    },
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resnet18_block_dims(img: int) -> list[tuple[int, int, int]]:
    """(C, H, W) of ResNet-18's 9 block outputs (stem after max-pool, then the 8 basic blocks)."""
    s = img // 4
    dims = [(64, s, s)] * 3
    for c in (128, 256, 512):
        s = (s + 1) // 2
        dims += [(c, s, s)] * 2
    return dims


def latent_layers(
    n: int, shapes: list[tuple[int, ...]], device, gen: torch.Generator, rank: int = 16, dtype=torch.float32
) -> list[torch.Tensor]:
    """Activations with shared low-rank structure (realistic CKA values, no near-zero pairs)."""
    z = torch.randn(n, rank, generator=gen)
    out = []
    for shp in shapes:
        d = math.prod(shp)
        W = torch.randn(rank, d, generator=gen) / math.sqrt(rank)
        x = z @ W + 0.5 * torch.randn(n, d, generator=gen)
        out.append(x.reshape(n, *shp).to(device=device, dtype=dtype))
        del W, x
    return out
