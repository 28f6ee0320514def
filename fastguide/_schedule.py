"""The schedule of :class:`fastguide.Guidance`: a step counter (loss calls or optimizer steps), its state."""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from ._mapping import make_mapping, resolve_pairs

if TYPE_CHECKING:
    from .guidance import Guidance

_STATE_VERSION = 1


class _OptimizerHook:
    """Optimizer step post-hook advancing a Guidance's schedule (weak: it never keeps the Guidance alive)."""

    def __init__(self, owner: Guidance):
        self._owner = weakref.ref(owner)

    def __call__(self, optimizer, args, kwargs) -> None:
        owner = self._owner()
        if owner is not None and not owner._closed:
            owner.optimizer_step()

    def __reduce__(self):
        return (_noop_optimizer_hook, ())


def _noop_optimizer_hook(*args, **kwargs) -> None:
    return None


_EAGER_REASONS: dict[Callable, str | None] = {}
_DISABLED: dict[Callable, Callable] = {}


def eager_only(reason: str | None = None):
    """Decorator: the function runs as eager code also when compiled code calls it (a graph break,
    whose message under ``fullgraph=True`` is ``reason``). The ``torch.compiler.disable`` wrapper is
    made on first use under compile: it imports torch._dynamo, which ``import fastguide`` does not."""

    def deco(fn: Callable) -> Callable:
        _EAGER_REASONS[fn] = reason

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if torch.compiler.is_compiling():
                return _disabled(fn)(*args, **kwargs)
            return fn(*args, **kwargs)

        return call

    return deco


def _disabled(fn: Callable) -> Callable:
    wrapped = _DISABLED.get(fn)
    if wrapped is None:
        wrapped = _DISABLED[fn] = torch.compiler.disable(fn, reason=_EAGER_REASONS[fn])
    return wrapped


def prepare_eager_only() -> None:
    """Make the wrappers now if torch._dynamo is loaded already (so that compiled code finds them)."""
    if "torch._dynamo" in sys.modules:
        for fn in _EAGER_REASONS:
            _disabled(fn)


@eager_only(
    reason="fastguide.Guidance counts loss() calls in eager code; under torch.compile(fullgraph=True) "
    "construct it with step_on='optimizer' and advance the schedule outside the compiled region "
    "(guidance.attach_optimizer(opt) or guidance.optimizer_step())"
)
def _count_loss_call(guidance: Guidance) -> None:
    guidance._count_loss_call()


class ScheduleMixin:
    """``every``/``until``/``weight(step)`` over a step counter that counts training ``loss()`` calls
    (every ``accumulate``-th) or optimizer steps (``step_on="optimizer"``), and the state that
    ``state_dict()`` carries (``get_extra_state``: torch's hook for non-tensor module state)."""

    # ------------------------------------------------------------------ schedule

    def _active(self, step: int) -> bool:
        return (self.until is None or step < self.until) and step % self.every == 0

    def _refresh(self) -> None:
        # The schedule's decision for the current step, read by compiled code (no guard on the step).
        self._now_active = self._active(self._step)
        if callable(self.weight):
            self._now_weight: float | torch.Tensor = torch.tensor(
                float(self.weight(self._step)), dtype=torch.float64
            )
        else:
            self._now_weight = float(self.weight)

    @property
    def step(self) -> int:
        """The schedule step: optimizer steps taken (``step_on="optimizer"``) or training ``loss()``
        calls divided by ``accumulate``. Settable (integrations set it to the trainer's global step)."""
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"step must be a non-negative int; got {value!r}")
        self._flush_history()
        self._step, self._micro = value, 0
        self._refresh()

    @property
    def active(self) -> bool:
        """Whether the current step (the next training ``loss()`` call) is guided."""
        return self._active(self._step)

    def optimizer_step(self) -> None:
        """Advance the schedule by one optimizer step (``step_on="optimizer"``)."""
        if self.step_on != "optimizer":
            raise RuntimeError(
                "optimizer_step() needs step_on='optimizer' (with step_on='loss', loss() calls advance the "
                "schedule); construct Guidance(..., step_on='optimizer') or call attach_optimizer(opt)"
            )
        self._flush_history()
        self._step += 1
        self._refresh()

    def attach_optimizer(self, optimizer: torch.optim.Optimizer):
        """Count the schedule in steps of ``optimizer`` (a step post-hook; steps that AMP's GradScaler
        skips are not counted). Sets ``step_on="optimizer"``; the hook goes with :meth:`close`."""
        if not hasattr(optimizer, "register_step_post_hook"):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
        self.step_on = "optimizer"
        self._micro = 0
        handle = optimizer.register_step_post_hook(_OptimizerHook(self))
        self._opt_hooks._handles.append(handle)
        return handle

    def _count_loss_call(self) -> None:
        self._micro += 1
        if self._micro >= self.accumulate:
            self._flush_history()
            self._micro = 0
            self._step += 1
            self._refresh()

    # ------------------------------------------------------------------ state

    def get_extra_state(self) -> dict:
        return {
            "version": _STATE_VERSION,
            "step": self._step,
            "micro": self._micro,
            "pairs": [list(p) for p in self.pairs] if self._mapping is not None else None,
            "history": self._history_state(),  # absent from states saved before histories existed
        }

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"not a Guidance state (version {_STATE_VERSION}): {state!r}")
        step, micro, pairs = state.get("step"), state.get("micro", 0), state.get("pairs")
        if not isinstance(step, int) or step < 0 or not isinstance(micro, int) or micro < 0:
            raise ValueError(f"Guidance state has an invalid step {step!r} / micro {micro!r}")
        mapping = None
        if pairs is not None:
            pairs = resolve_pairs(pairs, self._t_modules, self._g_modules)
            if self._mapping is not None and pairs != self.pairs:
                raise ValueError(f"the state's layer pairs {pairs} differ from this Guidance's {self.pairs}")
            mapping = make_mapping(pairs)
        history = self._parse_history_state(state.get("history"))
        n_pairs = len(pairs) if pairs is not None else None
        if len(history) and n_pairs is not None and len(history.pairs) != n_pairs:
            raise ValueError(
                f"Guidance state: the history has {len(history.pairs)} pairs but the state {n_pairs}"
            )
        if mapping is not None and self._mapping is None:
            self._commit_mapping(mapping)
        self._step, self._micro = step, micro
        self._load_history(history)
        self._refresh()
