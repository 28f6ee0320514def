"""The fastguide algorithm in plain torch (CPU, and the fallback on GPU): one of the two backends.

A backend is a module with the same five functions; the ops (:mod:`fastguide._ops`) pick one
(:mod:`fastguide._triton_backend` is the other) and never branch on it:

* :func:`gram_table` -- per-layer statistics of a layer stack (C, s, ok, h, sigma, klog);
* :func:`pair_dots` -- ``<C_i, C_j>`` of the requested pairs (HSIC before the division by N);
* :func:`layer_grad` -- one layer's gradient ``(2 / s) G X^`` (or the RBF form);
* :func:`feature_fwd` / :func:`feature_bwd` -- the feature route (linear kernel, n > d): the same
  HSICs and gradients from ``X^T Y`` products and O(nd) vectors, without any n x n matrix.

A backend may also have the optional fused pair ``fused_fwd(layers, pre, pairs, estimator, dtype)
-> (cka, table)`` and ``fused_bwd(grad, cka, layers, which, table, pre, pairs, estimator) ->
grads`` (see :mod:`fastguide._triton_backend`, which has them): the ops then run a Gram-route call
through them instead of composing the five entries. This backend has none: its composition (a few
batched GEMMs and elementwise ops) is already what it would do inside them.

Names follow DESIGN.md section 2. Per layer a (an (n, d) matrix of examples): the shift
(:func:`fastguide._utils.shift_of`) subtracted on load -> ``X^``; Gram ``K = X^ X^T`` (one per layer);
centring ``H K H`` (biased) or ``U(K)`` (unbiased), never forming H; normalisation by the mean diagonal
``s = tr(HKH) / n``: ``C = centred(K) / s``; self-HSIC ``h = <C, C> / N``; degenerate flag ``ok``
(section 3). Pairs: ``HSIC(a, b) = <C_a, C_b> / N``; CKA = ``HSIC / (sqrt(h_a) sqrt(h_b))``.
Backward: ``dX_a = (2 / s_a) G_a X^_a`` with ``G_a = sum_b W[a, b] C_b`` (:func:`pair_weights`).
"""

from __future__ import annotations

import math

import torch

from ._cpu import gram_stack, shifted_matmul, sym_gram
from ._rbf import rbf_grad, rbf_matrix
from ._utils import SHIFT_ROWS, acc_dtype, hsic_norm, shift_of

# --------------------------------------------------------------------------- per-layer statistics
#: A centred Gram whose Frobenius norm is at most this many rounding units (eps of the accumulation
#: dtype) of the Gram it was centred from is zero up to rounding: its layer is degenerate. Measured
#: (docs/numerics.md): layers with U(K) = 0 exactly reach 3 units, legitimate ones 1.5e5 and more.
VANISH_UNITS = 64.0


def stack_dtype(xs) -> torch.dtype:
    """The accumulation dtype of a call: float64 if any layer is float64, else float32 (issue 14 item 1)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def degenerate_factor(dtype: torch.dtype) -> float:
    """``(k eps)^2`` of an input dtype: the degeneracy threshold per unit of ``||x||_F^2``.

    k = 4 for float32/float64 (their own arithmetic upstream leaves noise of a few ulps: DESIGN.md
    section 3) and k = 1 for float16/bfloat16, whose values are rounded once from fp32 accumulation: a
    layer with 2 ulps of signal is data there (measured, docs/numerics.md "Half precision").
    """
    k = 1.0 if dtype in (torch.float16, torch.bfloat16) else 4.0
    return (k * torch.finfo(dtype).eps) ** 2


def degenerate_threshold(x: torch.Tensor, sq: torch.Tensor | None = None) -> torch.Tensor:
    """``degenerate_factor(x.dtype) ||x||_F^2`` of the raw input (DESIGN.md section 3).

    ``sq``: ``||x||_F^2`` when the caller already has it (e.g. the trace of the raw Gram).
    """
    if sq is None:
        sq = torch.linalg.vector_norm(x, dtype=acc_dtype(x.dtype)).square()
    return degenerate_factor(x.dtype) * sq


def vanishes(norm: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``norm <= VANISH_UNITS eps ref``: a centred Gram of Frobenius norm ``norm`` computed from a
    matrix whose rounding reference is ``ref`` is zero up to rounding (NaN: False, so NaN propagates)."""
    return norm <= VANISH_UNITS * torch.finfo(ref.dtype).eps * ref


