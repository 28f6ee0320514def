"""JSON files of the analysis results (:class:`fastguide.CompareResult`, :class:`fastguide.CKAHistory`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["SavedJSON", "check_header"]


def check_header(d: Any, fmt: str, version: int, what: str) -> None:
    """Raise unless ``d`` is a mapping written by ``what``'s ``to_dict`` in this format version."""
    if not isinstance(d, Mapping) or d.get("format") != fmt:
        raise ValueError(f"not a saved {what} (format {fmt!r} expected)")
    if d.get("version") != version:
        raise ValueError(f"{what} version {d.get('version')!r}; this fastguide reads {version}")


class SavedJSON:
    """:meth:`save` / :meth:`load` for a class with ``to_dict()`` and ``from_dict(d)``."""

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` as JSON (parent folders made as needed); :meth:`load` reads it back."""
        folder = os.path.dirname(os.fspath(path))
        if folder:
            os.makedirs(folder, exist_ok=True)
        with open(path, "w") as f:
            # default=str: metadata values JSON cannot hold are written as text.
            json.dump(self.to_dict(), f, indent=1, default=str)

    @classmethod
    def load(cls, path: str | os.PathLike):
        with open(path) as f:
            return cls.from_dict(json.load(f))
