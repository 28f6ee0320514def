"""The ways CKA is usually computed, as the benchmark's comparison providers.

* careful plain torch (``torch-careful``): centre the features once, one Gram per layer, pair HSICs as
  row dots (one GEMM for a matrix), autograd for the backward;
* the per-pair ``linear_CKA`` that repositories copy and the paper's code uses (``naive``): an explicit
  centring matrix ``H K H``, and every HSIC call rebuilds its Grams, so one CKA costs six Gram products;
* the peer libraries ``pytorch-cka`` (module ``cka``) and ``ckatorch``, when installed;
* grouped CKA as users write it today (``loop``, ``einsum``): per-position CKA of (B, T, D) activations
  (CKA at each position over the batch) and per-sample structure CKA (each sample's T x T token Grams),
  as a Python loop over positions/samples calling a careful per-layer CKA, or batched with einsum.
"""

from __future__ import annotations

import torch

__all__ = [
    "careful_gram",
    "careful_pairs",
    "careful_matrix",
    "careful_metric_update",
    "naive_linear_cka",
    "naive_pairs",
    "naive_matrix",
    "pytorch_cka_matrix",
    "pytorch_cka_metric_update",
    "ckatorch_matrix",
    "have",
    "compiled",
    "careful_cka",
    "loop_group_cka",
    "einsum_group_cka",
]


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def have(module: str) -> bool:
    """Whether an optional peer library imports here."""
    try:
        __import__(module)
        return True
    except Exception:
        return False


def compiled(fn):
    """``torch.compile`` of a provider function (the ``torch-compile`` provider)."""
    return torch.compile(fn, dynamic=False)


# --------------------------------------------------------------------------- careful torch
def _ucenter(K: torch.Tensor) -> torch.Tensor:
    """Szekely-Rizzo U-centring, differentiable (plain torch)."""
    n = K.shape[0]
    Kt = K - torch.diag_embed(torch.diagonal(K))
    r = Kt.sum(1)
    U = Kt - r[:, None] / (n - 2) - r[None, :] / (n - 2) + Kt.sum() / ((n - 1) * (n - 2))
    return U - torch.diag_embed(torch.diagonal(U))


def careful_gram(x: torch.Tensor, estimator: str) -> torch.Tensor:
    """Centred Gram the careful way: centre the features once, one GEMM (H K H = K for centred X)."""
    X = _flat(x)
    if X.dtype in (torch.float16, torch.bfloat16):
        X = X.float()
    X = X - X.mean(0)
    K = X @ X.T
    return K if estimator == "biased" else _ucenter(K)


def careful_pairs(xs, ys, pairs, estimator: str = "biased") -> torch.Tensor:
    """CKA of selected pairs: Grams once per layer, pair HSICs as row dots, autograd backward."""
    used_x = sorted({i for i, _ in pairs})
    used_y = sorted({j for _, j in pairs})
    Kx = {i: careful_gram(xs[i], estimator) for i in used_x}
    Ky = {j: careful_gram(ys[j], estimator) for j in used_y}
    hx = {i: (K * K).sum().sqrt() for i, K in Kx.items()}
    hy = {j: (K * K).sum().sqrt() for j, K in Ky.items()}
    return torch.stack([(Kx[i] * Ky[j]).sum() / (hx[i] * hy[j]) for i, j in pairs])


def careful_matrix(xs, ys=None, estimator: str = "unbiased") -> torch.Tensor:
    """All-pairs CKA: Grams once per layer, one GEMM over the flattened centred Grams."""
    Kx = torch.stack([careful_gram(x, estimator) for x in xs]).flatten(1)
    Ky = Kx if ys is None else torch.stack([careful_gram(y, estimator) for y in ys]).flatten(1)
    M = Kx @ Ky.T
    hx = (Kx * Kx).sum(1).sqrt()
    hy = hx if ys is None else (Ky * Ky).sum(1).sqrt()
    return M / hx[:, None] / hy[None, :]


def careful_metric_update(acc: dict, xs, ys, estimator: str) -> None:
    """Minibatch-CKA accumulation the careful way: float64 sums of per-batch HSICs into ``acc``."""
    n = xs[0].shape[0]
    with torch.no_grad():
        Kx = torch.stack([careful_gram(x, estimator) for x in xs]).flatten(1)
        Ky = torch.stack([careful_gram(y, estimator) for y in ys]).flatten(1)
        N = n * (n - 3)
        cross = (Kx @ Ky.T).double() / N
        sx = (Kx * Kx).sum(1).double() / N
        sy = (Ky * Ky).sum(1).double() / N
        for k, v in (("c", cross), ("x", sx), ("y", sy)):
            acc[k] = acc[k] + v if k in acc else v


# --------------------------------------------------------------------------- naive per-pair code
def _naive_centering(K: torch.Tensor) -> torch.Tensor:
    n = K.shape[0]
    unit = torch.ones(n, n, dtype=K.dtype, device=K.device)
    eye = torch.eye(n, dtype=K.dtype, device=K.device)
    H = eye - unit / n
    return torch.matmul(torch.matmul(H, K), H)