def center_gram_(K: torch.Tensor, estimator: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre a stack of Grams (..., n, n) IN PLACE (the caller owns K). Returns (K, tr(HKH)).

    Biased: ``H K H`` by subtracting row/column means and adding the grand mean (never forming H).
    Unbiased: Szekely-Rizzo U-centring of ``K~`` (K with zeroed diagonal): zero diagonal, zero row
    sums. In place and batched over layers, so the n x n work is a handful of passes over one
    buffer and a handful of kernel launches however many layers there are.
    """
    n = K.shape[-1]
    diag = K.diagonal(dim1=-2, dim2=-1)
    if estimator == "biased":
        m = K.mean(dim=-1)
        g = m.mean(dim=-1)
        K.sub_(m.unsqueeze(-1)).sub_(m.unsqueeze(-2)).add_(g[..., None, None])
        return K, diag.sum(-1)
    tr = diag.sum(-1)
    diag.zero_()
    r = K.sum(dim=-1)
    tot = r.sum(dim=-1)
    t = tr - (tot + tr) / n
    r = r / (n - 2)
    K.sub_(r.unsqueeze(-1)).sub_(r.unsqueeze(-2)).add_((tot / ((n - 1) * (n - 2)))[..., None, None])
    diag.zero_()
    return K, t


def gram_fwd(
    xs: list[torch.Tensor], estimator: str, kernel: str = "linear", sigma: float | None = None
) -> tuple[torch.Tensor, ...]:
    """(C, s, ok, h, sigma) of :func:`gram_table`: the twin of the launcher ``fastguide.kernels.gram_fwd``."""
    return gram_table(xs, estimator, kernel, sigma)[:5]


def gram_table(
    xs: list[torch.Tensor], estimator: str, kernel: str = "linear", sigma: float | None = None
) -> tuple[torch.Tensor, ...]:
    """Backend entry: per-layer statistics of L layers (n, d_l): C (L, n, n), s, ok, h, sigma, klog
    (each (L,)).

    One Gram per layer (symmetric product, written into its slot of the stack; on CPU several layers
    at once, one per core: :func:`fastguide._cpu.gram_stack`), then centring, normalisation and
    self-HSICs batched over the whole stack. ``klog`` is 0 except for unbiased RBF layers, whose
    kernel was scaled by ``exp(klog)`` (:mod:`fastguide._rbf`).
    """
    n = xs[0].shape[0]
    N = hsic_norm(n, estimator)
    dt = stack_dtype(xs)
    dev = xs[0].device
    C = torch.empty((len(xs), n, n), dtype=dt, device=dev)

    # K = X^ X^T: symmetric (BLAS syrk on CPU), shifted in column chunks (no full copy of x); only
    # H K H / U(K) / distances use it (centring_only). ||x||^2 for the degeneracy threshold comes from
    # the raw Gram's trace when the raw route ran (no extra pass over x).
    sq = gram_stack(xs, C)
    if sq is None:
        sqs: list = []
        for l, x in enumerate(xs):
            sym_gram(x, shift_of(x).to(dt), out=C[l], centring_only=True, sq=sqs)
        sq = torch.stack(sqs).to(dt)
    # degenerate_threshold of every layer at once (one op, not one per layer).
    thr = torch.tensor([degenerate_factor(x.dtype) for x in xs], dtype=dt, device=dev) * sq
    klog = torch.zeros((len(xs),), dtype=dt, device=dev)
    if kernel == "linear":
        # Rounding reference of the centred Gram: the trace of the Gram it is centred from.
        ref = C.diagonal(dim1=-2, dim2=-1).sum(-1)
        C, t = center_gram_(C, estimator)
        # NaN-propagating comparison: a NaN trace keeps ok True so NaN reaches the output.
        ok = ~(t <= thr)
        sig = torch.ones_like(t)
        s = torch.where(ok, t / n, torch.ones_like(t))
    else:
        t_lin = C.diagonal(dim1=-2, dim2=-1).sum(-1) - C.sum(dim=(-2, -1)) / n  # tr(HKH), linear
        ok = ~(t_lin <= thr)
        parts = []
        for l in range(len(xs)):
            M, sg, m, R = rbf_matrix(C[l], sigma, ok[l], estimator)
            C[l].copy_(M)
            parts.append((sg, m, R))
        sig, klog, ref = (torch.stack(v) for v in zip(*parts, strict=True))
        C, t = center_gram_(C, estimator)
        if estimator == "unbiased":
            # The diagonal of e^m K is not used (nor formed): normalise by the norm of U(M) instead.
            t = torch.linalg.vector_norm(C, dim=(-2, -1)) * (n / math.sqrt(N))
        ok = ok & ~(t <= 0)
        s = torch.where(ok, t / n, torch.ones_like(t))
    C.div_(s[:, None, None])
    # Cascade-summed squares per layer: vector_norm and BLAS dots lose digits over n^2 fp32 entries,
    # a batched mul-sum costs a transient (docs/numerics.md).
    h = torch.stack([(c * c).sum() for c in C]) / N
    # Degenerate also when the centred Gram is zero up to rounding (e.g. U(K) = 0 for a layer whose
    # examples are all equal but one: issue 14 item 2). ||centred|| = s sqrt(h N).
    ok = ok & ~(h <= 0) & ~vanishes(s * (h * N).sqrt(), ref)
    s = torch.where(ok, s, torch.ones_like(s))
    return C, s, ok, h, sig, klog


# --------------------------------------------------------------------------- pair values
#: Reduction length of one GEMM in :func:`flat_dots` (the partial products are summed in float64).
DOT_CHUNK = 1 << 15


def flat_dots(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A @ B.T`` for (p, K) and (q, K) with K = n^2 (flattened Grams), accurate to ~1e-7 relative.

    One fp32 GEMM over the whole K = n^2 is not (BLAS accumulates a long reduction in few partial
    sums), so the reduction is split into GEMMs of at most ``DOT_CHUNK`` terms whose (p, q) results
    are summed in float64 (measurements: docs/numerics.md).
    """
    K = A.shape[1]
    if K <= DOT_CHUNK or A.dtype == torch.float64:
        return A @ B.T
    acc = torch.zeros((A.shape[0], B.shape[0]), dtype=torch.float64, device=A.device)
    for c0 in range(0, K, DOT_CHUNK):
        acc += (A[:, c0 : c0 + DOT_CHUNK] @ B[:, c0 : c0 + DOT_CHUNK].T).double()
    return acc.to(A.dtype)


def view_dots(SA: torch.Tensor, SB: torch.Tensor, li: list[int], lj: list[int]) -> torch.Tensor:
    """``<SA[li[q]], SB[lj[q]]>`` for each q: one GEMM (:func:`flat_dots`) over the index ranges spanned."""
    i0, i1, j0, j1 = min(li), max(li) + 1, min(lj), max(lj) + 1
    A = SA[i0:i1].flatten(1)
    B = SB[j0:j1].flatten(1)
    if len(li) == 1:
        return (A[0] * B[0]).sum().reshape(1)
    M = flat_dots(A, B)
    flat = [(a - i0) * (j1 - j0) + (b - j0) for a, b in zip(li, lj, strict=True)]
    return M.flatten().index_select(0, torch.tensor(flat, device=M.device))


def block_dots(
    stacks: list[torch.Tensor], index: list[tuple[int, int]], pairs: list[tuple[int, int]], dots=None
) -> torch.Tensor:
    """``<C_i, C_j>`` for each pair of global layer indices, from a few GEMMs over views.

    ``stacks`` hold (L_k, n, n) matrices; ``index[g] = (k, l)`` locates global layer g. Pairs are
    grouped by the stacks they touch and each group is one call of ``dots(stack_a, stack_b, la, lb)``
    (the values ``<stack_a[la[q]], stack_b[lb[q]]>``): by default :func:`view_dots`, one GEMM over the
    contiguous index range the group spans (views, no gathers), so all pairs cost a handful of GEMMs;
    the Triton backend passes its pair kernel.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for p, (i, j) in enumerate(pairs):
        groups.setdefault((index[i][0], index[j][0]), []).append(p)
    pieces, order = [], []
    for (ki, kj), ps in groups.items():
        li = [index[pairs[p][0]][1] for p in ps]
        lj = [index[pairs[p][1]][1] for p in ps]
        pieces.append((dots or view_dots)(stacks[ki], stacks[kj], li, lj))
        order.extend(ps)
    vals = torch.cat(pieces)
    if order != list(range(len(pairs))):
        inv = [0] * len(order)
        for pos, p in enumerate(order):
            inv[p] = pos
        vals = vals.index_select(0, torch.tensor(inv, device=vals.device))
    return vals


def pair_dots(
    stacks: list[torch.Tensor], index: list[tuple[int, int]], pairs: list[tuple[int, int]]
) -> torch.Tensor:
    """Backend entry: ``<C_i, C_j>`` of each pair, a few GEMMs over views (:func:`block_dots`)."""
    return block_dots(stacks, index, pairs)


def cka_from_hsic(
    hsic: torch.Tensor, h: torch.Tensor, ok: torch.Tensor, pi: torch.Tensor, pj: torch.Tensor
) -> torch.Tensor:
    """CKA epilogue: two separate square roots, exactly 0 for pairs with a degenerate layer."""
    valid = ok[pi] & ok[pj]
    one = torch.ones_like(h)
    root = torch.where(ok, h, one).sqrt()
    den = root[pi] * root[pj]
    return torch.where(valid, hsic / den, torch.zeros_like(hsic))


def pair_weights(
    grad: torch.Tensor,
    cka: torch.Tensor,
    h: torch.Tensor,
    ok: torch.Tensor,
    pi: torch.Tensor,
    pj: torch.Tensor,
    N: float,
) -> torch.Tensor:
    """The (L, L) matrix W with ``G_a = sum_b W[a, b] C_b`` (DESIGN.md section 2, backward).

    ``alpha_p = g_p / sqrt(h_i h_j)`` goes to W[i, j] and W[j, i]; ``beta = g_p CKA_p / h`` is
    subtracted on the diagonal of each side. Degenerate pairs are masked (else NaN).
    """
    L = h.shape[0]
    grad = grad.to(h.dtype)
    valid = ok[pi] & ok[pj]
    one = torch.ones_like(h)
    hs = torch.where(ok, h, one)
    root = hs.sqrt()
    zero = torch.zeros_like(grad)
    alpha = torch.where(valid, grad / (root[pi] * root[pj]), zero)
    bi = torch.where(valid, grad * cka / hs[pi], zero)
    bj = torch.where(valid, grad * cka / hs[pj], zero)
    W = torch.zeros(L * L, dtype=h.dtype, device=h.device)
    W.index_add_(0, pi * L + pj, alpha)
    W.index_add_(0, pj * L + pi, alpha)
    W.index_add_(0, pi * (L + 1), -bi)
    W.index_add_(0, pj * (L + 1), -bj)
    return W.view(L, L) / N


def grad_from_terms(
    x: torch.Tensor, Cs: list[torch.Tensor], w: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    """``dX = (2 / s) (sum_k w_k C_k) X^`` for one layer (G formed explicitly, one n^2 d GEMM).

    Accumulates in the dtype of the C's (the call's: float64 when any layer is) and returns x's dtype.
    """
    G = w[0] * Cs[0]
    for wk, Ck in zip(w[1:], Cs[1:], strict=True):
        G.addcmul_(Ck, wk)  # in place: one n x n buffer however many partners
    return shifted_matmul(G, x, shift_of(x).to(G.dtype), 2.0 / s, x.dtype)


def layer_grad(
    x: torch.Tensor,
    Cs: list[torch.Tensor],
    w: torch.Tensor,
    s: torch.Tensor,
    sig: torch.Tensor,
    klog: torch.Tensor,
    kernel: str,
    estimator: str,
) -> torch.Tensor:
    """Backend entry: the gradient of one layer from its partners' matrices ``Cs`` and weights ``w``.

    ``sig``, ``klog``: the layer's RBF bandwidth and kernel scale from the forward (unused: linear).
    """
    if kernel == "rbf":
        G = w[0] * Cs[0]
        for wk, Ck in zip(w[1:], Cs[1:], strict=True):
            G.addcmul_(Ck, wk)
        shift = shift_of(x).to(G.dtype)
        Xh = x.to(G.dtype) - shift
        K = sym_gram(x, shift)
        return rbf_grad(Xh, K, G, s, sig, klog, estimator).to(x.dtype)
    return grad_from_terms(x, Cs, w, s)


# --------------------------------------------------------------------------- feature route
def feature_prep(x: torch.Tensor, dt: torch.dtype):
    """Feature-route statistics of one layer: exactly centred, normalised ``Xb = H X^ / sqrt(s)``.

    Returns (Xb, s, ok, aux, ref) with aux = (row sq. norms a, Xb^T 1, r = K~1, S = 1^T K~ 1), all
    O(nd), and ref = ``tr(X^ X^T)`` (the rounding reference of the degeneracy rule); no n x n matrix is
    formed. ``dt``: the call's accumulation dtype. ``ok`` is the rounding-level test of DESIGN.md
    section 3 (the caller adds the self-HSIC tests).
    """
    n = x.shape[0]
    # One (n, d) buffer: the shifted copy is centred and normalised in place (same values as out of
    # place; two fewer n x d allocations and passes).
    Xb = x.to(dt) - shift_of(x).to(dt)
    ref = Xb.square().sum()
    Xb.sub_(Xb.mean(dim=0))
    t = Xb.square().sum()
    ok = ~(t <= degenerate_threshold(x).to(dt))
    s = torch.where(ok, t / n, torch.ones_like(t))
    Xb.div_(s.sqrt())
    return Xb, s, ok, feature_aux(Xb), ref


def feature_aux(Xb: torch.Tensor):
    a = Xb.square().sum(dim=1)
    u = Xb.sum(dim=0)
    r = Xb @ u - a
    S = u.square().sum() - a.sum()
    return a, u, r, S


def feature_hsic(Xb, Yb, ax, ay, estimator: str, XtY: torch.Tensor | None = None) -> torch.Tensor:
    """HSIC of two normalised feature matrices, matching ``<C_x, C_y> / N`` of the Gram route."""
    n = Xb.shape[0]
    N = hsic_norm(n, estimator)
    if XtY is None:
        XtY = Xb.T @ Yb
    if estimator == "biased":
        # Exactly centred features: H K H = K, so <C_x, C_y> = ||X^T Y||_F^2.
        return XtY.square().sum() / N
    a, _, rK, SK = ax
    b, _, rL, SL = ay
    trKL = XtY.square().sum() - a @ b
    val = trKL + SK * SL / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (rK @ rL)
    return val / N


def feature_apply(Yb, ay, Z, estimator: str) -> torch.Tensor:
    """``C_y Z`` for the feature form of ``C_y`` (U(Yb Yb^T) or Yb Yb^T), O(n d_y d_z)."""
    n = Yb.shape[0]
    LZ = Yb @ (Yb.T @ Z)
    if estimator == "biased":
        return LZ
    b, _, rL, SL = ay
    c = SL / ((n - 1) * (n - 2))
    one_z = Z.sum(dim=0, keepdim=True)  # 1^T Z, (1, d)
    LtZ = LZ - b.unsqueeze(1) * Z
    delta = -2.0 * rL / (n - 2) + c
    return (
        LtZ
        - rL.unsqueeze(1) * one_z / (n - 2)
        - (rL @ Z).unsqueeze(0) / (n - 2)
        + c * one_z
        - delta.unsqueeze(1) * Z
    )


#: The feature route's unbiased self-HSIC is a sum of terms of size ``||K||^2`` (``||X^T X||^2 - a'a +
#: ...``), so it resolves ``||U(K)||^2`` only down to a few eps of their absolute sum: below this many
#: units the layer is degenerate on this route (measured: docs/numerics.md, "Degenerate layers").
FEATURE_VANISH_UNITS = 64.0


def _feature_self(f, estimator: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, degenerate) of one prepared layer: its self-HSIC and whether its centred Gram vanishes
    at the rounding level of this route."""
    Xb, s, _, aux, ref = f
    n = Xb.shape[0]
    N = hsic_norm(n, estimator)
    XtX = Xb.T @ Xb
    h = feature_hsic(Xb, Xb, aux, aux, estimator, XtX)
    gone = vanishes(s * (h * N).sqrt(), ref)
    if estimator == "unbiased":
        a, _, r, S = aux
        terms = XtX.square().sum() + a @ a + S * S / ((n - 1) * (n - 2)) + 2.0 / (n - 2) * (r @ r)
        gone = gone | (h * N <= FEATURE_VANISH_UNITS * torch.finfo(h.dtype).eps * terms)
    return h, gone


