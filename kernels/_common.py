"""Shared helpers of the fastguide kernels: jit helpers, dtype rules, cached device tables.

Naming scheme (STYLE.md section 7.2), used in every file of ``kernels/``:

* kernels ``_<op>_fwd_kernel`` / ``_<op>_bwd_kernel`` (plus ``_<op>_<stage>_kernel`` for the extra
  passes of one op); launchers ``<op>_fwd`` / ``<op>_bwd`` or the op name the caller uses;
* pointers ``<tensor>_ptr``; strides ``stride_<tensor><dim>`` with dims m (rows / examples),
  k (features), or 0/1/2 for stacked matrices;
* constexprs in CAPS; locals ``pid_*`` (program ids), ``offs_*`` (int64 offsets), ``mask_*``,
  ``acc_*`` (accumulators);
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


def tl_dtype(dtype: torch.dtype):
    return _TL_DTYPES[dtype]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 stays fp64, everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def input_precision(dtype: torch.dtype) -> str:
    """Explicit ``tl.dot`` precision for operands of ``dtype``.

    fp32 operands: ``"ieee"`` when ``torch.get_float32_matmul_precision() == "highest"``, else
    ``"tf32"`` (the GPU default would be TF32 silently; the interpreter is always exact).
    Other dtypes ignore the flag; ``"ieee"`` is passed.
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


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


def device_table(values, dtype: torch.dtype, device: torch.device, key=None) -> torch.Tensor:
    """A small int table on ``device``, cached by content (no host sync, CUDA-graph friendly).

    ``values`` is a sequence, or a callable returning one when ``key`` (a small hashable that
    determines the content) is given, so large tables are built only on a miss.

    Host-built tables (program tables, pointer tables) are reused while their content repeats, as
    it does in a training loop (the caching allocator hands back the same addresses). A miss copies
    from pinned memory with ``non_blocking=True``, which does not synchronise the stream.
    """
    if key is None:
        values = tuple(values)
        key = values
    key = (key, dtype, str(device))
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit[0]
    host = torch.tensor(list(values() if callable(values) else values), dtype=dtype)
    if device.type == "cuda":
        # The pinned source stays cached too: a copy captured in a CUDA graph re-reads it on replay.
        host = host.pin_memory()
        t = host.to(device, non_blocking=True)
    else:
        t = host.to(device)
    _TABLES[key] = (t, host)
    if len(_TABLES) > _TABLES_MAX:
        _TABLES.popitem(last=False)
    return t


@triton.jit
def _column_shift(
    x_ptr,
    col_offs,
    mask_k,
    stride_xm,
    n_shift,
    SHIFT_ROWS: tl.constexpr,
    ACC: tl.constexpr,
):
    """Per-column shift: the mean of the first ``n_shift = min(n, SHIFT_ROWS)`` rows.

    x_ptr: base of an (n, d) matrix; col_offs: (BLOCK,) int64 column offsets (already times the
    column stride); mask_k: (BLOCK,) valid columns. Returns (BLOCK,) in ACC (0 on masked columns).
    """
    offs_s = tl.arange(0, SHIFT_ROWS).to(tl.int64)
    mask_s = offs_s < n_shift
    xs = tl.load(
        x_ptr + offs_s[:, None] * stride_xm + col_offs[None, :],
        mask=mask_s[:, None] & mask_k[None, :],
        other=0.0,
    ).to(ACC)  # (SHIFT_ROWS, BLOCK)
    return tl.sum(xs, axis=0) / n_shift
