"""The RBF kernel of the torch backend: kernel matrix from the linear Gram, median heuristic, backward.

``K_ij = exp(-E_ij)`` with ``E = D / (2 sigma^2)`` and D the squared distances, taken from the linear
Gram of the shifted features (DESIGN.md section 2). Both HSICs ignore a constant added to K, and CKA a
positive factor, so the matrix that is centred is ``M = c K - b`` in the form that keeps its digits
(docs/numerics.md, "RBF kernel"):

* wide kernels (off-diagonal entries near 1) use ``M = expm1(m - E) = e^m K - 1``: ``exp`` near 1 would
  round the information away before centring;
* narrow kernels use ``M = exp(m - E) = e^m K``;
* for the unbiased estimator, which ignores the diagonal, ``m`` is the smallest off-diagonal exponent,
  so the largest off-diagonal entry of ``e^m K`` is 1 and narrow kernels do not underflow; the
  biased estimator needs the diagonal and keeps ``m = 0``.

``m`` is returned (``klog``) so that un-normalised HSICs can be brought back to the scale of K.
"""

from __future__ import annotations

import torch

__all__ = ["rbf_matrix", "rbf_grad", "median_sq_distance", "DIST_FLOOR"]

#: Squared distances up to this many rounding units of ``a_i + a_j`` (the squared norms they come
#: from) are zero: they are what the Gram leaves of duplicate examples.
DIST_FLOOR = 16.0


def _exponent(K: torch.Tensor, sig2: torch.Tensor | None):
    """(E, D, S) from a linear Gram (n, n): squared distances D (zero diagonal, rounding-level
    entries 0), ``S_ij = a_i + a_j`` and ``E = D / (2 sigma^2)`` (None without ``sig2``)."""
    a = K.diagonal()
    S = a.unsqueeze(1) + a.unsqueeze(0)
    D = S - 2.0 * K
    eps = torch.finfo(K.dtype).eps
    D = torch.where(D <= DIST_FLOOR * eps * S, torch.zeros_like(D), D)
    D.diagonal().zero_()
    return (None if sig2 is None else D / (2.0 * sig2)), D, S


def median_sq_distance(D: torch.Tensor) -> torch.Tensor:
    """``np.median`` of all n^2 squared distances (zero diagonal included; the mean of the two middle
    values), as Kornblith et al.'s code takes it; where that is 0 (more than half the distances are
    0), the median of the positive ones, which scales with the data as the heuristic must. 0 only
    for a constant layer. No host synchronisation."""
    v = D.detach().flatten().sort().values
    m = v.numel()
    med = 0.5 * (v[(m - 1) // 2] + v[m // 2])
    z = (v <= 0).sum()
    p = m - z
    lo = (z + (p - 1).clamp_min(0) // 2).clamp_max(m - 1)
    hi = (z + p // 2).clamp_max(m - 1)
    med_pos = 0.5 * (v[lo] + v[hi])
    return torch.where(med > 0, med, torch.where(p > 0, med_pos, torch.zeros_like(med)))


def _scaled(E: torch.Tensor, unbiased: bool, m: torch.Tensor | None = None):
    """(m, wide, K' = exp(m - E) off the diagonal, off-diagonal mask) of an exponent matrix; ``m``
    is the forward's when given (the backward), else chosen as in the module docstring."""
    n = E.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=E.device)
    if m is not None:
        pass
    elif unbiased:
        m = torch.where(off, E, torch.full_like(E, float("inf"))).amin()
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # NaN stays NaN
    else:
        m = torch.zeros((), dtype=E.dtype, device=E.device)
    Kp = torch.where(off, torch.exp(m - E), torch.zeros_like(E))
    wide = Kp.sum() / (n * (n - 1)) > 0.5
    return m, wide, Kp, off


def rbf_matrix(K: torch.Tensor, sigma: float | None, ok: torch.Tensor, estimator: str):
    """The matrix M (n, n) whose centring the HSICs use, from a linear Gram K of shifted features.

    Returns (M, sigma, m, R): sigma detached (the median heuristic, :func:`median_sq_distance`, when
    ``sigma`` is None; 1 for a degenerate layer, which has no scale); ``m`` the log of the factor K was
    scaled by; R the rounding reference of M for the degeneracy rule (``||M||_F`` off the diagonal,
    plus the first-order effect of the squared norms' rounding on it).
    """
    _, D, S = _exponent(K, None)
    if sigma is None:
        sig2 = median_sq_distance(D)
    else:
        sig2 = torch.full((), float(sigma) ** 2, dtype=K.dtype, device=K.device)
    sig2 = torch.where(ok & (sig2 > 0), sig2, torch.ones_like(sig2))
    E = D / (2.0 * sig2)
    m, wide, Kp, off = _scaled(E, estimator == "unbiased")
    M = torch.where(wide, torch.expm1(m - E), torch.exp(m - E))
    if estimator == "unbiased":
        M = torch.where(off, M, torch.zeros_like(M))  # U ignores it; exp(m) could overflow
    # Only off-diagonal entries carry rounding (the diagonal of M is exactly 0 or 1, or unused).
    R = torch.linalg.vector_norm(torch.where(off, M, 0.0)) + torch.linalg.vector_norm(Kp * S) / (2.0 * sig2)
    return M, sig2.sqrt(), m, R


def rbf_grad(Xh: torch.Tensor, K: torch.Tensor, G: torch.Tensor, s, sig, m, estimator: str) -> torch.Tensor:
    """``dL/dX^ = -(2 / (sigma^2 s)) sum_j G_ij K'_ij (x_i - x_j)``, (n, d) in the dtype of ``Xh``.

    ``Xh``: the shifted features; ``K``: their linear Gram; ``G``: dL/dC (zero row sums), C = centred(M)
    / s; sigma detached; K' = exp(m - E) as in the forward. Off the diagonal ``G_ij K'_ij (x_i - x_j)``
    sums to ``rho_i x_i - (W x)_i`` with ``W = G o K'``. For a wide kernel ``W ~ G`` and its row sums
    ``rho`` cancel to almost nothing, so they are formed as ``(G o (K' - 1)) 1 - diag(G)`` (G 1 = 0),
    which keeps their digits (docs/numerics.md).
    """
    sig2 = sig * sig
    E, _, _ = _exponent(K, sig2)
    _, wide, Kp, off = _scaled(E, estimator == "unbiased", m)
    W = G * Kp
    A = torch.where(off, torch.expm1(m - E), torch.zeros_like(E))
    rho = torch.where(wide, (G * A).sum(1) - G.diagonal(), W.sum(1))
    out = rho.unsqueeze(1) * Xh - W @ Xh
    return out.mul_(-2.0 / (sig2 * s))
