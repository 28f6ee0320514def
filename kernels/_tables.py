"""Host side shared by the launchers: input checks, and the tables the kernels read.

Nothing here launches a kernel or touches device memory except :func:`pair_index` (through
:func:`~fastguide.kernels._common.device_table`). The checks raise an exception naming the argument;
the table builders return flat Python lists that the launchers upload with ``device_table``.

* Gram stacks (:mod:`~fastguide.kernels.cka`, :mod:`~fastguide.kernels.backward`): the (L, n, n)
  stacks, their self-HSICs and flags, pair lists and pair index tables.
* Layers (:mod:`~fastguide.kernels.gram`, :mod:`~fastguide.kernels.backward`): the (n, d) inputs.
* ``_gram_fwd_kernel``'s program table and the feature-axis split plan of
  :func:`~fastguide.kernels.gram.gram_fwd`.
"""

from __future__ import annotations

import torch
import triton

from ._common import acc_dtype, check_float, device_table, tl_dtype
from ._configs import GRAM_GRANULE, GRAM_MIN_CHUNK, gram_split_target, interpreting

# --------------------------------------------------------------------------- Gram stacks


def _check_stack(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() != 3 or t.shape[1] != t.shape[2] or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (L, n, n) stack of Grams; got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float16, torch.float32, torch.float64):
        raise TypeError(f"{name} must be float16, float32 or float64; got {t.dtype}")
    return t


def _check_pair(A: torch.Tensor, B: torch.Tensor, na: str = "A", nb: str = "B") -> None:
    _check_stack(A, na)
    _check_stack(B, nb)
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"{na} and {nb} must have the same n; got {A.shape[1]} and {B.shape[1]}")
    if A.dtype != B.dtype:
        raise TypeError(f"{na} and {nb} must have one dtype; got {A.dtype} and {B.dtype}")
    if A.device != B.device:
        raise ValueError(f"{na} and {nb} must be on one device; got {A.device} and {B.device}")


def _is_flat(t: torch.Tensor) -> bool:
    """The last two dims of a matrix or a stack of square matrices are contiguous."""
    n = t.shape[-1]
    return t.stride(-1) == 1 and (t.stride(-2) == n or n == 1)


def _aligned_stacks(*ts: torch.Tensor) -> bool:
    """Every matrix of every (flat) stack starts on 16 bytes and holds a multiple of 16 bytes."""
    for t in ts:
        vec = 16 // t.element_size()
        if not _is_flat(t) or t.data_ptr() % 16 or (t.shape[1] ** 2) % vec:
            return False
        if t.shape[0] > 1 and t.stride(0) % vec:
            return False
    return True


def _norm(n: int, estimator: str | None) -> float:
    """``1 / N`` of the HSIC estimator (1 for ``None``: the raw inner products)."""
    if estimator is None:
        return 1.0
    if estimator not in ("unbiased", "biased"):
        raise ValueError(f"estimator must be 'unbiased' or 'biased'; got {estimator!r}")
    return 1.0 / (n * (n - 3) if estimator == "unbiased" else (n - 1) ** 2)


def _check_self(h, ok, L: int, acc: torch.dtype, device, name: str) -> None:
    if not isinstance(h, torch.Tensor) or h.shape != (L,) or h.dtype != acc:
        raise ValueError(f"h{name} must be a ({L},) tensor of dtype {acc}")
    if not isinstance(ok, torch.Tensor) or ok.shape != (L,) or ok.dtype != torch.bool:
        raise ValueError(f"ok{name} must be a ({L},) bool tensor")
    if h.device != device or ok.device != device:
        raise ValueError(f"h{name} and ok{name} must be on {device}")


def _check_space(C, h, ok, C2, h2, ok2, *, gram_dtype: bool = False) -> tuple[int, int, torch.dtype]:
    """Checks of a layer space ``C`` (L1, n, n) [+ ``C2`` (L2, n, n)] with its self-HSICs and flags,
    as :func:`~fastguide.kernels.cka.cka_pairs_fwd` and
    :func:`~fastguide.kernels.backward.cka_pairs_bwd` take it; returns (L1, L2, accumulation dtype).
    ``gram_dtype``: the stacks must be ``gram_fwd``'s (float32 or float64, not float16)."""
    _check_stack(C, "C")
    two = C2 is not None
    if two:
        _check_pair(C, C2, "C", "C2")
    if gram_dtype and C.dtype == torch.float16:
        raise TypeError("C must be float32 or float64 (the stacks of gram_fwd)")
    L1 = C.shape[0]
    L2 = C2.shape[0] if two else 0
    acc = acc_dtype(C.dtype)
    _check_self(h, ok, L1, acc, C.device, "")
    if two:
        _check_self(h2, ok2, L2, acc, C.device, "2")
    return L1, L2, acc


def _check_index(A: torch.Tensor, pi, pj) -> None:
    for name, t in (("pi", pi), ("pj", pj)):
        if (
            not isinstance(t, torch.Tensor)
            or t.dim() != 1
            or t.dtype.is_floating_point
            or t.dtype == torch.bool
        ):
            raise TypeError(f"{name} must be a 1-D integer tensor")
        if t.device != A.device:
            raise ValueError(f"{name} must be on {A.device}; got {t.device}")
    if pi.shape != pj.shape:
        raise ValueError(f"pi and pj must have the same length; got {pi.shape[0]} and {pj.shape[0]}")


def check_pairs(pairs, num_layers: int) -> tuple[tuple[int, int], ...]:
    """Host-side pair list (i, j) with 0 <= i, j < num_layers, as a tuple of int pairs."""
    try:
        out = tuple((int(i), int(j)) for i, j in pairs)
    except (TypeError, ValueError) as e:
        raise TypeError(f"pairs must be a sequence of (i, j) integer pairs; got {pairs!r}") from e
    for p, (i, j) in enumerate(out):
        if not (0 <= i < num_layers and 0 <= j < num_layers):
            raise ValueError(f"pairs[{p}] = ({i}, {j}) is out of range for {num_layers} layers")
    return out


