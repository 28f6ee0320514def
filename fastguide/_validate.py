"""Argument checks of the public API and the one options object every entry point validates once.

Everything here raises ``TypeError`` / ``ValueError`` / ``IndexError`` naming the argument (DESIGN.md
section 3); nothing computes. Used by :mod:`fastguide.functional`, :class:`fastguide.CKALoss`,
:class:`fastguide.MinibatchCKA` and :class:`fastguide.Guidance`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Options:
    """The options shared by the ops (DESIGN.md section 1), checked when the object is made.

    ``route`` is the user's request (``"auto"``, ``"gram"``, ``"feature"``); the route an op takes is
    decided per call by :func:`fastguide._ops.build_plan`.
    """

    estimator: str = "unbiased"
    kernel: str = "linear"
    sigma: float | None = None
    backend: str = "auto"
    tokens: str = "flatten"
    route: str = "auto"

    def __post_init__(self) -> None:
        check_option(self.estimator, "estimator", ESTIMATORS)
        check_option(self.kernel, "kernel", KERNELS)
        check_option(self.backend, "backend", BACKENDS)
        check_option(self.tokens, "tokens", TOKENS)
        check_option(self.route, "route", ROUTES)
        sigma = self.sigma
        if sigma is not None:
            if self.kernel != "rbf":
                raise ValueError(
                    f"sigma is only used with kernel='rbf'; got sigma={sigma!r} with kernel={self.kernel!r}"
                )
            if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
                raise ValueError(f"sigma must be a positive number or None (median heuristic); got {sigma!r}")


def check_options(estimator, kernel, backend, tokens, route, sigma) -> Options:
    """:class:`Options` from loose arguments (the order callers such as ``Guidance`` pass them in)."""
    return Options(
        estimator=estimator, kernel=kernel, sigma=sigma, backend=backend, tokens=tokens, route=route
    )


# --------------------------------------------------------------------------- tensors and layers
def min_examples(estimator: str) -> int:
    return 4 if estimator == "unbiased" else 2


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
    ``name`` is kept for symmetry with the checks (the view itself cannot fail).
    """
    if x.dim() == 3 and tokens == "mean":
        return x.mean(dim=1)
    if x.dim() == 3 and tokens == "samples":
        return x.reshape(x.shape[0] * x.shape[1], x.shape[2])
    if x.dim() == 1:
        return x.reshape(x.shape[0], 1)
    return x.reshape(x.shape[0], -1)


def layer_list(xs, name: str, tokens: str) -> list[torch.Tensor]:
    """A non-empty list/tuple of activations, each checked and viewed as (n, d) examples."""
    if isinstance(xs, torch.Tensor) or not isinstance(xs, Sequence):
        raise TypeError(f"{name} must be a list or tuple of tensors; got {type(xs).__name__}")
    if len(xs) == 0:
        raise ValueError(f"{name} must hold at least one layer")
    out = []
    for k, x in enumerate(xs):
        check_tensor(x, f"{name}[{k}]")
        out.append(as_examples(x, tokens, f"{name}[{k}]"))
    return out


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


def check_stats(stats: Sequence, opts: Options, n: int, device: torch.device) -> None:
    """Precomputed :class:`fastguide.LayerStats` must match the call's options, n and device."""
    for k, st in enumerate(stats):
        if st.estimator != opts.estimator or st.kernel != opts.kernel:
            raise ValueError(
                f"precomputed LayerStats {k} was made with estimator={st.estimator!r}, kernel={st.kernel!r}; "
                f"this call uses estimator={opts.estimator!r}, kernel={opts.kernel!r}"
            )
        if st.n != n:
            raise ValueError(
                f"all layers must have the same number of examples n; got n={n} and LayerStats n={st.n}"
            )
        if st.C.device != device:
            raise ValueError(
                f"all layers must be on one device; got {device} and LayerStats on {st.C.device}"
            )


# --------------------------------------------------------------------------- layer pairs
def pair_types(pairs) -> list[tuple[int, int]]:
    """A non-empty sequence of (i, j) int pairs (tensors of two ints accepted), as a list of tuples.

    Only the type is checked: a range check needs the layer counts (:func:`pair_range`).
    """
    try:
        items = list(pairs)
    except TypeError:
        raise TypeError(
            f"pairs must be a sequence of (i, j) index pairs; got {type(pairs).__name__}"
        ) from None
    if not items:
        raise ValueError("pairs must not be empty")
    out = []
    for p in items:
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        if len(p) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in p):
            raise TypeError(f"pairs must hold (i, j) pairs of ints; got {p!r}")
        out.append((p[0], p[1]))
    return out


def pair_range(pairs: Sequence[tuple[int, int]], nx: int, ny: int) -> list[tuple[int, int]]:
    """Pairs (already type-checked) in range for ``nx`` x-layers and ``ny`` y-layers, negatives resolved."""
    out = []
    for i, j in pairs:
        if not (-nx <= i < nx) or not (-ny <= j < ny):
            raise IndexError(f"pair {(i, j)!r} out of range for {nx} x-layers and {ny} y-layers")
        out.append((i % nx, j % ny))
    return out


def check_pairs(pairs, nx: int, ny: int) -> list[tuple[int, int]]:
    """:func:`pair_types` then :func:`pair_range`."""
    return pair_range(pair_types(pairs), nx, ny)
