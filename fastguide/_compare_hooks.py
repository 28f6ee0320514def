"""Hooks and helpers of :func:`fastguide.compare`: layer selection, per-layer statistics made inside the
forward hooks (activations never kept), model inputs, and the model state restored afterwards."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ._capture import HookSet
from ._mapping import auto_candidates, batch_first, first_tensor, resolve_name
from ._validate import as_examples, min_examples
from .functional import LayerStats, layer_stats


# ---------------------------------------------------------------------------------------- inputs
def default_input(batch: Any) -> Any:
    """The model input of a batch: a tensor itself; the first element of a tuple or list (``(x, y)``,
    a ``TensorDataset``'s ``[x, y]``); a mapping as keyword arguments (``model(**batch)``, Hugging
    Face style). Other batches need ``input_fn=``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("a batch is an empty tuple/list: pass input_fn= to say what the model takes")
        return batch[0]
    if isinstance(batch, Mapping):
        return dict(batch)
    raise TypeError(
        f"cannot take a model input from a batch of type {type(batch).__name__}: pass input_fn=batch -> input"
    )


def to_device(x: Any, dev: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x if x.device == dev else x.to(dev)
    if isinstance(x, tuple):
        return tuple(to_device(v, dev) for v in x)
    if isinstance(x, list):
        return [to_device(v, dev) for v in x]
    if isinstance(x, Mapping):
        return {k: to_device(v, dev) for k, v in x.items()}
    return x


# ---------------------------------------------------------------------------------------- hooks
class Side:
    """The hooks of one forward (one model, or one model standing for both sides): each selected
    module's output becomes LayerStats inside its hook; the activation itself is never kept."""

    def __init__(self, model: nn.Module, label: str, candidates: list[str], explicit: set[str], opts: dict):
        self.model, self.label, self.opts = model, label, opts
        self.explicit = explicit  # names that must fire and must give a tensor
        self.need = min_examples(opts["estimator"])
        self.order: list[str] = []  # execution order of the first batch
        self.no_tensor: set[str] = set()
        self.multi: set[str] = set()
        self.stats: dict[str, LayerStats] = {}
        self.calls: dict[str, int] = {}
        self.small: int | None = None
        self.first = True
        self.active = False
        self._thread = threading.get_ident()
        self._hooks = HookSet(self)
        mods = dict(model.named_modules())
        for n in candidates:
            self._hooks.add(self, "_on_layer", n, mods[n])

    def begin(self) -> None:
        self.stats, self.calls, self.small, self.active = {}, {}, None, True

    def end(self) -> None:
        self.active = False
        self.first = False

    def _on_layer(self, name: str, module: nn.Module, output: Any) -> None:
        if not self.active or threading.get_ident() != self._thread:
            return
        calls = self.calls.get(name, 0)
        self.calls[name] = calls + 1
        if self.first and calls == 0:
            self.order.append(name)
        if calls:
            self.multi.add(name)  # the first call of a module in a forward counts
            return
        t = first_tensor(output)
        if t is None:
            if name in self.explicit:
                raise TypeError(f"{self.label} module {name!r} returned no tensor ({type(output).__name__})")
            self.no_tensor.add(name)
            return
        if self.small is not None:
            return  # this batch is skipped: too few examples
        t = batch_first(module, t).detach()
        try:
            n = as_examples(t, self.opts["tokens"], f"{self.label} layer {name!r}").shape[0]
            if n < self.need:
                self.small = n
                return
            self.stats[name] = layer_stats(t, **self.opts)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{self.label} layer {name!r}: {e}") from e

    def close(self) -> None:
        self._hooks.remove()


def candidates(model: nn.Module, spec: Any, which: str) -> tuple[list[str], bool]:
    """(module names to hook, explicit?) for one ``layers_*`` argument."""
    mods = dict(model.named_modules())
    if isinstance(spec, str):
        if spec != "auto":
            raise ValueError(
                f"{which} must be 'auto', a list of module names or a predicate(name, module); got {spec!r} "
                f"(for one module pass [{spec!r}])"
            )
        names = auto_candidates(model)
        if not names:
            raise ValueError(
                f"{which}='auto' found no hookable module (Linear, Conv2d, RNN, ...) in the model"
            )
        return names, False
    if callable(spec):
        names = [n for n, m in mods.items() if spec(n, m)]
        if not names:
            raise ValueError(f"the {which} predicate selected no module")
        return names, False
    if isinstance(spec, torch.Tensor) or not isinstance(spec, Iterable):
        raise TypeError(
            f"{which} must be 'auto', a list of module names or a predicate; got {type(spec).__name__}"
        )
    names = [resolve_name(n, mods, which.replace("layers_", "model_")) for n in spec]
    if not names:
        raise ValueError(f"{which} is empty")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{which} names module(s) {dup} more than once")
    return names, True


def final_names(side: Side, names: list[str], explicit: bool, which: str) -> list[str]:
    if explicit:
        return names
    wanted = set(names)
    out = [n for n in side.order if n in wanted and n not in side.no_tensor]
    if not out:
        raise RuntimeError(
            f"{which}: none of the selected modules ran (and returned a tensor) in the first batch"
        )
    return out


def module_state(model: nn.Module, mode: str | None):
    """What compare changes and restores: per-module training flags, and in train mode the buffers
    (BatchNorm running statistics move in train-mode forwards)."""
    flags = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()] if mode == "train" else []
    return flags, buffers


def restore(state) -> None:
    flags, buffers = state
    for m, was in flags:
        m.training = was
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)


def dist_info(group) -> tuple[bool, int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return False, 1, 0
    return True, dist.get_world_size(group), dist.get_rank(group)


def batch_stats(side: Side, names: list[str], label: str) -> list[LayerStats]:
    missing = [n for n in names if n not in side.stats]
    if missing:
        raise RuntimeError(
            f"{label} module(s) {missing} did not run in this batch's forward (they ran in the first); "
            "compare needs every selected layer in every batch"
        )
    return [side.stats[n] for n in names]


def check_n(st_a, st_b, names_a, names_b, tokens: str) -> None:
    n0 = st_a[0].n
    for sts, names, label in ((st_a, names_a, "model_a"), (st_b, names_b, "model_b")):
        for st, name in zip(sts, names, strict=True):
            if st.n != n0:
                raise ValueError(
                    f"{label} layer {name!r} has {st.n} examples in this batch but model_a layer "
                    f"{names_a[0]!r} has {n0} (tokens={tokens!r}); every layer needs the same examples"
                )
