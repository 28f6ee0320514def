"""Benchmark harness: ``python -m fastguide bench [--device cpu|cuda] [--quick]``.

Times fastguide against the ways CKA is usually computed, on the workloads of DESIGN.md section 6,
and prints one comparison table; writes every record as JSON (default ``benchmarks/results/``).

Providers (same inputs for every provider of a case; each is checked against the float64 oracle
:mod:`fastguide._reference` before it is timed, and a provider that fails the check is not timed):

* ``fastguide-triton`` / ``fastguide-torch``: the library (``backend="triton"`` only on CUDA).
* ``torch-careful``: careful plain torch -- one centred Gram per layer, pair HSICs from row dots (or
  one GEMM for a matrix), autograd for the backward.
* ``torch-compile``: ``torch.compile`` of ``torch-careful``.
* ``naive``: the per-pair ``linear_CKA`` that repositories copy (and the paper's code uses): explicit
  centring matrix ``H K H``, and every HSIC call rebuilds its Grams, so one CKA costs six Gram products.
* ``pytorch-cka`` (``cka.cka_from_features`` and its per-batch ``hsic``) and ``ckatorch``
  (``cka_base`` per pair) when installed.
* Training steps: ``unguided`` (target step alone), ``guide-fwd`` (guide forward alone),
  ``gram-gemms`` (``X @ X.T`` of every paired layer), ``fastguide-torch`` (:class:`fastguide.Guidance`),
  ``torch-careful`` (hooks + careful loss) and ``paper-step`` (the paper code's step: a second target
  forward to collect activations, ``naive`` CKA per pair).

Timing (DESIGN.md section 6): providers are interleaved in shuffled order every round in one process
and ratios are medians of per-round paired ratios (CPU timings on a shared machine swing several-fold
between runs). CPU samples are wall-clock; CUDA samples are CUDA-event times after an L2 flush (what
``triton.testing.do_bench`` does), and ``triton.testing.do_bench`` medians are recorded as well.
On CUDA every record also gets the roofline floor -- bytes at the measured copy bandwidth, flops at
the measured GEMM rate -- and the ratio to it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fastguide
from fastguide import _reference as R
from fastguide._utils import cpu_name

__all__ = [
    "main",
    "build_cases",
    "run_case",
    "run_suite",
    "Case",
    "Runner",
    "env_info",
    "careful_pairs",
    "careful_matrix",
    "naive_linear_cka",
    "format_table",
    "evaluate_goals",
]

MB = 1024.0 * 1024.0


# =========================================================================== reference-style code
def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


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


# --------------------------------------------------------------------------- float64 oracle
def _reference_centred(x: torch.Tensor, estimator: str) -> torch.Tensor:
    """Float64 centred Gram from :mod:`fastguide._reference`: ``U(K)`` or ``H K H``."""
    K = R.linear_gram(x)
    if estimator == "unbiased":
        return R.u_center(K)
    H = R.centering_matrix(K.shape[0]).to(K.device)
    return H @ K @ H


def reference_grams(xs, estimator: str):
    """Per-layer float64 centred Grams of the oracle, with its degenerate flags."""
    return [(_reference_centred(x, estimator), R.is_degenerate(x)) for x in xs]


def reference_pairs(xs, ys, pairs, estimator: str) -> torch.Tensor:
    """Float64 CKA of pairs from the oracle's centred Grams (the ``<C_a, C_b>`` identity of _reference).

    Grams are formed pair by pair and dropped (token-level layers have 8192 x 8192 float64 Grams).
    """
    vals = []
    for i, j in pairs:
        if R.is_degenerate(xs[i]) or R.is_degenerate(ys[j]):
            vals.append(torch.zeros((), dtype=torch.float64))
            continue
        Cx = _reference_centred(xs[i], estimator)
        Cy = _reference_centred(ys[j], estimator)
        hxx, hyy, hxy = (Cx * Cx).sum(), (Cy * Cy).sum(), (Cx * Cy).sum()
        del Cx, Cy
        ok = hxx > 0 and hyy > 0
        vals.append(hxy / (hxx.sqrt() * hyy.sqrt()) if ok else torch.zeros((), dtype=torch.float64))
    return torch.stack(vals)


def reference_matrix(xs, ys, estimator: str) -> torch.Tensor:
    """Float64 all-pairs CKA (CPU tensor) from the oracle's centred Grams, one GEMM over them."""
    Cx = torch.stack([c for c, _ in reference_grams(xs, estimator)]).flatten(1)
    Cy = torch.stack([c for c, _ in reference_grams(ys, estimator)]).flatten(1)
    return ((Cx @ Cy.T) / (Cx.norm(dim=1)[:, None] * Cy.norm(dim=1)[None, :])).cpu()


def reference_loss_grads(xs, ys, pairs, estimator: str):
    """Float64 autograd gradient of ``sum (1 - CKA)`` w.r.t. xs (careful formulas in float64)."""
    xd = [x.detach().double().requires_grad_(True) for x in xs]
    yd = [y.detach().double() for y in ys]
    loss = (1 - careful_pairs(xd, yd, pairs, estimator)).sum()
    used = sorted({i for i, _ in pairs})
    gs = torch.autograd.grad(loss, [xd[i] for i in used])
    out = [None] * len(xs)
    for i, g in zip(used, gs, strict=False):
        out[i] = g
    return out


# =========================================================================== environment
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()})"


