"""Every environment variable fastguide reads, read once, with an override context manager.

Library code asks :func:`get` for the current :class:`Config`; nothing else in the package reads
``os.environ``. Tests and the benchmark harness change behaviour with :func:`override` instead of
writing environment variables::

    from fastguide import _config
    with _config.override(cpu_layer_parallel=False):
        ...

The table of variables (also in the README):

=============================== ======== ==================== ==========================================
variable                        default  values               effect
=============================== ======== ==================== ==========================================
``FASTGUIDE_CPU_LAYER_PARALLEL`` ``1``    ``1`` / ``0``        several CPU layers' Grams at once, one
                                                              layer per core (``0``: one after another)
``FASTGUIDE_CPU_SYRK``           ``auto`` ``auto``/``on``/``off`` symmetric ``syrk`` for CPU Grams:
                                                              ``auto`` by a fixed shape rule, ``on``
                                                              always, ``off`` never (``torch.mm``)
``FASTGUIDE_CPU_OPENBLAS``       ``1``    ``1`` / ``0``        SciPy's OpenBLAS ``ssyrk`` in the layer
                                                              workers (``0``: MKL's, or ``torch.mm``)
``FASTGUIDE_SKIP_AUTOTUNE``      ``0``    ``1`` / ``0``        one known-good Triton config per kernel
                                                              instead of autotuning
``TRITON_INTERPRET``             ``0``    ``1`` / ``0``        Triton's interpreter (read by Triton when
                                                              kernels are decorated); fastguide then
                                                              accepts CPU tensors on ``backend="triton"``
=============================== ======== ==================== ==========================================
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Iterator, Mapping

__all__ = ["Config", "get", "override", "from_environ"]

_SYRK_MODES = ("auto", "on", "off")
# Values accepted for FASTGUIDE_CPU_SYRK before it had one meaning ("1"/"0" at one site,
# "auto"/"force" at another); mapped onto the documented ones.
_SYRK_ALIASES = {"1": "auto", "0": "off", "force": "on"}


@dataclasses.dataclass(frozen=True)
class Config:
    """fastguide's settings (one field per environment variable in the module docstring)."""

    cpu_layer_parallel: bool = True
    cpu_syrk: str = "auto"
    cpu_openblas: bool = True
    skip_autotune: bool = False
    triton_interpret: bool = False

    def __post_init__(self) -> None:
        if self.cpu_syrk not in _SYRK_MODES:
            raise ValueError(f"cpu_syrk must be one of {_SYRK_MODES}; got {self.cpu_syrk!r}")
        for f in ("cpu_layer_parallel", "cpu_openblas", "skip_autotune", "triton_interpret"):
            if not isinstance(getattr(self, f), bool):
                raise TypeError(f"{f} must be a bool; got {getattr(self, f)!r}")


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw in ("1", "true", "True", "yes", "on"):
        return True
    if raw in ("0", "false", "False", "no", "off"):
        return False
    raise ValueError(f"environment variable {name} must be 1 or 0; got {raw!r}")


def from_environ(env: Mapping[str, str] | None = None) -> Config:
    """A :class:`Config` from ``env`` (default ``os.environ``); a bad value raises naming the variable."""
    env = os.environ if env is None else env
    syrk = env.get("FASTGUIDE_CPU_SYRK", "auto") or "auto"
    syrk = _SYRK_ALIASES.get(syrk, syrk)
    if syrk not in _SYRK_MODES:
        raise ValueError(
            f"environment variable FASTGUIDE_CPU_SYRK must be one of {_SYRK_MODES}; got {syrk!r}"
        )
    return Config(
        cpu_layer_parallel=_flag(env, "FASTGUIDE_CPU_LAYER_PARALLEL", True),
        cpu_syrk=syrk,
        cpu_openblas=_flag(env, "FASTGUIDE_CPU_OPENBLAS", True),
        skip_autotune=_flag(env, "FASTGUIDE_SKIP_AUTOTUNE", False),
        triton_interpret=_flag(env, "TRITON_INTERPRET", False),
    )


_lock = threading.Lock()
_current: Config | None = None


def get() -> Config:
    """The current settings: the environment as read on first use, or an active :func:`override`."""
    global _current
    cur = _current
    if cur is None:
        with _lock:
            if _current is None:
                _current = from_environ()
            cur = _current
    return cur


@contextlib.contextmanager
def override(**changes) -> Iterator[Config]:
    """Replace fields of the current :class:`Config` inside a ``with`` block (process-wide).

    Restores the previous settings on exit, also after an exception. Meant for tests and the
    benchmark harness (single-threaded use); library code only reads :func:`get`.
    """
    global _current
    old = get()
    new = dataclasses.replace(old, **changes)
    with _lock:
        _current = new
    try:
        yield new
    finally:
        with _lock:
            _current = old
