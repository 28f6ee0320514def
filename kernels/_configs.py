"""Launch configurations of the fastguide kernels, kept as data (STYLE.md section 7.3).

Every autotuned kernel has a list of candidate configs and an ``early_config_prune`` that keeps only
those that fit the device: the shared memory a config's software pipeline needs (estimated per
kernel below, checked against the real ``metadata.shared`` by the compile gate,
``tests/kernels/gpu_compile.py``) must stay within the device's per-block limit, and 128 x 128
accumulator tiles need 8 warps (4 warps hold 128 fp32 accumulators per thread and spill). With
``FASTGUIDE_SKIP_AUTOTUNE=1`` the pruning returns only the first fitting config of the list, in the
list's order of preference, so the default is shape-aware too. Under ``TRITON_INTERPRET=1`` (CPU
CI) every list is one config (multi-config autotuning needs a GPU driver); the interpreter configs
use small legal ``tl.dot`` tiles (16 or 32) so tiny test shapes cross block boundaries.

Block sizes that change the host-built program tables (Gram ``BLOCK_M``, the centring tile, the
feature split, the backward tiles) are chosen on the host by the ``*_block*`` helpers here, not
autotuned; autotuning only touches parameters that leave the grid unchanged (``BLOCK_K``/``BLOCK_J``,
warps, stages).
"""

from __future__ import annotations

import functools

import triton

from fastguide import _config

from ._common import SHIFT_ROWS


def interpreting() -> bool:
    """True when kernels run through the Triton interpreter (set before the kernels are imported)."""
    return _config.get().triton_interpret


def skip_autotune() -> bool:
    cfg = _config.get()
    return cfg.triton_interpret or cfg.skip_autotune


@functools.lru_cache(maxsize=16)
def _device_properties(driver_id: int, device: int) -> dict:
    drv = triton.runtime.driver.active
    return dict(drv.utils.get_device_properties(device))


def device_properties() -> dict:
    """The active Triton driver's properties of the current device (``max_shared_mem``,
    ``multiprocessor_count``); the compile gate's stand-in driver reports those of its target."""
    drv = triton.runtime.driver.active
    return _device_properties(id(drv), drv.get_current_device())


def target_arch() -> int:
    """Compute capability of the active device as an int (80 for sm_80, 90 for sm_90)."""
    return int(triton.runtime.driver.active.get_current_target().arch)


def max_shared_memory() -> int:
    """Shared memory one program may use on the current device (bytes, opt-in per-block limit)."""
    return int(device_properties()["max_shared_mem"])


def sm_count() -> int:
    return int(device_properties()["multiprocessor_count"])


def _fits(configs, need) -> list[triton.Config]:
    """Configs whose estimated need (``need(config)`` -> (shared bytes, ok)) fits the device; only
    the first one with ``FASTGUIDE_SKIP_AUTOTUNE=1``. Never empty: the smallest-need config stays."""
    limit = max_shared_memory()
    scored = [(need(c), c) for c in configs]
    keep = [c for (smem, ok), c in scored if ok and smem <= limit]
    if not keep:
        keep = [min(scored, key=lambda e: (not e[0][1], e[0][0]))[1]]
    return keep[:1] if skip_autotune() else keep


# --------------------------------------------------------------------------- Gram (kernels/gram.py)
def gram_fwd_configs() -> list[triton.Config]:
    """``_gram_fwd_kernel``: BLOCK_K (features per iteration), warps, stages; most preferred first."""
    if interpreting():
        return [triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=1)]
    # fp64 variants get the whole register file (without a budget ptxas caps some at 128 registers
    # and spills); the others do better without one (with it some IEEE fp32 variants spill).
    return [
        triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s, maxnreg=reg)
        for reg in (None, 255)
        for bk, s in ((32, 3), (32, 4), (64, 3), (16, 4))
        for w in (8, 4)
    ]


def gram_fwd_smem(block_m: int, block_k: int, stages: int, esize: int) -> int:
    """Pipeline buffers of ``_gram_fwd_kernel``: two row blocks and the shift rows per stage."""
    per_stage = (2 * block_m + SHIFT_ROWS) * block_k * esize
    return stages * per_stage + 1024


