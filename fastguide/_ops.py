"""The op layer: the plan of one call, the ``torch.library`` custom ops, their fakes and autograd.

Every public op builds one :class:`Plan` (:func:`build_plan`) and runs one pair of custom ops:

* ``fastguide::cka_fwd(<plan>)`` computes the per-layer statistics of the raw ``layers`` (one
  centred, normalised Gram per layer, or the feature-route equivalent), joins them with precomputed
  statistics (``pre_*``, e.g. a guide's :class:`fastguide.LayerStats`) and returns the CKA of each
  requested pair plus the per-layer tensors (:class:`LayerTable`) the backward needs;
* ``fastguide::cka_bwd(grad, which, cka, <table>, <plan>)`` returns the gradients of the layers that
  need one (guide layers get no work).

The schemas are generated from the fields of :class:`Plan` and :class:`LayerTable`, so the argument
list is written once. The ops are wired with ``torch.library.register_autograd``: eager autograd,
``torch.compile`` and ``torch.library.opcheck`` all see the same analytic backward. Pairs travel as a
flat ``list[int]`` ``[i0, j0, i1, j1, ...]`` of global layer indices (raw layers first, then
precomputed ones). The arithmetic is the backend's (:mod:`fastguide._torch_backend` or
:mod:`fastguide._triton_backend`, chosen in the plan); the op bodies only route: a Gram-route plan
goes through the backend's optional fused entries ``fused_fwd``/``fused_bwd`` when it has them
(:func:`_fused`; the Triton backend: 5 launches forward, 1 backward), otherwise through the five
basic entries composed here (:func:`_hsic_table`, :func:`_backward_op`). No host synchronisation:
index tables are cached device tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import torch

from . import _torch_backend, _triton_backend
from . import _torch_backend as tb
from ._utils import hsic_norm, pair_index, triton_usable
from ._validate import Options, check_layers, check_stats

__all__ = [
    "Plan",
    "LayerTable",
    "build_plan",
    "build_stats_plan",
    "run",
    "batch_hsic",
    "backend_module",
    "use_triton",
]


def _arg(schema: str):
    return field(metadata={"schema": schema})


@dataclass(frozen=True, eq=False)  # tensors have no value equality: compare plans by identity
class Plan:
    """Everything one call of ``fastguide::cka_fwd`` needs; its fields are the op's arguments, in order.

    ``layers`` are the raw (n, d) activations, ``pre_*`` the stacked precomputed statistics (C, s, ok,
    h; empty when there are none), ``pairs`` the flat global pair list, ``route`` the route taken
    (``"gram"`` or ``"feature"``) and ``backend`` the backend that computes (``"torch"``/``"triton"``).
    """

    layers: list[torch.Tensor] = _arg("Tensor[]")
    pre_C: torch.Tensor = _arg("Tensor")
    pre_s: torch.Tensor = _arg("Tensor")
    pre_ok: torch.Tensor = _arg("Tensor")
    pre_h: torch.Tensor = _arg("Tensor")
    pairs: list[int] = _arg("int[]")
    estimator: str = _arg("str")
    kernel: str = _arg("str")
    sigma: float | None = _arg("float?")
    route: str = _arg("str")
    backend: str = _arg("str")

    def args(self) -> tuple:
        """The positional arguments of the custom ops (field order)."""
        return tuple(getattr(self, f.name) for f in fields(self))

    @property
    def n(self) -> int:
        return self.layers[0].shape[0] if self.layers else self.pre_C.shape[1]

    @property
    def device(self) -> torch.device:
        return self.layers[0].device if self.layers else self.pre_C.device

    @property
    def pair_list(self) -> list[tuple[int, int]]:
        return list(zip(self.pairs[0::2], self.pairs[1::2], strict=False))

    def static(self) -> dict:
        """The non-tensor fields (kept on the autograd context)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if not f.metadata["schema"].startswith("Tensor")
        }

    def saved(self) -> tuple:
        """The tensor fields, flat (for ``save_for_backward``): the ``pre_*`` tensors, then the layers."""
        return (*(getattr(self, name) for name in _PRE_FIELDS), *self.layers)

    @classmethod
    def restore(cls, saved: Sequence[torch.Tensor], static: dict) -> Plan:
        """Inverse of :meth:`saved` plus :meth:`static`."""
        k = len(_PRE_FIELDS)
        return cls(layers=list(saved[k:]), **dict(zip(_PRE_FIELDS, saved[:k], strict=True)), **static)