def feature_fwd(layers: list[torch.Tensor], pairs: list[tuple[int, int]], estimator: str):
    """Backend entry, feature route: (hsic (P,), s, ok, h (each (L,))) of ``layers``, no n x n matrix.

    ``hsic`` is normalised like ``<C_i, C_j> / N`` on the Gram route; ``ok`` includes the self-HSIC tests.
    """
    dt = stack_dtype(layers)
    feats = [feature_prep(x, dt) for x in layers]
    s = torch.stack([f[1] for f in feats])
    ok = torch.stack([f[2] for f in feats])
    h, gone = (torch.stack(v) for v in zip(*[_feature_self(f, estimator) for f in feats], strict=True))
    ok = ok & ~(h <= 0) & ~gone
    s = torch.where(ok, s, torch.ones_like(s))
    hsic = torch.stack(
        [
            h[i] if i == j else feature_hsic(feats[i][0], feats[j][0], feats[i][3], feats[j][3], estimator)
            for i, j in pairs
        ]
    )
    return hsic, s, ok, h


def feature_bwd(
    layers: list[torch.Tensor],
    W: torch.Tensor,
    s: torch.Tensor,
    which: list[int],
    partners: dict[int, list[int]],
    estimator: str,
) -> list[torch.Tensor]:
    """Backend entry, feature route: gradients of ``layers[a]`` for a in ``which``, from the pair weights W.

    ``dX_a = (2 / sqrt(s_a)) H sum_b W[a, b] C_b Xb_a`` with each ``C_b Xb_a`` applied in feature
    form (:func:`feature_apply`); ``partners[a]`` lists a itself and every layer it is paired with.
    """
    need = sorted({b for a in which for b in partners[a]})
    dt = W.dtype
    feats = {b: feature_prep(layers[b], dt) for b in need}
    out = []
    for a in which:
        Xb = feats[a][0]
        acc = None
        for b in partners[a]:
            term = W[a, b] * feature_apply(feats[b][0], feats[b][3], Xb, estimator)
            acc = term if acc is None else acc + term
        g = (2.0 / s[a].sqrt()) * acc
        out.append((g - g.mean(dim=0)).to(layers[a].dtype))
    return out


