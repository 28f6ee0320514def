"""The guide side of :class:`fastguide.Guidance`: the frozen guide's forward and its hooks, per call."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ._mapping import batch_first, first_tensor
from ._validate import GROUP_TOKENS, as_examples
from .distributed import all_gather_batch, gather_ints
from .functional import layer_stats


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _masked(t: torch.Tensor, idx: torch.Tensor, shape: tuple[int, int], what: str) -> torch.Tensor:
    """The rows of a (B, T, D) activation at the masked token positions ``idx``, as (n_tokens, D)."""
    if t.dim() != 3 or tuple(t.shape[:2]) != shape:
        raise ValueError(
            f"mask of shape {shape} does not fit {what} of shape {tuple(t.shape)}: a mask needs "
            "(B, T, D) activations on the mask's token grid"
        )
    return t.reshape(shape[0] * shape[1], t.shape[2]).index_select(0, idx.to(t.device))


def as_args(x: Any) -> tuple[tuple, dict]:
    """A model input as call arguments: a tuple is unpacked positionally, a dict as keywords."""
    if isinstance(x, tuple):
        return x, {}
    if isinstance(x, Mapping):
        return (), dict(x)
    return (x,), {}


class _GuideCall:
    """Per-call context of one ``loss()``: what the guide hooks of this Guidance fill in on this thread."""

    __slots__ = (
        "thread",
        "names",
        "stats",
        "batch",
        "n_target",
        "sizes",
        "mask",
        "device",
        "keep_examples",
        "widths",
    )

    def __init__(self, names, n_target, mask, device, keep_examples=False):
        # Compiled code runs on the thread that traced it; the thread check is eager-only.
        self.thread = None if torch.compiler.is_compiling() else threading.get_ident()
        self.names = names
        self.stats: dict[str, Any] = {}
        self.batch: dict[str, int] = {}
        self.n_target = n_target  # this rank's target batch when gathering, else None
        self.sizes: list[int] | None = None
        self.mask = mask  # (token indices, (B, T)) with a mask, else None
        self.device = device
        # All-reduce route (gather=True): keep this rank's activations, neither gathered nor reduced.
        self.keep_examples = keep_examples
        self.widths: dict[str, int] = {}  # per-example feature sizes, recorded before a gather


class GuideMixin:
    """Runs the frozen guide for one ``loss()`` call. Its hooks act only inside that call, on the calling
    thread (a guide shared by two ``Guidance`` objects, also from two threads, is safe), and reduce
    each activation to Gram statistics or features inside the hook."""

    def _on_guide(self, name: str, module: nn.Module, output: Any) -> None:
        call = self._call
        if call is None or name not in call.names:
            return  # a forward of the guide that is not this Guidance's (a shared guide)
        if not torch.compiler.is_compiling() and call.thread != threading.get_ident():
            return
        t = first_tensor(output)
        if t is None:
            raise TypeError(f"guide module {name!r} returned no tensor ({type(output).__name__})")
        if t.requires_grad:
            raise RuntimeError(
                f"guide module {name!r} produced an output that requires grad: the guide must run "
                "frozen under torch.no_grad() with requires_grad_(False) parameters"
            )
        t = batch_first(module, t)
        if self.check_finite and not bool(torch.isfinite(t).all()):
            raise FloatingPointError(f"guide layer {name!r} has non-finite values (NaN or inf)")
        tokens = self.tokens
        if call.mask is not None:
            t, tokens = _masked(t, *call.mask, f"guide layer {name!r}"), "flatten"
        if call.keep_examples:
            call.batch[name] = t.shape[0]
            call.stats[name] = t.detach().clone()  # a copy: later in-place ops of the guide cannot change it
            return
        if call.n_target is not None:  # gathering: agree on every rank's sizes before any activation moves
            if tokens not in GROUP_TOKENS:
                call.widths[name] = as_examples(t, tokens, f"guide layer {name!r}").shape[1]
            t = self._gather_guide(name, t, call)
        call.batch[name] = t.shape[0]
        compiling = torch.compiler.is_compiling()
        if tokens in GROUP_TOKENS:
            # Grouped modes: per-group Gram statistics (compiled code keeps the activation, as below).
            call.stats[name] = (
                t.detach().clone()
                if compiling
                else layer_stats(t, estimator=self.estimator, tokens=tokens, backend=self.backend)
            )
            return
        if compiling or (self.kernel == "linear" and self.route != "gram"):
            y2 = as_examples(t, tokens, f"guide layer {name!r}")
            # Compiled code keeps the examples and forms the Gram inside the loss's custom op: the Gram
            # statistics' CPU path makes host-side choices that torch.compile cannot trace.
            if compiling or self.route == "feature" or y2.shape[1] < y2.shape[0]:
                # Narrower than the batch: the features themselves (n*d) are smaller than a Gram (n^2).
                # A copy, so that later in-place ops of the guide cannot change them.
                call.stats[name] = y2.detach().clone()
                return
        call.stats[name] = layer_stats(
            t,
            estimator=self.estimator,
            kernel=self.kernel,
            sigma=self.sigma,
            tokens=tokens,
            backend=self.backend,
        )

    def _gather_guide(self, name: str, t: torch.Tensor, call: _GuideCall) -> torch.Tensor:
        group = self.process_group
        rank = dist.get_rank(group)
        if call.sizes is None:
            # One small collective for every rank's (target, guide) batch sizes, so that a mismatch on any
            # rank raises on every rank before an activation is gathered (nothing is left pending).
            got = gather_ints([call.n_target, t.shape[0]], call.device, group)
            bad = [r for r, (a, b) in enumerate(got) if a != b]
            if bad:
                detail = ", ".join(f"rank {r}: target {got[r][0]}, guide {got[r][1]}" for r in bad)
                raise ValueError(
                    f"batch-size mismatch at guide layer {name!r} ({detail}); this rank: target "
                    f"{call.n_target}, guide {t.shape[0]}. Feed the guide the same batch as the target"
                )
            call.sizes = [a for a, _ in got]
        elif t.shape[0] != call.sizes[rank]:
            raise ValueError(
                f"batch-size mismatch: guide layer {name!r} has batch size {t.shape[0]} on this rank "
                f"but the target's batch here is {call.sizes[rank]}; feed the guide the same batch as the "
                "target"
            )
        return all_gather_batch(t, group, call.sizes)

    # ------------------------------------------------------------------ guide

    def _run_guide(
        self, g_in: Any, names, n_target: int | None, mask, device: torch.device, keep_examples: bool = False
    ) -> _GuideCall:
        """One frozen guide forward on ``g_in``; returns the call with the statistics of ``names``."""
        self._check_guide_frozen()
        call = _GuideCall(set(names), n_target, mask, device, keep_examples)
        g_args, g_kwargs = as_args(self._to_guide(g_in))
        self._call = call
        try:
            with torch.no_grad(), self._guide_autocast():
                self.guide(*g_args, **g_kwargs)
        finally:
            self._call = None
        return call

    def _guide_device(self) -> torch.device:
        return _model_device(self.guide)

    def _guide_autocast(self):
        if self.guide_dtype is None or self.guide_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self._guide_device().type, dtype=self.guide_dtype)

    def _to_guide(self, x: Any) -> Any:
        dev = self._guide_device()
        if isinstance(x, torch.Tensor):
            return x.to(dev, non_blocking=True) if x.device != dev else x
        if isinstance(x, (tuple, list)):
            return type(x)(self._to_guide(v) for v in x)
        if isinstance(x, Mapping):
            return {k: self._to_guide(v) for k, v in x.items()}
        return x

    def _check_guide_frozen(self) -> None:
        # A train()/eval() call on a parent module could have flipped the guide's mode; restore it.
        if self.guide_mode == "eval" and self.guide.training:
            self.guide.eval()
        elif self.guide_mode == "train" and not self.guide.training:
            self.guide.train()
        for n, p in self.guide.named_parameters():
            if p.requires_grad:
                raise RuntimeError(
                    f"guide parameter {n!r} requires grad: the guide must stay frozen "
                    "(Guidance calls guide.requires_grad_(False); something turned it back on)"
                )
