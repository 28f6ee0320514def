"""Alignment tracking of :class:`fastguide.Guidance`: per-pair CKA every k steps (:class:`CKAHistory`).

The training ``loss()`` call only keeps a reference to its detached CKA vector (no host sync, no
branch on the step, so compiled code is unaffected). The vector is filed under its step when the
schedule moves on (eager code: ``_count_loss_call``, ``optimizer_step``, the ``step`` setter) or when
the history is read, and only for steps that are multiples of ``record_every``; rows stay device
tensors until :attr:`CKAHistory.cka` copies them to the host.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import _plot
from ._saved import SavedJSON, check_header

__all__ = ["CKAHistory", "HistoryMixin"]

_FORMAT = "fastguide.CKAHistory"
_FORMAT_VERSION = 1


class CKAHistory(SavedJSON):
    """Per-pair CKA of a guided training run at recorded steps.

    ``steps`` (list of schedule steps), ``pairs`` ((target_name, guide_name) per column), ``cka`` ((steps,
    pairs) float64 on the CPU; the device rows are copied on first read after a new record),
    :meth:`mean` (per step, over pairs), :meth:`plot` (curves, pair x step) and :meth:`save` /
    :meth:`load` (JSON, exact float64). Each row is the CKA of the last training ``loss()`` call of its
    step (the minibatch the loss used, with Guidance's estimator).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]] = (),
        steps: Sequence[int] = (),
        cka: torch.Tensor | None = None,
        record_every: int | None = None,
    ):
        self.pairs: list[tuple[str, str]] = [(str(t), str(g)) for t, g in pairs]
        self.record_every = record_every
        self._steps: list[int] = [int(s) for s in steps]
        rows = torch.zeros((0, len(self.pairs)), dtype=torch.float64) if cka is None else cka
        rows = torch.as_tensor(rows, dtype=torch.float64).detach().cpu().clone()
        if rows.dim() != 2 or rows.shape[0] != len(self._steps) or rows.shape[1] != len(self.pairs):
            raise ValueError(
                f"cka of shape {tuple(rows.shape)} does not fit {len(self._steps)} steps x "
                f"{len(self.pairs)} pairs"
            )
        self._host = rows  # rows already copied to the host
        self._new: list[torch.Tensor] = []  # later rows, still device tensors

    def _record(self, step: int, row: torch.Tensor, pairs: list[tuple[str, str]]) -> None:
        if not self.pairs:
            self.pairs = list(pairs)
        if self._steps and self._steps[-1] == step:
            # The same step again (the history was read mid-step, then more micro-batches ran).
            if self._new:
                self._new[-1] = row
            else:
                self._host = self._host[:-1]
                self._new.append(row)
            return
        self._steps.append(step)
        self._new.append(row)

    @property
    def steps(self) -> list[int]:
        return list(self._steps)

    @property
    def cka(self) -> torch.Tensor:
        """(len(steps), len(pairs)) float64 CPU tensor (the one host copy of the rows recorded since the
        last read happens here)."""
        if self._new:
            dev = self._new[-1].device
            new = torch.stack([r.to(dev, torch.float64) for r in self._new]).cpu()
            self._host = torch.cat([self._host.reshape(-1, new.shape[1]), new])
            self._new = []
        return self._host

    def mean(self) -> torch.Tensor:
        """Mean CKA over pairs at each recorded step, (len(steps),) float64."""
        c = self.cka
        return c.mean(dim=1) if c.shape[1] else torch.zeros(c.shape[0], dtype=torch.float64)

    def __len__(self) -> int:
        return len(self._steps)

    def __repr__(self) -> str:
        return f"CKAHistory({len(self)} steps x {len(self.pairs)} pairs, record_every={self.record_every})"

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "record_every": self.record_every,
            "pairs": [list(p) for p in self.pairs],
            "steps": self.steps,
            "cka": self.cka.tolist(),  # Python floats (float64); json writes their exact repr
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> CKAHistory:
        check_header(d, _FORMAT, _FORMAT_VERSION, "CKAHistory")
        pairs, steps, rows = d.get("pairs"), d.get("steps"), d.get("cka")
        if not isinstance(pairs, list) or not isinstance(steps, list) or not isinstance(rows, list):
            raise ValueError("saved CKAHistory: pairs, steps and cka must be lists")
        cka = torch.tensor(rows, dtype=torch.float64).reshape(len(steps), len(pairs))
        return cls([tuple(p) for p in pairs], steps, cka, d.get("record_every"))

    # ------------------------------------------------------------------ picture
    def plot(
        self,
        path: str | os.PathLike | None = None,
        *,
        ax: Any = None,
        title: str | None = None,
        mean: bool = True,
        legend: bool | None = None,
        dpi: int = 120,
    ):
        """CKA curves over steps, one per pair (coloured from shallow to deep), plus the mean over pairs.

        ``legend`` (default: up to 12 pairs) names each curve ``target <- guide``. Draws into ``ax``
        when given, else a new figure made without pyplot; saves to ``path`` when given; returns the
        figure.
        """
        fig, ax = _plot.new_axes(ax, (7.0, 4.2))
        c, steps = self.cka, self._steps
        P = c.shape[1]
        try:
            from matplotlib import colormaps

            colours = [colormaps["viridis"](v) for v in torch.linspace(0, 0.9, max(P, 1)).tolist()]
        except ImportError:  # pragma: no cover
            colours = [None] * P
        for p in range(P):
            t, g = self.pairs[p] if p < len(self.pairs) else (f"pair {p}", "")
            ax.plot(steps, c[:, p].numpy(), color=colours[p], lw=1.2, alpha=0.85, label=f"{t} <- {g}")
        if mean and P:
            ax.plot(steps, self.mean().numpy(), color="black", lw=2.2, ls="--", label="mean over pairs")
        ax.set_xlabel("training step")
        ax.set_ylabel("CKA (training minibatch)")
        ax.set_title(title or f"alignment during guided training ({P} pairs)", fontsize=10)
        ax.grid(alpha=0.3)
        if legend is None:
            legend = P <= 12
        if legend:
            ax.legend(fontsize=6, loc="best", ncol=2 if P > 6 else 1)
        _plot.save(fig, path, dpi)
        return fig


