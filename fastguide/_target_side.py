"""The target side of :class:`fastguide.Guidance`: hooks that capture the target's activations."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ._guide_side import _masked
from ._mapping import batch_first, first_tensor
from ._schedule import eager_only


def _in_backward() -> bool:
    # Activation checkpointing re-runs forwards inside the backward pass; those are not this step's.
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


@eager_only()
def _warn(msg: str) -> None:
    warnings.warn(msg, stacklevel=4)


def mask_targets(
    xs: list[torch.Tensor], t_names: list[str], mask: Any, tokens: str
) -> tuple[list[torch.Tensor], tuple[torch.Tensor, tuple[int, int]]]:
    """``loss(mask=...)``: the target activations at the mask's nonzero tokens, and the (token index,
    (B, T)) that the guide side applies to its activations."""
    if tokens != "samples":
        raise ValueError(f"mask needs tokens='samples' (one example per token); got tokens={tokens!r}")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(
            f"mask must be a (B, T) tensor; got {type(mask).__name__} {getattr(mask, 'shape', '')}"
        )
    idx = (mask.reshape(-1).nonzero().squeeze(1), tuple(mask.shape))
    return [_masked(x, *idx, f"target layer {n!r}") for x, n in zip(xs, t_names, strict=True)], idx


class TargetMixin:
    """Captures target activations (the tensors autograd keeps anyway) from grad-enabled forwards and,
    separately, from evaluation forwards; validates them for one ``loss()`` call."""

    # ------------------------------------------------------------------ hooks

    def _on_root(self, name: str, module: nn.Module, _args: Any) -> None:
        # A new forward of the target: captures of an earlier forward of the same kind are replaced.
        (self._t_acts if torch.is_grad_enabled() else self._e_acts).clear()

    def _on_target(self, name: str, module: nn.Module, output: Any) -> None:
        compiling = torch.compiler.is_compiling()
        if torch.is_grad_enabled():
            # Compiled code captures on every step: reading the schedule there would guard on the step.
            if not compiling and (not self._now_active or _in_backward()):
                return
            store = self._t_acts
        else:
            store = self._e_acts
        prev = store.get(name)
        if prev is not None and self.multi_call == "first":
            store[name] = (prev[0], prev[1], prev[2] + 1)
            return
        t = first_tensor(output)
        if t is None:
            raise TypeError(f"target module {name!r} returned no tensor ({type(output).__name__})")
        t = batch_first(module, t)
        if self.clone_inplace:
            t = t.clone()
        # Under compile the version is symbolic (data-dependent) and of the traced tensor: not recorded.
        version = None if compiling or t.is_inference() else t._version
        store[name] = (t, version, 1 if prev is None else prev[2] + 1)

    def _take(self, t_names: list[str], train: bool, compiling: bool) -> dict:
        """This call's captures (validated in eager mode); nothing is consumed here."""
        store = self._t_acts if train else (self._e_acts or self._t_acts)
        missing = [n for n in t_names if n not in store]
        if missing:
            how = "with grad enabled " if train else ""
            raise RuntimeError(
                f"target module(s) {missing} did not fire since the last loss() call: run target(x) {how}"
                "before guidance.loss(x)"
                + (
                    " (forwards under torch.no_grad() are evaluation forwards)"
                    if train and self._e_acts
                    else ""
                )
            )
        acts = {}
        multi = []
        for n in t_names:
            t, version, calls = store[n]
            if calls > 1:
                multi.append((n, calls))
            if not compiling and version is not None and t._version != version:
                raise RuntimeError(
                    f"the output of target module {n!r} was modified in place after the hook captured it "
                    "(e.g. by ReLU(inplace=True)); CKA would use the wrong values. Make that op out-of-place "
                    "or pass clone_inplace=True"
                )
            if self.check_finite and not bool(torch.isfinite(t).all()):
                raise FloatingPointError(f"target layer {n!r} has non-finite values (NaN or inf)")
            acts[n] = t
        if multi and self.multi_call in ("warn", "error"):
            what = ", ".join(f"{n!r} ({c} calls)" for n, c in multi)
            if self.multi_call == "error":
                raise RuntimeError(
                    f"target module(s) {what} ran several times in one forward; CKA needs one activation "
                    "per module: pass multi_call='first' or 'last' to choose one"
                )
            new = [n for n, _ in multi if n not in self._warned]
            if new:
                self._warned.update(new)
                _warn(
                    f"fastguide.Guidance: target module(s) {what} ran several times in one forward; the "
                    "last call is used (multi_call='first'|'last' silences this, 'error' raises)"
                )
        return acts
