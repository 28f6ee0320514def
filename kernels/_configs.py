"""Launch configurations of the fastguide kernels, kept as data (STYLE.md section 7.3).

Every list is a function of the environment: under ``TRITON_INTERPRET=1`` (CPU CI) or with
``FASTGUIDE_SKIP_AUTOTUNE=1`` it is reduced to one known-good config, because multi-config
autotuning needs a GPU driver. The interpreter configs use the smallest legal ``tl.dot`` tiles
(16) or 32 so that tiny test shapes still cross block boundaries with few programs.

Block sizes that change the host-built program tables (``BLOCK_M`` of the Gram, the split of the
feature axis) are chosen on the host by the ``*_block_*`` helpers here, not autotuned; autotuning
only touches parameters that leave the grid unchanged (``BLOCK_K``, warps, stages).
"""

from __future__ import annotations

import os

import triton


def interpreting() -> bool:
    """True when kernels run through the Triton interpreter (set before the kernels are imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def skip_autotune() -> bool:
    return interpreting() or os.environ.get("FASTGUIDE_SKIP_AUTOTUNE", "0") == "1"


def _reduce(configs: list[triton.Config], default: triton.Config) -> list[triton.Config]:
    return [default] if skip_autotune() else configs


# --------------------------------------------------------------------------- Gram (kernels/gram.py)
def gram_fwd_configs() -> list[triton.Config]:
    """``_gram_fwd_kernel``: BLOCK_K (feature chunk per iteration), warps, stages."""
    if interpreting():
        return [triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=1)]
    configs = [
        triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bk in (32, 64)
        for w in (4, 8)
        for s in (3, 4)
    ]
    return _reduce(configs, triton.Config({"BLOCK_K": 32}, num_warps=8, num_stages=3))


def gram_block_m(n: int, fp64: bool = False) -> int:
    """Square output tile of the Gram (BLOCK_M = BLOCK_N; >= 16 for tl.dot on the GPU).

    fp64 accumulators are twice the registers: at most 64 there.
    """
    if interpreting():
        return 16 if n <= 16 else 32
    return 64 if (n <= 64 or fp64) else 128


def gram_rowsum_block(n: int) -> int:
    """Rows per program of the row-sum pass (sums the tiny epilogue partials, no n x n read)."""
    return 32 if interpreting() else 256


def gram_center_warps(block_m: int) -> int:
    """Warps of the centring pass: one BLOCK_M x BLOCK_M elementwise tile per program."""
    return 4 if block_m <= 64 else 8


def gram_split_target() -> int:
    """Programs the Gram launch aims for when splitting the feature axis (about 2 waves)."""
    if interpreting():
        return 1
    import torch

    if torch.cuda.is_available():
        return 2 * torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return 264


# Smallest feature chunk worth a split (below this the partial Grams cost more than they save).
GRAM_MIN_CHUNK = 2048


# --------------------------------------------------------------------------- HSIC (kernels/cka.py)
def hsic_matrix_configs() -> list[triton.Config]:
    """``_hsic_matrix_fwd_kernel``: BLOCK_K positions of the flattened n*n axis per iteration."""
    if interpreting():
        return [triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=1)]
    configs = [
        triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bk in (64, 128)
        for w in (4, 8)
        for s in (2, 3)
    ]
    return _reduce(configs, triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=3))


def hsic_pairs_block() -> int:
    """Positions per iteration of ``_hsic_pairs_fwd_kernel`` (elementwise products, no tl.dot)."""
    return 256 if interpreting() else 1024


def hsic_chunks(numel: int, block: int) -> int:
    """How many programs split the flattened n*n axis (per-program partials, summed on the host)."""
    blocks = triton.cdiv(numel, block)
    if interpreting():
        return max(1, min(4, blocks))
    return max(1, min(2 * gram_split_target(), blocks))


# --------------------------------------------------------------------------- backward (kernels/backward.py)
def grad_x_configs() -> list[triton.Config]:
    """``_grad_x_bwd_kernel``: BLOCK_J (reduction over examples) per iteration, warps, stages."""
    if interpreting():
        return [triton.Config({"BLOCK_J": 32}, num_warps=4, num_stages=1)]
    configs = [
        triton.Config({"BLOCK_J": bj}, num_warps=w, num_stages=s)
        for bj in (32, 64)
        for w in (4, 8)
        for s in (3, 4)
    ]
    return _reduce(configs, triton.Config({"BLOCK_J": 32}, num_warps=8, num_stages=3))


def grad_x_blocks(n: int, d: int, fp64: bool = False) -> tuple[int, int]:
    """(BLOCK_M rows of dX, BLOCK_N feature columns) per program; both >= 16 for tl.dot."""
    if interpreting():
        return (16 if n <= 16 else 32), 32
    if fp64:
        return 64, 64
    return (64 if n <= 64 else 128), 128