def _acc_warps(rows: int, cols: int, acc) -> int:
    """Warps for a rows x cols accumulator: 8 from 32 KiB on (128 x 128 fp32, 64 x 64 fp64 hold 64
    or 32 registers a thread at 8 warps; 4 warps spill them), else 4."""
    return 8 if rows * cols * acc.primitive_bitwidth // 8 >= 32768 else 4


def _fma_dot(kwargs) -> bool:
    """The kernel's tl.dot runs on the FMA units (IEEE fp32 or fp64): no tensor cores."""
    return not kwargs.get("DOT_LOW", False) and kwargs["INPUT_PRECISION"] == "ieee"


def prune_gram_fwd(configs, named_args, **kwargs):
    bm = kwargs["BLOCK_M"]
    esize = named_args["x_ref_ptr"].element_size()
    warps = _acc_warps(bm, bm, kwargs["ACC"])
    fp64 = kwargs["ACC"].primitive_bitwidth == 64
    hopper = target_arch() >= 90
    vector = kwargs["ALIGNED"] and kwargs["LAYOUT"] == 0
    # Feature steps per iteration, as the compile gate found them spill-free: 64 with row-major
    # vector loads on sm_90's tensor cores; 32 with such loads, or on sm_90 (its wgmma keeps the
    # accumulator and B operand out of the general registers); 16 otherwise (sm_80's mma.sync
    # holds every operand in registers).
    widest = 64 if (hopper and vector and not _fma_dot(kwargs)) else (32 if (vector or hopper) else 16)
    return _fits(
        configs,
        lambda c: (
            gram_fwd_smem(bm, c.kwargs["BLOCK_K"], c.num_stages, esize),
            c.num_warps == warps and c.kwargs["BLOCK_K"] <= widest and (c.maxnreg is not None) == fp64,
        ),
    )


def gram_block_m(n: int, fma: bool = False) -> int:
    """Square output tile of the Gram (BLOCK_M = BLOCK_N; >= 16 for tl.dot on the GPU).

    ``fma``: the dot runs on the FMA units (fp64, or fp32 at IEEE precision), whose operands live
    in registers: 64 x 64 tiles there (128 x 128 spill).
    """
    if interpreting():
        return 16 if n <= 16 else 32
    return 64 if (n <= 64 or fma) else 128


def gram_center_block(block_m: int, n: int, fp64: bool = False) -> int:
    """Tile of the centring pass (divides BLOCK_M): 64 x 64 on the GPU (32 fp32 values per thread
    at 4 warps), 32 x 32 for fp64 or when n is not a multiple of 16 (its loads are not vectors then;
    64 x 64 spills in both cases); the Gram tile under the interpreter (fewer programs)."""
    if interpreting():
        return block_m
    return min(64 if n % 16 == 0 and not fp64 else 32, block_m)


def gram_rowsum_block(n: int) -> int:
    """Rows per program of the row-sum pass (sums the tiny epilogue partials, no n x n read)."""
    return 32 if interpreting() else 256


def gram_split_target() -> int:
    """Programs the Gram launch aims for when splitting the feature axis (about 2 waves)."""
    if interpreting():
        return 1
    return 2 * sm_count()


# Smallest feature chunk worth a split (below this the partial Grams cost more than they save).
GRAM_MIN_CHUNK = 2048
# Feature-axis granule: chunk boundaries are multiples of it (>= every BLOCK_K, a multiple of 16
# so the kernels may promise 16-byte alignment of every chunk start).
GRAM_GRANULE = 64


