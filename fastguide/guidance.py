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

import dataclasses
import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ._validate import as_examples
from ._validate import check_options as _check_options
from .distributed import all_gather_batch, batch_sizes, is_distributed

__all__ = ["Guidance", "align", "AlignHistory", "AUTO_TYPES", "auto_pairs", "first_tensor"]

#: Module types that ``layers="auto"`` hooks (the paper's code), in execution order; the last is dropped.
AUTO_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv2d,
    nn.Linear,
    nn.AdaptiveAvgPool2d,
    nn.RNN,
    nn.LSTM,
    nn.GRU,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.LayerNorm,
    nn.MultiheadAttention,
)

# Modules whose 3-D output is (T, B, D) unless they were built with batch_first=True.
_SEQ_FIRST_TYPES = (nn.RNNBase, nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def first_tensor(out: Any) -> torch.Tensor | None:
    """The first tensor in a module output: the tensor itself, the first tensor of a tuple/list
    (RNN ``(output, h)``, attention ``(out, weights)``), of a mapping or of a dataclass (Hugging Face
    model outputs). ``None`` if there is none."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, nn.utils.rnn.PackedSequence):
        raise TypeError(
            "PackedSequence outputs are not supported: their data rows are tokens of varying "
            "sequences, not examples; hook a module that returns a padded (B, T, D) tensor"
        )
    if isinstance(out, Mapping):
        items: Iterable = out.values()
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        items = (getattr(out, f.name) for f in dataclasses.fields(out))
    elif isinstance(out, (tuple, list)):
        items = out
    else:
        return None
    for item in items:
        t = first_tensor(item)
        if t is not None:
            return t
    return None


def _batch_first(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """(T, B, D) sequence outputs of modules built without ``batch_first`` become (B, T, D) views."""
    if isinstance(module, _SEQ_FIRST_TYPES) and not getattr(module, "batch_first", False) and t.dim() == 3:
        return t.transpose(0, 1)
    return t


def auto_pairs(n_target: int, n_guide: int) -> list[tuple[int, int]]:
    """Evenly spaced one-to-one mapping of the shallower network's layers over the deeper one's.

    Layer ``i`` of the shallower network maps to ``round(i * (N_deep - 1) / (N_shallow - 1))`` of the
    deeper one (first and last always paired); every pair appears once. Returns (target, guide) indices.
    """
    if n_target < 1 or n_guide < 1:
        raise ValueError(f"need at least one layer on each side; got {n_target} target, {n_guide} guide")
    shallow, deep = min(n_target, n_guide), max(n_target, n_guide)
    if shallow == 1:
        mapped = [0]
    else:
        # Python's round() is round-half-even; floor(x + 0.5) is the usual half-up rounding.
        mapped = [int(math.floor(i * (deep - 1) / (shallow - 1) + 0.5)) for i in range(shallow)]
    if n_target <= n_guide:
        return [(i, j) for i, j in enumerate(mapped)]
    return [(i, j) for j, i in enumerate(mapped)]


def _resolve_name(model: nn.Module, name: str, modules: dict[str, nn.Module], which: str) -> str:
    if name in modules:
        return name
    # DDP / FSDP / torch.compile wrappers prefix names; accept the unwrapped name too.
    for prefix in ("module.", "_orig_mod.", "_fsdp_wrapped_module."):
        if prefix + name in modules:
            return prefix + name
    close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown {which} module name {name!r} in layers{hint}")


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


class Guidance:
    """Representational-guidance wrapper: CKA alignment of ``target`` layers to a frozen ``guide``.

    Args:
        target: the network being trained. Its forward is unchanged; hooks only read outputs.
        guide: the frozen guide (trained or untrained). ``requires_grad_(False)`` is applied to it.
        layers: ``"auto"`` (the paper's module selection and evenly spaced mapping, resolved from
            execution order on the first step, or at construction when ``example`` is given), a
            ``{target_name: guide_name}`` dict, or a list of ``(target_name, guide_name)`` pairs.
        weight: float, or a callable ``weight(step) -> float`` (a weight schedule).
        estimator, kernel, sigma, backend, tokens: passed to :func:`fastguide.cka_pairs` and
            :func:`fastguide.layer_stats`. The default estimator is ``"unbiased"``; ``"biased"`` gives
            the paper's loss.
        reduction: ``"sum"`` (the paper's, default) or ``"mean"`` over pairs.
        every: guide every ``every`` steps (other steps return a zero loss and capture nothing).
        until: guide only for steps ``< until`` (``None``: always).
        guide_mode: ``"eval"`` (default), ``"train"`` (BatchNorm uses batch statistics, dropout active)
            or ``None`` (leave the guide's mode alone).
        guide_dtype: e.g. ``torch.bfloat16`` to run the guide under autocast in that dtype.
        guide_device: device to run the guide on (the guide is moved there); default: where it is.
        check_finite: check every captured activation for NaN/inf and raise naming the layer
            (a host sync per layer; off by default).
        clone_inplace: clone target activations in the hook (use when an in-place op such as
            ``ReLU(inplace=True)`` modifies a hooked output); otherwise such a change raises.
        example: an input to resolve ``layers="auto"`` at construction (one ``no_grad`` forward of
            each network; target in its current mode, state restored).
        gather: under ``torch.distributed`` (DDP/FSDP), gather every rank's activations before the
            Grams so that CKA covers the global batch (:func:`fastguide.distributed.all_gather_batch`:
            target activations with autograd, guide activations in the guide's hooks; ranks may
            hold different batch sizes). Every rank then computes the same loss, and after DDP's gradient
            averaging the parameters get the gradient of that global-batch loss (tested with DDP on
            Gloo; FSDP's default gradient reduction averages the same way). Costs per
            step one all-gather per hooked layer (target and guide), one all-reduce of the gathered
            gradient per target layer in the backward, guide memory of one *global* activation, and on
            every rank the Grams of the global batch (world_size^2 times the local Gram flops).
            A no-op without an initialised process group of two or more ranks. Default ``False``: each
            rank's loss uses its local batch.
        process_group: the group to gather over with ``gather=True`` (default: the world).
        route: what the guide's hooks keep of a layer (linear kernel). ``"auto"`` (default): the layer's
            examples matrix itself (a detached (n, d) copy) when it is narrower than the batch (d < n,
            e.g. token-level layers with ``tokens="samples"``), so that memory is n*d instead of an n x n
            Gram and the loss may take the feature route (chosen by counted flops, as in
            :func:`fastguide.cka_pairs`); otherwise the n x n Gram statistics. ``"gram"``: always the
            Gram statistics. ``"feature"``: always the features, and the loss on the feature route.

    A step is one ``loss()`` call: run ``target(x)``, then ``guidance.loss(x)``. ``loss(x)`` feeds
    ``x`` to the guide (a tuple is unpacked as positional arguments, a dict as keyword arguments,
    ``guide_input=`` overrides). Forwards under ``torch.no_grad()`` (evaluation) are not captured.
    """

    def __init__(
        self,
        target: nn.Module,
        guide: nn.Module,
        layers: str | Mapping[str, str] | Iterable[tuple[str, str]] = "auto",
        weight: float | Callable[[int], float] = 1.0,
        estimator: str = "unbiased",
        kernel: str = "linear",
        sigma: float | None = None,
        reduction: str = "sum",
        every: int = 1,
        until: int | None = None,
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
    ):
        if not isinstance(target, nn.Module) or not isinstance(guide, nn.Module):
            raise TypeError("target and guide must be nn.Module instances")
        if target is guide:
            raise ValueError("target and guide must be different modules")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean'; got {reduction!r}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int; got {every!r}")
        if until is not None and (not isinstance(until, int) or until < 0):
            raise ValueError(f"until must be None or a non-negative int; got {until!r}")
        if guide_mode not in ("eval", "train", None):
            raise ValueError(f"guide_mode must be 'eval', 'train' or None; got {guide_mode!r}")
        if guide_dtype is not None and guide_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(
                f"guide_dtype must be None, torch.bfloat16, torch.float16 or torch.float32; got {guide_dtype}"
            )
        if not (callable(weight) or isinstance(weight, (int, float))):
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

        self.target = target
        self.guide = guide
        self.weight = weight
        self.estimator = estimator
        self.kernel = kernel
        self.sigma = sigma
        self.reduction = reduction
        self.every = every
        self.until = until
        self.guide_mode = guide_mode
        self.guide_dtype = guide_dtype
        self.check_finite = check_finite
        self.clone_inplace = clone_inplace
        self.tokens = tokens
        self.backend = backend
        self.gather = gather
        self.route = route
        self.process_group = process_group
        # Every rank's batch size for this step's gather (set in loss() before the guide forward).
        self._sizes: list[int] | None = None
        self.step = 0
        self._last_cka: torch.Tensor | None = None
        self._closed = False

        if guide_device is not None:
            guide.to(guide_device)
        guide.requires_grad_(False)
        if guide_mode == "eval":
            guide.eval()
        elif guide_mode == "train":
            guide.train()

        self._t_modules = dict(target.named_modules())
        self._g_modules = dict(guide.named_modules())
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # name -> (activation, version at capture); cleared by every loss() call.
        self._t_acts: dict[str, tuple[torch.Tensor, int]] = {}
        self._g_stats: dict[str, Any] = {}
        self._g_batch: dict[str, int] = {}

        self._t_names: list[str] = []
        self._g_names: list[str] = []
        self._pair_idx: list[tuple[int, int]] = []
        if isinstance(layers, str):
            if layers != "auto":
                raise ValueError(
                    f"layers must be 'auto', a {{target: guide}} dict or a list of pairs; got {layers!r}"
                )
            self._resolved = False
            cands = [n for n, m in self._t_modules.items() if isinstance(m, AUTO_TYPES)]
            if not cands:
                raise ValueError(
                    f"layers='auto' found no module of types {[t.__name__ for t in AUTO_TYPES]} in the target"
                )
            if not any(isinstance(m, AUTO_TYPES) for m in self._g_modules.values()):
                raise ValueError(
                    f"layers='auto' found no module of types {[t.__name__ for t in AUTO_TYPES]} in the guide"
                )
            for n in cands:
                self._handles.append(self._t_modules[n].register_forward_hook(self._make_target_hook(n)))
            if example is not None:
                self._resolve_with_example(example)
        else:
            items = list(layers.items()) if isinstance(layers, Mapping) else [tuple(p) for p in layers]
            if not items:
                raise ValueError("layers is empty")
            pairs = []
            for item in items:
                if len(item) != 2:
                    raise ValueError(f"layers entries must be (target_name, guide_name); got {item!r}")
                tn = _resolve_name(target, item[0], self._t_modules, "target")
                gn = _resolve_name(guide, item[1], self._g_modules, "guide")
                pairs.append((tn, gn))
            self._set_pairs(pairs)

    # ------------------------------------------------------------------ mapping

    def _set_pairs(self, pairs: list[tuple[str, str]]) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._t_names = list(dict.fromkeys(t for t, _ in pairs))
        self._g_names = list(dict.fromkeys(g for _, g in pairs))
        self._pair_idx = [(self._t_names.index(t), self._g_names.index(g)) for t, g in pairs]
        for n in self._t_names:
            self._handles.append(self._t_modules[n].register_forward_hook(self._make_target_hook(n)))
        for n in self._g_names:
            self._handles.append(self._g_modules[n].register_forward_hook(self._make_guide_hook(n)))
        self._resolved = True

    def _guide_order(self, guide_args: tuple, guide_kwargs: dict) -> list[str]:
        """Execution order of the guide's auto-type modules (one no_grad guide forward)."""
        order: list[str] = []
        handles = []
        for n, m in self._g_modules.items():
            if isinstance(m, AUTO_TYPES):

                def hook(mod, inp, out, n=n):
                    if n not in order:
                        order.append(n)

                handles.append(m.register_forward_hook(hook))
        try:
            with torch.no_grad(), self._guide_autocast():
                self.guide(*guide_args, **guide_kwargs)
        finally:
            for h in handles:
                h.remove()
        return order

    def _resolve_auto(self, t_order: list[str], g_order: list[str]) -> None:
        if len(t_order) < 2:
            raise RuntimeError(
                f"layers='auto': the target ran {len(t_order)} hookable module(s) ({t_order}); need at least "
                "two (the last one, the logits, is dropped)"
            )
        if len(g_order) < 2:
            raise RuntimeError(
                f"layers='auto': the guide ran {len(g_order)} hookable module(s) ({g_order}); "
                "need at least two"
            )
        t_order, g_order = t_order[:-1], g_order[:-1]
        idx = auto_pairs(len(t_order), len(g_order))
        self._set_pairs([(t_order[i], g_order[j]) for i, j in idx])

    def _resolve_with_example(self, example: Any) -> None:
        args, kwargs = self._as_args(example)
        t_order: list[str] = []
        handles = []
        for n, m in self._t_modules.items():
            if isinstance(m, AUTO_TYPES):

                def hook(mod, inp, out, n=n):
                    if n not in t_order:
                        t_order.append(n)

                handles.append(m.register_forward_hook(hook))
        # BatchNorm running statistics must not move because of the probe (no_grad: nothing is captured).
        buffers = [(b, b.clone()) for b in self.target.buffers()]
        try:
            with torch.no_grad():
                self.target(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
        g_args, g_kwargs = self._as_args(self._to_guide(example))
        self._resolve_auto(t_order, self._guide_order(g_args, g_kwargs))
        self._t_acts.clear()

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """The (target_name, guide_name) pairs, in the order of :attr:`last_cka`.

        With ``layers="auto"`` the mapping follows execution order and is resolved on the first
        step (or at construction when ``example`` was given); before that this raises.
        """
        if not self._resolved:
            raise RuntimeError(
                "layers='auto' is resolved from execution order on the first loss() call; run one step "
                "or pass example=<input> to Guidance to resolve it now"
            )
        return [(self._t_names[i], self._g_names[j]) for i, j in self._pair_idx]

    @property
    def last_cka(self) -> torch.Tensor | None:
        """Per-pair CKA of the last guided step, detached (no host sync until you read it); None before."""
        return self._last_cka

    # ------------------------------------------------------------------ hooks

    def _active(self, step: int) -> bool:
        return (self.until is None or step < self.until) and step % self.every == 0

    @property
    def active(self) -> bool:
        """Whether the current step (the next ``loss()`` call) is guided."""
        return self._active(self.step)

    def _make_target_hook(self, name: str):
        def hook(module, inputs, output):
            if not torch.is_grad_enabled() or not self._active(self.step):
                return
            t = first_tensor(output)
            if t is None:
                raise TypeError(f"target module {name!r} returned no tensor ({type(output).__name__})")
            t = _batch_first(module, t)
            if self.clone_inplace:
                t = t.clone()
            self._t_acts[name] = (t, t._version)

        return hook

    def _make_guide_hook(self, name: str):
        def hook(module, inputs, output):
            import fastguide

            t = first_tensor(output)
            if t is None:
                raise TypeError(f"guide module {name!r} returned no tensor ({type(output).__name__})")
            if t.requires_grad:
                raise RuntimeError(
                    f"guide module {name!r} produced an output that requires grad: the guide must run "
                    "frozen under torch.no_grad() with requires_grad_(False) parameters"
                )
            t = _batch_first(module, t)
            if self.check_finite and not bool(torch.isfinite(t).all()):
                raise FloatingPointError(f"guide layer {name!r} has non-finite values (NaN or inf)")
            if self._sizes is not None:
                mine = self._sizes[dist.get_rank(self.process_group)]
                if t.shape[0] != mine:
                    raise ValueError(
                        f"batch-size mismatch: guide layer {name!r} has batch size {t.shape[0]} on this rank "
                        f"but the target's batch here is {mine}; feed the guide the same batch as the target"
                    )
                t = all_gather_batch(t, self.process_group, self._sizes)
            self._g_batch[name] = t.shape[0]
            if self.kernel == "linear" and self.route != "gram":
                y2 = as_examples(t, self.tokens, f"guide layer {name!r}")
                if self.route == "feature" or y2.shape[1] < y2.shape[0]:
                    # Narrower than the batch: the features themselves (n*d) are smaller than a Gram (n^2).
                    # A copy, so that later in-place ops of the guide cannot change them.
                    self._g_stats[name] = y2.detach().clone()
                    return
            self._g_stats[name] = fastguide.layer_stats(
                t,
                estimator=self.estimator,
                kernel=self.kernel,
                sigma=self.sigma,
                tokens=self.tokens,
                backend=self.backend,
            )

        return hook

    # ------------------------------------------------------------------ step

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

    @staticmethod
    def _as_args(x: Any) -> tuple[tuple, dict]:
        if isinstance(x, tuple):
            return x, {}
        if isinstance(x, Mapping):
            return (), dict(x)
        return (x,), {}

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

    def _current_weight(self, step: int):
        return self.weight(step) if callable(self.weight) else self.weight

    def loss(self, x: Any = None, *, guide_input: Any = None) -> torch.Tensor:
        """Alignment loss of this step: ``weight * sum_p (1 - CKA_p)`` (or the mean over pairs).

        Call after the target forward of this step. ``x`` (or ``guide_input``) is the guide's input;
        it must hold the same examples as the target's batch. Non-guided steps (``every``/``until``)
        return a zero tensor. Advances the step counter.
        """
        import fastguide

        if self._closed:
            raise RuntimeError("this Guidance was closed")
        step = self.step
        self.step += 1
        g_in = guide_input if guide_input is not None else x
        if g_in is None:
            raise ValueError("loss() needs the guide's input: loss(x) or loss(guide_input=...)")
        if not self._active(step):
            self._t_acts.clear()
            return torch.zeros((), device=_model_device(self.target))
        w = self._current_weight(step)

        t_acts = self._t_acts
        self._t_acts = {}
        g_args, g_kwargs = self._as_args(self._to_guide(g_in))
        if not self._resolved:
            # Execution order of the target's auto-type modules = capture order of this forward.
            t_order = list(t_acts)
            if not t_order:
                raise RuntimeError(
                    "no target module fired since the last loss() call: run target(x) (with grad enabled) "
                    "before guidance.loss(x)"
                )
            self._resolve_auto(t_order, self._guide_order(g_args, g_kwargs))
            t_acts = {n: t_acts[n] for n in self._t_names if n in t_acts}

        missing = [n for n in self._t_names if n not in t_acts]
        if missing:
            raise RuntimeError(
                f"target module(s) {missing} did not fire since the last loss() call: run target(x) with "
                "grad enabled before guidance.loss(x) (forwards under torch.no_grad() are not captured)"
            )
        xs = []
        for n in self._t_names:
            t, version = t_acts[n]
            if t._version != version:
                raise RuntimeError(
                    f"the output of target module {n!r} was modified in place after the hook captured it "
                    "(e.g. by ReLU(inplace=True)); CKA would use the wrong values. Make that op out-of-place "
                    "or pass clone_inplace=True"
                )
            if self.check_finite and not bool(torch.isfinite(t).all()):
                raise FloatingPointError(f"target layer {n!r} has non-finite values (NaN or inf)")
            xs.append(t)
        del t_acts
        if self.gather and is_distributed(self.process_group):
            local = {x.shape[0] for x in xs}
            if len(local) != 1:
                raise ValueError(f"target layers have different batch sizes {sorted(local)}; cannot gather")
            sizes = batch_sizes(xs[0].shape[0], xs[0].device, self.process_group)
            xs = [all_gather_batch(x, self.process_group, sizes) for x in xs]
        else:
            sizes = None

        self._check_guide_frozen()
        self._g_stats, self._g_batch = {}, {}
        try:
            self._sizes = sizes  # read by the guide hooks, which gather the guide's activations
            with torch.no_grad(), self._guide_autocast():
                self.guide(*g_args, **g_kwargs)
            missing = [n for n in self._g_names if n not in self._g_stats]
            if missing:
                raise RuntimeError(f"guide module(s) {missing} did not fire during the guide forward")
            ys = [self._g_stats[n] for n in self._g_names]
        finally:
            self._g_stats = {}
            self._sizes = None
        for i, j in self._pair_idx:
            n_t, n_g = xs[i].shape[0], self._g_batch[self._g_names[j]]
            if n_t != n_g:
                raise ValueError(
                    f"batch-size mismatch: target layer {self._t_names[i]!r} has batch size {n_t} but guide "
                    f"layer {self._g_names[j]!r} has {n_g}; feed the guide the same batch as the target"
                )
        dev = xs[0].device
        ys = [s.to(dev) for s in ys]
        # Pairs whose guide layer was kept as features and pairs with Gram statistics go to one call
        # each: a call with any precomputed Gram statistics runs on the Gram route.
        groups: dict[bool, list[int]] = {}
        for p, (_, j) in enumerate(self._pair_idx):
            groups.setdefault(isinstance(ys[j], torch.Tensor), []).append(p)
        parts, order = [], []
        for feats, ps in groups.items():
            parts.append(
                fastguide.cka_pairs(
                    xs,
                    ys,
                    [self._pair_idx[p] for p in ps],
                    estimator=self.estimator,
                    kernel=self.kernel,
                    sigma=self.sigma,
                    backend=self.backend,
                    tokens=self.tokens,
                    route=self.route if feats else "gram",
                )
            )
            order.extend(ps)
        ckas = parts[0] if len(parts) == 1 else torch.cat(parts)
        if order != sorted(order):
            ckas = ckas[torch.tensor(order, device=ckas.device).argsort()]
        self._last_cka = ckas.detach()
        per_pair = 1.0 - ckas
        loss = per_pair.sum() if self.reduction == "sum" else per_pair.mean()
        return loss * w

    __call__ = loss

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Remove every hook and drop captured activations. Idempotent."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._t_acts = {}
        self._g_stats = {}
        self._closed = True

    def __enter__(self) -> Guidance:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        mapping = f"{len(self._pair_idx)} pairs" if self._resolved else "layers='auto' (unresolved)"
        return (
            f"Guidance({mapping}, estimator={self.estimator!r}, kernel={self.kernel!r}, "
            f"reduction={self.reduction!r}, every={self.every}, until={self.until}, step={self.step}"
            + (", gather=True)" if self.gather else ")")
        )


@dataclasses.dataclass
class AlignHistory:
    """Result of :func:`align`: ``cka`` (steps, P) per-pair CKA per step, ``loss`` (steps,) and ``pairs``."""

    pairs: list[tuple[str, str]]
    cka: torch.Tensor
    loss: torch.Tensor

    def __len__(self) -> int:
        return self.cka.shape[0]


def _noise_fn(noise, example, target: nn.Module, vocab_size: int | None):
    if callable(noise):
        return noise
    if example is None:
        raise ValueError("align needs example=<one input batch> (its shape and dtype define the noise)")
    if not isinstance(example, torch.Tensor):
        raise TypeError("align: example must be a tensor (pass noise=callable(generator) for other inputs)")
    shape, dtype, device = tuple(example.shape), example.dtype, example.device
    if noise == "tokens" or (noise == "auto" and not dtype.is_floating_point):
        if vocab_size is None:
            emb = [m for m in target.modules() if isinstance(m, nn.Embedding)]
            if not emb:
                raise ValueError("align: noise='tokens' needs vocab_size= (no nn.Embedding in the target)")
            vocab_size = emb[0].num_embeddings
        return lambda g: torch.randint(0, vocab_size, shape, generator=g).to(device)
    if noise in ("gaussian", "auto"):
        return lambda g: torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    if noise == "uniform":
        return lambda g: (torch.rand(shape, generator=g) * 2 - 1).to(device=device, dtype=dtype)
    raise ValueError(f"noise must be 'auto', 'gaussian', 'uniform', 'tokens' or a callable; got {noise!r}")


def align(
    target: nn.Module,
    guide: nn.Module,
    steps: int,
    noise: str | Callable[[torch.Generator], Any] = "auto",
    lr: float = 1e-3,
    *,
    example: Any = None,
    layers: Any = "auto",
    optimizer: torch.optim.Optimizer | None = None,
    vocab_size: int | None = None,
    seed: int | None = None,
    **guidance_kwargs,
) -> AlignHistory:
    """Alignment as initialization: optimise ``target`` on the CKA alignment loss alone, on random noise.

    Both networks see the same noise batches: Gaussian for float inputs, random tokens in
    ``[0, vocab_size)`` for integer inputs (``noise="auto"``); ``example`` (one real batch) fixes the
    noise's shape, dtype and device, or pass ``noise=callable(generator) -> input``. The target is
    trained with Adam(lr) (or ``optimizer``) in train mode and restored to its mode afterwards.
    ``guidance_kwargs`` go to :class:`Guidance` (e.g. ``estimator="biased"``).

    Returns an :class:`AlignHistory` with the per-pair CKA of every step (one host copy at the end).
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int; got {steps!r}")
    make = _noise_fn(noise, example, target, vocab_size)
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
    first = make(g)
    was_training = target.training
    opt = optimizer if optimizer is not None else torch.optim.Adam(target.parameters(), lr=lr)
    ckas, losses = [], []
    with Guidance(target, guide, layers=layers, **guidance_kwargs) as guidance:
        target.train()
        x = first
        for _ in range(steps):
            target(*Guidance._as_args(x)[0], **Guidance._as_args(x)[1])
            loss = guidance.loss(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ckas.append(guidance.last_cka)
            losses.append(loss.detach())
            x = make(g)
        pairs = guidance.pairs if guidance._resolved else []
    target.train(was_training)
    cka = torch.stack(ckas).cpu() if ckas else torch.zeros(0, len(pairs))
    loss_t = torch.stack(losses).cpu() if losses else torch.zeros(0)
    return AlignHistory(pairs=pairs, cka=cka, loss=loss_t)