def feature_cost(ds: list[int], pairs: list[tuple[int, int]], n: int) -> tuple[float, float]:
    """Counted flops of the (feature, Gram) routes (DESIGN.md section 2)."""
    used = sorted({i for p in pairs for i in p})
    feat = sum(n * ds[i] * ds[j] for i, j in pairs if i != j) + sum(n * ds[i] ** 2 / 2 for i in used)
    gram = sum(n * n * ds[i] / 2 for i in used) + len(pairs) * n * n
    return feat, gram


# --------------------------------------------------------------------------- grouped Grams
def group_shift(x: torch.Tensor) -> torch.Tensor:
    """Per-group column shift of a (G, n, d) view: the mean of each group's first min(n, 32) rows, (G, d)."""
    return x[:, :SHIFT_ROWS].to(acc_dtype(x.dtype)).mean(dim=1)


def _group_shifted(x: torch.Tensor, shift: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """One shifted copy ``x - shift`` of a (G, n, d) view in ``dt``: one pass, the upcast by type
    promotion, the view's layout kept (a streaming pass; the batched GEMM takes the strides)."""
    return x - shift.to(dt).unsqueeze(1)


def group_gram(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Backend entry: Grams ``X^_g X^_g^T`` of a (G, n, d) view into ``out`` (G, n, n); returns ``||x_g||^2``.

    One batched GEMM over the groups (no loop over positions or samples). ``||x_g||^2`` (for the
    degeneracy threshold) from the shifted Gram's trace and the raw column sums, ``tr K + 2 c.(x^T 1) -
    n ||c||^2``: a (G, d) reduction instead of a second full pass over the strided view.
    """
    c = group_shift(x).to(out.dtype)
    Xh = _group_shifted(x, c, out.dtype)
    torch.bmm(Xh, Xh.transpose(1, 2), out=out)
    colsum = x.sum(dim=1, dtype=out.dtype)
    tr = out.diagonal(dim1=-2, dim2=-1).sum(-1)
    return tr + 2.0 * (c * colsum).sum(-1) - x.shape[1] * (c * c).sum(-1)


def group_grad(W: torch.Tensor, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Backend entry: ``scale_g W_g X^_g`` per group of a (G, n, d) view, in x's dtype ((G, n, d))."""
    out = torch.bmm(W, _group_shifted(x, group_shift(x), W.dtype))
    return out.mul_(scale[:, None, None]).to(x.dtype)


__all__ = [
    "gram_fwd",
    "gram_table",
    "pair_dots",
    "layer_grad",
    "feature_fwd",
    "feature_bwd",
    "block_dots",
    "cka_from_hsic",
    "pair_weights",
    "feature_cost",
    "group_shift",
    "group_gram",
    "group_grad",
]
