"""A second float64 oracle in plain numpy, written from the papers' formulas (not from _reference).

* biased HSIC, Kornblith et al. 2019 (eq. 3, after Gretton et al. 2005): ``tr(K H L H) / (n-1)^2``
  with the explicit centring matrix ``H = I - 11'/n``;
* unbiased HSIC, Song et al. 2012: by its definition as a U-statistic over ordered 4-tuples of
  distinct examples (``hsic_unbiased_ustat``, brute force, n <= ``USTAT_MAX_N``), or by the paper's
  closed form (Theorem 2) evaluated in extended precision (``hsic_unbiased_song``) for larger n;
* minibatch CKA, Nguyen et al. 2021: per-batch unbiased HSICs summed, one ratio at the end;
* RBF kernel ``exp(-||xi - xj||^2 / (2 sigma^2))`` with Kornblith et al.'s median heuristic,
  ``sigma^2 = np.median`` of the full n x n matrix of squared distances.

Two facts of the math (not of any implementation) keep this oracle well conditioned: both HSICs
ignore a per-column shift of the features and a constant added to the kernel, so features are
centred first and a wide RBF kernel is used as ``K - 1 = expm1(...)``. A self-HSIC that is zero to the
rounding of its own evaluation is taken as exactly 0 (the layer is degenerate).

Inputs are numpy arrays of the rounded values (float64 or float32); ``eps`` is the machine epsilon
of the dtype the values were rounded to (numpy has no bfloat16).
"""

from __future__ import annotations

import math

import numpy as np

USTAT_MAX_N = 16


def as_matrix(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape[0], -1)


def linear_kernel(x) -> np.ndarray:
    X = as_matrix(x)
    X = X - X.mean(axis=0, keepdims=True)
    return X @ X.T


def sq_distances(x) -> np.ndarray:
    """Squared distances from explicit differences, one row at a time."""
    X = as_matrix(x)
    n = X.shape[0]
    D = np.empty((n, n))
    for i in range(n):
        diff = X - X[i]
        D[i] = np.einsum("jk,jk->j", diff, diff)
    return D


def median_sigma(x) -> float:
    """Kornblith et al.'s heuristic: sigma = sqrt(np.median(all n^2 squared distances)); where that is
    0, sqrt of the median of the positive ones (scale invariant); 1 if every distance is 0."""
    D = sq_distances(x)
    m = float(np.median(D))
    if m <= 0 and (D > 0).any():
        m = float(np.median(D[D > 0]))
    return math.sqrt(m) if m > 0 else 1.0


def rbf_kernel_shifted(x, sigma: float) -> np.ndarray:
    """The RBF kernel up to a constant: ``expm1(...) = K - 1`` when K is wide (near 1), else K.

    ``K - 1`` keeps the digits of a wide kernel, K those of a narrow one (off-diagonal near 0).
    """
    A = -sq_distances(x) / (2.0 * sigma * sigma)
    K = np.exp(A)
    n = K.shape[0]
    wide = (K.sum() - np.trace(K)) / (n * (n - 1)) > 0.5
    return np.expm1(A) if wide else K


def kernel_for_hsic(x, kernel: str, sigma: float | None) -> np.ndarray:
    if kernel == "linear":
        return linear_kernel(x)
    return rbf_kernel_shifted(x, median_sigma(x) if sigma is None else sigma)


def hsic_biased(K: np.ndarray, L: np.ndarray) -> tuple[float, float]:
    """(value, sum of |terms|): ``tr(K H L H) / (n-1)^2``."""
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    M = (K @ H) * (L @ H).T  # tr(A B) = sum_ij A_ij B_ji
    return math.fsum(M.ravel()) / (n - 1) ** 2, float(np.abs(M).sum()) / (n - 1) ** 2


def hsic_unbiased_ustat(K: np.ndarray, L: np.ndarray) -> tuple[float, float]:
    """(value, sum of |terms|) of the U-statistic definition, by brute force over distinct 4-tuples.

    ``HSIC_1 = 1/(n)_4 sum_{(i,j,q,r) distinct} h_ijqr`` with h the symmetrisation over the 4!
    orderings of ``K_ij L_ij + K_ij L_qr - 2 K_ij L_iq``; the sum over all ordered distinct tuples
    already symmetrises, so the unsymmetrised term is summed (exactly rounded, ``math.fsum``).
    """
    n = K.shape[0]
    if n > USTAT_MAX_N:
        raise ValueError(f"brute-force U-statistic is for n <= {USTAT_MAX_N}; got n={n}")
    i, j, q, r = np.meshgrid(*(np.arange(n),) * 4, indexing="ij")
    distinct = (i != j) & (i != q) & (i != r) & (j != q) & (j != r) & (q != r)
    i, j, q, r = i[distinct], j[distinct], q[distinct], r[distinct]
    Kij = K[i, j]
    terms = np.concatenate([Kij * L[i, j], Kij * L[q, r], -2.0 * Kij * L[i, q]])
    count = n * (n - 1) * (n - 2) * (n - 3)
    return math.fsum(terms) / count, float(np.abs(terms).sum()) / count