_PRE_FIELDS = tuple(f.name for f in fields(Plan) if f.metadata["schema"] == "Tensor")


class LayerTable(NamedTuple):
    """Per-layer outputs of the forward: C (L, n, n) (``(0, n, n)`` on the feature route), s, ok, h,
    sigma and klog (the log of the factor an unbiased RBF kernel was scaled by, else 0)."""

    C: torch.Tensor
    s: torch.Tensor
    ok: torch.Tensor
    h: torch.Tensor
    sig: torch.Tensor
    klog: torch.Tensor


_PLAN_SCHEMA = ", ".join(f"{f.metadata['schema']} {f.name}" for f in fields(Plan))
_TABLE_SCHEMA = ", ".join(f"Tensor {name}" for name in LayerTable._fields)
_FWD_SCHEMA = f"({_PLAN_SCHEMA}) -> ({', '.join(['Tensor'] * (1 + len(LayerTable._fields)))})"
_BWD_SCHEMA = f"(Tensor grad, int[] which, Tensor cka, {_TABLE_SCHEMA}, {_PLAN_SCHEMA}) -> Tensor[]"
_TABLE = len(LayerTable._fields)


# --------------------------------------------------------------------------- building the plan
_BACKENDS = {"torch": _torch_backend, "triton": _triton_backend}


def use_triton(backend: str, device: torch.device, kernel: str) -> bool:
    """Whether the Triton backend computes: always for ``"triton"`` (checked), CUDA only for ``"auto"``."""
    if backend == "torch":
        return False
    usable = triton_usable(device)
    if backend == "triton":
        if not usable:
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); got {device}"
            )
        if kernel != "linear":
            raise ValueError(
                "backend='triton' implements the linear kernel; use backend='torch' for kernel='rbf'"
            )
        return True
    # auto: compiled Triton on CUDA only (the interpreter is for tests, never picked automatically).
    return device.type == "cuda" and kernel == "linear"


def backend_module(backend: str, device: torch.device, kernel: str):
    """The backend module (torch or Triton) that computes for these options on ``device``."""
    return _BACKENDS["triton" if use_triton(backend, device, kernel) else "torch"]


def choose_route(route: str, kernel: str, layers, plist, has_pre: bool) -> str:
    """The route an op takes: the request, or for ``"auto"`` the one with fewer counted flops."""
    if route == "feature":
        if kernel != "linear":
            raise ValueError("route='feature' needs kernel='linear'")
        if has_pre:
            raise ValueError("route='feature' cannot use precomputed LayerStats (they are Gram statistics)")
        return "feature"
    if route == "gram" or kernel != "linear" or has_pre:
        return "gram"
    n = layers[0].shape[0]
    feat, gram_cost = tb.feature_cost([x[0].numel() for x in layers], plist, n)
    return "feature" if feat < gram_cost else "gram"


