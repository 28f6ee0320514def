"""Argument checks of the public API and the one options object every entry point validates once.

Everything here raises ``TypeError`` / ``ValueError`` / ``IndexError`` naming the argument (DESIGN.md
section 3); nothing computes. Used by :mod:`fastguide.functional`, :class:`fastguide.CKALoss`,
:class:`fastguide.MinibatchCKA` and :class:`fastguide.Guidance`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._utils import SHIFT_ROWS, acc_dtype

ESTIMATORS = ("unbiased", "biased")
KERNELS = ("linear", "rbf")
BACKENDS = ("auto", "torch", "triton")
#: How a (B, T, D) activation becomes examples: one (n, d) matrix per layer ...
LAYER_TOKENS = ("flatten", "mean", "samples")
#: ... or G groups of (n, d) examples per layer, one CKA per group (``fastguide._structure``):
#: ``"positions"`` (CKA at each position over the batch), ``"structure"`` (each sample's token x token Gram).
GROUP_TOKENS = ("positions", "structure")
TOKENS = LAYER_TOKENS + GROUP_TOKENS
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
            if (
                isinstance(sigma, bool)
                or not isinstance(sigma, (int, float))
                or not (sigma > 0 and math.isfinite(sigma))
            ):
                raise ValueError(
                    f"sigma must be a positive finite number or None (median heuristic); got {sigma!r}"
                )
        if self.tokens in GROUP_TOKENS:
            if self.kernel != "linear":
                raise ValueError(
                    f"tokens={self.tokens!r} implements the linear kernel; got kernel={self.kernel!r}"
                )
            if self.route == "feature":
                raise ValueError(
                    f"tokens={self.tokens!r} runs on grouped Grams; route='feature' does not apply"
                )


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

    ``"flatten"``: (n, ...) flattens everything after dim 0. ``"mean"`` and ``"samples"`` read a 3-D
    (B, T, D) sequence, or a 4-D (B, C, H, W) map as H*W tokens of C features (as the grouped modes
    do): ``"mean"`` -> (B, D) mean over the tokens, ``"samples"`` -> (B*T, D) one example per token.
    A 2-D (n, d) input already is a matrix of examples (e.g. a pooled layer, or examples reduced
    earlier) and is used as it is. Other shapes have no token axis and raise, naming ``tokens`` and
    ``name`` (issue 14 item 8). The grouped modes (:data:`GROUP_TOKENS`) have no single examples
    matrix: they raise too (their view is :func:`group_view`).
    """
    if tokens in GROUP_TOKENS:
        raise ValueError(
            f"tokens={tokens!r} compares grouped Grams (one per position or per sample), not one (n, d) "
            f"examples matrix of {name}; use fastguide.layer_stats / cka_pairs / cka_groups with it"
        )
    if tokens == "flatten":
        return x.reshape(x.shape[0], 1) if x.dim() == 1 else x.reshape(x.shape[0], -1)
    if x.dim() == 2:
        return x
    if x.dim() == 4:
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
    elif x.dim() != 3:
        raise ValueError(
            f"tokens={tokens!r} needs (B, T, D) sequence or (B, C, H, W) map activations (or (n, d) "
            f"examples); {name} has shape {tuple(x.shape)} (use tokens='flatten' to flatten it)"
        )
    if tokens == "samples":
        return x.reshape(x.shape[0] * x.shape[1], x.shape[2])
    return token_mean(x)