def env_info(device: torch.device) -> dict:
    """Device and software versions recorded with every result file."""
    info = {
        "device": str(device),
        "device_name": _device_name(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fastguide": fastguide.__version__,
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
    }
    for mod in ("triton", "numpy", "scipy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    for dist in ("pytorch-cka", "ckatorch"):
        try:
            from importlib.metadata import version

            info[dist] = version(dist)
        except Exception:
            info[dist] = None
    try:
        from fastguide import _cpu_blas

        info["cpu_syrk"] = (
            "mkl_blas_ssyrk (torch's MKL)" if _cpu_blas.syrk_available() else "torch.mm (no syrk)"
        )
        info["cpu_layer_parallel"] = _cpu_blas.describe_layer_parallel()
    except Exception:
        info["cpu_syrk"] = info["cpu_layer_parallel"] = None
    try:
        import subprocess

        here = Path(__file__).resolve().parent.parent
        info["git_commit"] = (
            subprocess.run(
                ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            or None
        )
    except Exception:
        info["git_commit"] = None
    return info


# =========================================================================== timing and memory
_FLUSH: dict = {}


class Timer:
    """One timed sample of ``run(state)``: wall clock on CPU, CUDA events after an L2 flush on GPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            key = str(device)
            if key not in _FLUSH:
                _FLUSH[key] = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.float32, device=device)
            self._flush = _FLUSH[key]

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def __call__(self, run, state) -> float:
        if self.cuda:
            self._flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            run(state)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        run(state)
        return time.perf_counter() - t0


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def _cpu_peak_rss(runner: Runner, repeats: int, warmup: bool = True) -> int:
    """Peak resident memory above the level at call start (Linux): VmHWM after resetting it.

    glibc is told to serve every block of >= 128 KiB by its own mapping (``mallopt``) during the
    measurement, so freed tensors leave the resident set at once and the high-water mark is the true
    peak of live memory (to page granularity); afterwards :func:`malloc_steady_state`. With ``warmup``
    one unmeasured run under the same setting comes first, so that buffers a library keeps between
    calls (BLAS workspaces, per-thread malloc arenas of worker threads) are in place as in
    steady-state training and only what a call allocates and frees again is counted; then the
    smallest of ``repeats`` measured runs (every run allocates the same tensors; noise only adds).
    """
    libc = _libc()
    libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    vals = []
    try:
        for k in range(int(not warmup), repeats + 1):
            state = runner.prepare()
            try:
                libc.malloc_trim(0)
                base = _rss_kib("VmRSS")
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current RSS
                runner.run(state)
                if k:
                    vals.append(max(0, _rss_kib("VmHWM") - base) * 1024)
            finally:
                runner.finish(state)
    finally:
        malloc_steady_state()
    return min(vals)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def _libc():
    import ctypes

    return ctypes.CDLL("libc.so.6")


def malloc_steady_state() -> None:
    """glibc's malloc as a long-running tensor program ends up (Linux; a no-op elsewhere).

    By default glibc raises its mmap threshold to the largest block freed (at most 32 MiB) and its trim
    threshold to twice that, so in steady state tensors are reused from the heap. Any ``mallopt`` of
    those settings (the memory pass uses one) turns the adaptation off for the rest of the process and
    would leave the 128 KiB trim threshold, so that freed tensors give their pages back and the next
    call faults them in again. The suite sets this state at its start and after each memory pass, so
    that every provider is timed under one allocator state whatever the case order and whether memory
    was measured (the effect itself was below this machine's run-to-run noise when measured).
    """
    try:
        libc = _libc()
    except OSError:  # pragma: no cover - not glibc
        return
    libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)
    libc.mallopt(M_TRIM_THRESHOLD, 64 * 1024 * 1024)


def cpu_tensor_peak(runner: Runner, warmup: bool = True) -> int | None:
    """CPU: peak bytes of live tensors allocated above the level at call start during one ``run``.

    The CPU analogue of ``torch.cuda.max_memory_allocated``: every allocation and free of torch's CPU
    allocator during the call, from the profiler's memory events in time order (exported trace), summed
    to a running total whose maximum is the peak. Exact and repeatable (the resident-set measure is
    neither: the kernel's per-CPU RSS counters read a fresh 1 MiB tensor as 0.85-0.92 MB here, and
    heap pages that ``malloc_trim`` returned and the call touches again add 0-2 MB depending on the
    process's history). It counts tensors only (not BLAS workspaces or Python objects), and only those
    allocated on the calling thread, so fastguide's layer-parallel Gram path is switched off for the
    measurement (its workers write into the caller's Gram stack and allocate nothing on the raw-Gram
    route; on the chunked shifted route each worker holds one chunk of at most 4 MiB, where the serial
    path holds one). With ``warmup`` one unmeasured run under the same setting comes first, so that
    buffers kept between calls (fastguide's per-thread n x n mirror scratch, like a BLAS workspace) are
    in place and only what a call allocates is counted, as with ``max_memory_allocated`` after a warm-up
    on CUDA. None if the profiler is unavailable.
    """
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    old = os.environ.get("FASTGUIDE_CPU_LAYER_PARALLEL")
    os.environ["FASTGUIDE_CPU_LAYER_PARALLEL"] = "0"
    try:
        if warmup:
            state = runner.prepare()
            try:
                runner.run(state)
            finally:
                runner.finish(state)
        state = runner.prepare()
        try:
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                runner.run(state)
        finally:
            runner.finish(state)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    except Exception:
        return None
    finally:
        if old is None:
            os.environ.pop("FASTGUIDE_CPU_LAYER_PARALLEL", None)
        else:
            os.environ["FASTGUIDE_CPU_LAYER_PARALLEL"] = old
    events.sort(key=lambda e: e["ts"])
    live = peak = 0
    for e in events:
        live += int(e["args"]["Bytes"])
        peak = max(peak, live)
    return peak


def peak_memory(runner: Runner, device: torch.device, repeats: int = 3, warmup: bool = True) -> int | None:
    """Peak bytes allocated above the level at call start during one ``run`` (after ``prepare``).

    CUDA: ``torch.cuda.max_memory_allocated``. CPU (Linux): the resident-set high-water mark
    (:func:`_cpu_peak_rss`, smallest of ``repeats`` runs, after one warm-up run with ``warmup``); the
    allocator-level CPU figure is :func:`cpu_tensor_peak` (the profiler's per-event trace -- its
    aggregated events net the frees inside an op against its allocations and are not usable for this).
    """
    try:
        if device.type != "cuda":
            return _cpu_peak_rss(runner, repeats, warmup)
        state = runner.prepare()
        try:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            runner.run(state)
            torch.cuda.synchronize(device)
            return int(torch.cuda.max_memory_allocated(device) - base)
        finally:
            runner.finish(state)
    except Exception:
        return None


def measure_peaks(device: torch.device, quick: bool = False) -> dict:
    """Measured copy bandwidth (GB/s) and GEMM rate (TFLOP/s, fp32 at the current matmul precision,
    and bf16) for the roofline floors. CUDA only (uses ``triton.testing.do_bench``)."""
    if device.type != "cuda":
        return {}
    from triton.testing import do_bench

    out = {}
    nbytes = (256 if quick else 1024) * 1024 * 1024
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = do_bench(lambda s=src, d=dst: d.copy_(s), warmup=25, rep=100, return_mode="median") / 1e3
    out["copy_GBps"] = 2 * nbytes / t / 1e9
    del src, dst
    m = 4096 if quick else 8192
    for dt, key in ((torch.float32, "gemm_fp32_TFLOPs"), (torch.bfloat16, "gemm_bf16_TFLOPs")):
        a = torch.randn(m, m, device=device, dtype=dt)
        b = torch.randn(m, m, device=device, dtype=dt)
        t = do_bench(lambda a=a, b=b: a @ b, warmup=25, rep=100, return_mode="median") / 1e3
        out[key] = 2 * m**3 / t / 1e12
    out["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    return out


# =========================================================================== cases
@dataclass
class Runner:
    """``prepare()`` (untimed) -> state; ``run(state)`` (timed); ``finish(state)`` (untimed);
    ``check()`` -> dict with ``ok`` and error figures (runs before any timing)."""

    prepare: Callable[[], object]
    run: Callable[[object], object]
    finish: Callable[[object], None] = lambda state: None
    check: Callable[[], dict] | None = None
    note: str = ""


@dataclass
class Case:
    key: str  # e.g. "W1 loss fwd+bwd"
    workload: str
    op: str
    mode: str
    title: str
    shapes: dict
    estimator: str
    dtype: str
    make: Callable[[torch.device], dict]  # builds the shared inputs
    providers: dict[str, Callable[[dict, torch.device], Runner]]
    baseline: str = "fastguide-torch"
    model_flops: float = 0.0
    model_bytes: float = 0.0
    gram_bytes: float = 0.0  # one n x n accumulation-dtype Gram per layer that has one
    grad_bytes: float = 0.0  # bytes of the input gradients the op returns (not "extra")
    budget_s: float = 12.0
    # Comparison providers too slow to time every round (e.g. the paper's step): at most 3 timed rounds,
    # and they do not count when the case's rounds are fitted to its budget.
    capped: tuple = ()
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- scales
SCALES = {
    # DESIGN.md section 6 sizes (GPU).
    "full": {
        "W1": {"n": 256, "target": [4096] * 8, "guide_img": 224},
        "W2": {"n": 4096, "dx": 1024, "dy": 768, "layers": 12},
        "W3": {"n": 512, "d": 2048, "layers": 24},
        "tokens": {"B": 32, "T": 256, "D": 256, "pairs": 4},
        "W1step": {"n": 256, "img": 224, "hidden": [4096] * 8},
        "W4step": {"n": 256, "img": 224},
        "rounds": 20,
    },
    # Same structure, smaller n and d: the whole CPU table in a few minutes on 2 cores.
    "cpu": {
        "W1": {"n": 256, "target": [1024] * 8, "guide_img": 64},
        "W2": {"n": 1024, "dx": 256, "dy": 192, "layers": 12},
        "W3": {"n": 256, "d": 1024, "layers": 24},
        "tokens": {"B": 32, "T": 256, "D": 256, "pairs": 1},
        "W1step": {"n": 128, "img": 64, "hidden": [1024] * 8},
        "W4step": {"n": 128, "img": 64},
        "rounds": 11,
    },
    "quick": {
        "W1": {"n": 64, "target": [512] * 8, "guide_img": 32},
        "W2": {"n": 512, "dx": 128, "dy": 96, "layers": 6},
        "W3": {"n": 128, "d": 512, "layers": 12},
        "tokens": {"B": 16, "T": 256, "D": 128, "pairs": 2},
        "W1step": {"n": 64, "img": 32, "hidden": [512] * 8},
        "W4step": {"n": 32, "img": 32},
        "rounds": 3,
    },
    # Harness smoke test (tests/test_bench_smoke.py, `pytest benchmarks --benchmark-disable`).
    "smoke": {
        "W1": {"n": 16, "target": [64] * 8, "guide_img": 32},
        "W2": {"n": 64, "dx": 32, "dy": 24, "layers": 3},
        "W3": {"n": 32, "d": 64, "layers": 4},
        "tokens": {"B": 4, "T": 32, "D": 16, "pairs": 2},
        "W1step": {"n": 16, "img": 32, "hidden": [64] * 8},
        "W4step": {"n": 8, "img": 32, "small_fcn": True},
        "rounds": 2,
    },
}


def resnet18_block_dims(img: int) -> list[tuple[int, int, int]]:
    """(C, H, W) of ResNet-18's 9 block outputs (stem after max-pool, then the 8 basic blocks)."""
    s = img // 4
    dims = [(64, s, s)] * 3
    for c in (128, 256, 512):
        s = (s + 1) // 2
        dims += [(c, s, s)] * 2
    return dims


def _latent_layers(
    n: int, shapes: list[tuple[int, ...]], device, gen: torch.Generator, rank: int = 16, dtype=torch.float32
) -> list[torch.Tensor]:
    """Activations with shared low-rank structure (realistic CKA values, no near-zero pairs)."""
    z = torch.randn(n, rank, generator=gen)
    out = []
    for shp in shapes:
        d = math.prod(shp)
        W = torch.randn(rank, d, generator=gen) / math.sqrt(rank)
        x = z @ W + 0.5 * torch.randn(n, d, generator=gen)
        out.append(x.reshape(n, *shp).to(device=device, dtype=dtype))
        del W, x
    return out


# --------------------------------------------------------------------------- providers: loss on pairs
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loss_runner(fn, inp, mode: str, device, check) -> Runner:
    """A loss provider ``fn(xs, ys) -> scalar`` in one of the modes fwd / bwd / fwd+bwd."""
    xs, ys = inp["xs"], inp["ys"]

    def clear():
        for x in xs:
            x.grad = None

    if mode == "fwd":

        def prepare():
            return None

        def run(_):
            with torch.no_grad():
                return fn(xs, ys)
    elif mode == "bwd":

        def prepare():
            clear()
            return fn(xs, ys)

        def run(loss):
            loss.backward()
    else:

        def prepare():
            clear()
            return None

        def run(_):
            fn(xs, ys).backward()

    def finish(_):
        clear()

    return Runner(prepare, run, finish, check)


def _loss_check(fn, inp, mode: str, pairs, estimator: str, grad_ref: bool = True):
    def check():
        xs, ys = inp["xs"], inp["ys"]
        for x in xs:
            x.grad = None
        loss = fn(xs, ys)
        want = (1 - inp["ref_cka"]).sum()
        res = {"loss_abs_err": abs(float(loss.detach().double()) - float(want))}
        tol = 1e-5 * len(pairs) if inp["xs"][0].dtype == torch.float32 else 1e-2 * len(pairs)
        ok = res["loss_abs_err"] <= tol
        if mode != "fwd" and grad_ref:
            loss.backward()
            ref = inp["ref_grads"]()
            worst = 0.0
            for x, g in zip(xs, ref, strict=False):
                if g is None:
                    continue
                got = torch.zeros_like(x) if x.grad is None else x.grad
                worst = max(worst, float((got.double() - g).norm() / g.norm().clamp_min(1e-300)))
            res["grad_rel_err"] = worst
            ok = ok and worst <= (1e-4 if inp["xs"][0].dtype == torch.float32 else 2e-2)
        for x in xs:
            x.grad = None
        res["ok"] = bool(ok)
        return res

    return check


def _fastguide_loss(backend: str, pairs, estimator: str, route: str = "auto", tokens: str = "flatten"):
    loss = fastguide.CKALoss(pairs, estimator=estimator, backend=backend, route=route, tokens=tokens)
    return lambda xs, ys: loss(xs, ys)


def _careful_loss(pairs, estimator: str, tokens: str = "flatten"):
    def fn(xs, ys):
        if tokens == "samples":
            xs = [x.reshape(-1, x.shape[-1]) for x in xs]
            ys = [y.reshape(-1, y.shape[-1]) for y in ys]
        return (1 - careful_pairs(xs, ys, pairs, estimator)).sum()

    return fn


def _naive_loss(pairs):
    return lambda xs, ys: (1 - naive_pairs(xs, ys, pairs)).sum()


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _loss_providers(
    pairs,
    estimator: str,
    mode: str,
    *,
    naive=True,
    compile_=True,
    tokens="flatten",
    gram_route_variant=False,
    grad_ref=True,
    careful=True,
):
    P = {}

    def add(name, make_fn, grad_ref=grad_ref):
        def factory(inp, device, make_fn=make_fn, grad_ref=grad_ref):
            fn = make_fn()
            return _loss_runner(fn, inp, mode, device, _loss_check(fn, inp, mode, pairs, estimator, grad_ref))

        P[name] = factory

    P_triton = lambda: _fastguide_loss("triton", pairs, estimator, tokens=tokens)  # noqa: E731
    add("fastguide-triton", P_triton)
    add("fastguide-torch", lambda: _fastguide_loss("torch", pairs, estimator, tokens=tokens))
    if gram_route_variant:
        add("fastguide-torch:gram-route", lambda: _fastguide_loss("torch", pairs, estimator, "gram", tokens))
    if careful:
        add("torch-careful", lambda: _careful_loss(pairs, estimator, tokens))
    if compile_:
        add("torch-compile", lambda: _compiled(_careful_loss(pairs, estimator, tokens)))
    if naive:
        add("naive", lambda: _naive_loss(pairs))
    return P


def _loss_model(n, dts_t, dts_g, pairs, mode, elt=4):
    """Useful-work model of a loss call: Gram flops (symmetric, n^2 d per layer), backward GEMMs."""
    used_t = sorted({i for i, _ in pairs})
    used_g = sorted({j for _, j in pairs})
    f_fwd = (
        sum(n * n * dts_t[i] for i in used_t) + sum(n * n * dts_g[j] for j in used_g) + 2 * len(pairs) * n * n
    )
    b_fwd = sum(n * dts_t[i] * elt for i in used_t) + sum(n * dts_g[j] * elt for j in used_g)
    f_bwd = sum(2 * n * n * dts_t[i] for i in used_t)
    b_bwd = sum(2 * n * dts_t[i] * elt for i in used_t)
    if mode == "fwd":
        return f_fwd, b_fwd
    if mode == "bwd":
        return f_bwd, b_bwd
    return f_fwd + f_bwd, b_fwd + b_bwd


_INPUT_CACHE: dict = {}


def _loss_inputs(xs_shapes, ys_shapes, n, pairs, estimator, device, seed=0, tokens="flatten"):
    def make(device=device):
        # The fwd / bwd / fwd+bwd cases of one workload share inputs and oracle (one entry kept).
        key = (tuple(xs_shapes), tuple(ys_shapes), n, tuple(pairs), estimator, str(device), seed, tokens)
        if key not in _INPUT_CACHE:
            _INPUT_CACHE.clear()
            _INPUT_CACHE[key] = _make(device)
        return _INPUT_CACHE[key]

    def _make(device):
        g = torch.Generator().manual_seed(seed)
        # Built on the device: the float64 oracle then runs there too (fast on a GPU).
        layers = _latent_layers(n, list(xs_shapes) + list(ys_shapes), device, g)
        xs_cpu, ys_cpu = layers[: len(xs_shapes)], layers[len(xs_shapes) :]
        if tokens == "samples":
            rx = [x.reshape(-1, x.shape[-1]) for x in xs_cpu]
            ry = [y.reshape(-1, y.shape[-1]) for y in ys_cpu]
        else:
            rx, ry = xs_cpu, ys_cpu
        ref_cka = reference_pairs(rx, ry, pairs, estimator)
        xs = [x.requires_grad_(True) for x in xs_cpu]
        ys = ys_cpu
        cache = {}

        def ref_grads():
            if "g" not in cache:
                gs = reference_loss_grads(rx, ry, pairs, estimator)
                cache["g"] = [
                    None if gg is None else gg.reshape(x.shape).to(device)
                    for gg, x in zip(gs, xs, strict=False)
                ]
            return cache["g"]

        return {"xs": xs, "ys": ys, "ref_cka": ref_cka, "ref_grads": ref_grads}

    return make


def _w1_loss_case(sc, mode: str, compile_: bool) -> Case:
    c = sc["W1"]
    n = c["n"]
    xs_shapes = [(d,) for d in c["target"]]
    ys_shapes = resnet18_block_dims(c["guide_img"])
    pairs = fastguide.guidance.auto_pairs(len(xs_shapes), len(ys_shapes))
    est = "biased"
    dts_t = [math.prod(s) for s in xs_shapes]
    dts_g = [math.prod(s) for s in ys_shapes]
    fl, by = _loss_model(n, dts_t, dts_g, pairs, mode)
    layers_with_gram = len({i for i, _ in pairs}) + len({j for _, j in pairs})
    return Case(
        key=f"W1 loss {mode}",
        workload="W1",
        op="loss",
        mode=mode,
        title=(
            f"W1 guidance loss {mode}: n={n}, target FCN {len(xs_shapes)}x{dts_t[0]} vs ResNet-18's 9 block "
            f"outputs ({min(dts_g)}..{max(dts_g)} features, {c['guide_img']}px), {len(pairs)} pairs, {est}"
        ),
        shapes={"n": n, "target": xs_shapes, "guide": ys_shapes, "pairs": pairs},
        estimator=est,
        dtype="float32",
        make=_loss_inputs(xs_shapes, ys_shapes, n, pairs, est, None),
        providers=_loss_providers(pairs, est, mode, compile_=compile_),
        model_flops=fl,
        model_bytes=by,
        gram_bytes=layers_with_gram * n * n * 4,
        grad_bytes=0 if mode == "fwd" else sum(n * d * 4 for d in dts_t),
    )


def _w3_loss_case(sc, mode: str, compile_: bool) -> Case:
    c = sc["W3"]
    n, d, L = c["n"], c["d"], c["layers"]
    shapes = [(d,)] * L
    pairs = [(i, i) for i in range(L)]
    est = "biased"
    fl, by = _loss_model(n, [d] * L, [d] * L, pairs, mode)
    return Case(
        key=f"W3 loss {mode}",
        workload="W3",
        op="loss",
        mode=mode,
        title=f"W3 loss {mode}: n={n}, {L} target vs {L} guide layers of d={d}, {L} one-to-one pairs, {est}",
        shapes={"n": n, "target": shapes, "guide": shapes, "pairs": len(pairs)},
        estimator=est,
        dtype="float32",
        make=_loss_inputs(shapes, shapes, n, pairs, est, None, seed=3),
        providers=_loss_providers(pairs, est, mode, compile_=compile_),
        model_flops=fl,
        model_bytes=by,
        gram_bytes=2 * L * n * n * 4,
        grad_bytes=L * n * d * 4,
    )


def _tokens_case(sc, mode: str, slow_peers: bool) -> Case:
    c = sc["tokens"]
    B, T, D, P = c["B"], c["T"], c["D"], c["pairs"]
    n = B * T
    shapes = [(T, D)] * P
    pairs = [(i, i) for i in range(P)]
    est = "unbiased"
    feat, gram = fastguide._torch_backend.feature_cost([D] * (2 * P), [(i, P + i) for i in range(P)], n)
    fl = 2 * feat * (1 if mode == "fwd" else 3)
    by = 2 * P * n * D * 4 + (0 if mode == "fwd" else 2 * P * n * D * 4)
    return Case(
        key=f"tokens loss {mode}",
        workload="tokens",
        op="loss",
        mode=mode,
        title=(
            f"token-level loss {mode}: tokens='samples', n=B*T={B}x{T}={n}, d={D}, {P} pairs, {est} "
            f"(feature route vs Gram route)"
        ),
        shapes={"n": n, "B": B, "T": T, "D": D, "pairs": P},
        estimator=est,
        dtype="float32",
        make=_loss_inputs(shapes, shapes, B, pairs, est, None, seed=4, tokens="samples"),
        # Gradients at n = 8192 are checked in tests/ (the float64 autograd oracle needs GBs here).
        # torch-careful (autograd through 8192 x 8192 Grams) takes ~20 s a call on 2 CPU cores.
        providers=_loss_providers(
            pairs,
            est,
            mode,
            naive=False,
            compile_=False,
            tokens="samples",
            gram_route_variant=True,
            grad_ref=False,
            careful=slow_peers,
        ),
        model_flops=fl,
        model_bytes=by,
        gram_bytes=2 * P * n * n * 4,
        grad_bytes=P * n * D * 4,
        budget_s=20.0,
        extra={"counted_flops_feature": feat, "counted_flops_gram": gram},
    )


# --------------------------------------------------------------------------- providers: matrix / metric
def _matrix_inputs(n, dx, dy, L, estimator, seed):
    def make(device):
        g = torch.Generator().manual_seed(seed)
        layers = _latent_layers(n, [(dx,)] * L + [(dy,)] * L, device, g)
        xs, ys = layers[:L], layers[L:]
        return {"xs": xs, "ys": ys, "ref": reference_matrix(xs, ys, estimator)}

    return make


def _matrix_runner(fn, inp, est_of_provider: str, estimator: str) -> Runner:
    def check():
        got = fn(inp["xs"], inp["ys"]).detach().double().cpu()
        ref = (
            inp["ref"]
            if est_of_provider == estimator
            else reference_matrix(inp["xs"], inp["ys"], est_of_provider)
        )
        err = float((got - ref).abs().max())
        return {
            "cka_max_abs_err": err,
            "ok": err <= 1e-5 or (inp["xs"][0].dtype != torch.float32 and err <= 1e-2),
        }

    def run(_):
        with torch.no_grad():
            return fn(inp["xs"], inp["ys"])

    return Runner(lambda: None, run, lambda s: None, check)


def _pytorch_cka_matrix(xs, ys):
    import cka

    return cka.cka_from_features([_flat(x) for x in xs], [_flat(y) for y in ys])


def _ckatorch_matrix(xs, ys):
    from ckatorch.core import cka_base

    return torch.stack([torch.stack([cka_base(_flat(x), _flat(y), unbiased=True) for y in ys]) for x in xs])


def _have(mod: str) -> bool:
    try:
        __import__(mod)
        return True
    except Exception:
        return False


def _matrix_providers(estimator: str, *, compile_=True, ckatorch=True, naive=False):
    P = {}
    for backend in ("triton", "torch"):
        P[f"fastguide-{backend}"] = lambda inp, device, b=backend: _matrix_runner(
            lambda xs, ys: fastguide.cka_matrix(xs, ys, estimator=estimator, backend=b),
            inp,
            estimator,
            estimator,
        )
    P["torch-careful"] = lambda inp, device: _matrix_runner(
        lambda xs, ys: careful_matrix(xs, ys, estimator), inp, estimator, estimator
    )
    if compile_:

        def comp(inp, device):
            f = _compiled(lambda xs, ys: careful_matrix(xs, ys, estimator))
            return _matrix_runner(f, inp, estimator, estimator)

        P["torch-compile"] = comp
    if naive:
        P["naive"] = lambda inp, device: _matrix_runner(
            lambda xs, ys: torch.stack([torch.stack([naive_linear_cka(x, y) for y in ys]) for x in xs]),
            inp,
            "biased",
            estimator,
        )
    if _have("cka"):
        P["pytorch-cka"] = lambda inp, device: _matrix_runner(_pytorch_cka_matrix, inp, "unbiased", estimator)
    if ckatorch and _have("ckatorch"):
        P["ckatorch"] = lambda inp, device: _matrix_runner(_ckatorch_matrix, inp, "unbiased", estimator)
    return P


def _matrix_model(n, dx, dy, L, elt=4):
    return L * n * n * (dx + dy) + 2 * L * L * n * n, L * n * (dx + dy) * elt


def _w2_case(sc, compile_: bool) -> Case:
    c = sc["W2"]
    n, dx, dy, L = c["n"], c["dx"], c["dy"], c["layers"]
    fl, by = _matrix_model(n, dx, dy, L)
    return Case(
        key="W2 matrix fwd",
        workload="W2",
        op="matrix",
        mode="fwd",
        title=f"W2 all-pairs CKA matrix: n={n} tokens, {L}x{L} layers, d={dx}/{dy}, unbiased",
        shapes={"n": n, "dx": dx, "dy": dy, "layers": L},
        estimator="unbiased",
        dtype="float32",
        make=_matrix_inputs(n, dx, dy, L, "unbiased", 2),
        providers=_matrix_providers("unbiased", compile_=compile_, ckatorch=False),
        model_flops=fl,
        model_bytes=by,
        gram_bytes=2 * L * n * n * 4,
    )


def _w3_matrix_case(sc, compile_: bool, slow_peers: bool) -> Case:
    c = sc["W3"]
    n, d, L = c["n"], c["d"], c["layers"]
    fl, by = _matrix_model(n, d, d, L)
    return Case(
        key="W3 matrix fwd",
        workload="W3",
        op="matrix",
        mode="fwd",
        title=f"W3 all-pairs CKA matrix: n={n}, {L}x{L} layers, d={d}, unbiased",
        shapes={"n": n, "d": d, "layers": L},
        estimator="unbiased",
        dtype="float32",
        make=_matrix_inputs(n, d, d, L, "unbiased", 3),
        providers=_matrix_providers("unbiased", compile_=compile_, ckatorch=slow_peers),
        model_flops=fl,
        model_bytes=by,
        gram_bytes=2 * L * n * n * 4,
        budget_s=15.0,
    )


def _metric_case(sc) -> Case:
    c = sc["W3"]
    n, d, L = c["n"], c["d"], c["layers"]
    fl, by = _matrix_model(n, d, d, L)
    est = "unbiased"

    def fg(backend):
        def factory(inp, device):
            m = fastguide.MinibatchCKA(est, backend=backend)

            def check():
                m1 = fastguide.MinibatchCKA(est, backend=backend)
                m1.update(inp["xs"], inp["ys"])
                err = float((m1.compute().cpu() - inp["ref"]).abs().max())
                return {"cka_max_abs_err": err, "ok": err <= 1e-5}

            return Runner(lambda: None, lambda s: m.update(inp["xs"], inp["ys"]), lambda s: None, check)

        return factory

    def careful(inp, device):
        acc = {}

        def update(_):
            with torch.no_grad():
                Kx = torch.stack([careful_gram(x, est) for x in inp["xs"]]).flatten(1)
                Ky = torch.stack([careful_gram(y, est) for y in inp["ys"]]).flatten(1)
                N = n * (n - 3)
                cross = (Kx @ Ky.T).double() / N
                sx = (Kx * Kx).sum(1).double() / N
                sy = (Ky * Ky).sum(1).double() / N
                for k, v in (("c", cross), ("x", sx), ("y", sy)):
                    acc[k] = acc[k] + v if k in acc else v

        def check():
            acc.clear()
            update(None)
            got = acc["c"] / (acc["x"].sqrt()[:, None] * acc["y"].sqrt()[None, :])
            acc.clear()
            err = float((got.cpu() - inp["ref"]).abs().max())
            return {"cka_max_abs_err": err, "ok": err <= 1e-5}

        return Runner(lambda: None, update, lambda s: None, check)

    def pytorch_cka(inp, device):
        from cka.hsic import hsic

        acc = {}

        def update(_):
            with torch.no_grad():
                gx = torch.stack([torch.mm(_flat(x), _flat(x).T) for x in inp["xs"]])
                gy = torch.stack([torch.mm(_flat(y), _flat(y).T) for y in inp["ys"]])
                xy, xx, yy = hsic(gx, gy)
                for k, v in (("c", xy), ("x", xx), ("y", yy)):
                    acc[k] = acc[k] + v if k in acc else v

        def check():
            acc.clear()
            update(None)
            got = acc["c"].double() / (acc["x"].double().sqrt()[:, None] * acc["y"].double().sqrt()[None, :])
            acc.clear()
            err = float((got.cpu() - inp["ref"]).abs().max())
            return {"cka_max_abs_err": err, "ok": err <= 1e-4}

        return Runner(
            lambda: None,
            update,
            lambda s: None,
            check,
            note="its per-batch accumulation (cka.hsic.hsic on torch.mm Grams)",
        )

    P = {"fastguide-triton": fg("triton"), "fastguide-torch": fg("torch"), "torch-careful": careful}
    if _have("cka"):
        P["pytorch-cka"] = pytorch_cka
    return Case(
        key="W3 MinibatchCKA update",
        workload="W3",
        op="metric",
        mode="update",
        title=f"MinibatchCKA.update (W3 shape): n={n}, {L}x{L} layers, d={d}, unbiased, float64 sums",
        shapes={"n": n, "d": d, "layers": L},
        estimator=est,
        dtype="float32",
        make=_matrix_inputs(n, d, d, L, est, 5),
        providers=P,
        model_flops=fl,
        model_bytes=by,
        gram_bytes=2 * L * n * n * 4,
    )


# --------------------------------------------------------------------------- providers: training steps
class _Capture:
    """Forward hooks storing module outputs (first tensor) by name; removable."""

    def __init__(self, model: nn.Module, names: list[str], detach: bool = False):
        self.acts: dict[str, torch.Tensor] = {}
        mods = dict(model.named_modules())
        self.handles = []
        for nm in names:

            def hook(m, i, o, nm=nm):
                t = fastguide.guidance.first_tensor(o)
                self.acts[nm] = t.detach() if detach else t

            self.handles.append(mods[nm].register_forward_hook(hook))

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []
        self.acts = {}


def _step_case(sc, which: str) -> Case:
    from fastguide.experiments.models import DeepFCN, paper_deep_fcn, resnet18

    c = sc[which]
    n, img = c["n"], c["img"]
    est = "biased"
    in_features = 3 * img * img

    def make(device):
        torch.manual_seed(0)
        if which == "W1step":
            target = DeepFCN(in_features, 10, hidden=c["hidden"], dropout=0.0)
        elif c.get("small_fcn"):
            target = DeepFCN(in_features, 10, hidden=[128] + [64] * 11, dropout=0.1)
        else:
            target = paper_deep_fcn(in_features, 10, dropout=0.1)
        guide = resnet18(num_classes=10)
        target.to(device).train()
        guide.to(device).eval().requires_grad_(False)
        x = torch.randn(n, 3, img, img, device=device)
        y = torch.randint(0, 10, (n,), device=device)
        if which == "W1step":
            t_names = [f"features.{k}" for k in range(1, len(c["hidden"]) + 1)]
            g_names = ["maxpool"] + [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
            idx = fastguide.guidance.auto_pairs(len(t_names), len(g_names))
            mapping = [(t_names[i], g_names[j]) for i, j in idx]
        else:
            with fastguide.Guidance(target, guide, layers="auto", estimator=est, example=x[:4]) as gd:
                mapping = gd.pairs
        opt = torch.optim.SGD(target.parameters(), lr=1e-4)
        t_names = list(dict.fromkeys(t for t, _ in mapping))
        g_names = list(dict.fromkeys(g for _, g in mapping))
        pairs = [(t_names.index(t), g_names.index(g)) for t, g in mapping]
        # Shapes of the paired activations (for the gram-gemms provider and the records).
        cap_t, cap_g = _Capture(target, t_names, detach=True), _Capture(guide, g_names, detach=True)
        with torch.no_grad():
            target(x)
            guide(x)
        t_shapes = [tuple(cap_t.acts[k].shape) for k in t_names]
        g_shapes = [tuple(cap_g.acts[k].shape) for k in g_names]
        cap_t.close()
        cap_g.close()
        return {
            "target": target,
            "guide": guide,
            "x": x,
            "y": y,
            "opt": opt,
            "mapping": mapping,
            "t_names": t_names,
            "g_names": g_names,
            "pairs": pairs,
            "t_shapes": t_shapes,
            "g_shapes": g_shapes,
        }

    def task_step(inp, extra_loss=None):
        logits = inp["target"](inp["x"])
        loss = F.cross_entropy(logits, inp["y"])
        return logits, loss

    def finish_step(inp, loss):
        loss.backward()
        inp["opt"].step()
        inp["opt"].zero_grad(set_to_none=True)

    def unguided(inp, device):
        def run(_):
            _, loss = task_step(inp)
            finish_step(inp, loss)
            _sync(device)

        return Runner(lambda: None, run)

    def guide_fwd(inp, device):
        def run(_):
            with torch.no_grad():
                inp["guide"](inp["x"])
            _sync(device)

        return Runner(lambda: None, run)

    def gram_gemms(inp, device):
        g = torch.Generator().manual_seed(1)
        used_t = sorted({i for i, _ in inp["pairs"]})
        used_g = sorted({j for _, j in inp["pairs"]})
        mats = [torch.randn(n, math.prod(inp["t_shapes"][i][1:]), generator=g).to(device) for i in used_t]
        mats += [torch.randn(n, math.prod(inp["g_shapes"][j][1:]), generator=g).to(device) for j in used_g]

        def run(_):
            for X in mats:
                X @ X.T
            _sync(device)

        return Runner(lambda: None, run, note="X @ X.T of every paired layer (torch.mm)")

    def _align_check(get_loss_and_acts):
        def check():
            val, t_acts, g_acts = get_loss_and_acts()
            ref = reference_pairs([a.detach() for a in t_acts], list(g_acts), inp_pairs[0], est)
            want = float((1 - ref).sum())
            err = abs(float(val) - want)
            return {"align_loss_abs_err": err, "ok": err <= 1e-5 * len(ref)}

        return check

    inp_pairs = [None]

    def fastguide_step(backend):
        def factory(inp, device):
            inp_pairs[0] = inp["pairs"]

            def prepare():
                return fastguide.Guidance(
                    inp["target"], inp["guide"], layers=inp["mapping"], estimator=est, backend=backend
                )

            def run(gd):
                _, loss = task_step(inp)
                finish_step(inp, loss + gd.loss(inp["x"]))
                _sync(device)

            def finish(gd):
                gd.close()

            def get():
                gd = prepare()
                ct = _Capture(inp["target"], inp["t_names"], detach=True)
                cg = _Capture(inp["guide"], inp["g_names"], detach=True)
                try:
                    task_step(inp)
                    t_acts = [ct.acts[k] for k in inp["t_names"]]
                    val = gd.loss(inp["x"]).detach()
                    g_acts = [cg.acts[k] for k in inp["g_names"]]
                finally:
                    gd.close()
                    ct.close()
                    cg.close()
                return val, t_acts, g_acts

            return Runner(prepare, run, finish, _align_check(get))

        return factory

    def careful_step(inp, device):
        inp_pairs[0] = inp["pairs"]

        def prepare():
            return _Capture(inp["target"], inp["t_names"]), _Capture(inp["guide"], inp["g_names"])

        def align(caps):
            ct, cg = caps
            with torch.no_grad():
                inp["guide"](inp["x"])
            xs = [ct.acts[k] for k in inp["t_names"]]
            ys = [cg.acts[k] for k in inp["g_names"]]
            return (1 - careful_pairs(xs, ys, inp["pairs"], est)).sum(), xs, ys

        def run(caps):
            _, loss = task_step(inp)
            a, _, _ = align(caps)
            finish_step(inp, loss + a)
            _sync(device)

        def finish(caps):
            for cp in caps:
                cp.close()

        def get():
            caps = prepare()
            try:
                task_step(inp)
                a, xs, ys = align(caps)
            finally:
                finish(caps)
            return a.detach(), [t.detach() for t in xs], ys

        return Runner(prepare, run, finish, _align_check(get))

    def paper_step(inp, device):
        inp_pairs[0] = inp["pairs"]

        def prepare():
            return _Capture(inp["target"], inp["t_names"]), _Capture(inp["guide"], inp["g_names"])

        def align(caps):
            ct, cg = caps
            # The paper's code runs the target a second time to collect its activations.
            inp["target"](inp["x"])
            with torch.no_grad():
                inp["guide"](inp["x"])
            xs = [ct.acts[k] for k in inp["t_names"]]
            ys = [cg.acts[k] for k in inp["g_names"]]
            return sum(1 - naive_linear_cka(xs[i], ys[j]) for i, j in inp["pairs"]), xs, ys

        def run(caps):
            _, loss = task_step(inp)
            a, _, _ = align(caps)
            finish_step(inp, loss + a)
            _sync(device)

        def finish(caps):
            for cp in caps:
                cp.close()

        def get():
            caps = prepare()
            try:
                a, xs, ys = align(caps)
            finally:
                finish(caps)
            return a.detach(), [t.detach() for t in xs], ys

        return Runner(
            prepare, run, finish, _align_check(get), note="second target forward + naive linear_CKA per pair"
        )

    providers = {
        "unguided": unguided,
        "guide-fwd": guide_fwd,
        "gram-gemms": gram_gemms,
        "fastguide-triton": fastguide_step("triton"),
        "fastguide-torch": fastguide_step("torch"),
        "torch-careful": careful_step,
        "paper-step": paper_step,
    }
    if which == "W1step":
        title = (
            f"W1 guided training step: n={n}, {img}px inputs, target FCN {len(c['hidden'])}x{c['hidden'][0]} "
            f"(SGD), guide ResNet-18 (9 block outputs), 8 pairs, {est}"
        )
        wl = "W1"
    else:
        title = (
            f"W4 guided training step (paper setting): n={n}, {img}px inputs, target FCN 2048+47x1024 with "
            f"BN/ReLU/Dropout, guide ResNet-18 21 hooked maps (layers='auto'), {est}"
        )
        wl = "W4"
    return Case(
        key=f"{wl} guided step",
        workload=wl,
        op="step",
        mode="step",
        title=title,
        shapes={"n": n, "img": img},
        estimator=est,
        dtype="float32",
        make=make,
        providers=providers,
        # Guided-step ratios are the noisiest figures (one round is ~1-4 s of several models): they
        # get the largest budgets; the paper's step (a slow comparison) is timed in at most 3 rounds.
        budget_s=25.0 if which == "W1step" else 35.0,
        capped=("paper-step",),
    )


# --------------------------------------------------------------------------- the case list
def build_cases(
    scale: str = "cpu",
    *,
    compile_: bool = True,
    only: list[str] | None = None,
    slow_peers: bool | None = None,
) -> list[Case]:
    """The benchmark cases of one scale (``full`` on GPU, ``cpu``, ``quick``, ``smoke``).

    ``compile_``: torch.compile providers (W1 loss fwd+bwd; also the W3 matrix at full scale -- each
    compile takes 20-60 s on 2 CPU cores). ``slow_peers`` (default: at full and smoke scale): ckatorch
    on the W3 matrix (float64, per pair: ~50x fastguide) and torch-careful on the token-level case.
    """
    sc = SCALES[scale]
    if slow_peers is None:
        slow_peers = scale in ("full", "smoke")
    cases = [
        _w1_loss_case(sc, "fwd+bwd", compile_),
        _w1_loss_case(sc, "fwd", False),
        _w1_loss_case(sc, "bwd", False),
        _w3_loss_case(sc, "fwd+bwd", False),
        _tokens_case(sc, "fwd+bwd", slow_peers),
        _w2_case(sc, False),
        _w3_matrix_case(sc, compile_ and scale == "full", slow_peers),
        _metric_case(sc),
        _step_case(sc, "W1step"),
        _step_case(sc, "W4step"),
    ]
    if only:
        keys = [o.lower() for o in only]
        cases = [c for c in cases if any(k in c.key.lower() for k in keys)]
    return cases


# =========================================================================== running a case
def _provider_available(name: str, device: torch.device) -> str | None:
    """None if the provider can run here, else the reason it is skipped."""
    if name.endswith("triton") or name == "fastguide-triton":
        if device.type != "cuda":
            return "needs CUDA"
        try:
            fastguide.functional._kernels()
        except Exception as e:  # pragma: no cover - depends on the kernels' state
            return f"fastguide.kernels unavailable: {e}"
    return None


def _summ(ts: list[float]) -> dict:
    q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0], ts[0], ts[0]]
    return {
        "median_ms": statistics.median(ts) * 1e3,
        "p25_ms": q[0] * 1e3,
        "p75_ms": q[2] * 1e3,
        "min_ms": min(ts) * 1e3,
        "rounds": len(ts),
    }


def run_case(
    case: Case,
    device: torch.device,
    *,
    rounds: int,
    peaks: dict | None = None,
    log: Callable[[str], None] = print,
    memory: bool = True,
) -> list[dict]:
    """Check, warm up and time every provider of ``case`` (interleaved, shuffled rounds)."""
    t_start = time.perf_counter()
    inp = case.make(device)
    runners: dict[str, Runner] = {}
    records: dict[str, dict] = {}
    base = {
        "case": case.key,
        "workload": case.workload,
        "op": case.op,
        "mode": case.mode,
        "title": case.title,
        "device": str(device),
        "dtype": case.dtype,
        "estimator": case.estimator,
        "shapes": case.shapes,
        "model_flops": case.model_flops,
        "model_bytes": case.model_bytes,
    }
    for name, factory in case.providers.items():
        rec = dict(base, provider=name)
        records[name] = rec
        why = _provider_available(name, device)
        if why:
            rec["skipped"] = why
            continue
        try:
            r = factory(inp, device)
            rec["note"] = r.note or None
            if r.check is not None:
                chk = r.check()
                rec["check"] = chk
                if not chk.get("ok", False):
                    rec["skipped"] = "failed the correctness check"
                    log(f"  {name}: FAILED check {chk}")
                    continue
            # Warm-up (compilation, autotuning, allocator) and the first timing for the budget; a
            # provider slower than a third of the case budget gets no second warm-up call.
            timer = Timer(device)
            state = r.prepare()
            t0 = time.perf_counter()
            r.run(state)
            timer.sync()
            rec["first_call_s"] = time.perf_counter() - t0
            r.finish(state)
            rec["warm_call_s"] = rec["first_call_s"]
            if rec["first_call_s"] < min(1.0, case.budget_s / 3):  # a slow call is warm after one run
                state = r.prepare()
                t0 = time.perf_counter()
                r.run(state)
                timer.sync()
                rec["warm_call_s"] = time.perf_counter() - t0
                r.finish(state)
            runners[name] = r
            # Peak memory right after the provider's own warm-up, before the next provider runs: on CPU
            # the resident-set measure also sees heap pages that other providers' machinery left
            # fragmented (after torch.compile had run in the same process, fastguide's W1 figure rose
            # by 1-1.8 MB, a third of its Grams). A provider slower than 0.3 s a call (MB-level noise
            # is small against what it allocates, and it has just been warmed up) gets one measured run.
            wanted = rec["warm_call_s"] <= case.budget_s / 6 or name in (case.baseline, "torch-careful")
            if memory and wanted:
                quick_ = rec["warm_call_s"] >= 0.3
                _memory_record(rec, r, device, case, repeats=1 if quick_ else 3, warmup=not quick_)
        except Exception as e:
            rec["skipped"] = f"error: {type(e).__name__}: {e}"[:300]
            log(f"  {name}: {rec['skipped']}")
    if not runners:
        return list(records.values())
    # Rounds: every provider gets `rounds`, except that a slow one is capped by the case budget.
    # Rounds from the providers that are not slow (a slow one, > budget / 6 a call, is capped below).
    per_round = sum(
        records[k]["warm_call_s"]
        for k in runners
        if records[k]["warm_call_s"] <= case.budget_s / 6 and k not in case.capped
    )
    target = max(2, min(rounds, int(case.budget_s / max(per_round, 1e-9))))
    cap = {
        k: max(1, min(target, int(case.budget_s / 3 / max(records[k]["warm_call_s"], 1e-9)))) for k in runners
    }
    for k in case.capped:
        if k in cap:
            cap[k] = min(cap[k], 3)
    t_rounds = time.perf_counter()
    timer = Timer(device)
    times: dict[str, list[float | None]] = {k: [] for k in runners}
    for rnd in range(target):
        order = list(runners)
        random.shuffle(order)
        for k in order:
            if rnd >= cap[k]:
                times[k].append(None)
                continue
            r = runners[k]
            state = r.prepare()
            times[k].append(timer(r.run, state))
            r.finish(state)
    t_timed = time.perf_counter() - t_rounds
    bl = case.baseline if case.baseline in runners else None
    if device.type == "cuda" and "fastguide-triton" in runners:
        bl = "fastguide-triton"
    for k, ts in times.items():
        rec = records[k]
        good = [t for t in ts if t is not None]
        rec.update(_summ(good))
        if bl is not None:
            ratios = [a / b for a, b in zip(ts, times[bl], strict=False) if a is not None and b is not None]
            rec["baseline"] = bl
            rec["ratio_to_baseline"] = statistics.median(ratios) if ratios else None
        med = rec["median_ms"] / 1e3
        if case.model_flops:
            rec["achieved_TFLOPs"] = case.model_flops / med / 1e12
        if case.model_bytes:
            rec["achieved_GBps"] = case.model_bytes / med / 1e9
        if peaks and case.model_flops:
            gemm = peaks.get("gemm_fp32_TFLOPs")
            bw = peaks.get("copy_GBps")
            if gemm and bw:
                floor = max(case.model_bytes / (bw * 1e9), case.model_flops / (gemm * 1e12))
                rec["floor_ms"] = floor * 1e3
                rec["floor_ratio"] = med / floor
        if device.type == "cuda" and case.mode in ("fwd", "fwd+bwd", "update"):
            try:
                from triton.testing import do_bench

                r = runners[k]
                rec["do_bench_median_ms"] = do_bench(
                    lambda r=r: r.run(None), warmup=10, rep=50, return_mode="median"
                )
            except Exception:
                pass
    if case.op == "step":
        _step_ratios(records, times)
    del inp
    total = time.perf_counter() - t_start
    log(f"  [{case.key}: {target} rounds, {t_timed:.1f} s timed, {total:.1f} s in all]")
    case.extra["timed_s"] = t_timed
    return list(records.values())


def _memory_record(
    rec: dict, r: Runner, device: torch.device, case: Case, repeats: int, warmup: bool
) -> None:
    pk = peak_memory(r, device, repeats=repeats, warmup=warmup)
    rec["peak_extra_bytes"] = pk
    if not case.gram_bytes:
        return
    rec["gram_bytes"], rec["grad_bytes"] = case.gram_bytes, case.grad_bytes
    if pk is not None:
        rec["peak_extra_minus_grads_bytes"] = pk - case.grad_bytes
        rec["peak_extra_per_gram_budget"] = (pk - case.grad_bytes) / case.gram_bytes
    if device.type == "cpu":
        tp = cpu_tensor_peak(r, warmup=warmup)  # allocator level, like max_memory_allocated on CUDA
        rec["peak_tensor_bytes"] = tp
        if tp is not None:
            rec["peak_tensor_per_gram_budget"] = (tp - case.grad_bytes) / case.gram_bytes


def _step_ratios(records: dict, times: dict) -> None:
    """guided / (target step + guide forward), and / (... + Gram GEMMs): medians of per-round ratios."""
    if "unguided" not in times or "guide-fwd" not in times:
        return
    u, g = times["unguided"], times["guide-fwd"]
    gg = times.get("gram-gemms")
    for k, ts in times.items():
        if k in ("unguided", "guide-fwd", "gram-gemms"):
            continue
        r1 = [a / (b + c) for a, b, c in zip(ts, u, g, strict=False) if None not in (a, b, c)]
        records[k]["step_ratio"] = statistics.median(r1) if r1 else None
        if gg is not None:
            r2 = [
                a / (b + c + d) for a, b, c, d in zip(ts, u, g, gg, strict=False) if None not in (a, b, c, d)
            ]
            records[k]["step_ratio_with_grams"] = statistics.median(r2) if r2 else None


# =========================================================================== goals and the table
GOALS_CPU = [
    ("W1 loss fwd+bwd: >= 5x faster than naive per-pair", "W1 loss fwd+bwd", "naive", ">=", 5.0),
    (
        "W1 loss fwd+bwd: >= 1.5x faster than careful torch autograd",
        "W1 loss fwd+bwd",
        "torch-careful",
        ">=",
        1.5,
    ),
    ("all-pairs matrix (W3): >= 1.2x faster than pytorch-cka", "W3 matrix fwd", "pytorch-cka", ">=", 1.2),
    (
        "feature route >= 5x faster than the Gram route (n=8192, d=256)",
        "tokens loss fwd+bwd",
        "fastguide-torch:gram-route",
        ">=",
        5.0,
    ),
    ("guided step (W1) <= 1.10x (target step + guide forward)", "W1 guided step", "step_ratio", "<=", 1.10),
    ("guided step (W4) <= 1.10x (target step + guide forward)", "W4 guided step", "step_ratio", "<=", 1.10),
    (
        "loss peak extra memory <= one Gram per layer + 10% (W1 fwd+bwd)",
        "W1 loss fwd+bwd",
        "memory",
        "<=",
        1.10,
    ),
]
GOALS_GPU = [
    ("W1 loss fwd+bwd <= 1.3x the roofline floor", "W1 loss fwd+bwd", "floor", "<=", 1.3),
    ("W3 all-pairs <= 1.5x the roofline floor", "W3 matrix fwd", "floor", "<=", 1.5),
    ("guided step (W1) <= 1.05x (target step + guide forward)", "W1 guided step", "step_ratio", "<=", 1.05),
    ("guided step (W4) <= 1.05x (target step + guide forward)", "W4 guided step", "step_ratio", "<=", 1.05),
]


def evaluate_goals(records: list[dict], device: torch.device) -> list[dict]:
    """The issue's goals, measured from the records (medians of paired ratios)."""
    by = {(r["case"], r["provider"]): r for r in records}
    out = []
    for text, case, what, op, target in GOALS_GPU if device.type == "cuda" else GOALS_CPU:
        # The Triton provider on CUDA, unless it was skipped there (then the torch backend, the baseline).
        rec = by.get((case, "fastguide-triton")) if device.type == "cuda" else None
        if rec is None or "median_ms" not in rec:
            rec = by.get((case, "fastguide-torch"))
        val = None
        detail = ""
        if rec is not None and "median_ms" in rec:
            if what == "step_ratio":
                val = rec.get("step_ratio")
                if rec.get("step_ratio_with_grams") is not None:
                    detail = f"with Gram GEMMs in the denominator: {rec['step_ratio_with_grams']:.3f}"
            elif what == "memory":
                # Allocator level (tensors) on both devices: max_memory_allocated on CUDA, the profiler's
                # allocation events on CPU (cpu_tensor_peak); the CPU resident-set figure goes in the detail.
                tensor = rec.get("peak_tensor_per_gram_budget")
                val = tensor if tensor is not None else rec.get("peak_extra_per_gram_budget")
                if val is not None:
                    grads = rec.get("grad_bytes", 0.0)
                    got = rec["peak_tensor_bytes"] if tensor is not None else rec["peak_extra_bytes"]
                    detail = (
                        f"peak extra {(got - grads) / MB:.2f} MB (excluding the {grads / MB:.2f} MB of input "
                        f"gradients) vs {rec['gram_bytes'] / MB:.2f} MB of Grams"
                    )
                    if tensor is not None and rec.get("peak_extra_per_gram_budget") is not None:
                        detail += (
                            f" (tensors; resident set: {rec['peak_extra_minus_grads_bytes'] / MB:.2f} MB, "
                            f"ratio {rec['peak_extra_per_gram_budget']:.2f})"
                        )
            elif what == "floor":
                val = rec.get("floor_ratio")
            else:
                other = by.get((case, what))
                if other is not None and other.get("ratio_to_baseline") is not None:
                    val = other["ratio_to_baseline"]
                    detail = (
                        f"{what} {other['median_ms']:.2f} ms vs fastguide {rec['median_ms']:.2f} ms (medians)"
                    )
        met = None if val is None else (val >= target if op == ">=" else val <= target)
        out.append(
            {
                "goal": text,
                "case": case,
                "target": f"{op} {target}",
                "measured": val,
                "met": met,
                "detail": detail,
            }
        )
    return out


def _fmt(v, spec="{:.2f}", none="-"):
    return none if v is None else spec.format(v)


def format_table(records: list[dict], goals: list[dict] | None = None, markdown: bool = False) -> str:
    """The comparison table (plain text, or GitHub markdown)."""
    lines = []
    cases = list(dict.fromkeys(r["case"] for r in records))
    cols = [
        "provider",
        "median ms",
        "IQR ms",
        "x fastguide",
        "peak extra MB",
        "tensor MB",
        "GB/s",
        "TFLOP/s",
        "floor x",
        "check",
    ]
    for c in cases:
        rs = [r for r in records if r["case"] == c]
        step = rs[0]["op"] == "step"
        title = rs[0]["title"]
        head = list(cols)
        if step:
            head = [
                "provider",
                "median ms",
                "IQR ms",
                "x fastguide",
                "peak extra MB",
                "/ (step+guide)",
                "/ (step+guide+Grams)",
                "check",
            ]
        rows = []
        for r in rs:
            if "median_ms" not in r:
                rows.append([r["provider"], "skipped: " + r.get("skipped", "?")] + [""] * (len(head) - 2))
                continue
            chk = r.get("check", {})
            err = next((v for k, v in chk.items() if k.endswith("err")), None)
            cells = [
                r["provider"],
                _fmt(r["median_ms"], "{:.1f}" if r["median_ms"] >= 10 else "{:.2f}"),
                _fmt(r["p75_ms"] - r["p25_ms"], "{:.1f}" if r["median_ms"] >= 10 else "{:.2f}"),
                _fmt(r.get("ratio_to_baseline"), "{:.2f}"),
                _fmt(None if r.get("peak_extra_bytes") is None else r["peak_extra_bytes"] / MB, "{:.1f}"),
            ]
            if step:
                cells += [_fmt(r.get("step_ratio"), "{:.3f}"), _fmt(r.get("step_ratio_with_grams"), "{:.3f}")]
            else:
                tb_ = r.get("peak_tensor_bytes")
                cells += [
                    _fmt(None if tb_ is None else tb_ / MB, "{:.2f}"),
                    _fmt(r.get("achieved_GBps"), "{:.1f}"),
                    _fmt(r.get("achieved_TFLOPs"), "{:.3f}"),
                    _fmt(r.get("floor_ratio"), "{:.2f}"),
                ]
            cells.append("ok" if not chk else (f"ok {err:.1e}" if err is not None else "ok"))
            rows.append(cells)
        if markdown:
            lines.append(f"**{title}**\n")
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "|".join(["---"] * len(head)) + "|")
            for row in rows:
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
        else:
            w = [
                max(len(str(x)) for x in col)
                for col in zip(head, *[rw + [""] * (len(head) - len(rw)) for rw in rows], strict=False)
            ]
            lines.append(title)
            lines.append(
                "  "
                + "  ".join(
                    h.rjust(wi) if i else h.ljust(wi) for i, (h, wi) in enumerate(zip(head, w, strict=False))
                )
            )
            for row in rows:
                if row[1].startswith("skipped"):
                    lines.append("  " + row[0].ljust(w[0]) + "  " + row[1])
                else:
                    lines.append(
                        "  "
                        + "  ".join(
                            x.rjust(wi) if i else x.ljust(wi)
                            for i, (x, wi) in enumerate(zip(row, w, strict=False))
                        )
                    )
            lines.append("")
    if goals:
        if markdown:
            lines.append("| goal | measured | target | met |")
            lines.append("|---|---|---|---|")
            for g in goals:
                lines.append(
                    f"| {g['goal']} | {_fmt(g['measured'], '{:.2f}')} | {g['target']} | "
                    f"{'-' if g['met'] is None else ('yes' if g['met'] else 'NO')} |"
                )
        else:
            lines.append("Goals (medians of paired ratios):")
            for g in goals:
                met = "n/a" if g["met"] is None else ("met" if g["met"] else "MISSED")
                lines.append(
                    f"  [{met:>6}] {g['goal']}: measured {_fmt(g['measured'], '{:.2f}')} "
                    f"(target {g['target']}) {g['detail']}"
                )
    return "\n".join(lines)


def plot_results(records: list[dict], path: str) -> None:
    """Bar chart of the paired ratio to fastguide per case and provider (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in dict.fromkeys(r["case"] for r in records)]
    provs = [
        p
        for p in dict.fromkeys(r["provider"] for r in records)
        if p not in ("unguided", "guide-fwd", "gram-gemms")
    ]
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(cases)), 4.5))
    width = 0.8 / max(1, len(provs))
    for k, p in enumerate(provs):
        xs, vs = [], []
        for i, c in enumerate(cases):
            r = next((r for r in records if r["case"] == c and r["provider"] == p), None)
            if r is not None and r.get("ratio_to_baseline"):
                xs.append(i + k * width - 0.4 + width / 2)
                vs.append(r["ratio_to_baseline"])
        if vs:
            ax.bar(xs, vs, width=width, label=p)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("time / fastguide time (median of paired ratios)")
    dev = records[0]["device"] if records else ""
    ax.set_title(f"fastguide benchmark ({dev}): higher = slower than fastguide")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# =========================================================================== suite and CLI
def run_suite(
    device: str = "cpu",
    *,
    quick: bool = False,
    scale: str | None = None,
    rounds: int | None = None,
    compile_: bool | None = None,
    only: list[str] | None = None,
    memory: bool = True,
    log: Callable[[str], None] = print,
    seed: int = 0,
    slow_peers: bool | None = None,
    time_budget_s: float | None = None,
) -> dict:
    """Run every case of a scale; ``time_budget_s`` shares a wall-clock budget for the timed rounds
    across cases (set-up, oracle checks, warm-up and compilation come on top)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    scale = scale or ("quick" if quick else ("full" if dev.type == "cuda" else "cpu"))
    if compile_ is None:
        compile_ = scale in ("full", "cpu")
    rounds = rounds or SCALES[scale]["rounds"]
    random.seed(seed)
    torch.manual_seed(seed)
    if dev.type == "cpu":
        malloc_steady_state()  # a no-op without glibc
    t0 = time.perf_counter()
    peaks = measure_peaks(dev, quick=scale != "full") if dev.type == "cuda" else {}
    records = []
    cases = build_cases(scale, compile_=compile_, only=only, slow_peers=slow_peers)
    nominal = [c.budget_s for c in cases]
    timed = 0.0
    for i, case in enumerate(cases):
        log(f"[{i + 1}/{len(cases)}] {case.key}")
        if time_budget_s:
            # Share what is left of the suite's budget for timed rounds in proportion to the cases'
            # nominal budgets (set-up, checks, warm-up and memory passes are not charged to it, so a
            # slow set-up early on cannot starve the last cases of rounds).
            left = time_budget_s - timed
            case.budget_s = max(2.0, left * nominal[i] / sum(nominal[i:]))
        records += run_case(case, dev, rounds=rounds, peaks=peaks, log=log, memory=memory)
        timed += case.extra.get("timed_s", 0.0)
    _INPUT_CACHE.clear()
    goals = evaluate_goals(records, dev)
    if scale not in ("cpu", "full"):
        for g in goals:
            g["detail"] = (
                g["detail"] + " " if g["detail"] else ""
            ) + f"[{scale} sizes: goals are set for the cpu/full scale]"
    return {
        "suite": "fastguide-bench",
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "env": env_info(dev),
        "config": {
            "device": device,
            "scale": scale,
            "rounds": rounds,
            "compile": compile_,
            "only": only,
            "timing": (
                "CUDA events after L2 flush, interleaved shuffled rounds; do_bench medians too"
                if dev.type == "cuda"
                else "wall clock, interleaved shuffled rounds"
            ),
            "wall_s": time.perf_counter() - t0,
        },
        "peaks": peaks,
        "records": records,
        "goals": goals,
    }


def _default_out(device: str, scale: str) -> Path:
    here = Path.cwd() / "benchmarks" / "results"
    name = f"bench_{torch.device(device).type}_{scale}.json"
    return here / name if here.is_dir() else Path.cwd() / f"fastguide-{name}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fastguide bench",
        description="fastguide benchmark table: W1-W4 workloads and guided training steps against careful "
        "torch, torch.compile, naive per-pair code and peer libraries (DESIGN.md section 6).",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes, few rounds, no torch.compile (about a minute on an idle 2-core machine)",
    )
    p.add_argument(
        "--scale",
        choices=sorted(SCALES),
        default=None,
        help="workload sizes (default: full on CUDA, cpu on CPU, quick with --quick)",
    )
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds per case (at most)")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="wall-clock seconds shared by the timed rounds of all cases (default: 65 at cpu scale, "
        "45 with --quick, none on CUDA); set-up, checks and compilation come on top",
    )
    p.add_argument("--only", nargs="+", default=None, help="run cases whose name contains any of these words")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    p.add_argument(
        "--slow-peers",
        action="store_true",
        help="also run ckatorch on the W3 matrix and torch-careful on the token case at cpu scale",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument(
        "--tf32",
        action="store_true",
        help="torch.set_float32_matmul_precision('high') (TF32 on GPU; floors use that GEMM rate)",
    )
    p.add_argument(
        "--out", default=None, help="results JSON path (default: benchmarks/results/bench_<dev>_<scale>.json)"
    )
    p.add_argument("--markdown", default=None, help="also write the table as markdown to this path")
    p.add_argument("--plot", default=None, help="also write a PNG bar chart of the ratios to this path")
    a = p.parse_args(argv)
    if a.tf32:
        torch.set_float32_matmul_precision("high")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    scale = a.scale or ("quick" if a.quick else ("full" if torch.device(device).type == "cuda" else "cpu"))
    res = run_suite(
        device,
        quick=a.quick,
        scale=scale,
        rounds=a.rounds,
        compile_=False if a.no_compile else None,
        only=a.only,
        memory=not a.no_memory,
        log=lambda s: print(s, file=sys.stderr, flush=True),
        slow_peers=True if a.slow_peers else None,
        time_budget_s=a.budget if a.budget is not None else {"cpu": 65.0, "quick": 45.0}.get(scale),
    )
    env = res["env"]
    wall = res["config"]["wall_s"]
    print(
        f"\nfastguide {env['fastguide']} | {env['device_name']} | torch {env['torch']} | "
        f"triton {env['triton']} | syrk: {env['cpu_syrk']} | layers: {env.get('cpu_layer_parallel')} | "
        f"scale {scale} | {wall:.0f} s\n"
    )
    print(format_table(res["records"], res["goals"]))
    out = Path(a.out) if a.out else _default_out(device, scale)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print(f"\nresults: {out}")
    if a.markdown:
        Path(a.markdown).write_text(format_table(res["records"], res["goals"], markdown=True) + "\n")
        print(f"markdown: {a.markdown}")
    if a.plot:
        try:
            plot_results(res["records"], a.plot)
            print(f"plot: {a.plot}")
        except Exception as e:  # matplotlib is optional
            print(f"plot skipped: {e}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
