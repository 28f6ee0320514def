"""Shared helpers of the fastguide kernels: jit helpers, dtype rules, cached device tables.

Naming scheme (STYLE.md section 7.2), used in every file of ``kernels/``:

* kernels ``_<op>_fwd_kernel`` / ``_<op>_bwd_kernel`` (plus ``_<op>_<stage>_kernel`` for the extra
  passes of one op); launchers ``<op>_fwd`` / ``<op>_bwd`` or the op name the caller uses;
* pointers ``<tensor>_ptr``; strides ``stride_<tensor><dim>`` with dims m (rows / examples),
  k (features), or 0/1/2 for stacked matrices;
* constexprs in CAPS; locals ``pid_*`` (program ids), ``offs_*`` / ``off_*`` (in-tile offsets:
  int32 relative to an int64 per-program base pointer, int64 where the host found a tile could
  overflow int32), ``mask_*``, ``acc_*`` (accumulators);
* argument order: outputs, inputs, strides, sizes, runtime scalars, constexprs.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch
import triton
import triton.language as tl

# Rows averaged into the per-column shift (DESIGN.md section 2); matches the torch backend.
SHIFT_ROWS = 32

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


# The degeneracy rule of DESIGN.md section 3 / docs/numerics.md, the same numbers as the torch
# backend (fastguide._torch_backend.degenerate_factor and VANISH_UNITS; tests/kernels/test_gram.py
# checks they agree): a centred Gram at most VANISH_UNITS rounding units of the Gram it came from
# vanishes.
VANISH_UNITS = 64.0


def degenerate_factor(dtype: torch.dtype) -> float:
    """``(k eps)^2`` of an input dtype, the trace test's threshold per unit of ``||x||_F^2``: k = 4
    for float32/float64, k = 1 for float16/bfloat16 (values rounded once from fp32 accumulation)."""
    k = 1.0 if dtype in (torch.float16, torch.bfloat16) else 4.0
    return (k * torch.finfo(dtype).eps) ** 2


def tl_dtype(dtype: torch.dtype):
    return _TL_DTYPES[dtype]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 stays fp64, everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def input_precision(dtype: torch.dtype) -> str:
    """Explicit ``tl.dot`` precision for operands of ``dtype``.

    fp32 operands: ``"ieee"`` when ``torch.get_float32_matmul_precision() == "highest"`` (torch's
    meaning of "highest", and what the CKA error <= 1e-5 contract is stated for), else ``"tf32"``
    (the GPU default would be TF32 silently; the interpreter is always exact). ``tf32x3`` is not
    used: see kernels/README.md ("Precision"). Other dtypes ignore the flag; ``"ieee"`` is passed.
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision for fp32 operands upcast from inputs of ``dtype`` (the backward's and the
    grouped kernels' dots): fp32 inputs follow the matmul precision (:func:`input_precision`);
    16-bit inputs always use TF32 (tensor cores: their results are rounded to 8 or 11 bits anyway,
    and fp16 operands would flush the ~1e-5 magnitudes of G = W C / N to subnormals); fp64 stays
    IEEE. The interpreter's dot is exact whatever the flag."""
    if dtype in (torch.float16, torch.bfloat16):
        return "tf32"
    return input_precision(dtype)


def check_float(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in _TL_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64; got {x.dtype}")
    return x


def pow2_bucket(v: int) -> int:
    """Coarse autotune key: the next power of two (so varying sizes do not re-tune)."""
    return triton.next_power_of_2(max(int(v), 1))


def on_input_device(fn):
    """Run a launcher with its first tensor's CUDA device current (Triton launches on the current
    device, not the tensor's). The first argument is a tensor or a list of tensors."""

    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        t = first[0] if isinstance(first, (list, tuple)) and first else first
        if isinstance(t, torch.Tensor) and t.is_cuda and t.device.index != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return fn(first, *args, **kwargs)
        return fn(first, *args, **kwargs)

    return wrapper


_TABLES: OrderedDict = OrderedDict()
_TABLES_MAX = 512
_CAPTURED: dict = {}  # tables used while a CUDA graph was captured: kept for the process's life


def device_table(values, dtype: torch.dtype, device: torch.device, key=None) -> torch.Tensor:
    """A small int table on ``device``, cached by content (no host sync, CUDA-graph friendly).

    ``values`` is a sequence, or a callable returning one when ``key`` (a small hashable that
    determines the content) is given, so large tables are built only on a miss.

    Host-built tables (program tables, pointer tables) are reused while their content repeats, as
    it does in a training loop (the caching allocator hands back the same addresses). A miss copies
    from pinned memory with ``non_blocking=True``, which does not synchronise the stream. The cache
    is an LRU of ``_TABLES_MAX`` entries, except that tables used during a CUDA-graph capture are
    kept for good (kernels/README.md, "CUDA graphs").
    """
    if key is None:
        values = tuple(values)
        key = values
    key = (key, dtype, str(device))
    # A table a CUDA graph is being captured with is referenced by that graph's replays: it must
    # never be evicted (nor its pinned source, which a captured miss copies from on every replay).
    captured = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    hit = _TABLES.get(key) or _CAPTURED.get(key)
    if hit is not None:
        if key in _TABLES:
            _TABLES.move_to_end(key)
        if captured:
            _CAPTURED[key] = hit
        return hit[0]
    host = torch.tensor(list(values() if callable(values) else values), dtype=dtype)
    if device.type == "cuda":
        host = host.pin_memory()
        t = host.to(device, non_blocking=True)
    else:
        t = host.to(device)
    _TABLES[key] = (t, host)
    if captured:
        _CAPTURED[key] = (t, host)
    if len(_TABLES) > _TABLES_MAX:
        _TABLES.popitem(last=False)
    return t


def aligned_2d(x: torch.Tensor) -> bool:
    """16-byte vector loads are possible along the unit-stride dimension of the (n, d) matrix ``x``:
    16-byte aligned data pointer, a row (or column) stride and an extent along that dimension that
    are multiples of 16 bytes. The kernels promise the compiler this alignment (``tl.multiple_of``)
    only when the host checked it here."""
    vec = 16 // x.element_size()
    if x.data_ptr() % 16:
        return False
    n, d = x.shape
    if x.stride(1) == 1 or d == 1:
        return d % vec == 0 and (x.stride(0) % vec == 0 or n == 1)
    if x.stride(0) == 1 or n == 1:
        return n % vec == 0 and x.stride(1) % vec == 0
    return False


def layout_2d(x: torch.Tensor) -> int:
    """Memory layout class of an (n, d) matrix: 0 row-major (unit feature stride), 1 column-major
    (unit example stride, e.g. the transpose of a (d, n) tensor), 2 anything else."""
    n, d = x.shape
    if x.stride(1) == 1 or d == 1:
        return 0
    if x.stride(0) == 1 or n == 1:
        return 1
    return 2


# Largest in-tile element offset the kernels compute in int32 (tile offsets relative to an int64
# per-program base); a launch whose tile offsets could exceed it uses int64 offsets instead.
INT32_SAFE = 2**31 - 1


def needs_int64(rows: int, stride_rows: int, cols: int, stride_cols: int) -> bool:
    """Whether a (rows, cols) tile's offsets ``r * stride_rows + c * stride_cols`` can overflow int32."""
    return (rows - 1) * abs(stride_rows) + (cols - 1) * abs(stride_cols) > INT32_SAFE


_COUNTERS: dict = {}
_RETIRED: list = []


def arrival_counters(device: torch.device, size: int) -> torch.Tensor:
    """Zeroed int32 counters for the "last program reduces" pattern, one buffer per (device, stream).

    A kernel that uses them leaves them at 0 again (its last program resets what it counted), so the
    buffer is zeroed once, at first use, and never again: no per-call fill, nothing to synchronise,
    and a CUDA-graph replay finds them at 0 too. Kernels on one stream run one after another, so one
    buffer per stream is never used by two kernels at the same time.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < size:
        if buf is not None:
            _RETIRED.append(buf)  # a captured CUDA graph may still count in it: never freed
        buf = torch.zeros(
            max(size, 1024 if buf is None else 2 * buf.numel()), dtype=torch.int32, device=device
        )
        _COUNTERS[key] = buf
    return buf


@triton.jit
def _cast(v, DT: tl.constexpr):
    """``v`` (an integer scalar, or a literal the launch specialised to a constant) as a ``DT`` scalar."""
    return (v * tl.full((), 1, DT)).to(DT)


@triton.jit
def _x_offsets(offs_m, offs_k, offs_s, stride_xm, stride_xk, LAYOUT: tl.constexpr, IDX: tl.constexpr):
    """IDX in-tile offsets of an (n, d) input of memory layout class LAYOUT (:func:`layout_2d`): the
    (len(offs_m), len(offs_k)) tile of rows ``offs_m`` and its (SHIFT_ROWS, len(offs_k)) shift rows.

    The caller sets the unit stride of LAYOUT 0 / 1 to a compile-time 1 (so the compiler sees the
    contiguity); this helper does not read it.
    """
    if LAYOUT == 0:
        om = _cast(stride_xm, IDX)
        off_t = offs_m.to(IDX)[:, None] * om + offs_k.to(IDX)[None, :]
        off_s = offs_s.to(IDX)[:, None] * om + offs_k.to(IDX)[None, :]
    elif LAYOUT == 1:
        okk = _cast(stride_xk, IDX)
        off_t = offs_m.to(IDX)[:, None] + offs_k.to(IDX)[None, :] * okk
        off_s = offs_s.to(IDX)[:, None] + offs_k.to(IDX)[None, :] * okk
    else:
        om = _cast(stride_xm, IDX)
        okk = _cast(stride_xk, IDX)
        off_t = offs_m.to(IDX)[:, None] * om + offs_k.to(IDX)[None, :] * okk
        off_s = offs_s.to(IDX)[:, None] * om + offs_k.to(IDX)[None, :] * okk
    return off_t, off_s


@triton.jit
def _column_shift(ptr, offs, mask, n_shift, ACC: tl.constexpr):
    """Per-column shift: the mean of the first ``n_shift = min(n, SHIFT_ROWS)`` rows.

    ptr: scalar pointer to element (0, first column) of the block; offs: (SHIFT_ROWS, BLOCK) element
    offsets of rows 0..SHIFT_ROWS-1 of the block's columns; mask: (SHIFT_ROWS, BLOCK) valid rows and
    columns. Returns (BLOCK,) in ACC (0 on masked columns).
    """
    xs = tl.load(ptr + offs, mask=mask, other=0.0).to(ACC)  # (SHIFT_ROWS, BLOCK)
    return tl.sum(xs, axis=0) / n_shift


@triton.jit
def _arrive(cnt_ptr, expected):
    """Count this program in at ``cnt_ptr``; True in the program that arrives last of ``expected``.

    The partial results a program stored before arriving are visible to the last one: the barrier
    orders the whole program's stores before the counting thread's release, and its acquire (read
    by the last program) orders them before that program's reads (use ``cache_modifier=".cg"``
    there, so no stale L1 line is read). The last program must reset the counter to 0.
    """
    tl.debug_barrier()
    prev = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    return prev == expected - 1
