"""CKALoss: the layer-wise alignment loss ``sum_p w_p (1 - CKA_p)``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._validate import Options, check_option, pair_types
from .functional import GroupStats, LayerStats, cka_pairs

REDUCTIONS = ("sum", "mean", "none")


def _weights(weights) -> torch.Tensor:
    """Per-pair weights as a float64 vector: a 1-D real tensor or a sequence of real numbers, finite."""
    if isinstance(weights, torch.Tensor):
        if weights.is_complex() or weights.dtype == torch.bool:
            raise TypeError(f"weights must be real numbers; got a {weights.dtype} tensor")
        w = weights.detach().to(torch.float64).clone()
    else:
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
            raise TypeError(
                f"weights must be a sequence of numbers or a 1-D tensor; got {type(weights).__name__}"
            )
        bad = [v for v in weights if isinstance(v, bool) or not isinstance(v, (int, float))]
        if bad:
            raise TypeError(f"weights must hold real numbers; got {bad[0]!r}")
        w = torch.tensor([float(v) for v in weights], dtype=torch.float64)
    if w.dim() != 1 or w.numel() == 0:
        raise ValueError(f"weights must be a non-empty 1-D sequence; got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("weights must be finite")
    return w


class CKALoss(nn.Module):
    """Alignment loss between target activations and guide activations (or precomputed LayerStats).

    ``loss(target_acts, guide_acts) = sum_p w_p (1 - CKA(target_acts[i_p], guide_acts[j_p]))``.

    Args:
        pairs: (i, j) index pairs into (target_acts, guide_acts); ``None`` pairs them one-to-one.
        weights: per-pair weights (default 1). Stored as a buffer, so ``.to()`` moves it.
        estimator, kernel, sigma, backend, tokens, route: as in :func:`fastguide.cka_pairs`. With
            ``tokens="positions"`` / ``"structure"`` each pair's CKA is its mean over the valid positions
            / samples, and ``guide_acts`` may hold :class:`fastguide.GroupStats`.
        reduction: ``"sum"`` (the paper's), ``"mean"`` (the weighted mean ``sum w (1-CKA) / sum w``,
            like torch's weighted losses) or ``"none"`` (the per-pair vector ``w (1 - CKA)``).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[int, int]] | None = None,
        weights: Sequence[float] | torch.Tensor | None = None,
        estimator: str = "unbiased",
        kernel: str = "linear",
        reduction: str = "sum",
        *,
        sigma: float | None = None,
        backend: str = "auto",
        tokens: str = "flatten",
        route: str = "auto",
    ) -> None:
        super().__init__()
        Options(estimator=estimator, kernel=kernel, sigma=sigma, backend=backend, tokens=tokens, route=route)
        check_option(reduction, "reduction", REDUCTIONS)
        # Type check now; the range is checked against the layer lists at call time.
        self.pairs = None if pairs is None else pair_types(pairs)
        if weights is not None:
            w = _weights(weights)
            if self.pairs is not None and w.numel() != len(self.pairs):
                raise ValueError(f"weights has {w.numel()} entries but there are {len(self.pairs)} pairs")
            if reduction == "mean" and w.sum() == 0:
                raise ValueError(
                    "weights sum to 0, so reduction='mean' (sum w (1 - CKA) / sum w) is undefined; "
                    "use reduction='sum' or weights with a nonzero sum"
                )
            # float64: the loss takes the dtype of the CKAs, so fp64 losses keep the weights' digits.
            self.register_buffer("weights", w)
        else:
            self.weights = None
        self.estimator, self.kernel, self.sigma = estimator, kernel, sigma
        self.reduction, self.backend, self.tokens, self.route = reduction, backend, tokens, route

    def forward(
        self,
        target_acts: Sequence[torch.Tensor],
        guide_acts: Sequence[torch.Tensor | LayerStats | GroupStats],
    ) -> torch.Tensor:
        c = cka_pairs(
            target_acts,
            guide_acts,
            self.pairs,
            estimator=self.estimator,
            kernel=self.kernel,
            sigma=self.sigma,
            backend=self.backend,
            tokens=self.tokens,
            route=self.route,
        )
        per = 1.0 - c
        if self.weights is not None:
            if self.weights.numel() != per.numel():
                raise ValueError(
                    f"weights has {self.weights.numel()} entries but there are {per.numel()} pairs"
                )
            w = self.weights.to(device=per.device, dtype=per.dtype)
            per = w * per
        if self.reduction == "none":
            return per
        if self.reduction == "sum":
            return per.sum()
        denom = per.numel() if self.weights is None else self.weights.sum().to(per.dtype)
        return per.sum() / denom

    def extra_repr(self) -> str:
        pairs = "one-to-one" if self.pairs is None else f"{len(self.pairs)} pairs"
        s = (
            f"pairs={pairs}, estimator={self.estimator!r}, kernel={self.kernel!r}, "
            f"reduction={self.reduction!r}"
        )
        if self.weights is not None:
            s += ", weighted"
        return s