def hsic_unbiased_song(K: np.ndarray, L: np.ndarray) -> tuple[float, float]:
    """(value, sum of |terms|) of Song et al. 2012's closed form, in np.longdouble.

    ``[tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))``, K~ = K with zero diagonal.
    """
    n = K.shape[0]
    Kt = K.astype(np.longdouble)
    Lt = L.astype(np.longdouble)
    np.fill_diagonal(Kt, 0)
    np.fill_diagonal(Lt, 0)
    one = np.ones(n, dtype=np.longdouble)
    t1 = np.sum(Kt * Lt.T)
    t2 = (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
    t3 = -2.0 / (n - 2) * (one @ Kt @ (Lt @ one))
    N = n * (n - 3)
    return float((t1 + t2 + t3) / N), float((abs(t1) + abs(t2) + abs(t3)) / N)


def hsic(K: np.ndarray, L: np.ndarray, estimator: str) -> tuple[float, float]:
    if estimator == "biased":
        return hsic_biased(K, L)
    if K.shape[0] <= USTAT_MAX_N:
        return hsic_unbiased_ustat(K, L)
    return hsic_unbiased_song(K, L)


def degenerate(x, eps: float) -> bool:
    """DESIGN.md section 3: ``sum (X - mean)^2 <= (k eps)^2 sum X^2`` on the rounded input values, with
    k = 1 for 16-bit dtypes (eps >= 2^-10) and k = 4 otherwise."""
    X = as_matrix(x)
    k = 1.0 if eps >= 2.0**-10 else 4.0
    return float(((X - X.mean(axis=0)) ** 2).sum()) <= (k * eps) ** 2 * float((X * X).sum())


def _centred(K: np.ndarray, estimator: str) -> np.ndarray:
    """H K H, or the U-centred K (zero diagonal and row sums) for the unbiased estimator."""
    n = K.shape[0]
    if estimator == "biased":
        H = np.eye(n) - np.ones((n, n)) / n
        return H @ K @ H
    Kt = K - np.diag(np.diag(K))
    r = Kt.sum(axis=1)
    U = Kt - (r[:, None] + r[None, :]) / (n - 2) + Kt.sum() / ((n - 1) * (n - 2))
    np.fill_diagonal(U, 0.0)
    return U


def vanishing(x, K: np.ndarray, estimator: str, kernel: str, sigma, eps: float) -> bool:
    """The centred Gram is zero up to the accumulation dtype's rounding: ``||centred K||_F <= 64 eps_acc
    R``, R the trace of the Gram of the features shifted by the mean of their first 32 rows (linear),
    or ``||K||_F + ||exp(-D / 2 sigma^2) o (a_i + a_j)||_F / (2 sigma^2)`` off the diagonal (RBF, a those
    squared norms)."""
    X = as_matrix(x)
    Xh = X - X[:32].mean(axis=0)
    a = (Xh * Xh).sum(axis=1)
    if kernel == "linear":
        R = a.sum()
    else:
        s2 = sigma * sigma
        E = np.exp(-sq_distances(x) / (2.0 * s2))
        np.fill_diagonal(E, 0.0)
        Ko = K - np.diag(np.diag(K))
        R = np.linalg.norm(Ko) + np.linalg.norm(E * (a[:, None] + a[None, :])) / (2.0 * s2)
    eps_acc = np.finfo(np.float64).eps if eps <= np.finfo(np.float64).eps else np.finfo(np.float32).eps
    return float(np.linalg.norm(_centred(K, estimator))) <= 64.0 * eps_acc * R


def self_hsic(x, estimator: str, kernel: str, sigma, eps: float) -> tuple[np.ndarray | None, float]:
    """(kernel, self-HSIC) of a layer, or (None, 0.0) if the layer is degenerate."""
    if degenerate(x, eps):
        return None, 0.0
    if kernel == "rbf" and sigma is None:
        sigma = median_sigma(x)
    K = kernel_for_hsic(x, kernel, sigma)
    h, scale = hsic(K, K, estimator)
    # zero to the rounding of its own evaluation or of the fast paths' (e.g. all examples equal but one)
    if h <= 1e3 * np.finfo(np.float64).eps * scale or vanishing(x, K, estimator, kernel, sigma, eps):
        return None, 0.0
    return K, h


def cka(x, y, estimator: str = "unbiased", kernel: str = "linear", sigma=None, eps_x=None, eps_y=None):
    """CKA of two layers; exactly 0 when either is degenerate. ``eps_*``: the inputs' dtype epsilon."""
    eps_x = np.finfo(np.asarray(x).dtype).eps if eps_x is None else eps_x
    eps_y = np.finfo(np.asarray(y).dtype).eps if eps_y is None else eps_y
    K, hk = self_hsic(x, estimator, kernel, sigma, eps_x)
    L, hl = self_hsic(y, estimator, kernel, sigma, eps_y)
    if K is None or L is None:
        return 0.0
    return hsic(K, L, estimator)[0] / (math.sqrt(hk) * math.sqrt(hl))


def minibatch_cka(batches_x, batches_y, estimator: str = "unbiased", eps=None) -> float:
    """Nguyen et al. 2021: ``sum_t HSIC_t(x, y) / sqrt(sum_t HSIC_t(x, x) sum_t HSIC_t(y, y))``.

    Each batch's HSIC carries its own normaliser; a layer degenerate in a batch contributes 0.
    """
    xy = xx = yy = 0.0
    for x, y in zip(batches_x, batches_y, strict=True):
        e = np.finfo(np.asarray(x).dtype).eps if eps is None else eps
        K, hk = self_hsic(x, estimator, "linear", None, e)
        L, hl = self_hsic(y, estimator, "linear", None, e)
        xx += hk
        yy += hl
        if K is not None and L is not None:
            xy += hsic(K, L, estimator)[0]
    if xx <= 0 or yy <= 0:
        return 0.0
    return xy / (math.sqrt(xx) * math.sqrt(yy))
