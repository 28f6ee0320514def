"""Readable float64 oracle of every quantity fastguide computes. Clarity over speed.

Tests and benchmarks compare against these functions. Everything is evaluated in float64 with the
textbook formulas (explicit centring matrix H, the Song et al. 2012 closed form of unbiased HSIC),
without the fp32 tricks of the fast paths.
"""

from __future__ import annotations

import torch


def _f64(x: torch.Tensor) -> torch.Tensor:
    """float64 (n, d) view; differentiable, so tests can take reference gradients by autograd."""
    return x.to(torch.float64).reshape(x.shape[0], -1)


def linear_gram(x: torch.Tensor) -> torch.Tensor:
    """``X X^T`` of the column-centred float64 features.

    Both HSIC estimators are invariant to per-column shifts; centring first keeps the oracle itself
    free of cancellation when the inputs carry large offsets (e.g. +1e4).
    """
    X = _f64(x)
    X = X - X.mean(0)
    return X @ X.T


def rbf_gram(x: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """``exp(-||xi - xj||^2 / (2 sigma^2))``; ``sigma=None``: sigma^2 = median of all n^2 sq. distances."""
    X = _f64(x)
    X = X - X.mean(0)
    sq = (X * X).sum(1)
    D = (sq[:, None] + sq[None, :] - 2 * X @ X.T).clamp_min(0)
    D.fill_diagonal_(0)
    sig2 = D.detach().median() if sigma is None else torch.tensor(float(sigma) ** 2, dtype=torch.float64)
    return torch.exp(-D / (2 * sig2))


def centering_matrix(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)


def hsic_biased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Kornblith et al. 2019: ``tr(K H L H) / (n - 1)^2``."""
    n = K.shape[0]
    H = centering_matrix(n)
    return torch.trace(K @ H @ L @ H) / (n - 1) ** 2


def hsic_unbiased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Song et al. 2012 / Nguyen et al. 2021 unbiased HSIC (needs n >= 4).

    With K~, L~ the Grams with zeroed diagonals:
    ``[tr(K~L~) + (1'K~1)(1'L~1)/((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))``.
    """
    n = K.shape[0]
    Kt = K.clone()
    Lt = L.clone()
    Kt.fill_diagonal_(0)
    Lt.fill_diagonal_(0)
    one = torch.ones(n, dtype=torch.float64)
    term1 = torch.trace(Kt @ Lt)
    term2 = (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (one @ Kt @ Lt @ one)
    return (term1 + term2 - term3) / (n * (n - 3))


def u_center(K: torch.Tensor) -> torch.Tensor:
    """Szekely-Rizzo U-centring (zero diagonal, zero row sums); <U(K), U(L)>/(n(n-3)) = hsic_unbiased."""
    n = K.shape[0]
    Kt = K.clone()
    Kt.fill_diagonal_(0)
    r = Kt.sum(1)
    U = Kt - r[:, None] / (n - 2) - r[None, :] / (n - 2) + Kt.sum() / ((n - 1) * (n - 2))
    U.fill_diagonal_(0)
    return U


def hsic(K: torch.Tensor, L: torch.Tensor, estimator: str = "unbiased") -> torch.Tensor:
    return hsic_unbiased(K, L) if estimator == "unbiased" else hsic_biased(K, L)


def gram(x: torch.Tensor, kernel: str = "linear", sigma: float | None = None) -> torch.Tensor:
    return linear_gram(x) if kernel == "linear" else rbf_gram(x, sigma)


def centered_gram(x: torch.Tensor) -> torch.Tensor:
    """``H X X^T H`` in float64 (what ``fastguide.gram(x)`` returns)."""
    H = centering_matrix(x.shape[0])
    X = _f64(x)
    return H @ (X @ X.T) @ H


def is_degenerate(x: torch.Tensor) -> bool:
    """The DESIGN.md section 3 rule: centred signal below the input dtype's rounding level."""
    eps = torch.finfo(x.dtype).eps
    X = _f64(x).detach()
    t = ((X - X.mean(0)) ** 2).sum()
    return bool(t <= (4 * eps) ** 2 * (X**2).sum())


def cka(
    x: torch.Tensor, y: torch.Tensor, estimator: str = "unbiased", kernel: str = "linear", sigma=None
) -> torch.Tensor:
    """CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)); exactly 0 if either layer is degenerate."""
    if is_degenerate(x) or is_degenerate(y):
        return torch.zeros((), dtype=torch.float64)
    K, L = gram(x, kernel, sigma), gram(y, kernel, sigma)
    kl = hsic(K, L, estimator)
    kk = hsic(K, K, estimator)
    ll = hsic(L, L, estimator)
    if kk <= 0 or ll <= 0:
        return torch.zeros((), dtype=torch.float64)
    return kl / (kk.sqrt() * ll.sqrt())


def cka_matrix(xs, ys=None, estimator: str = "unbiased", kernel: str = "linear", sigma=None) -> torch.Tensor:
    ys = xs if ys is None else ys
    out = torch.zeros(len(xs), len(ys), dtype=torch.float64)
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            out[i, j] = cka(x, y, estimator, kernel, sigma)
    return out


def minibatch_cka(batches_x, batches_y, estimator: str = "unbiased") -> torch.Tensor:
    """Nguyen et al. 2021 minibatch CKA over lists of per-batch activations (one layer each side).

    Sums per-batch HSICs (each with its own 1/(n_t(n_t-3))) and divides once at the end.
    """
    xy = xx = yy = torch.zeros((), dtype=torch.float64)
    for x, y in zip(batches_x, batches_y, strict=False):
        K, L = linear_gram(x), linear_gram(y)  # centred per batch: HSIC is shift-invariant
        xy = xy + hsic(K, L, estimator)
        xx = xx + hsic(K, K, estimator)
        yy = yy + hsic(L, L, estimator)
    return xy / (xx.sqrt() * yy.sqrt())


# The <C_x, C_y> identity: HSIC(x, y) = <C_x, C_y> / N with C the centred Gram (U(K) unbiased, H K H biased).
# No n x n x n product per pair, so the benchmark harness can check workload-size cases (n up to 8192).
def centred_linear_gram(x: torch.Tensor, estimator: str = "unbiased") -> torch.Tensor:
    """``U(K)`` (unbiased) or ``H K H`` (biased) of the float64 linear Gram; differentiable."""
    K = linear_gram(x)
    if estimator == "unbiased":
        return u_center(K)
    H = centering_matrix(K.shape[0]).to(K.device)
    return H @ K @ H


def cka_pairs(xs, ys, pairs, estimator: str = "unbiased") -> torch.Tensor:
    """Float64 CKA of the selected ``(i, j)`` pairs from centred Grams; 0 where a layer is degenerate.

    Grams are formed pair by pair and dropped (a token-level layer's float64 Gram at n = 8192 is 512 MiB).
    Differentiable in ``xs`` and ``ys`` (the harness takes its reference gradients through it).
    """
    vals = []
    for i, j in pairs:
        if is_degenerate(xs[i]) or is_degenerate(ys[j]):
            vals.append(torch.zeros((), dtype=torch.float64))
            continue
        Cx = centred_linear_gram(xs[i], estimator)
        Cy = centred_linear_gram(ys[j], estimator)
        hxx, hyy, hxy = (Cx * Cx).sum(), (Cy * Cy).sum(), (Cx * Cy).sum()
        del Cx, Cy
        ok = hxx > 0 and hyy > 0
        vals.append(hxy / (hxx.sqrt() * hyy.sqrt()) if ok else torch.zeros((), dtype=torch.float64))
    return torch.stack(vals)


def cka_matrix_centred(xs, ys, estimator: str = "unbiased") -> torch.Tensor:
    """Float64 all-pairs CKA (CPU tensor): every layer's centred Gram once, one GEMM over them.

    The fast form of :func:`cka_matrix` for non-degenerate layers (no degenerate-layer rule).
    """
    Cx = torch.stack([centred_linear_gram(x, estimator) for x in xs]).flatten(1)
    Cy = torch.stack([centred_linear_gram(y, estimator) for y in ys]).flatten(1)
    return ((Cx @ Cy.T) / (Cx.norm(dim=1)[:, None] * Cy.norm(dim=1)[None, :])).cpu()


# =====================================================================================================
# Grouped CKA (tokens="positions" / "structure") and global-batch CKA (issue 17). Loops over the groups,
# calling the per-layer oracle above; nothing shared with the fast paths' grouped view.
# =====================================================================================================
def groups(x: torch.Tensor, tokens: str) -> list[torch.Tensor]:
    """The (n, d) examples matrices of each group, in the input dtype (so the degeneracy rule sees it).

    ``"positions"``: (B, T, D) -> T matrices x[:, t] of B examples; (B, C, H, W) -> H*W matrices
    x[:, :, h, w] of B examples with C features. ``"structure"``: (B, T, D) -> B matrices x[b] of T
    tokens; (B, C, H, W) -> B matrices x[b].reshape(C, H*W).T of H*W positions.
    """
    B = x.shape[0]
    if x.dim() == 4:
        x = x.reshape(B, x.shape[1], -1).transpose(1, 2)  # (B, HW, C)
    if tokens == "positions":
        return [x[:, t] for t in range(x.shape[1])]
    return [x[b] for b in range(B)]


def group_valid(x: torch.Tensor, y: torch.Tensor, estimator: str = "unbiased") -> bool:
    """Whether one group pair counts: neither side degenerate, both self-HSICs positive."""
    if is_degenerate(x) or is_degenerate(y):
        return False
    Cx, Cy = centred_linear_gram(x, estimator), centred_linear_gram(y, estimator)
    return bool((Cx * Cx).sum() > 0 and (Cy * Cy).sum() > 0)


def cka_groups(x: torch.Tensor, y: torch.Tensor, tokens: str, estimator: str = "unbiased"):
    """(cka (G,), valid (G,)) float64 per-group CKAs of one layer pair; 0 where not valid.

    Each group through :func:`cka_pairs` (centred Grams, on the inputs' device; differentiable).
    """
    gx, gy = groups(x, tokens), groups(y, tokens)
    vals = torch.cat(
        [cka_pairs([a], [b], [(0, 0)], estimator).to(x.device) for a, b in zip(gx, gy, strict=True)]
    )
    valid = torch.tensor(
        [group_valid(a, b, estimator) for a, b in zip(gx, gy, strict=True)], device=vals.device
    )
    return vals, valid


def cka_grouped(x: torch.Tensor, y: torch.Tensor, tokens: str, estimator: str = "unbiased") -> torch.Tensor:
    """The documented reduction: mean of the per-group CKAs over the valid groups; 0 if there is none."""
    vals, valid = cka_groups(x, y, tokens, estimator)
    if not valid.any():
        return torch.zeros((), dtype=torch.float64, device=vals.device)
    return vals[valid].mean()


def cka_pairs_grouped(xs, ys, pairs, tokens: str, estimator: str = "unbiased") -> torch.Tensor:
    """:func:`cka_grouped` of each selected (i, j) pair, (P,) float64; differentiable in xs and ys."""
    return torch.stack([cka_grouped(xs[i], ys[j], tokens, estimator) for i, j in pairs])


def cka_global_batch(xs_per_rank, ys_per_rank, pairs, estimator: str = "biased") -> torch.Tensor:
    """CKA over the concatenated batches of every rank, (P,) float64: what an exact global-batch CKA
    under torch.distributed must equal. ``xs_per_rank[r][i]`` is layer i on rank r."""
    xs = [torch.cat([rank[i] for rank in xs_per_rank]) for i in range(len(xs_per_rank[0]))]
    ys = [torch.cat([rank[j] for rank in ys_per_rank]) for j in range(len(ys_per_rank[0]))]
    return torch.stack([cka(xs[i], ys[j], estimator) for i, j in pairs])
