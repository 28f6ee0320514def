"""Public CKA ops: validation, dispatch, the analytic backward and the torch.library custom ops.

Every op funnels into one pair of custom ops:

* ``fastguide::cka_fwd(layers, pre_C, pre_s, pre_ok, pre_h, pairs, ...)`` computes the per-layer
  statistics of the raw ``layers`` (one centred, normalised Gram per layer, or the feature-route
  equivalent), joins them with precomputed statistics (``pre_*``, e.g. a guide's, see
  :func:`layer_stats`) and returns the CKA of each requested pair plus the per-layer tensors the
  backward needs;
* ``fastguide::cka_bwd(...)`` returns the gradients of the layers that need one (guide layers get
  no work).

They are wired with ``torch.library.register_autograd``, so eager autograd, ``torch.compile`` and
``torch.library.opcheck`` all see the same analytic backward. Pairs travel as a flat ``list[int]``
``[i0, j0, i1, j1, ...]`` of global layer indices (raw layers first, then precomputed ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import _torch_backend as tb
from ._utils import (
    BACKENDS,
    ESTIMATORS,
    KERNELS,
    ROUTES,
    TOKENS,
    acc_dtype,
    as_examples,
    check_layers,
    check_option,
    check_tensor,
    hsic_norm,
    triton_usable,
)

__all__ = ["LayerStats", "layer_stats", "gram", "cka", "cka_matrix", "cka_pairs"]


# --------------------------------------------------------------------------- precomputed statistics
@dataclass(frozen=True)
class LayerStats:
    """Precomputed per-layer statistics of one (guide) layer, for :func:`cka_pairs` / ``CKALoss``.

    ``C`` is the (n, n) centred Gram normalised by its mean diagonal ``s``; ``h`` the self-HSIC;
    ``ok`` False for a degenerate layer. They are constants: no gradient flows back through them.
    Made by :func:`layer_stats`; holds no reference to the activation it came from.
    """

    C: torch.Tensor
    s: torch.Tensor
    ok: torch.Tensor
    h: torch.Tensor
    estimator: str
    kernel: str

    @property
    def n(self) -> int:
        return self.C.shape[0]

    def to(self, device) -> LayerStats:
        return LayerStats(
            self.C.to(device),
            self.s.to(device),
            self.ok.to(device),
            self.h.to(device),
            self.estimator,
            self.kernel,
        )


def layer_stats(
    y: torch.Tensor,
    *,
    estimator: str = "unbiased",
    kernel: str = "linear",
    sigma: float | None = None,
    tokens: str = "flatten",
    backend: str = "auto",
) -> LayerStats:
    """Reduce one activation to its :class:`LayerStats` (no gradient; the activation can be freed).

    This is what a guide's forward hook calls, so that guide memory is one activation at a time plus
    one n x n matrix per layer.
    """
    _check_options(estimator, kernel, backend, tokens, "gram", sigma)
    check_tensor(y, "y")
    y2 = as_examples(y, tokens, "y")
    check_layers([y2], ["y"], estimator)
    with torch.no_grad():
        y2 = y2.detach()
        if _use_triton(backend, y2.device, kernel):
            C, s, ok, h, _ = _kernels().gram.gram_fwd([y2], estimator)
        else:
            C, s, ok, h, _ = tb.gram_fwd([y2], estimator, kernel, sigma)
    return LayerStats(C[0], s[0], ok[0], h[0], estimator, kernel)


# --------------------------------------------------------------------------- option checks, dispatch
def _check_options(estimator, kernel, backend, tokens, route, sigma) -> None:
    check_option(estimator, "estimator", ESTIMATORS)
    check_option(kernel, "kernel", KERNELS)
    check_option(backend, "backend", BACKENDS)
    check_option(tokens, "tokens", TOKENS)
    check_option(route, "route", ROUTES)
    if sigma is not None:
        if kernel != "rbf":
            raise ValueError(
                f"sigma is only used with kernel='rbf'; got sigma={sigma!r} with kernel={kernel!r}"
            )
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
            raise ValueError(f"sigma must be a positive number or None (median heuristic); got {sigma!r}")


_KERNELS_MODULE = None


def _kernels():
    """Import the Triton launchers lazily (Triton is only needed on that path)."""
    global _KERNELS_MODULE
    if _KERNELS_MODULE is None:
        try:
            import fastguide.kernels as k
            import fastguide.kernels.backward  # noqa: F401
            import fastguide.kernels.cka  # noqa: F401
            import fastguide.kernels.gram  # noqa: F401
        except Exception as e:  # pragma: no cover - depends on the install
            raise RuntimeError(
                f"backend='triton' is not available: importing fastguide.kernels failed ({e})"
            ) from e
        _KERNELS_MODULE = k
    return _KERNELS_MODULE


def _use_triton(backend: str, device: torch.device, kernel: str) -> bool:
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


# --------------------------------------------------------------------------- custom ops
_INDEX_CACHE: dict = {}


def _index(pairs: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(pi, pj) index tensors, cached per pair list and device (no host->device copy per step)."""
    key = (tuple(pairs), device)
    hit = _INDEX_CACHE.get(key)
    if hit is None:
        t = torch.tensor(list(pairs), dtype=torch.long, device=device).view(-1, 2)
        hit = (t[:, 0].contiguous(), t[:, 1].contiguous())
        if len(_INDEX_CACHE) > 256:
            _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = hit
    return hit


