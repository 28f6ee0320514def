"""The layer-parallel CPU Gram schedule: several layers' products at once, one layer per core.

At CKA's Gram sizes (n of a few hundred) threaded BLAS scales poorly across cores while independent
layers scale well, so a stack of layers is spread over a thread pool whose workers are each made
single-threaded (OpenMP's per-thread ``omp_set_num_threads(1)``, OpenBLAS's thread-local count).
Only the products (and the raw route's first-rows pre-check) run in the workers: small torch ops from
two Python threads at once fight over the GIL, so everything else stays on the caller's thread,
batched over layers. Measurements: docs/cpu-path.md.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from .. import _config
from .._utils import shift_of
from .blas import mkl_syrk, omp_set_num_threads, openblas
from .gram import can_raw, offset_terms, raw_gram, raw_ok, rho_max, shifted_gram, syrk_for

__all__ = ["gram_stack", "describe_layer_parallel", "PARALLEL_MIN_WORK"]

#: Below this much work per call (sum of n^2 d over the layers) the layers run one after another.
PARALLEL_MIN_WORK = 1 << 24
#: Layers with n^2 d below this skip the first-rows pre-check of the raw route in the workers.
PRECHECK_MIN_WORK = 1 << 28

_lock = threading.Lock()
_POOL: tuple | None = None  # ((pid, workers), ThreadPoolExecutor)
_PREFIX = "fastguide-gram"


def _single_thread() -> None:
    # OpenMP's nthreads ICV is per thread: this makes torch ops and MKL calls made from the worker
    # single-threaded without touching the caller's setting; likewise OpenBLAS's thread-local count.
    omp_set_num_threads()(1)
    local = openblas().get("local")
    if local is not None:
        local(1)


def layer_pool(workers: int) -> ThreadPoolExecutor:
    """The process's worker pool of ``workers`` threads (a forked child gets its own).

    Keyed on whether SciPy's OpenBLAS is in use too: the workers' initializer makes it single-threaded,
    so switching ``cpu_openblas`` on later starts a new pool rather than reuse unprepared workers.
    """
    global _POOL
    key = (os.getpid(), workers, bool(openblas()))  # OpenBLAS is loaded before the workers start
    if _POOL is None or _POOL[0] != key:
        with _lock:
            if _POOL is None or _POOL[0] != key:
                old = _POOL
                pool = ThreadPoolExecutor(workers, thread_name_prefix=_PREFIX, initializer=_single_thread)
                _POOL = (key, pool)
                if old is not None and old[0][0] == key[0]:  # never touch a parent's pool after a fork
                    old[1].shutdown(wait=False)
    return _POOL[1]


def _parallel(device: torch.device, layers: int, work: float) -> bool:
    return (
        device.type == "cpu"
        and layers >= 2
        and torch.get_num_threads() >= 2
        and work >= PARALLEL_MIN_WORK
        and _config.get().cpu_layer_parallel
        and not threading.current_thread().name.startswith(_PREFIX)
        and bool(omp_set_num_threads())
    )


def _gram_worker(x: torch.Tensor, K: torch.Tensor, fn, eligible: bool) -> tuple:
    """One layer's Gram into K; returns (raw, sq).

    Raw route (``eligible`` and the first-rows pre-check passes): the product of the raw x with ``fn``
    (a syrk, or None for ``torch.mm``); ``sq`` None (the caller takes ``||x||^2`` from the Gram's
    trace). Otherwise the chunked shifted product and ``sq = ||x||_F^2``.
    """
    n, d = x.shape
    shift = None
    if eligible:
        # Small layers skip the pre-check (its fixed cost outweighs what it saves): the exact check
        # after the product still catches a large offset, at the price of one wasted product.
        if n * n * d < PRECHECK_MIN_WORK or raw_ok(x, shift := shift_of(x).to(K.dtype)):  # NaN: not raw
            raw_gram(x, K, fn)
            return True, None
    if shift is None:  # the pre-check's shift serves the shifted route too
        shift = shift_of(x).to(K.dtype)
    shifted_gram(x, shift, K, fn)
    return False, torch.linalg.vector_norm(x, dtype=shift.dtype).square()


def _in_worker(inference: bool, *args):
    # Grad and inference modes are per thread: the worker takes the caller's inference mode (writing
    # into an inference tensor needs it) and never records autograd.
    with torch.inference_mode(inference), torch.no_grad():
        return _gram_worker(*args)


def gram_stack(xs: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor | None:
    """Grams of several CPU layers at once into ``out`` (L, n, n), one layer per core.

    Returns the raw squared norms ``||x_l||_F^2`` (L,), or None when the layer-parallel path does not
    apply (then the caller runs :func:`fastguide._cpu.gram.sym_gram` per layer). Each layer is shifted
    by :func:`fastguide._utils.shift_of` in ``out.dtype``. Same results as ``sym_gram`` with
    ``centring_only=True``: raw-route Grams come without the rank-2 shift correction. Applies when
    torch runs on OpenMP with at least two threads, there are at least two layers,
    ``n^2 sum(d) >= PARALLEL_MIN_WORK`` and ``cpu_layer_parallel`` is on. Each layer is computed by one
    thread in a fixed order, so results do not depend on which worker ran it.
    """
    L, n = len(xs), out.shape[-1]
    acc = out.dtype
    if not out.is_contiguous() or not _parallel(out.device, L, float(n * n * sum(x.shape[1] for x in xs))):
        return None
    xs = [x.detach() for x in xs]
    fns = [syrk_for(acc, n, x.shape[1], threads=1, worker=True) for x in xs]
    eligible = [
        (x.shape[1] >= n or fn is not None) and can_raw(x, acc) for x, fn in zip(xs, fns, strict=True)
    ]
    pool = layer_pool(torch.get_num_threads())
    inference = torch.is_inference_mode_enabled()
    # Largest products first (longest-processing-time order): the pool's FIFO queue then balances
    # the cores when layer sizes differ (e.g. a guide's 16384-wide maps next to 1024-wide layers).
    order = sorted(range(L), key=lambda l: -xs[l].shape[1])
    futs = {l: pool.submit(_in_worker, inference, xs[l], out[l], fns[l], eligible[l]) for l in order}
    res = [futs[l].result() for l in range(L)]
    sqs = [r[1] for r in res]
    if any(r[0] for r in res):
        # Exact offset check of the raw route, batched (see sym_gram); a layer that fails it is
        # recomputed from shifted features.
        _, mu2, tr_shifted = offset_terms(out)
        bound = torch.tensor([rho_max(x.shape[1]) for x in xs], dtype=acc)
        good = (n * mu2 <= bound * tr_shifted).tolist()  # NaN: recomputed (and propagated)
        for l, (raw, _) in enumerate(res):
            if raw and not good[l]:  # on this thread: MKL (OpenBLAS would start its own threads here)
                d = xs[l].shape[1]
                fn = syrk_for(acc, n, d, threads=torch.get_num_threads())
                sqs[l] = _gram_worker(xs[l], out[l], fn, False)[1]
    tr = out.diagonal(dim1=-2, dim2=-1).sum(-1)
    return torch.stack([tr[l] if sqs[l] is None else sqs[l] for l in range(L)])


def describe_layer_parallel() -> str:
    """One line for benchmark records: how this process computes the Grams of several CPU layers."""
    if not _config.get().cpu_layer_parallel:
        return "off (FASTGUIDE_CPU_LAYER_PARALLEL=0)"
    if not omp_set_num_threads():
        return "off (torch does not run on OpenMP)"
    if torch.get_num_threads() < 2:
        return "off (one torch thread)"
    if _config.get().cpu_syrk == "off":
        kernel = "torch.mm"
    elif torch.float32 in openblas():
        kernel = "SciPy's OpenBLAS ssyrk"
    else:
        kernel = "MKL ssyrk" if mkl_syrk(torch.float32) is not None else "torch.mm"
    return f"one layer per core ({torch.get_num_threads()} workers), single-threaded {kernel}"