def pair_index(pairs: tuple[tuple[int, int], ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(pi, pj) int32 device tables of a host pair list, cached by content (no per-call copy)."""
    P = len(pairs)
    flat = device_table(
        lambda: [i for i, _ in pairs] + [j for _, j in pairs], torch.int32, device, key=("pairs", pairs)
    )
    return flat[:P], flat[P:]


# --------------------------------------------------------------------------- layers


def _check_x(x, name: str) -> None:
    check_float(x, name)
    if x.dim() != 2 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (n, d) tensor; got shape {tuple(x.shape)}")


def _check_layers(xs, estimator: str) -> tuple[int, torch.device, torch.dtype]:
    """Checks of :func:`~fastguide.kernels.gram.gram_fwd`'s inputs; returns (n, device, acc dtype)."""
    if estimator not in ("unbiased", "biased"):
        raise ValueError(f"estimator must be 'unbiased' or 'biased'; got {estimator!r}")
    if not isinstance(xs, (list, tuple)) or len(xs) == 0:
        raise ValueError("xs must be a non-empty list of (n, d) tensors")
    for i, x in enumerate(xs):
        _check_x(x, f"xs[{i}]")
    n = xs[0].shape[0]
    device = xs[0].device
    acc = acc_dtype(xs[0].dtype)
    for i, x in enumerate(xs):
        if x.shape[0] != n:
            raise ValueError(f"all layers must have the same n; xs[0] has {n}, xs[{i}] has {x.shape[0]}")
        if x.device != device:
            raise ValueError(f"all layers must be on one device; xs[0] is on {device}, xs[{i}] on {x.device}")
        if acc_dtype(x.dtype) != acc:
            raise TypeError(
                "xs must be all float64 or all of float16/bfloat16/float32 (one accumulation dtype)"
            )
    need = 4 if estimator == "unbiased" else 2
    if n < need:
        raise ValueError(f"the {estimator} estimator needs n >= {need}; got n={n}")
    return n, device, acc


# --------------------------------------------------------------------------- gram_fwd's plan

# Columns of the per-program table of _gram_fwd_kernel: local layer, ti, tj, feature range
# [k0, k1), destination buffer (0: K, 1: split partials KX), index in that buffer, split slot.
_PROG_COLS = 8


def _dot_dtype(dtype: torch.dtype):
    """Operand dtype of the Gram dot: 16-bit inputs use the tensor-core dot (fp32 accumulate),
    except bf16 under the interpreter, whose bf16 dot is wrong (STYLE.md): fp32 there."""
    if dtype == torch.float16 or (dtype == torch.bfloat16 and not interpreting()):
        return tl_dtype(dtype)
    return None


def _splits(ds: list[int], tiles: int, granule: int, split, n: int, esize: int) -> list[int]:
    """Feature-axis splits per layer: enough programs for about two waves, chunks >= GRAM_MIN_CHUNK,
    and split partials (written and read once, S n^2 acc values) at most ~1/8 of the input bytes."""
    L = len(ds)
    if split is not None:
        want = [split] * L if isinstance(split, int) else list(split)
        if len(want) != L or any(int(v) < 1 for v in want):
            raise ValueError(f"split must be a positive int or one per layer; got {split!r}")
        return [min(int(v), triton.cdiv(d, granule)) for v, d in zip(want, ds, strict=True)]
    base = L * tiles
    target = gram_split_target()
    if base >= target:
        return [1] * L
    per = triton.cdiv(target, base)
    return [max(1, min(per, d // GRAM_MIN_CHUNK, d * esize // (64 * n))) for d in ds]


def _split_plan(ds: list[int], T: int, split, n: int, esize: int):
    """(S, chunks, split0, ext0) of layers of widths ``ds`` with T x T Gram tiles: per layer the
    number of feature splits, the chunk width (a multiple of GRAM_GRANULE), its first split slot
    and its first slot in the extra-split buffer (the splits after the first)."""
    granule = GRAM_GRANULE
    S = _splits(ds, T * (T + 1) // 2, granule, split, n, esize)
    chunks = [triton.cdiv(triton.cdiv(d, s), granule) * granule for d, s in zip(ds, S, strict=True)]
    S = [triton.cdiv(d, c) for d, c in zip(ds, chunks, strict=True)]
    split0, ext0 = [], []
    ns = ne = 0
    for s_l in S:
        split0.append(ns)
        ext0.append(ne)
        ns += s_l
        ne += s_l - 1
    return S, chunks, split0, ext0


def _program_table(spec, T: int) -> list[int]:
    """Flat (P, 8) rows of ``_gram_fwd_kernel``'s program table for one layer group.

    spec: per local layer (global index, d, splits, chunk, first extra slot, first slot).
    Longest feature ranges first (load balance across waves); a (layer, split)'s tiles stay
    adjacent, so they run together and share the x rows they read through L2.
    """
    prog = []
    for local, (g, d, s_l, chunk, e0, sl0) in enumerate(spec):
        for sp in range(s_l):
            k0 = sp * chunk
            k1 = min(d, k0 + chunk)
            dest, index = (0, g) if sp == 0 else (1, e0 + sp - 1)
            for ti in range(T):
                for tj in range(ti, T):
                    prog.append((k1 - k0, (local, ti, tj, k0, k1, dest, index, sl0 + sp)))
    prog.sort(key=lambda e: -e[0])
    return [v for _, row in prog for v in row]
