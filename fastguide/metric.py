"""MinibatchCKA: dataset-level CKA accumulated over minibatches (Nguyen et al. 2021)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .functional import _check_options, _check_pairs, _hsic_table, _index, _pair_list, _plan, _prepare


class MinibatchCKA:
    """Accumulates per-batch unbiased (or biased) HSICs and reports CKA over the whole dataset.

    For each batch t, with its own normaliser ``1/(n_t (n_t - 3))`` (so a short last batch counts as
    the U-statistic says), it adds ``HSIC_t(a, b)`` for every pair and ``HSIC_t(a, a)`` for every
    layer to float64 sums; ``compute()`` returns ``sum cross / sqrt(sum self_a * sum self_b)``.
    Sums make the distributed case an all-reduce (:meth:`sync`). Layers that are degenerate in a batch
    contribute 0 to that batch's sums (their HSIC is 0 in exact arithmetic).

    ``update(xs, ys=None)``: ``ys=None`` compares xs with themselves. The layer counts are fixed by
    the first update. ``pairs`` (optional) restricts the result to selected (i, j) pairs and
    ``compute()`` then returns a (len(pairs),) vector instead of the (len(xs), len(ys)) matrix.
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
        _check_options(estimator, kernel, backend, tokens, route, sigma)
        self.estimator, self.kernel, self.sigma = estimator, kernel, sigma
        self.backend, self.tokens, self.route = backend, tokens, route
        self.pairs = None if pairs is None else [tuple(p) for p in pairs]
        if self.pairs is not None:
            _check_pairs(self.pairs, 1 << 62, 1 << 62)
        self.reset()

    def reset(self) -> None:
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
        xs2 = _prepare(xs, "xs", self.tokens)
        ys2 = None if ys is None else _prepare(ys, "ys", self.tokens)
        A = len(xs2)
        B = A if ys2 is None else len(ys2)
        if self.shape is None:
            self.shape, self.symmetric = (A, B), ys2 is None
            if self.pairs is not None:
                self.pairs = _check_pairs(self.pairs, A, B)
        elif self.shape != (A, B) or self.symmetric != (ys2 is None):
            raise ValueError(
                f"update() got {A} x-layers and {'no ys' if ys2 is None else f'{B} y-layers'}; earlier "
                f"updates had {self.shape[0]} x-layers and "
                f"{'no ys' if self.symmetric else f'{self.shape[1]} y-layers'}"
            )
        layers = [x.detach() for x in xs2] + ([] if ys2 is None else [y.detach() for y in ys2])
        off = 0 if ys2 is None else A
        pairs = self.pairs if self.pairs is not None else [(i, j) for i in range(A) for j in range(B)]
        glob = [(i, off + j) for i, j in pairs]
        args = _plan(layers, [], glob, self.estimator, self.kernel, self.sigma, self.backend, self.route)
        flat = args[5]
        plist = _pair_list(flat)
        hsic, _, s, ok, h, _, _, _ = _hsic_table(*args[:5], plist, *args[6:])
        # Back to the un-normalised scale (multiply by s_a s_b); degenerate layers count as 0.
        s64, h64 = s.double(), h.double()
        self_all = torch.where(ok, h64 * s64 * s64, torch.zeros_like(h64))
        pi, pj = _index(flat, s.device)
        cross = torch.where(
            ok[pi] & ok[pj], hsic.double() * s64[pi] * s64[pj], torch.zeros_like(hsic, dtype=torch.float64)
        )
        sx = self_all[:A]
        sy = self_all[:A] if ys2 is None else self_all[A:]
        if self.cross is None:
            self.cross, self.self_x, self.self_y = cross, sx, sy
        else:
            self.cross, self.self_x, self.self_y = self.cross + cross, self.self_x + sx, self.self_y + sy
        self.batches += 1
        self.examples += layers[0].shape[0]
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
        rx = torch.where(sx > 0, sx, torch.ones_like(sx)).sqrt()
        ry = torch.where(sy > 0, sy, torch.ones_like(sy)).sqrt()
        if self.pairs is not None:
            pi, pj = _index([v for p in self.pairs for v in p], cross.device)
            valid = (sx[pi] > 0) & (sy[pj] > 0)
            return torch.where(valid, cross / (rx[pi] * ry[pj]), torch.zeros_like(cross))
        A, B = self.shape
        M = cross.view(A, B)
        valid = (sx > 0).unsqueeze(1) & (sy > 0).unsqueeze(0)
        return torch.where(valid, M / (rx.unsqueeze(1) * ry.unsqueeze(0)), torch.zeros_like(M))

    def sync(self, group=None) -> None:
        """All-reduce (sum) the accumulators over ``torch.distributed`` (one collective).

        Local sums are kept; ``compute()`` uses the global ones until the next ``update()``, so calling
        ``sync()`` twice never double counts. Every rank must have made at least one update.
        """
        import torch.distributed as dist

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

    def __repr__(self) -> str:
        return (
            f"MinibatchCKA(estimator={self.estimator!r}, kernel={self.kernel!r}, batches={self.batches}, "
            f"examples={self.examples})"
        )


__all__ = ["MinibatchCKA"]
