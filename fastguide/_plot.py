"""Matplotlib helpers shared by the analysis results (heatmaps, alignment curves): backend-safe figures."""

from __future__ import annotations

import math
import os
from typing import Any


def matplotlib_figure():
    """``matplotlib.figure.Figure``, or an ImportError that says how to get matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib (pip install matplotlib, or fastguide[demo])") from e
    return Figure


def new_axes(ax: Any, figsize: tuple[float, float]):
    """``(figure, axes)``: the given axes' figure, or a new figure made without pyplot.

    A ``Figure`` made directly (not through ``pyplot``) needs no GUI backend and never switches the
    user's backend, so plotting is safe in scripts, on servers and inside notebooks alike.
    """
    if ax is not None:
        return ax.figure, ax
    Figure = matplotlib_figure()
    fig = Figure(figsize=figsize)
    return fig, fig.add_subplot()


def save(fig: Any, path: str | os.PathLike | None, dpi: int) -> None:
    if path is None:
        return
    folder = os.path.dirname(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")


def tick_positions(count: int, max_ticks: int) -> list[int]:
    """Every k-th index so that at most ``max_ticks`` labels show (the last index always shows)."""
    if count <= max_ticks:
        return list(range(count))
    step = math.ceil(count / max_ticks)
    ticks = list(range(0, count, step))
    if ticks[-1] != count - 1:
        if count - 1 - ticks[-1] < step / 2:
            ticks[-1] = count - 1
        else:
            ticks.append(count - 1)
    return ticks


def label_fontsize(count: int) -> float:
    """Tick label size that stays readable from a handful of layers to 100+ (shown ticks)."""
    return max(5.0, min(9.0, 10.0 - 0.1 * count))