# --------------------------------------------------------------------------- pair products (kernels/cka.py)
def matrix_configs() -> list[triton.Config]:
    """``_cka_matrix_fwd_kernel``: BLOCK_K positions of the flattened n*n axis per iteration."""
    if interpreting():
        return [triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_K": bk}, num_warps=4, num_stages=s) for bk, s in ((128, 3), (64, 4))]


def matrix_smem(block_a: int, block_b: int, block_k: int, stages: int, esize: int) -> int:
    return stages * (block_a + block_b) * block_k * esize + 1024


def prune_matrix(configs, named_args, **kwargs):
    esize = named_args["a_ptr"].element_size()
    ba, bb = kwargs["BLOCK_A"], kwargs["BLOCK_B"]
    # FMA-unit dots (IEEE fp32, fp64) hold their operands in registers: 128-wide steps spill on sm_80.
    widest = 64 if _fma_dot(kwargs) else 128
    return _fits(
        configs,
        lambda c: (
            matrix_smem(ba, bb, c.kwargs["BLOCK_K"], c.num_stages, esize),
            c.kwargs["BLOCK_K"] <= widest,
        ),
    )


MATRIX_GRANULE = 256  # chunk boundaries of the flattened n*n axis: a multiple of every BLOCK_K


def matrix_blocks(La: int, Lb: int) -> tuple[int, int]:
    """Layers per program on each side (>= 16 for tl.dot)."""
    return (max(16, min(64, triton.next_power_of_2(La))), max(16, min(64, triton.next_power_of_2(Lb))))


def pairs_block() -> int:
    """Positions per iteration of ``_cka_pairs_fwd_kernel`` (elementwise products, no tl.dot)."""
    return 256 if interpreting() else 2048


def pair_chunks(numel: int, block: int, outputs: int) -> int:
    """How many programs split the flattened n*n axis of each output (partials reduced in-kernel by
    the last program of each output): about two waves in all, every chunk at least 4 blocks."""
    blocks = triton.cdiv(numel, block)
    if interpreting():
        return max(1, min(4, blocks))
    want = triton.cdiv(2 * sm_count(), max(outputs, 1))
    return max(1, min(want, triton.cdiv(blocks, 4)))


# --------------------------------------------------------------------------- backward (kernels/backward.py)
def grad_configs() -> list[triton.Config]:
    """``_cka_pairs_bwd_kernel`` (also behind ``grad_x``): BLOCK_J (examples per iteration), stages;
    most preferred first. 8 warps and the whole register file (without a budget ptxas caps some
    variants at 128 registers a thread and spills)."""
    if interpreting():
        return [triton.Config({"BLOCK_J": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_J": bj}, num_warps=8, num_stages=s, maxnreg=255)
        for bj, s in ((32, 3), (32, 4), (16, 3))
    ]


def grad_smem(num_c: int, block_m: int, block_n: int, block_j: int, stages: int, esize_x: int) -> int:
    """Pipeline buffers of the backward: NUM_C tiles of C (fp32/fp64) and one tile of x per stage."""
    per_stage = num_c * block_m * block_j * 4 + block_j * block_n * esize_x
    return stages * per_stage + 1024


def prune_grad(configs, named_args, **kwargs):
    bm, bn, num_c = kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["NUM_C"]
    esize = named_args["x_ref_ptr"].element_size()
    cw = 2 if kwargs["ACC"].primitive_bitwidth == 64 else 1
    fma = _fma_dot(kwargs)
    # Vector loads everywhere: aligned unit-stride x and n a multiple of 16 (C rows).
    vector = kwargs["ALIGNED"] and kwargs["LAYOUT"] == 0 and kwargs["N16"]
    # As the compile gate found them spill-free: 32-example steps only on the tensor cores with
    # vector loads and up to two C's (on sm_80 only for fp32 x, whose tiles need no conversion in
    # registers), 4 stages only for fp32 x with vector loads (on sm_80 with 16-example steps).
    hopper = target_arch() >= 90
    wide_ok = not fma and num_c <= 2 and vector and (esize >= 4 or hopper)
    deep_ok = esize >= 4 and vector
    return _fits(
        configs,
        lambda c: (
            grad_smem(num_c * cw, bm, bn, c.kwargs["BLOCK_J"], c.num_stages, esize),
            (c.kwargs["BLOCK_J"] <= 16 or wide_ok)
            and (c.num_stages <= 3 or (deep_ok and (hopper or c.kwargs["BLOCK_J"] <= 16))),
        ),
    )


def grad_blocks(n: int, fma: bool = False, vector: bool = True) -> tuple[int, int]:
    """(BLOCK_M rows of dX, BLOCK_N feature columns) per program; both >= 16 for tl.dot.

    ``fma``: the dot runs on the FMA units (fp64, or fp32 at IEEE precision): 64 x 64 tiles.
    ``vector``: x is 16-byte aligned and row-major and n a multiple of 16. Without vector loads the
    feature tile halves (scalar-load tiles spill at full width: x on the FMA units, and x or three
    or more C's on the tensor cores).
    """
    if interpreting():
        return (16 if n <= 16 else 32), 32
    if fma:
        return 64, (64 if vector else 32)
    return (64 if n <= 64 else 128), (128 if vector else 64)


GRAD_SLOTS = 4
