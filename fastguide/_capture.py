"""Forward hooks written once: weak, copy-safe, picklable hook objects, and a capture context manager.

A :class:`ModuleHook` calls ``owner.<method>(name, module, output)``. It holds its owner and its module
through weak references, so hooks never keep an owner alive (an owner's :class:`HookSet` removes them
when it is garbage-collected) and serve only the module object they were registered on. A deep copy
or a pickle of a hooked module (an EMA copy, ``torch.save(model)``) holds an :class:`InertHook` in its
place, which removes itself the first time the copy runs.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ._mapping import batch_first, first_tensor

__all__ = ["ModuleHook", "InertHook", "HookSet", "Capture"]

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


class InertHook:
    """What a copied or unpickled module holds instead of a :class:`ModuleHook`: it does nothing and
    removes itself from its module on the first call (torch iterates over a snapshot of the hooks)."""

    __slots__ = ("hook_id",)

    def __init__(self, hook_id: int | None):
        self.hook_id = hook_id

    def __call__(self, module: nn.Module, *args: Any) -> None:
        for d in _HOOK_DICTS:
            getattr(module, d, {}).pop(self.hook_id, None)

    def __reduce__(self):
        return (InertHook, (self.hook_id,))


class ModuleHook:
    """A forward hook (or forward pre-hook) that calls ``getattr(owner, method)(name, module, output)``.

    Calls with another module object than the one it was registered on (a shallow ``copy.copy`` shares
    its hooks dict) are ignored, and so is every call once the owner is gone. Pre-hooks get
    ``output=None``.
    """

    __slots__ = ("_owner", "_module", "name", "method", "hook_id")

    def __init__(self, owner: Any, method: str, name: str, module: nn.Module):
        self._owner = weakref.ref(owner)
        self._module = weakref.ref(module)
        self.name = name
        self.method = method
        self.hook_id: int | None = None

    def __call__(self, module: nn.Module, args: Any, output: Any = None) -> None:
        owner = self._owner()
        if owner is None or module is not self._module():
            return None
        getattr(owner, self.method)(self.name, module, output)
        return None

    def __deepcopy__(self, memo) -> InertHook:
        return InertHook(self.hook_id)

    def __reduce__(self):
        return (InertHook, (self.hook_id,))


def _remove_all(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()


class HookSet:
    """The handles of the hooks one owner registered; :meth:`remove` removes them all, and so does the
    owner's garbage collection (a finalizer that holds the handles, not the owner)."""

    def __init__(self, owner: Any):
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._finalizer = weakref.finalize(owner, _remove_all, self._handles)
        self._finalizer.atexit = False

    def add(self, owner: Any, method: str, name: str, module: nn.Module, *, pre: bool = False) -> ModuleHook:
        hook = ModuleHook(owner, method, name, module)
        if pre:
            handle = module.register_forward_pre_hook(hook)
        else:
            handle = module.register_forward_hook(hook)
        hook.hook_id = handle.id
        self._handles.append(handle)
        return hook

    def remove(self) -> None:
        _remove_all(self._handles)

    def __len__(self) -> int:
        return len(self._handles)


class Capture:
    """Record the first tensor of named modules' outputs during forwards, as a context manager::

        with Capture(model, ["features.1", "features.3"]) as cap:
            model(x)
        cap.order, cap.outputs["features.1"]

    ``order`` lists the modules in the order they first ran; ``outputs`` keeps each module's first
    (``keep="first"``) or last (``keep="last"``) call, detached by default, (T, B, D) sequence outputs
    made batch-first; ``calls`` counts calls. ``store=False`` records only the order and counts. Only
    forwards on the thread that created the capture are recorded (a model shared with another thread
    does not mix in its calls).
    """

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str],
        *,
        detach: bool = True,
        keep: str = "first",
        store: bool = True,
    ):
        if keep not in ("first", "last"):
            raise ValueError(f"keep must be 'first' or 'last'; got {keep!r}")
        mods = dict(model.named_modules())
        names = list(names)
        unknown = [n for n in names if n not in mods]
        if unknown:
            raise ValueError(f"unknown module name(s) {unknown} in names")
        self.detach, self.keep, self.store = detach, keep, store
        self.order: list[str] = []
        self.outputs: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self._thread = threading.get_ident()
        self._hooks = HookSet(self)
        for n in names:
            self._hooks.add(self, "_record", n, mods[n])

    def _record(self, name: str, module: nn.Module, output: Any) -> None:
        if not torch.compiler.is_compiling() and threading.get_ident() != self._thread:
            return
        first = name not in self.calls
        self.calls[name] = self.calls.get(name, 0) + 1
        if first:
            self.order.append(name)
        if not self.store or (self.keep == "first" and not first):
            return
        t = first_tensor(output)
        if t is None:
            return
        t = batch_first(module, t)
        self.outputs[name] = t.detach() if self.detach else t

    def close(self) -> None:
        """Remove the hooks (the recorded outputs stay). Idempotent."""
        self._hooks.remove()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
