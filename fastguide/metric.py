"""MinibatchCKA: dataset-level CKA accumulated over minibatches (Nguyen et al. 2021)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from . import _ops
from ._utils import pair_index
from ._validate import GROUP_TOKENS, Options, check_pairs, layer_list, pair_types
from .functional import LayerStats

_STATE_VERSION = 1
_STATE_KEYS = (
    "version",
    "estimator",
    "kernel",
    "sigma",
    "tokens",
    "pairs",
    "shape",
    "symmetric",
    "batches",
    "examples",
    "cross",
    "self_x",
    "self_y",
)
#: Options that change what the sums mean (backend and route change rounding only).
_STATE_OPTIONS = ("estimator", "kernel", "sigma", "tokens")


def _differs(key: str, saved, mine) -> None:
    raise ValueError(f"MinibatchCKA state: {key}={saved!r} was saved, but this metric has {key}={mine!r}")


def _stats_list(stats, name: str) -> list[LayerStats]:
    if isinstance(stats, (torch.Tensor, LayerStats)) or not isinstance(stats, Sequence):
        raise TypeError(f"{name} must be a list or tuple of LayerStats; got {type(stats).__name__}")
    if len(stats) == 0:
        raise ValueError(f"{name} must hold at least one layer")
    for k, st in enumerate(stats):
        if not isinstance(st, LayerStats):
            raise TypeError(
                f"{name}[{k}] must be a fastguide.LayerStats (from fastguide.layer_stats); got "
                f"{type(st).__name__}"
            )
    return list(stats)


class MinibatchCKA:
    """Accumulates per-batch unbiased (or biased) HSICs and reports CKA over the whole dataset.

    For each batch t, with its own normaliser ``1/(n_t (n_t - 3))`` (so a short last batch counts as
    the U-statistic says), it adds ``HSIC_t(a, b)`` for every pair and ``HSIC_t(a, a)`` for every
    layer to float64 sums; ``compute()`` returns ``sum cross / sqrt(sum self_a * sum self_b)``.
    Sums make the distributed case an all-reduce (:meth:`sync`). Layers that are degenerate in a batch
    contribute 0 to that batch's sums (their HSIC is 0 in exact arithmetic).

    ``update(xs, ys=None)``: ``ys=None`` compares xs with themselves; :meth:`update_stats` takes the
    per-layer statistics of a batch (:func:`fastguide.layer_stats`) instead of activations. The layer
    counts are fixed by the first update. ``pairs`` (optional) restricts the result to selected (i, j)
    pairs and ``compute()`` then returns a (len(pairs),) vector instead of the (len(xs), len(ys)) matrix.

    :meth:`state_dict` / :meth:`load_state_dict` save and resume the accumulated sums (torch
    conventions: a dict of tensors and plain values, fit for ``torch.save`` and ``torch.load`` with
    ``weights_only=True``). Under ``torch.distributed`` each rank saves and restores its own local sums.
    """

    def __init__(
        self,
        estimator: str = "unbiased",
        kernel: str = "linear",
        *,
        pairs: Sequence[tuple[int, int]] | None = None,
        sigma: float | None = None,
        backend: str = "auto",
        tokens: str = "flatten",
        route: str = "auto",
    ) -> None:
        self._opts = Options(
            estimator=estimator, kernel=kernel, sigma=sigma, backend=backend, tokens=tokens, route=route
        )
        if tokens in GROUP_TOKENS:
            # One accumulated CKA per layer pair; per-group sums are a different metric (not built).
            raise ValueError(
                f"MinibatchCKA does not support tokens={tokens!r} (one CKA per position or sample); "
                "average fastguide.cka_groups over your batches instead"
            )
        self.estimator, self.kernel, self.sigma = estimator, kernel, sigma
        self.backend, self.tokens, self.route = backend, tokens, route
        # Type check now; the range is checked against the layer counts of the first update.
        self._pairs_arg = None if pairs is None else pair_types(pairs)
        self.reset()

    def reset(self) -> None:
        self.pairs: list[tuple[int, int]] | None = self._pairs_arg
        self.shape: tuple[int, int] | None = None
        self.symmetric: bool | None = None
        self.cross: torch.Tensor | None = None
        self.self_x: torch.Tensor | None = None
        self.self_y: torch.Tensor | None = None
        self.batches = 0
        self.examples = 0
        self._global: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def update(self, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor] | None = None) -> None:
        xs2 = layer_list(xs, "xs", self.tokens)
        ys2 = None if ys is None else layer_list(ys, "ys", self.tokens)
        A = len(xs2)
        B = A if ys2 is None else len(ys2)
        pairs = self._layout(A, B, ys2 is None)
        layers = [x.detach() for x in xs2] + ([] if ys2 is None else [y.detach() for y in ys2])
        off = 0 if ys2 is None else A
        glob = [(i, off + j) for i, j in (pairs or [(i, j) for i in range(A) for j in range(B)])]
        cross, self_all = _ops.batch_hsic(_ops.build_plan(layers, [], glob, self._opts))
        self._accumulate(cross, self_all, A, B, ys2 is None, pairs, layers[0].shape[0])

    @torch.no_grad()
    def update_stats(
        self, stats_x: Sequence[LayerStats], stats_y: Sequence[LayerStats] | None = None
    ) -> None:
        """Like :meth:`update`, from per-layer statistics (:func:`fastguide.layer_stats`) of one batch.

        What :func:`fastguide.compare` feeds from its forward hooks, so that activations are reduced
        to one n x n matrix each inside the hook and never retained. The statistics must have been made
        with this metric's ``estimator`` and ``kernel`` (and ``sigma``/``tokens``, which they do not
        record), all with the same n, on one device. The same object may appear several times (e.g. a
        layer in both lists). Accumulates exactly what :meth:`update` would on the activations.
        """
        sx = _stats_list(stats_x, "stats_x")
        sy = None if stats_y is None else _stats_list(stats_y, "stats_y")
        A = len(sx)
        B = A if sy is None else len(sy)
        pairs = self._layout(A, B, sy is None)
        pre = sx + ([] if sy is None else sy)
        off = 0 if sy is None else A
        glob = [(i, off + j) for i, j in (pairs or [(i, j) for i in range(A) for j in range(B)])]
        cross, self_all = _ops.batch_hsic(_ops.build_stats_plan(pre, glob, self._opts))
        self._accumulate(cross, self_all, A, B, sy is None, pairs, pre[0].n)

    def _layout(self, A: int, B: int, symmetric: bool):
        """The resolved pairs for a batch of A x-layers and B y-layers (checked against earlier batches)."""
        pairs = self.pairs
        if self.shape is None:
            if pairs is not None:
                pairs = check_pairs(pairs, A, B)
        elif self.shape != (A, B) or self.symmetric != symmetric:
            raise ValueError(
                f"update() got {A} x-layers and {'no ys' if symmetric else f'{B} y-layers'}; earlier "
                f"updates had {self.shape[0]} x-layers and "
                f"{'no ys' if self.symmetric else f'{self.shape[1]} y-layers'}"
            )
        return pairs

    def _accumulate(self, cross, self_all, A: int, B: int, symmetric: bool, pairs, n: int) -> None:
        sx = self_all[:A]
        sy = self_all[:A] if symmetric else self_all[A:]
        if self.shape is None:
            self.shape, self.symmetric, self.pairs = (A, B), symmetric, pairs
        if self.cross is None:
            self.cross, self.self_x, self.self_y = cross, sx, sy
        else:
            # .to(): a state loaded on another device follows the data.
            dev = cross.device
            self.cross = self.cross.to(dev) + cross
            self.self_x = self.self_x.to(dev) + sx
            self.self_y = self.self_y.to(dev) + sy
        self.batches += 1
        self.examples += n
        self._global = None

    def _sums(self):
        if self.cross is None:
            raise RuntimeError("MinibatchCKA.compute() called before any update()")
        return self._global if self._global is not None else (self.cross, self.self_x, self.self_y)

    def compute(self) -> torch.Tensor:
        """CKA from the accumulated sums (float64): (len(xs), len(ys)) matrix, or (P,) with ``pairs``.

        Uses the all-reduced sums after :meth:`sync` (until the next update), else the local ones.
        """
        cross, sx, sy = self._sums()
        # NaN-propagating tests (~(s <= 0), not s > 0): a batch with NaN makes its pairs NaN, as in cka().
        okx, oky = ~(sx <= 0), ~(sy <= 0)
        rx = torch.where(okx, sx, torch.ones_like(sx)).sqrt()
        ry = torch.where(oky, sy, torch.ones_like(sy)).sqrt()
        if self.pairs is not None:
            pi, pj = pair_index([v for p in self.pairs for v in p], cross.device)
            valid = okx[pi] & oky[pj]
            return torch.where(valid, cross / (rx[pi] * ry[pj]), torch.zeros_like(cross))
        A, B = self.shape
        M = cross.view(A, B)
        valid = okx.unsqueeze(1) & oky.unsqueeze(0)
        return torch.where(valid, M / (rx.unsqueeze(1) * ry.unsqueeze(0)), torch.zeros_like(M))

    def sync(self, group=None) -> None:
        """All-reduce (sum) the accumulators over ``torch.distributed`` (one collective).

        Local sums are kept; ``compute()`` uses the global ones until the next ``update()``, so calling
        ``sync()`` twice never double counts. Every rank must have made at least one update.
        """
        cross, sx, sy = self.cross, self.self_x, self.self_y
        if cross is None:
            raise RuntimeError("MinibatchCKA.sync() called before any update()")
        if not (dist.is_available() and dist.is_initialized()):
            self._global = (cross, sx, sy)
            return
        flat = torch.cat([cross, sx, sy])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        a, b = cross.numel(), sx.numel()
        self._global = (flat[:a], flat[a : a + b], flat[a + b :])

    # ----------------------------------------------------------------------- resumable state
    def state_dict(self) -> dict:
        """The local sums and what they mean, as a dict (see the class docstring).

        Keys: ``version``; the options that change the sums' meaning (``estimator``, ``kernel``,
        ``sigma``, ``tokens``); ``pairs`` (resolved ``[[i, j], ...]`` or None), ``shape`` (``[A, B]``,
        None before the first update), ``symmetric``, ``batches``, ``examples``; the float64
        accumulators ``cross`` ((P,) with pairs, else (A*B,)), ``self_x`` (A,), ``self_y`` (B,) (None
        before the first update). Sums after :meth:`sync` are not part of the state.
        """
        return {
            "version": _STATE_VERSION,
            **{k: getattr(self, k) for k in _STATE_OPTIONS},
            "pairs": None if self.pairs is None else [list(p) for p in self.pairs],
            "shape": None if self.shape is None else list(self.shape),
            "symmetric": self.symmetric,
            "batches": self.batches,
            "examples": self.examples,
            "cross": self.cross,
            "self_x": self.self_x,
            "self_y": self.self_y,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore sums saved by :meth:`state_dict`; later updates continue the accumulation exactly.

        The accumulators keep the device they were loaded on and follow the data of the next update.
        Raises ValueError naming the key that differs (missing or unexpected keys, other options or
        pairs, accumulators of the wrong shape or dtype); nothing changes then.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping from state_dict(); got {type(state).__name__}")
        missing = [k for k in _STATE_KEYS if k not in state]
        unexpected = sorted(str(k) for k in state if k not in _STATE_KEYS)
        if missing or unexpected:
            raise ValueError(f"MinibatchCKA state: missing keys {missing}, unexpected keys {unexpected}")
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"MinibatchCKA state: version {state['version']!r}, expected {_STATE_VERSION}")
        for k in _STATE_OPTIONS:
            if state[k] != getattr(self, k):
                _differs(k, state[k], getattr(self, k))
        for k in ("batches", "examples"):
            v = state[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"MinibatchCKA state: {k} must be a non-negative int; got {v!r}")
        if state["shape"] is None:
            if any(state[k] is not None for k in ("cross", "self_x", "self_y", "symmetric")):
                raise ValueError("MinibatchCKA state: shape is None (no update) but accumulators are set")
            saved = None if state["pairs"] is None else pair_types(state["pairs"])
            if saved != self._pairs_arg:
                _differs("pairs", saved, self._pairs_arg)
            self.reset()
            return
        A, B, symmetric, pairs = self._check_layout(state)
        P = A * B if pairs is None else len(pairs)
        acc = {}
        for k, want in (("cross", P), ("self_x", A), ("self_y", B)):
            t = state[k]
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float64 or tuple(t.shape) != (want,):
                got = (
                    f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else repr(t)
                )
                raise ValueError(
                    f"MinibatchCKA state: {k} must be a float64 tensor of shape ({want},); got {got}"
                )
            acc[k] = t.detach().clone()
        self.pairs, self.shape, self.symmetric = pairs, (A, B), symmetric
        self.cross, self.self_x, self.self_y = acc["cross"], acc["self_x"], acc["self_y"]
        self.batches, self.examples = state["batches"], state["examples"]
        self._global = None

    def _check_layout(self, state: Mapping):
        shape, symmetric = state["shape"], state["symmetric"]
        if (
            not isinstance(shape, (list, tuple))
            or len(shape) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
        ):
            raise ValueError(f"MinibatchCKA state: shape must be [A, B] of positive ints; got {shape!r}")
        A, B = shape
        if not isinstance(symmetric, bool) or (symmetric and A != B):
            raise ValueError(f"MinibatchCKA state: symmetric={symmetric!r} does not fit shape {[A, B]}")
        saved = None if state["pairs"] is None else check_pairs(state["pairs"], A, B)
        mine = None if self._pairs_arg is None else check_pairs(self._pairs_arg, A, B)
        if saved != mine:
            _differs("pairs", saved, mine)
        return A, B, symmetric, saved

    def __repr__(self) -> str:
        return (
            f"MinibatchCKA(estimator={self.estimator!r}, kernel={self.kernel!r}, batches={self.batches}, "
            f"examples={self.examples})"
        )


__all__ = ["MinibatchCKA"]