def build_plan(raw: list[torch.Tensor], pre: Sequence, pairs: list[tuple[int, int]], opts: Options) -> Plan:
    """Check the layers against each other and the precomputed stats, and fix route and backend.

    ``raw``: (n, d) activations; ``pre``: :class:`fastguide.LayerStats` (global indices after the raw
    layers); ``pairs``: in-range (i, j) global index pairs.
    """
    if not raw:
        raise ValueError("at least one layer must be an activation tensor (not only precomputed LayerStats)")
    check_layers(raw, [f"layer {k}" for k in range(len(raw))], opts.estimator)
    n, dev = raw[0].shape[0], raw[0].device
    check_stats(pre, opts, n, dev)
    route = choose_route(opts.route, opts.kernel, raw, pairs, bool(pre))
    # Checked on every route: backend="triton" where Triton cannot run raises, also when the feature
    # route (plain GEMMs, the torch implementation on either backend) is the one taken.
    triton = use_triton(opts.backend, dev, opts.kernel) and route == "gram"
    dt = tb.stack_dtype([*raw, *(st.C for st in pre)])
    if pre:
        pre_t = [torch.stack([getattr(st, name) for st in pre]) for name in ("C", "s", "ok", "h")]
        pre_t = [t.to(dt) if t.is_floating_point() else t for t in pre_t]
    else:
        pre_t = [
            torch.empty((0, n, n), dtype=dt, device=dev),
            torch.empty((0,), dtype=dt, device=dev),
            torch.empty((0,), dtype=torch.bool, device=dev),
            torch.empty((0,), dtype=dt, device=dev),
        ]
    return Plan(
        list(raw),
        *pre_t,
        pairs=[v for p in pairs for v in p],
        estimator=opts.estimator,
        kernel=opts.kernel,
        sigma=None if opts.sigma is None else float(opts.sigma),
        route=route,
        backend="triton" if triton else "torch",
    )


def build_stats_plan(pre: Sequence, pairs: list[tuple[int, int]], opts: Options) -> Plan:
    """A plan over precomputed :class:`fastguide.LayerStats` only (no raw layer), for :func:`batch_hsic`.

    The autograd ops need a raw layer (:func:`build_plan`); a metric fed per-layer statistics made in
    forward hooks (:func:`fastguide.compare`) has none and needs no gradient.
    """
    if not pre:
        raise ValueError("need at least one LayerStats")
    first = pre[0]
    check_stats(pre, opts, first.n, first.C.device)
    dev = first.C.device
    dt = torch.float64 if any(st.C.dtype == torch.float64 for st in pre) else first.C.dtype
    pre_t = [
        torch.stack([st.C.to(dt) for st in pre]),
        torch.stack([st.s.to(dt) for st in pre]),
        torch.stack([st.ok for st in pre]),
        torch.stack([st.h.to(dt) for st in pre]),
    ]
    triton = use_triton(opts.backend, dev, opts.kernel)
    return Plan(
        [],
        *pre_t,
        pairs=[v for p in pairs for v in p],
        estimator=opts.estimator,
        kernel=opts.kernel,
        sigma=None if opts.sigma is None else float(opts.sigma),
        route="gram",
        backend="triton" if triton else "torch",
    )


def run(plan: Plan) -> torch.Tensor:
    """CKA of the plan's pairs, (P,), differentiable through the analytic backward."""
    return _cka_fwd(*plan.args())[0]


# --------------------------------------------------------------------------- the computation
def call_dtype(plan: Plan) -> torch.dtype:
    """The accumulation dtype of the call: float64 if any raw layer or precomputed statistic is."""
    return tb.stack_dtype([*plan.layers, plan.pre_C])


def _hsic_table(plan: Plan) -> tuple[torch.Tensor, LayerTable, torch.Tensor, torch.Tensor]:
    """Per-layer statistics and the normalised HSIC of each pair (no autograd).

    Returns (hsic (P,), table, h_all, ok_all); ``*_all`` span raw then precomputed layers. Everything
    is in the call's accumulation dtype (:func:`call_dtype`), also when layers of several dtypes meet.
    """
    be = _BACKENDS[plan.backend]
    n = plan.n
    dt = call_dtype(plan)
    if plan.route == "feature":
        hsic, s, ok, h = be.feature_fwd(plan.layers, plan.pair_list, plan.estimator)
        C = torch.empty((0, n, n), dtype=s.dtype, device=plan.device)
        return hsic, LayerTable(C, s, ok, h, torch.ones_like(s), torch.zeros_like(s)), h, ok
    if plan.layers:
        out = be.gram_table(list(plan.layers), plan.estimator, plan.kernel, plan.sigma)
        table = LayerTable(*(t.to(dt) if t.is_floating_point() else t for t in out))
    else:
        s = plan.pre_s.new_empty((0,))
        table = LayerTable(plan.pre_C.new_empty((0, n, n)), s, plan.pre_ok.new_empty((0,)), s, s, s)
    C = table.C
    h_all = torch.cat([table.h, plan.pre_h.to(dt)])
    ok_all = torch.cat([table.ok, plan.pre_ok])
    pre = plan.pre_C.to(dt)
    index = [(0, l) for l in range(C.shape[0])] + [(1, m) for m in range(pre.shape[0])]
    hsic = be.pair_dots([C, pre], index, plan.pair_list) / hsic_norm(n, plan.estimator)
    return hsic, table, h_all, ok_all