def _parse_pairs(pairs) -> list[tuple[str, str]]:
    if not isinstance(pairs, (list, tuple)) or not all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, str) for v in p) for p in pairs
    ):
        raise ValueError(f"Guidance state: history pairs must be [[target, guide], ...]; got {pairs!r}")
    return [tuple(p) for p in pairs]


class HistoryMixin:
    """The history side of :class:`fastguide.Guidance` (``record_every=k``); see the module docstring."""

    @property
    def history(self) -> CKAHistory:
        """Per-pair CKA every ``record_every`` steps (empty when ``record_every`` is None)."""
        self._flush_history()
        return self._history

    def _init_history(self, record_every: int | None) -> None:
        if record_every is not None and (
            not isinstance(record_every, int) or isinstance(record_every, bool) or record_every < 1
        ):
            raise ValueError(f"record_every must be None or a positive int; got {record_every!r}")
        self.record_every = record_every
        self._history = CKAHistory(record_every=record_every)
        self._hist_pending: torch.Tensor | None = None

    def _note_train_cka(self, cka: torch.Tensor) -> None:
        # Only a reference: filed (or dropped) in eager code when the step ends.
        self._hist_pending = cka

    def _flush_history(self) -> None:
        row, self._hist_pending = self._hist_pending, None
        k = self.record_every
        if row is None or k is None or self._step % k:
            return
        self._history._record(self._step, row, self.pairs)

    def _history_state(self) -> dict | None:
        self._flush_history()
        h = self._history
        if self.record_every is None and not len(h):
            return None
        return {
            "record_every": self.record_every,
            "pairs": [list(p) for p in h.pairs],
            "steps": h.steps,
            "cka": h.cka.clone(),
        }

    def _parse_history_state(self, state: Any) -> CKAHistory:
        """The history a Guidance state holds (none in states saved before histories existed)."""
        if state is None:
            return CKAHistory(record_every=self.record_every)
        if not isinstance(state, Mapping):
            raise ValueError(f"Guidance state: history must be a dict or None; got {type(state).__name__}")
        pairs, steps, cka = _parse_pairs(state.get("pairs", [])), state.get("steps"), state.get("cka")
        if not isinstance(steps, list) or not all(isinstance(s, int) and s >= 0 for s in steps):
            raise ValueError(
                f"Guidance state: history steps must be a list of non-negative ints; got {steps!r}"
            )
        if not isinstance(cka, torch.Tensor) or tuple(cka.shape) != (len(steps), len(pairs)):
            got = tuple(cka.shape) if isinstance(cka, torch.Tensor) else type(cka).__name__
            raise ValueError(
                f"Guidance state: history cka must be a ({len(steps)}, {len(pairs)}) tensor; got {got}"
            )
        return CKAHistory(pairs, steps, cka, self.record_every)

    def _load_history(self, history: CKAHistory) -> None:
        self._history = history
        self._hist_pending = None