def token_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over T of a (B, T, D) activation, shifted first: ``mean_t (x_bt - c)`` in the accumulation
    dtype, c the mean of the first rows' tokens (detached).

    CKA is invariant to the per-feature shift c; averaging the raw values would round the mean at the
    offset's magnitude before the op's own shift (issue 14 item 6: 7.7e-5 at +5e3 in fp32).
    """
    acc = acc_dtype(x.dtype)
    c = x[:SHIFT_ROWS].detach().to(acc).mean(dim=(0, 1))
    return (x.to(acc) - c).mean(dim=1)


def _checked_views(xs, name: str, tokens: str, view) -> list[torch.Tensor]:
    """A non-empty list/tuple of activations, each checked and viewed by ``view(x, tokens, name)``."""
    if isinstance(xs, torch.Tensor) or not isinstance(xs, Sequence):
        raise TypeError(f"{name} must be a list or tuple of tensors; got {type(xs).__name__}")
    if len(xs) == 0:
        raise ValueError(f"{name} must hold at least one layer")
    out = []
    for k, x in enumerate(xs):
        check_tensor(x, f"{name}[{k}]")
        out.append(view(x, tokens, f"{name}[{k}]"))
    return out


def layer_list(xs, name: str, tokens: str) -> list[torch.Tensor]:
    """A non-empty list/tuple of activations, each checked and viewed as (n, d) examples."""
    return _checked_views(xs, name, tokens, as_examples)


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
        if not isinstance(p, (tuple, list)):
            hint = " (a flat list? write pairs=[(i, j), ...])" if isinstance(p, int) else ""
            raise TypeError(f"pairs must hold (i, j) index pairs; got the element {p!r}{hint}")
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


# --------------------------------------------------------------------------- grouped modes
def group_view(x: torch.Tensor, tokens: str, name: str) -> torch.Tensor:
    """The (G, n, d) grouped view of a (B, T, D) or (B, C, H, W) activation (a view: no copy).

    ``"positions"``: G = T positions (H*W for maps) of n = B examples with d = D (C) features.
    ``"structure"``: G = B samples of n = T tokens (H*W positions) with d = D (C) features.
    """
    if x.dim() == 3:
        return x.transpose(0, 1) if tokens == "positions" else x
    if x.dim() == 4:
        seq = x.flatten(2)  # (B, C, HW)
        return seq.permute(2, 0, 1) if tokens == "positions" else seq.transpose(1, 2)
    raise ValueError(
        f"tokens={tokens!r} needs (B, T, D) sequence or (B, C, H, W) map activations; "
        f"{name} has shape {tuple(x.shape)}"
    )


def group_list(xs, name: str, tokens: str) -> list[torch.Tensor]:
    """A non-empty list/tuple of activations, each checked and viewed as (G, n, d) groups."""
    return _checked_views(xs, name, tokens, group_view)


def _group_words(tokens: str) -> tuple[str, str]:
    """What G and n are called in the messages of a grouped mode."""
    if tokens == "positions":
        return "positions T (H*W for maps)", "batch size B"
    return "batch size B", "tokens T (H*W for maps)"


def check_group_sizes(G: int, n: int, name: str, G0: int, n0: int, name0: str, tokens: str) -> None:
    """Same number of groups G and of examples per group n as the first layer, else a ValueError."""
    g_word, n_word = _group_words(tokens)
    if G != G0:
        why = (
            "position t is compared with position t"
            if tokens == "positions"
            else "sample b is compared with sample b"
        )
        raise ValueError(
            f"tokens={tokens!r}: all layers need the same {g_word} ({why}); "
            f"{name0} has {G0} but {name} has {G}"
        )
    if n != n0:
        why = (
            "each position's CKA is over the batch"
            if tokens == "positions"
            else "each sample's T x T Grams are compared; resample one side's tokens (e.g. F.interpolate or "
            "F.adaptive_avg_pool2d) to the other's count first"
        )
        raise ValueError(
            f"tokens={tokens!r}: all layers need the same {n_word} ({why}); "
            f"{name0} has {n0} but {name} has {n}"
        )


def check_group_layers(layers, names, tokens: str, estimator: str) -> None:
    """Agreement checks across the (G, n, d) views: same G, same n, one device, n large enough."""
    G0, n0 = layers[0].shape[:2]
    dev0 = layers[0].device
    for x, name in zip(layers, names, strict=True):
        check_group_sizes(x.shape[0], x.shape[1], name, G0, n0, names[0], tokens)
        if x.device != dev0:
            raise ValueError(
                f"all layers must be on one device; {names[0]} is on {dev0}, {name} on {x.device}"
            )
    need = min_examples(estimator)
    if n0 < need:
        _, n_word = _group_words(tokens)
        raise ValueError(
            f"tokens={tokens!r} with the {estimator} estimator needs {n_word} >= {need}; got {n0} "
            f"(in {names[0]})"
        )


def check_group_stats(stats, opts: Options, G: int, n: int, name0: str, names, device: torch.device) -> None:
    """Precomputed :class:`fastguide.GroupStats` (argument names ``names``) must match the call's
    options, the first layer's G and n (``name0``) and its device."""
    for st, name in zip(stats, names, strict=True):
        if st.estimator != opts.estimator or st.tokens != opts.tokens:
            raise ValueError(
                f"{name}: precomputed GroupStats made with estimator={st.estimator!r}, tokens={st.tokens!r}; "
                f"this call uses estimator={opts.estimator!r}, tokens={opts.tokens!r}"
            )
        check_group_sizes(st.groups, st.n, name, G, n, name0, opts.tokens)
        if st.C.device != device:
            raise ValueError(
                f"all layers must be on one device; {name0} is on {device}, {name} on {st.C.device}"
            )