def _naive_linear_hsic(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    L_X = torch.matmul(X, X.T)
    L_Y = torch.matmul(Y, Y.T)
    return torch.sum(_naive_centering(L_X) * _naive_centering(L_Y))


def naive_linear_cka(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """The widely copied ``linear_CKA`` (biased): six Gram products and six H K H per call."""
    X, Y = _flat(X), _flat(Y)
    hsic = _naive_linear_hsic(X, Y)
    var1 = torch.sqrt(_naive_linear_hsic(X, X))
    var2 = torch.sqrt(_naive_linear_hsic(Y, Y))
    return hsic / (var1 * var2)


def naive_pairs(xs, ys, pairs) -> torch.Tensor:
    return torch.stack([naive_linear_cka(xs[i], ys[j]) for i, j in pairs])


def naive_matrix(xs, ys) -> torch.Tensor:
    return torch.stack([torch.stack([naive_linear_cka(x, y) for y in ys]) for x in xs])


# --------------------------------------------------------------------------- peer libraries
def pytorch_cka_matrix(xs, ys) -> torch.Tensor:
    """pytorch-cka's ``cka.cka_from_features`` (unbiased)."""
    import cka

    return cka.cka_from_features([_flat(x) for x in xs], [_flat(y) for y in ys])


def pytorch_cka_metric_update(acc: dict, xs, ys) -> None:
    """pytorch-cka's per-batch accumulation: ``cka.hsic.hsic`` on ``torch.mm`` Grams, summed into ``acc``."""
    from cka.hsic import hsic

    with torch.no_grad():
        gx = torch.stack([torch.mm(_flat(x), _flat(x).T) for x in xs])
        gy = torch.stack([torch.mm(_flat(y), _flat(y).T) for y in ys])
        xy, xx, yy = hsic(gx, gy)
        for k, v in (("c", xy), ("x", xx), ("y", yy)):
            acc[k] = acc[k] + v if k in acc else v


def ckatorch_matrix(xs, ys) -> torch.Tensor:
    """ckatorch's ``cka_base(..., unbiased=True)`` pair by pair (float64 inside)."""
    from ckatorch.core import cka_base

    return torch.stack([torch.stack([cka_base(_flat(x), _flat(y), unbiased=True) for y in ys]) for x in xs])


# --------------------------------------------------------------------------- grouped CKA (issue 17)
def careful_cka(x: torch.Tensor, y: torch.Tensor, estimator: str = "biased") -> torch.Tensor:
    """One careful per-layer CKA (centre once, one Gram per side, autograd backward)."""
    Kx, Ky = careful_gram(x, estimator), careful_gram(y, estimator)
    return (Kx * Ky).sum() / ((Kx * Kx).sum().sqrt() * (Ky * Ky).sum().sqrt())


def loop_group_cka(x: torch.Tensor, y: torch.Tensor, tokens: str, estimator: str = "biased") -> torch.Tensor:
    """Mean per-position (``tokens="positions"``) or per-sample (``"structure"``) CKA of (B, T, D)
    activations: a Python loop calling :func:`careful_cka` on each slice."""
    if tokens == "positions":
        vals = [careful_cka(x[:, t], y[:, t], estimator) for t in range(x.shape[1])]
    else:
        vals = [careful_cka(x[b], y[b], estimator) for b in range(x.shape[0])]
    return torch.stack(vals).mean()


def _batched_centred_gram(X: torch.Tensor, estimator: str) -> torch.Tensor:
    """(G, n, n) Grams of (G, n, d) groups, features centred per group; U-centred for unbiased."""
    if X.dtype in (torch.float16, torch.bfloat16):
        X = X.float()
    X = X - X.mean(dim=1, keepdim=True)
    K = torch.einsum("gid,gjd->gij", X, X)
    if estimator == "biased":
        return K
    n = K.shape[-1]
    Kt = K - torch.diag_embed(torch.diagonal(K, dim1=-2, dim2=-1))
    r = Kt.sum(-1)
    U = (
        Kt
        - r[:, :, None] / (n - 2)
        - r[:, None, :] / (n - 2)
        + Kt.sum((-2, -1))[:, None, None] / ((n - 1) * (n - 2))
    )
    return U - torch.diag_embed(torch.diagonal(U, dim1=-2, dim2=-1))


def einsum_group_cka(
    x: torch.Tensor, y: torch.Tensor, tokens: str, estimator: str = "biased"
) -> torch.Tensor:
    """The same mean CKA batched with einsum: all groups' Grams at once, autograd backward."""
    if tokens == "positions":
        x, y = x.transpose(0, 1), y.transpose(0, 1)  # (T, B, D): groups of B examples
    Kx, Ky = _batched_centred_gram(x, estimator), _batched_centred_gram(y, estimator)
    num = (Kx * Ky).sum((-2, -1))
    den = (Kx * Kx).sum((-2, -1)).sqrt() * (Ky * Ky).sum((-2, -1)).sqrt()
    return (num / den).mean()
