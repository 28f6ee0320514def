"""Representational guidance: train a target with its task loss plus a CKA alignment loss to a frozen guide.

::

    with fastguide.Guidance(target, guide, layers="auto", estimator="biased") as guidance:
        for x, y in loader:
            logits = target(x)                                    # hooks capture target activations
            loss = F.cross_entropy(logits, y) + guidance.loss(x)  # guide forward + CKA loss
            loss.backward(); opt.step(); opt.zero_grad()

Target activations are captured by forward hooks from the one forward that produced the logits (the
tensors autograd keeps anyway: no copies, no second target forward). The guide runs frozen under
``torch.no_grad()``; each guide activation is reduced to a :class:`fastguide.LayerStats` inside its
hook, so guide activations are freed layer by layer. The loss is ``weight * sum_p (1 - CKA_p)``
(``reduction="sum"``, the paper's) or the mean over pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ._allreduce_cka import allreduce_feature_cka, choose_global_route
from ._capture import Capture, HookSet
from ._guide_side import GuideMixin, _GuideCall, _model_device, as_args
from ._history import HistoryMixin
from ._mapping import (
    AUTO_TYPES,
    auto_candidates,
    auto_mapping,
    auto_pairs,
    explicit_pairs,
    first_tensor,
    make_mapping,
)
from ._schedule import ScheduleMixin, _count_loss_call, eager_only, prepare_eager_only
from ._target_side import TargetMixin, mask_targets
from ._validate import as_examples
from ._validate import check_options as _check_options
from .distributed import all_gather_batch, gather_ints, is_distributed
from .functional import cka_pairs

# align and AlignHistory live in fastguide/align.py; __getattr__ below keeps them importable from here.
__all__ = ["Guidance", "AUTO_TYPES", "auto_pairs", "first_tensor"]

_MULTI_CALL = ("warn", "error", "first", "last")


@eager_only(
    reason="fastguide.Guidance resolves layers='auto' in eager code; before compiling with fullgraph=True "
    "pass explicit layers, example=<input>, or run one eager step"
)
def _resolve_in_eager(guidance: Guidance, t_order: list[str], g_in: Any) -> None:
    guidance._commit_mapping(guidance._auto_mapping(t_order, g_in))


class Guidance(ScheduleMixin, HistoryMixin, TargetMixin, GuideMixin, nn.Module):
    """Representational-guidance wrapper: CKA alignment of ``target`` layers to a frozen ``guide``.

    Args:
        target: the network being trained. Its forward is unchanged; hooks only read outputs.
        guide: the frozen guide (trained or untrained). ``requires_grad_(False)`` is applied to it.
        layers: ``"auto"`` (the paper's module selection and evenly spaced mapping, resolved from
            execution order on the first step, or at construction when ``example`` is given; inside
            Hugging Face models, the transformer blocks' outputs, see ``docs/huggingface.md``), a
            ``{target_name: guide_name}`` dict, or a list of ``(target_name, guide_name)`` pairs.
        weight: float, or a callable ``weight(step) -> float`` (a weight schedule).

    Keyword-only options:
        estimator, kernel, sigma, backend, tokens, route: as in :func:`fastguide.cka_pairs` and
            :func:`fastguide.layer_stats`. The default estimator is ``"unbiased"``; ``"biased"`` gives
            the paper's loss. ``route="auto"`` keeps a guide layer narrower than the batch (d < n) as its
            (n, d) features instead of an n x n Gram, so the loss may take the feature route.
        reduction: ``"sum"`` (the paper's, default) or ``"mean"`` over pairs.
        every: guide every ``every`` schedule steps (other steps return a zero loss, capture nothing).
        until: guide only for schedule steps ``< until`` (``None``: always).
        accumulate: training ``loss()`` calls per schedule step (gradient accumulation: micro-batches
            per optimizer step). Default 1.
        step_on: ``"loss"`` (default): training ``loss()`` calls advance the schedule (every
            ``accumulate``-th). ``"optimizer"``: only :meth:`optimizer_step` does (called by the hook
            :meth:`attach_optimizer` installs, by the Lightning and Hugging Face integrations, or by you).
        multi_call: a hooked target module that runs several times in one forward: ``"warn"`` (default;
            uses the last call and warns once), ``"error"`` (raise in ``loss()``), ``"first"``, ``"last"``.
        guide_mode: ``"eval"`` (default), ``"train"`` (BatchNorm uses batch statistics, dropout active)
            or ``None`` (leave the guide's mode alone).
        guide_dtype: e.g. ``torch.bfloat16`` to run the guide under autocast in that dtype.
        guide_device: device to run the guide on (the guide is moved there); default: where it is.
        check_finite: check every captured activation for NaN/inf and raise naming the layer
            (a host sync per layer; off by default).
        clone_inplace: clone target activations in the hook (use when an in-place op such as
            ``ReLU(inplace=True)`` modifies a hooked output); otherwise such a change raises (eager).
        example: an input to resolve ``layers="auto"`` at construction (one ``no_grad`` forward of
            each network; target in its current mode, state restored).
        gather: under ``torch.distributed`` (DDP/FSDP), gather every rank's activations before the
            Grams so that CKA covers the global batch (:func:`fastguide.distributed.all_gather_batch`:
            target activations with autograd, guide activations in the guide's hooks; ranks may hold
            different batch sizes). Every rank then computes the same loss, and after DDP's gradient
            averaging the parameters get the gradient of that global-batch loss. Costs per step one
            small all-gather of batch sizes, one all-gather per hooked layer (target and guide), one
            all-reduce of the gathered gradient per target layer in the backward, guide memory of one
            *global* activation, and the Grams of the global batch on every rank. The sizes are agreed
            before any activation is gathered, so a batch-size mismatch raises on every rank and leaves
            no collective or gathered graph behind. A no-op without a process group of two or more ranks.
            After the first gathered step, layers narrow enough (linear kernel, ``tokens`` other than
            ``"positions"``) switch to the exact all-reduce route
            (:func:`fastguide._allreduce_cka.allreduce_feature_cka`: X^T Y, X^T X, X^T 1 summed over ranks,
            no activation gathered) when it sends fewer bytes (docs/distributed.md); every rank agrees
            on the choice in one small collective. ``tokens="structure"`` exchanges nothing: each
            sample's structure CKA needs only its own tokens.
        process_group: the group to gather over with ``gather=True`` (default: the world).
        record_every: record the per-pair CKA of every ``record_every``-th schedule step (guided steps
            only) into :attr:`history` (a :class:`fastguide.CKAHistory`: curves, JSON), with no host
            sync in the step: the detached device vector is kept and copied when the history is read.
            Checkpointed with the state. ``None`` (default): no history.

    A step is: run ``target(x)``, then ``guidance.loss(x)``. Under ``torch.no_grad()`` /
    ``torch.inference_mode()`` (evaluation) forwards are captured separately and ``loss()`` computes
    the alignment for logging, whatever the schedule, without advancing it. ``Guidance`` is an
    ``nn.Module`` without parameters (it does not register ``target`` or ``guide``): held by a model
    or LightningModule, its :meth:`state_dict` (step, schedule, resolved pairs) is checkpointed with it.
    A failed ``loss()`` changes no state. Copies (``copy.deepcopy``, pickling) of a hooked module or of
    a ``Guidance`` carry no live hooks. The hooked outputs of the last evaluation forward stay
    referenced until the next forward or ``loss()`` (:meth:`remove_hooks` drops them).

    ``torch.compile``: a compiled target, a compiled step with graph breaks (the schedule is counted
    in eager code at a graph break) and ``fullgraph=True`` over target forward + ``loss`` (needs
    ``step_on="optimizer"`` and resolved layers) all work; the schedule enters compiled code as a bool
    and a weight tensor, so moving steps do not recompile. Compiled code keeps guide layers as
    (detached) examples and forms their Grams inside the loss's custom op. The in-place check is
    eager-only (versions are symbolic under compile): in compiled code a hooked output rewritten in
    place is seen rewritten, so pass ``clone_inplace=True`` there, or check one eager step.
    """

    def __init__(
        self,
        target: nn.Module,
        guide: nn.Module,
        layers: str | Mapping[str, str] | Iterable[tuple[str, str]] = "auto",
        weight: float | Callable[[int], float] = 1.0,
        *,
        estimator: str = "unbiased",
        kernel: str = "linear",
        sigma: float | None = None,
        reduction: str = "sum",
        every: int = 1,
        until: int | None = None,
        accumulate: int = 1,
        step_on: str = "loss",
        multi_call: str = "warn",
        guide_mode: str | None = "eval",
        guide_dtype: torch.dtype | None = None,
        guide_device: torch.device | str | None = None,
        check_finite: bool = False,
        clone_inplace: bool = False,
        tokens: str = "flatten",
        backend: str = "auto",
        example: Any = None,
        gather: bool = False,
        process_group: Any = None,
        route: str = "auto",
        record_every: int | None = None,
    ):
        super().__init__()
        prepare_eager_only()
        if not isinstance(target, nn.Module) or not isinstance(guide, nn.Module):
            raise TypeError("target and guide must be nn.Module instances")
        if target is guide:
            raise ValueError("target and guide must be different modules")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean'; got {reduction!r}")
        for name, v in (("every", every), ("accumulate", accumulate)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        if until is not None and (not isinstance(until, int) or until < 0):
            raise ValueError(f"until must be None or a non-negative int; got {until!r}")
        if step_on not in ("loss", "optimizer"):
            raise ValueError(f"step_on must be 'loss' or 'optimizer'; got {step_on!r}")
        if multi_call not in _MULTI_CALL:
            raise ValueError(
                f"multi_call must be one of {', '.join(map(repr, _MULTI_CALL))}; got {multi_call!r}"
            )
        if guide_mode not in ("eval", "train", None):
            raise ValueError(f"guide_mode must be 'eval', 'train' or None; got {guide_mode!r}")
        if guide_dtype is not None and guide_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(
                f"guide_dtype must be None, torch.bfloat16, torch.float16 or torch.float32; got {guide_dtype}"
            )
        if not (callable(weight) or isinstance(weight, (int, float))) or isinstance(weight, bool):
            raise TypeError(
                f"weight must be a number or a callable weight(step); got {type(weight).__name__}"
            )
        _check_options(estimator, kernel, backend, tokens, route, sigma)
        if route == "feature" and kernel != "linear":
            raise ValueError("route='feature' needs kernel='linear'")
        if not isinstance(gather, bool):
            raise TypeError(f"gather must be a bool; got {type(gather).__name__}")
        target_params = {id(p) for p in target.parameters()}
        shared = [n for n, p in guide.named_parameters() if id(p) in target_params]
        if shared:
            raise ValueError(
                f"guide shares parameters with the target ({', '.join(shared[:3])}...): freezing the guide "
                "would freeze the target; pass a separate copy (e.g. copy.deepcopy) as the guide"
            )

        # Plain attributes, not submodules: the model holding this Guidance owns target and guide.
        self.__dict__["target"] = target
        self.__dict__["guide"] = guide
        self.weight, self.estimator, self.kernel, self.sigma = weight, estimator, kernel, sigma
        self.reduction, self.every, self.until, self.accumulate = reduction, every, until, accumulate
        self.step_on, self.multi_call, self.guide_mode, self.guide_dtype = (
            step_on,
            multi_call,
            guide_mode,
            guide_dtype,
        )
        self.check_finite, self.clone_inplace, self.tokens, self.backend = (
            check_finite,
            clone_inplace,
            tokens,
            backend,
        )
        self.gather, self.route, self.process_group = gather, route, process_group
        self.guide_device = None if guide_device is None else torch.device(guide_device)
        self._step = 0
        self._micro = 0  # training loss() calls counted into the current accumulation block
        self._last_cka: torch.Tensor | None = None
        self._init_history(record_every)
        self._closed = False
        self._refresh()

        if guide_device is not None:
            guide.to(guide_device)
        guide.requires_grad_(False)
        if guide_mode == "eval":
            guide.eval()
        elif guide_mode == "train":
            guide.train()

        self._t_modules = dict(target.named_modules())
        self._g_modules = dict(guide.named_modules())
        self._init_runtime()
        self._mapping: tuple[list[str], list[str], list[tuple[int, int]]] | None = None
        if isinstance(layers, str):
            if layers != "auto":
                raise ValueError(
                    f"layers must be 'auto', a {{target: guide}} dict or a list of pairs; got {layers!r}"
                )
            self._candidates = auto_candidates(target)
            if not self._candidates:
                raise ValueError(
                    f"layers='auto' found no module of types {[t.__name__ for t in AUTO_TYPES]} in the target"
                )
            if not auto_candidates(guide):
                raise ValueError(
                    f"layers='auto' found no module of types {[t.__name__ for t in AUTO_TYPES]} in the guide"
                )
            self._install_hooks()
            if example is not None:
                self._resolve_with_example(example)
        else:
            self._candidates = []
            self._mapping = make_mapping(explicit_pairs(layers, self._t_modules, self._g_modules))
            self._install_hooks()

    def _init_runtime(self) -> None:
        """Hooks, captures and the per-call context: never copied or pickled."""
        self._hooks = HookSet(self)
        self._opt_hooks = HookSet(self)
        self._hooks_on = False
        # name -> (activation, version at capture or None, calls since the forward began)
        self._t_acts: dict[str, tuple[torch.Tensor, int | None, int]] = {}  # grad-enabled forwards
        self._e_acts: dict[str, tuple[torch.Tensor, int | None, int]] = {}  # no_grad / inference_mode
        self._call: _GuideCall | None = None
        self._warned: set[str] = set()
        # gather=True: "allreduce" or "gather", decided after the first gathered step (None until then).
        self._route_choice: str | None = None

    # ------------------------------------------------------------------ mapping and hooks

    def _install_hooks(self) -> None:
        self._hooks.remove()
        self._hooks.add(self, "_on_root", "", self.target, pre=True)
        names = self._candidates if self._mapping is None else self._mapping[0]
        for n in names:
            self._hooks.add(self, "_on_target", n, self._t_modules[n])
        if self._mapping is not None:
            for n in self._mapping[1]:
                self._hooks.add(self, "_on_guide", n, self._g_modules[n])
        self._hooks_on = True

    def _commit_mapping(self, mapping) -> None:
        self._mapping = mapping
        self._candidates = []
        if self._hooks_on:
            self._install_hooks()
        keep = set(mapping[0])
        for store in (self._t_acts, self._e_acts):
            for n in [n for n in store if n not in keep]:
                del store[n]

    def _guide_order(self, g_in: Any) -> list[str]:
        """Execution order of the guide's auto modules (one no_grad guide forward)."""
        args, kwargs = as_args(self._to_guide(g_in))
        with Capture(self.guide, auto_candidates(self.guide), store=False) as cap:
            with torch.no_grad(), self._guide_autocast():
                self.guide(*args, **kwargs)
        return cap.order

    def _auto_mapping(self, t_order: list[str], g_in: Any):
        return auto_mapping(t_order, self._guide_order(g_in))

    def _resolve_with_example(self, example: Any) -> None:
        args, kwargs = as_args(example)
        # BatchNorm running statistics must not move because of the probe (no_grad: nothing is captured).
        buffers = [(b, b.clone()) for b in self.target.buffers()]
        try:
            with Capture(self.target, self._candidates, store=False) as cap, torch.no_grad():
                self.target(*args, **kwargs)
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            self._e_acts.clear()
        self._commit_mapping(self._auto_mapping(cap.order, example))

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """The (target_name, guide_name) pairs, in the order of :attr:`last_cka`.

        With ``layers="auto"`` the mapping follows execution order and is resolved on the first
        step (or at construction when ``example`` was given); before that this raises.
        """
        if self._mapping is None:
            raise RuntimeError(
                "layers='auto' is resolved from execution order on the first loss() call; run one step "
                "or pass example=<input> to Guidance to resolve it now"
            )
        t_names, g_names, idx = self._mapping
        return [(t_names[i], g_names[j]) for i, j in idx]

    @property
    def _resolved(self) -> bool:
        return self._mapping is not None

    @property
    def last_cka(self) -> torch.Tensor | None:
        """Per-pair CKA of the last ``loss()`` call (training or evaluation), detached (no host sync
        until you read it); None before."""
        return self._last_cka

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for k in ("_hooks", "_opt_hooks", "_hooks_on", "_t_acts", "_e_acts", "_call", "_warned"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # A copy is not hooked: call register_hooks() to guide the copied target.
        self._init_runtime()

    # ------------------------------------------------------------------ step

    def loss(
        self, x: Any = None, *, guide_input: Any = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Alignment loss of this step: ``weight * sum_p (1 - CKA_p)`` (or the mean over pairs).

        Call after the target forward of this step. ``x`` (or ``guide_input``) is the guide's input;
        it must hold the same examples as the target's batch. ``mask`` (B, T), with ``tokens="samples"``:
        only the tokens where it is nonzero (e.g. an attention mask) are examples, in target and guide
        (a host sync for their count). Training steps outside the schedule (``every``/``until``) return a
        zero tensor. A training call advances the schedule (``step_on="loss"``); under ``no_grad`` the
        alignment is computed for logging, whatever the schedule, and nothing advances. A call that
        raises changes no state.
        """
        if self._closed:
            raise RuntimeError("this Guidance was closed")
        if not self._hooks_on:
            raise RuntimeError("this Guidance's hooks were removed: call register_hooks() first")
        g_in = guide_input if guide_input is not None else x
        if g_in is None:
            raise ValueError("loss() needs the guide's input: loss(x) or loss(guide_input=...)")
        train = torch.is_grad_enabled()
        compiling = torch.compiler.is_compiling()
        if train and not self._now_active:
            self._t_acts.clear()
            self._finish(train)
            return torch.zeros((), device=_model_device(self.target))
        mapping, pending = self._mapping, None
        if mapping is None:
            store = self._t_acts if train else (self._e_acts or self._t_acts)
            if not store:
                raise RuntimeError(
                    "no target module fired since the last loss() call: run target(x) before guidance.loss(x)"
                )
            if compiling:
                _resolve_in_eager(self, list(store), g_in)
                mapping = self._mapping
            else:
                # Resolved now, committed only if this call succeeds (the guide hooks are temporary).
                mapping = self._auto_mapping(list(store), g_in)
                pending = HookSet(self)
                for n in mapping[1]:
                    pending.add(self, "_on_guide", n, self._g_modules[n])
        try:
            acts = self._take(mapping[0], train, compiling)
            value, ckas = self._compute(mapping, acts, g_in, mask)
        finally:
            if pending is not None:
                pending.remove()
        if pending is not None:
            self._commit_mapping(mapping)
        if train:
            self._t_acts.clear()
        elif self._e_acts:
            self._e_acts.clear()
        self._last_cka = ckas.detach()
        if train:
            self._note_train_cka(self._last_cka)
        self._finish(train)
        return value

    def forward(
        self, x: Any = None, *, guide_input: Any = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``guidance(x)`` is :meth:`loss`."""
        return self.loss(x, guide_input=guide_input, mask=mask)

    def _finish(self, train: bool) -> None:
        if train and self.step_on == "loss":
            _count_loss_call(self)  # eager code always (also when called from a graph break's resume)

    def _compute(
        self, mapping, acts: dict, g_in: Any, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t_names, g_names, pair_idx = mapping
        xs = [acts[n] for n in t_names]
        tokens, idx = self.tokens, None
        if mask is not None:
            xs, idx = mask_targets(xs, t_names, mask, tokens)
            tokens = "flatten"
        # gather=True under torch.distributed: "gather" the activations, or "allreduce" cross products
        # (decided once, after the first gathered step), or "local" (per-sample structure CKA).
        route = self._global_route(tokens) if self.gather and is_distributed(self.process_group) else None
        n_local = None
        if route == "gather":
            local = {x.shape[0] for x in xs}
            if len(local) != 1:
                raise ValueError(f"target layers have different batch sizes {sorted(local)}; cannot gather")
            n_local = xs[0].shape[0]
        call = self._run_guide(g_in, g_names, n_local, idx, xs[0].device, keep_examples=route == "allreduce")
        missing = [n for n in g_names if n not in call.stats]
        if missing:
            raise RuntimeError(f"guide module(s) {missing} did not fire during the guide forward")
        if route == "allreduce":
            dev = xs[0].device
            ys = [call.stats[n].to(dev) for n in g_names]
            ckas = allreduce_feature_cka(
                xs, ys, pair_idx, estimator=self.estimator, tokens=tokens, group=self.process_group
            )
            return self._weighted(ckas), ckas
        if route == "gather":
            if self._route_choice is None and not torch.compiler.is_compiling():
                self._route_choice = self._choose_route(xs, g_names, pair_idx, tokens, call)
            xs = [all_gather_batch(x, self.process_group, call.sizes) for x in xs]
        for i, j in pair_idx:
            n_t, n_g = xs[i].shape[0], call.batch[g_names[j]]
            if n_t != n_g:
                raise ValueError(
                    f"batch-size mismatch: target layer {t_names[i]!r} has batch size {n_t} but guide "
                    f"layer {g_names[j]!r} has {n_g}; feed the guide the same batch as the target"
                )
        dev = xs[0].device
        ys = [call.stats[n].to(dev) for n in g_names]
        # Pairs whose guide layer was kept as features and pairs with Gram statistics go to one call
        # each: a call with any precomputed Gram statistics runs on the Gram route.
        groups: dict[bool, list[int]] = {}
        for p, (_, j) in enumerate(pair_idx):
            groups.setdefault(isinstance(ys[j], torch.Tensor), []).append(p)
        parts, order = [], []
        for feats, ps in groups.items():
            parts.append(
                cka_pairs(
                    xs,
                    ys,
                    [pair_idx[p] for p in ps],
                    estimator=self.estimator,
                    kernel=self.kernel,
                    sigma=self.sigma,
                    backend=self.backend,
                    tokens=tokens,
                    route=self.route if feats else "gram",
                )
            )
            order.extend(ps)
        ckas = parts[0] if len(parts) == 1 else torch.cat(parts)
        if order != sorted(order):
            ckas = ckas[torch.tensor(order, device=ckas.device).argsort()]
        return self._weighted(ckas), ckas

    def _weighted(self, ckas: torch.Tensor) -> torch.Tensor:
        per_pair = 1.0 - ckas
        value = per_pair.sum() if self.reduction == "sum" else per_pair.mean()
        w = self._now_weight
        return value * (w.to(value.dtype) if isinstance(w, torch.Tensor) else w)

    def _global_route(self, tokens: str) -> str:
        if tokens == "structure":
            return "local"  # per-sample CKAs need no other rank's examples
        return self._route_choice or "gather"

    def _choose_route(self, xs, g_names, pair_idx, tokens: str, call) -> str:
        """All-reduced cross products or gathered activations, by bytes on the wire (the same on every
        rank: decided from the agreed batch sizes, then agreed in one small collective)."""
        if tokens in ("positions",) or len(call.widths) != len(g_names):
            return "gather"
        views = [as_examples(x, tokens, "target layer") for x in xs]
        per_row = views[0].shape[0] // max(xs[0].shape[0], 1)
        world = len(call.sizes)
        mine = choose_global_route(
            [v.shape[1] for v in views],
            [call.widths[n] for n in g_names],
            pair_idx,
            max(call.sizes) * per_row,
            world,
            self.estimator,
            self.kernel,
            tokens,
        )
        votes = gather_ints([int(mine == "allreduce")], xs[0].device, self.process_group)
        return "allreduce" if all(v[0] == 1 for v in votes) else "gather"

    # ------------------------------------------------------------------ lifetime

    def remove_hooks(self) -> None:
        """Remove every hook (state stays; :meth:`register_hooks` puts them back). Idempotent."""
        self._hooks.remove()
        self._hooks_on = False
        self._t_acts.clear()
        self._e_acts.clear()

    def register_hooks(self) -> None:
        """(Re-)register the hooks on ``target`` and ``guide`` (after :meth:`remove_hooks`, or on a copy
        of a Guidance, e.g. after ``copy.deepcopy`` or unpickling). Idempotent."""
        if self._closed:
            raise RuntimeError("this Guidance was closed")
        if not self._hooks_on:
            self._install_hooks()

    def close(self) -> None:
        """Remove every hook (and the optimizer hooks) and drop captured activations. Idempotent."""
        self.remove_hooks()
        self._opt_hooks.remove()
        self._closed = True

    def __enter__(self) -> Guidance:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def extra_repr(self) -> str:
        mapping = (
            f"{len(self._mapping[2])} pairs" if self._mapping is not None else "layers='auto' (unresolved)"
        )
        return (
            f"{mapping}, estimator={self.estimator!r}, kernel={self.kernel!r}, reduction={self.reduction!r}, "
            f"every={self.every}, until={self.until}, step={self._step}"
            + (f", accumulate={self.accumulate}" if self.accumulate != 1 else "")
            + (f", step_on={self.step_on!r}" if self.step_on != "loss" else "")
            + (", gather=True" if self.gather else "")
        )


def __getattr__(name: str):
    # fastguide.guidance.align / AlignHistory (their old home) without an import cycle: align.py
    # imports Guidance from here, so they are looked up on first use.
    if name == "align":
        from .align import align

        return align
    if name == "AlignHistory":
        from .align import AlignHistory

        return AlignHistory
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