def batch_hsic(plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """One minibatch's HSICs in the un-normalised scale, float64, for :class:`fastguide.MinibatchCKA`.

    Returns (cross (P,) per pair, self (L,) per layer, raw then precomputed); each includes the batch's
    own ``1/N`` and is multiplied back by ``s_a s_b``; degenerate layers count as 0. No autograd.
    """
    with torch.no_grad():
        hsic, table, h_all, ok_all = _hsic_table(plan)
        # Back to the scale of K: an unbiased RBF kernel was scaled by exp(klog) (fastguide._rbf).
        s64 = torch.cat([table.s.double() * torch.exp(-table.klog.double()), plan.pre_s.double()])
        h64 = h_all.double()
        self_all = torch.where(ok_all, h64 * s64 * s64, torch.zeros_like(h64))
        pi, pj = pair_index(plan.pairs, s64.device)
        cross = torch.where(
            ok_all[pi] & ok_all[pj],
            hsic.double() * s64[pi] * s64[pj],
            torch.zeros_like(hsic, dtype=torch.float64),
        )
    return cross, self_all


def _fused(plan: Plan):
    """The backend's fused entries ``(fused_fwd, fused_bwd)`` where they apply to this plan (Gram
    route, raw layers present), else None: the ops then compose the five basic entries."""
    be = _BACKENDS[plan.backend]
    fwd, bwd = getattr(be, "fused_fwd", None), getattr(be, "fused_bwd", None)
    if fwd is None or bwd is None or plan.route != "gram" or not plan.layers:
        return None
    return fwd, bwd


def _pre(plan: Plan, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The precomputed statistics (C, h, ok) in the call's dtype (no copy when already in it)."""
    return plan.pre_C.to(dt), plan.pre_h.to(dt), plan.pre_ok


def _forward(plan: Plan) -> tuple:
    fused = _fused(plan)
    if fused is not None:
        dt = call_dtype(plan)
        cka, table = fused[0](list(plan.layers), _pre(plan, dt), plan.pair_list, plan.estimator, dt)
        return (cka, *table)
    pi, pj = pair_index(plan.pairs, plan.device)
    hsic, table, h_all, ok_all = _hsic_table(plan)
    return (tb.cka_from_hsic(hsic, h_all, ok_all, pi, pj), *table)


def _partners(plist, which) -> dict[int, list[int]]:
    """For each layer needing a gradient: itself plus every layer it is paired with (static)."""
    out = {}
    for a in which:
        ps = [a]
        for i, j in plist:
            for u, v in ((i, j), (j, i)):
                if u == a and v not in ps:
                    ps.append(v)
        out[a] = ps
    return out


def _backward_op(plan: Plan, grad: torch.Tensor, which: list[int], cka: torch.Tensor, t: LayerTable):
    """Gradients of ``plan.layers[a]`` for each ``a`` in ``which`` (in that order)."""
    fused = _fused(plan)
    if fused is not None:
        pre = _pre(plan, t.C.dtype)
        return fused[1](
            grad, cka, list(plan.layers), list(which), tuple(t), pre, plan.pair_list, plan.estimator
        )
    be = _BACKENDS[plan.backend]
    plist = plan.pair_list
    pi, pj = pair_index(plan.pairs, grad.device)
    ok_all = torch.cat([t.ok, plan.pre_ok])
    h_all = torch.cat([t.h, plan.pre_h.to(t.h.dtype)])  # the table is in the call's dtype
    W = tb.pair_weights(grad, cka, h_all, ok_all, pi, pj, hsic_norm(plan.n, plan.estimator))
    partners = _partners(plist, which)
    if plan.route == "feature":
        return be.feature_bwd(plan.layers, W, t.s, which, partners, plan.estimator)
    L = len(plan.layers)
    pre = plan.pre_C.to(t.C.dtype)
    out = []
    for a in which:
        Cs = [t.C[b] if b < L else pre[b - L] for b in partners[a]]
        w = torch.stack([W[a, b] for b in partners[a]])
        out.append(
            be.layer_grad(plan.layers[a], Cs, w, t.s[a], t.sig[a], t.klog[a], plan.kernel, plan.estimator)
        )
    return out


# --------------------------------------------------------------------------- custom ops
def _cka_fwd_impl(*args):
    """Returns (cka (P,), C, s, ok, h, sig, klog): see :class:`LayerTable`."""
    return _forward(Plan(*args))


def _cka_bwd_impl(grad, which, cka, *rest):
    """Gradients of ``layers[a]`` for each ``a`` in ``which`` (in that order)."""
    return _backward_op(Plan(*rest[_TABLE:]), grad, which, cka, LayerTable(*rest[:_TABLE]))


@torch.library.custom_op("fastguide::cka_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def _cka_fwd(*args):
    return _cka_fwd_impl(*args)


@_cka_fwd.register_fake
def _(*args):
    plan = Plan(*args)
    ref = plan.layers[0] if plan.layers else plan.pre_C
    dt = call_dtype(plan)
    L, n = len(plan.layers), plan.n
    table = LayerTable(
        C=ref.new_empty((0 if plan.route == "feature" else L, n, n), dtype=dt),
        s=ref.new_empty((L,), dtype=dt),
        ok=ref.new_empty((L,), dtype=torch.bool),
        h=ref.new_empty((L,), dtype=dt),
        sig=ref.new_empty((L,), dtype=dt),
        klog=ref.new_empty((L,), dtype=dt),
    )
    return (ref.new_empty((len(plan.pairs) // 2,), dtype=dt), *table)


@torch.library.custom_op("fastguide::cka_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def _cka_bwd(grad, which, cka, *rest):
    return _cka_bwd_impl(grad, which, cka, *rest)


@_cka_bwd.register_fake
def _(grad, which, cka, *rest):
    layers = Plan(*rest[_TABLE:]).layers
    return [torch.empty_like(layers[a]) for a in which]


def _setup_context(ctx, inputs, output):
    plan = Plan(*inputs)
    ctx.which = [a for a, x in enumerate(plan.layers) if x.requires_grad]
    ctx.n_layers = len(plan.layers)
    ctx.static = plan.static()
    # Only the CKA output is differentiable: without this, autograd materialises a zero gradient the
    # size of the whole (L, n, n) Gram stack for the unused C output on every backward.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*output, *plan.saved())


def _backward(ctx, grad_cka, *_unused):
    grads = [None] * ctx.n_layers
    if ctx.which and grad_cka is not None:
        cka, *rest = ctx.saved_tensors
        plan = Plan.restore(rest[_TABLE:], ctx.static)
        gs = _cka_bwd(grad_cka, ctx.which, cka, *rest[:_TABLE], *plan.args())
        for a, g in zip(ctx.which, gs, strict=False):
            grads[a] = g
    return (grads, *([None] * (len(fields(Plan)) - 1)))


torch.library.register_autograd("fastguide::cka_fwd", _backward, setup_context=_setup_context)

#: The real implementations of the custom ops by name (the launch-count harness of
#: tests/kernels/gpu_compile.py runs them on meta tensors, which otherwise dispatch to the fakes).
OP_IMPLS = {"cka_fwd": _cka_fwd_impl, "cka_bwd": _cka_bwd_impl}