def _pair_list(pairs: Sequence[int]) -> list[tuple[int, int]]:
    return list(zip(pairs[0::2], pairs[1::2], strict=False))


def _sigma_arg(sigma: float) -> float | None:
    return None if sigma <= 0 else sigma


@torch.library.custom_op("fastguide::cka_fwd", mutates_args=())
def _cka_fwd(
    layers: list[torch.Tensor],
    pre_C: torch.Tensor,
    pre_s: torch.Tensor,
    pre_ok: torch.Tensor,
    pre_h: torch.Tensor,
    pairs: list[int],
    estimator: str,
    kernel: str,
    sigma: float,
    route: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (cka (P,), C (L, n, n) or (0, n, n) on the feature route, s, ok, h, sigma (each (L,)))."""
    dev = layers[0].device if layers else pre_C.device
    pi, pj = _index(pairs, dev)
    hsic, C, s, ok, h, sig, h_all, ok_all = _hsic_table(
        layers, pre_C, pre_s, pre_ok, pre_h, _pair_list(pairs), estimator, kernel, sigma, route, backend
    )
    return tb.cka_from_hsic(hsic, h_all, ok_all, pi, pj), C, s, ok, h, sig


def _hsic_table(layers, pre_C, pre_s, pre_ok, pre_h, plist, estimator, kernel, sigma, route, backend):
    """Per-layer statistics of ``layers`` and the normalised HSIC of each pair (no autograd).

    Returns (hsic (P,), C, s, ok, h, sig, h_all, ok_all); ``*_all`` span raw then precomputed layers.
    """
    n = layers[0].shape[0] if layers else pre_C.shape[1]
    N = hsic_norm(n, estimator)
    dev = layers[0].device if layers else pre_C.device
    if route == "feature":
        feats = [tb.feature_prep(x) for x in layers]
        s = torch.stack([f[1] for f in feats])
        ok = torch.stack([f[2] for f in feats])
        h = torch.stack([tb.feature_hsic(f[0], f[0], f[3], f[3], estimator, f[0].T @ f[0]) for f in feats])
        ok = ok & ~(h <= 0)
        hsic = torch.stack(
            [
                h[i]
                if i == j
                else tb.feature_hsic(feats[i][0], feats[j][0], feats[i][3], feats[j][3], estimator)
                for i, j in plist
            ]
        )
        C = torch.empty((0, n, n), dtype=s.dtype, device=dev)
        return hsic, C, s, ok, h, torch.ones_like(s), h, ok
    if layers:
        if backend == "triton":
            C, s, ok, h, sig = _kernels().gram.gram_fwd(list(layers), estimator)
        else:
            C, s, ok, h, sig = tb.gram_fwd(list(layers), estimator, kernel, _sigma_arg(sigma))
    else:
        C = pre_C.new_empty((0, n, n))
        s = h = sig = pre_s.new_empty((0,))
        ok = pre_ok.new_empty((0,))
    L = C.shape[0]
    h_all = torch.cat([h, pre_h.to(h.dtype)])
    ok_all = torch.cat([ok, pre_ok])
    pre = pre_C.to(C.dtype)
    index = [(0, l) for l in range(L)] + [(1, m) for m in range(pre.shape[0])]
    hsic = tb.block_dots([C, pre], index, plist, _triton_dots if backend == "triton" else None) / N
    return hsic, C, s, ok, h, sig, h_all, ok_all


def _triton_dots(SA: torch.Tensor, SB: torch.Tensor, li: list[int], lj: list[int]) -> torch.Tensor:
    """Pair inner products of one (stack, stack) group through the Triton kernel (one launch)."""
    gi, gj = _index([v for ab in zip(li, lj, strict=True) for v in ab], SA.device)
    return _kernels().cka.hsic_pairs(SA, SB, gi, gj).to(SA.dtype)


@_cka_fwd.register_fake
def _(layers, pre_C, pre_s, pre_ok, pre_h, pairs, estimator, kernel, sigma, route, backend):
    ref = layers[0] if layers else pre_C
    n = ref.shape[0] if layers else pre_C.shape[1]
    dt = acc_dtype(ref.dtype) if layers else pre_C.dtype
    L = len(layers)
    P = len(pairs) // 2
    Lc = 0 if route == "feature" else L
    return (
        ref.new_empty((P,), dtype=dt),
        ref.new_empty((Lc, n, n), dtype=dt),
        ref.new_empty((L,), dtype=dt),
        ref.new_empty((L,), dtype=torch.bool),
        ref.new_empty((L,), dtype=dt),
        ref.new_empty((L,), dtype=dt),
    )


@torch.library.custom_op("fastguide::cka_bwd", mutates_args=())
def _cka_bwd(
    grad: torch.Tensor,
    cka: torch.Tensor,
    layers: list[torch.Tensor],
    C: torch.Tensor,
    pre_C: torch.Tensor,
    s: torch.Tensor,
    ok: torch.Tensor,
    pre_ok: torch.Tensor,
    h: torch.Tensor,
    pre_h: torch.Tensor,
    sig: torch.Tensor,
    pairs: list[int],
    which: list[int],
    estimator: str,
    kernel: str,
    sigma: float,
    route: str,
    backend: str,
) -> list[torch.Tensor]:
    """Gradients of ``layers[a]`` for each ``a`` in ``which`` (in that order)."""
    n = layers[0].shape[0]
    N = hsic_norm(n, estimator)
    plist = _pair_list(pairs)
    pi, pj = _index(pairs, grad.device)
    ok_all = torch.cat([ok, pre_ok])
    h_all = torch.cat([h, pre_h.to(h.dtype)])
    W = tb.pair_weights(grad, cka, h_all, ok_all, pi, pj, N)
    partners = _partners(plist, which)
    L = len(layers)
    out = []
    if route == "feature":
        need = sorted({b for a in which for b in partners[a]})
        feats = {b: tb.feature_prep(layers[b]) for b in need}
        for a in which:
            Xb = feats[a][0]
            acc = None
            for b in partners[a]:
                term = W[a, b] * tb.feature_apply(feats[b][0], feats[b][3], Xb, estimator)
                acc = term if acc is None else acc + term
            g = (2.0 / s[a].sqrt()) * acc
            out.append((g - g.mean(dim=0)).to(layers[a].dtype))
        return out
    pre = pre_C.to(C.dtype)
    for a in which:
        Cs = [C[b] if b < L else pre[b - L] for b in partners[a]]
        w = torch.stack([W[a, b] for b in partners[a]])
        if kernel == "rbf":
            G = sum(wk * Ck for wk, Ck in zip(w, Cs, strict=False))
            out.append(tb.rbf_grad(layers[a], G, s[a], sig[a]))
        elif backend == "triton":
            out.append(_kernels().backward.grad_x(layers[a], Cs, w, 2.0 / s[a]))
        else:
            out.append(tb.grad_from_terms(layers[a], Cs, w, s[a]))
    return out


@_cka_bwd.register_fake
def _(
    grad,
    cka,
    layers,
    C,
    pre_C,
    s,
    ok,
    pre_ok,
    h,
    pre_h,
    sig,
    pairs,
    which,
    estimator,
    kernel,
    sigma,
    route,
    backend,
):
    return [torch.empty_like(layers[a]) for a in which]


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


def _setup_context(ctx, inputs, output):
    layers, pre_C, pre_s, pre_ok, pre_h, pairs, estimator, kernel, sigma, route, backend = inputs
    cka, C, s, ok, h, sig = output
    ctx.which = [a for a, x in enumerate(layers) if x.requires_grad]
    ctx.n_layers = len(layers)
    ctx.args = (pairs, estimator, kernel, sigma, route, backend)
    # Only the CKA output is differentiable: without this, autograd materialises a zero gradient the
    # size of the whole (L, n, n) Gram stack for the unused C output on every backward.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(cka, C, pre_C, s, ok, pre_ok, h, pre_h, sig, *layers)


def _backward(ctx, grad_cka, _gC, _gs, _gok, _gh, _gsig):
    cka, C, pre_C, s, ok, pre_ok, h, pre_h, sig, *layers = ctx.saved_tensors
    grads = [None] * ctx.n_layers
    if ctx.which and grad_cka is not None:
        pairs, estimator, kernel, sigma, route, backend = ctx.args
        gs = _cka_bwd(
            grad_cka,
            cka,
            layers,
            C,
            pre_C,
            s,
            ok,
            pre_ok,
            h,
            pre_h,
            sig,
            pairs,
            ctx.which,
            estimator,
            kernel,
            sigma,
            route,
            backend,
        )
        for a, g in zip(ctx.which, gs, strict=False):
            grads[a] = g
    return grads, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("fastguide::cka_fwd", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public functions
def _prepare(xs, name: str, tokens: str) -> list[torch.Tensor]:
    if isinstance(xs, torch.Tensor) or not isinstance(xs, Sequence):
        raise TypeError(f"{name} must be a list or tuple of tensors; got {type(xs).__name__}")
    if len(xs) == 0:
        raise ValueError(f"{name} must hold at least one layer")
    out = []
    for k, x in enumerate(xs):
        check_tensor(x, f"{name}[{k}]")
        out.append(as_examples(x, tokens, f"{name}[{k}]"))
    return out


def _choose_route(route: str, kernel: str, layers, plist, has_pre: bool) -> str:
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


def _plan(
    raw: list[torch.Tensor],
    pre: list[LayerStats],
    pairs: list[tuple[int, int]],
    estimator: str,
    kernel: str,
    sigma,
    backend: str,
    route: str,
) -> tuple:
    """Validate layers against each other and build the argument tuple of ``fastguide::cka_fwd``."""
    if not raw:
        raise ValueError("at least one layer must be an activation tensor (not only precomputed LayerStats)")
    check_layers(raw, [f"layer {k}" for k in range(len(raw))], estimator)
    n, dev = raw[0].shape[0], raw[0].device
    for k, st in enumerate(pre):
        if st.estimator != estimator or st.kernel != kernel:
            raise ValueError(
                f"precomputed LayerStats {k} was made with estimator={st.estimator!r}, kernel={st.kernel!r}; "
                f"this call uses estimator={estimator!r}, kernel={kernel!r}"
            )
        if st.n != n:
            raise ValueError(
                f"all layers must have the same number of examples n; got n={n} and LayerStats n={st.n}"
            )
        if st.C.device != dev:
            raise ValueError(f"all layers must be on one device; got {dev} and LayerStats on {st.C.device}")
    route = _choose_route(route, kernel, raw, pairs, bool(pre))
    use_triton = route == "gram" and _use_triton(backend, dev, kernel)
    dt = torch.float64 if any(x.dtype == torch.float64 for x in raw) else torch.float32
    if pre:
        pre_C = torch.stack([st.C for st in pre])
        pre_s = torch.stack([st.s for st in pre])
        pre_ok = torch.stack([st.ok for st in pre])
        pre_h = torch.stack([st.h for st in pre])
    else:
        pre_C = torch.empty((0, n, n), dtype=dt, device=dev)
        pre_s = torch.empty((0,), dtype=dt, device=dev)
        pre_ok = torch.empty((0,), dtype=torch.bool, device=dev)
        pre_h = torch.empty((0,), dtype=dt, device=dev)
    flat = [v for p in pairs for v in p]
    sig = -1.0 if sigma is None else float(sigma)
    return (
        raw,
        pre_C,
        pre_s,
        pre_ok,
        pre_h,
        flat,
        estimator,
        kernel,
        sig,
        route,
        "triton" if use_triton else "torch",
    )


def _run(raw, pre, pairs, estimator, kernel, sigma, backend, route) -> torch.Tensor:
    return _cka_fwd(*_plan(raw, pre, pairs, estimator, kernel, sigma, backend, route))[0]


def _check_pairs(pairs, nx: int, ny: int) -> list[tuple[int, int]]:
    out = []
    try:
        items = list(pairs)
    except TypeError:
        raise TypeError(
            f"pairs must be a sequence of (i, j) index pairs; got {type(pairs).__name__}"
        ) from None
    if not items:
        raise ValueError("pairs must not be empty")
    for p in items:
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        if len(p) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in p):
            raise TypeError(f"pairs must hold (i, j) pairs of ints; got {p!r}")
        i, j = p
        if not (-nx <= i < nx) or not (-ny <= j < ny):
            raise IndexError(f"pair {p!r} out of range for {nx} x-layers and {ny} y-layers")
        out.append((i % nx, j % ny))
    return out


def cka_pairs(
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor | LayerStats],
    pairs: Sequence[tuple[int, int]] | None = None,
    *,
    estimator: str = "unbiased",
    kernel: str = "linear",
    sigma: float | None = None,
    backend: str = "auto",
    tokens: str = "flatten",
    route: str = "auto",
) -> torch.Tensor:
    """CKA of selected layer pairs ``(i, j)`` -> ``CKA(xs[i], ys[j])``, a (len(pairs),) tensor.

    ``pairs=None`` pairs ``xs[k]`` with ``ys[k]``. Each layer's Gram is computed once however many
    pairs use it. Elements of ``ys`` may be precomputed :class:`LayerStats` (constants). Differentiable
    in every tensor that requires grad, through an analytic backward.
    """
    _check_options(estimator, kernel, backend, tokens, route, sigma)
    if isinstance(ys, torch.Tensor) or not isinstance(ys, Sequence) or len(ys) == 0:
        raise TypeError("ys must be a non-empty list or tuple of tensors or LayerStats")
    xs2 = _prepare(xs, "xs", tokens)
    if pairs is None:
        if len(xs2) != len(ys):
            raise ValueError(f"pairs=None pairs xs[k] with ys[k]; got {len(xs2)} xs and {len(ys)} ys")
        pairs = [(k, k) for k in range(len(xs2))]
    plist = _check_pairs(pairs, len(xs2), len(ys))
    # Only layers that appear in a pair are computed (and only they get a gradient).
    used_x = sorted({i for i, _ in plist})
    used_y = sorted({j for _, j in plist})
    raw_y = [k for k in used_y if not isinstance(ys[k], LayerStats)]
    pre_y = [k for k in used_y if isinstance(ys[k], LayerStats)]
    ys_raw = _prepare([ys[k] for k in raw_y], "ys", tokens) if raw_y else []
    A, B = len(used_x), len(ys_raw)
    where_x = {k: r for r, k in enumerate(used_x)}
    where_y = {k: A + r for r, k in enumerate(raw_y)}
    where_y.update({k: A + B + r for r, k in enumerate(pre_y)})
    glob = [(where_x[i], where_y[j]) for i, j in plist]
    layers = [xs2[k] for k in used_x] + ys_raw
    return _run(layers, [ys[k] for k in pre_y], glob, estimator, kernel, sigma, backend, route)


def cka_matrix(
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor] | None = None,
    *,
    estimator: str = "unbiased",
    kernel: str = "linear",
    sigma: float | None = None,
    backend: str = "auto",
    tokens: str = "flatten",
    route: str = "auto",
) -> torch.Tensor:
    """All-pairs CKA, a (len(xs), len(ys)) tensor; ``ys=None`` compares xs with itself.

    One Gram per layer and one GEMM over the flattened centred Grams for all pairs. Differentiable.
    """
    _check_options(estimator, kernel, backend, tokens, route, sigma)
    xs2 = _prepare(xs, "xs", tokens)
    A = len(xs2)
    if ys is None:
        layers = xs2
        pairs = [(i, j) for i in range(A) for j in range(A)]
        B = A
    else:
        ys2 = _prepare(ys, "ys", tokens)
        B = len(ys2)
        layers = xs2 + ys2
        pairs = [(i, A + j) for i in range(A) for j in range(B)]
    return _run(layers, [], pairs, estimator, kernel, sigma, backend, route).view(A, B)


def cka(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    estimator: str = "unbiased",
    kernel: str = "linear",
    sigma: float | None = None,
    backend: str = "auto",
    tokens: str = "flatten",
    route: str = "auto",
) -> torch.Tensor:
    """CKA of two activations with the same number of examples, a 0-d tensor (differentiable)."""
    check_tensor(x, "x")
    check_tensor(y, "y")
    return cka_pairs(
        [x],
        [y],
        [(0, 0)],
        estimator=estimator,
        kernel=kernel,
        sigma=sigma,
        backend=backend,
        tokens=tokens,
        route=route,
    )[0]


def gram(x: torch.Tensor, *, center: bool = True, tokens: str = "flatten") -> torch.Tensor:
    """The (n, n) Gram ``X X^T`` of the flattened features, column-mean-centred by default.

    Accumulates in fp32 for fp16/bf16/fp32 inputs (fp64 stays fp64) and returns that dtype.
    Centring subtracts a shift (mean of the first 32 rows) and then the exact column mean, so large
    offsets do not cancel catastrophically in fp32. Differentiable through plain autograd.
    """
    check_tensor(x, "x")
    check_option(tokens, "tokens", TOKENS)
    X = as_examples(x, tokens, "x")
    if center:
        Xh = tb.shifted(X)
        X = Xh - Xh.mean(dim=0)
    else:
        X = X.to(acc_dtype(X.dtype))
    return X @ X.T
