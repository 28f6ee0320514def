"""GPU compile gate: compile every kernel variant the public launchers reach, for sm_80 / sm_90, on a CPU.

Run as a script in a fresh process (``tests/kernels/test_gpu_compile.py`` does; the stand-in driver
must never leak into the interpreter tests)::

    python tests/kernels/gpu_compile.py --arch 90 --tier default --json out.json [--table]

How it works (written against triton 3.9.0, :data:`PINNED_TRITON`):

* a stand-in driver (:class:`StandInDriver`) is made active with ``triton.runtime.driver.set_active``;
  it reports ``GPUTarget("cuda", arch, 32)``, the arch's shared-memory limit and SM count, and a
  benchmarker that runs each autotune candidate once and reports equal times (so the autotuner
  launches, i.e. compiles, every config it has not pruned);
* ``triton.knobs.runtime.jit_cache_hook`` receives every launch that misses Triton's kernel cache,
  compiles what that launch would compile with ``triton.compile(ASTSource(...), target=...)`` and
  returns True, which makes Triton skip the compile and the launch (nothing runs, so every launch
  reaches the hook: launches are counted there too);
* the launchers are driven over meta tensors (shapes, strides and data-pointer alignment are real,
  no memory is allocated), so conv-sized layers cost nothing;
* every distinct variant (kernel, specialisation key, options) is compiled once per arch, and the
  cubin is inspected with the ``cuobjdump`` bundled in the Triton wheel:
  ``--dump-resource-usage`` (registers, stack, local memory) and ``-sass`` (LDL/STL: local memory
  traffic, i.e. spills; HMMA/HGMMA: tensor cores; LDG/LDGSTS ``.128``: 16-byte global loads).

A variant is a *problem* when it fails to compile, needs more shared memory than the arch's
per-block limit (``metadata.shared`` against :data:`SHARED_LIMIT`), spills (stack > 0, local
memory, or any LDL/STL), or has a ``tt.dot`` on fp16/bf16 operands or TF32 (tf32, tf32x3) without
a tensor-core instruction (or, for a kernel of 16-bit inputs, any dot without one). Streaming
kernels launched on 16-byte-aligned shapes (tagged ``aligned-x`` / ``aligned-n`` below) must also
issue 16-byte global loads.

Triton internals used (checked by :func:`missing_internals`; the test skips naming what is absent):
``triton.runtime.driver.set_active`` / ``reset_active``, ``triton.backends.driver.DriverBase``,
``triton.backends.compiler.GPUTarget``, ``triton.knobs.runtime.jit_cache_hook`` (its keyword
arguments ``key``, ``fn.jit_function`` and ``compile["signature" | "constants" | "configs" |
"specialization_data"]``, and that returning True skips compile and launch),
``triton.compiler.ASTSource``, ``triton.compile(src, target=, options=)``, ``CompiledKernel.asm``
(``"ttir"``, ``"cubin"``) and ``.metadata.shared``, the autotuner's use of
``driver.active.get_benchmarker()``, ``driver.active.utils.get_device_properties`` (read by
``kernels/_configs.py``), and ``triton/backends/nvidia/bin/cuobjdump``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

PINNED_TRITON = "3.9.0"
ARCHES = (80, 90)
# Max dynamic shared memory per block (opt-in), bytes: A100 163 KiB, H100/H200 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}
SM_COUNT = {80: 108, 90: 132}
# Kernels that stream large operands from DRAM, and the tag under which they must use 16-byte
# loads: "aligned-x" (the activations pass the launchers' alignment check), "aligned-n" (n is a
# multiple of 16, so the n x n operands' rows are 16-byte aligned).
STREAMING = {
    "_gram_fwd_kernel": "aligned-x",
    "_gram_center_kernel": "aligned-n",
    "_hsic_matrix_fwd_kernel": "aligned-n",
    "_hsic_pairs_fwd_kernel": "aligned-n",
    "_cka_pairs_fwd_kernel": "aligned-n",
    "_cka_matrix_fwd_kernel": "aligned-n",
    "_grad_x_bwd_kernel": "aligned-x",
    "_cka_pairs_bwd_kernel": "aligned-x",
}
_TC_PRECISIONS = ("tf32", "tf32x3", "bf16x3", "bf16x6")


def missing_internals() -> list[str]:
    """Names of the Triton internals this gate relies on that the installed Triton lacks."""
    missing = []
    try:
        import triton
    except Exception as e:  # pragma: no cover - triton is a dependency
        return [f"triton ({e})"]
    checks = {
        "triton.runtime.driver.set_active": lambda: triton.runtime.driver.set_active,
        "triton.runtime.driver.reset_active": lambda: triton.runtime.driver.reset_active,
        "triton.knobs.runtime.jit_cache_hook": lambda: triton.knobs.runtime.jit_cache_hook,
        "triton.compiler.ASTSource": lambda: __import__("triton.compiler", fromlist=["ASTSource"]).ASTSource,
        "triton.backends.compiler.GPUTarget": lambda: (
            __import__("triton.backends.compiler", fromlist=["GPUTarget"]).GPUTarget
        ),
        "triton.backends.driver.DriverBase": lambda: (
            __import__("triton.backends.driver", fromlist=["DriverBase"]).DriverBase
        ),
    }
    for name, get in checks.items():
        try:
            get()
        except Exception:
            missing.append(name)
    if not os.path.exists(cuobjdump_path()):
        missing.append("triton/backends/nvidia/bin/cuobjdump")
    return missing


def cuobjdump_path() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


# --------------------------------------------------------------------------- stand-in driver
def make_driver(arch: int):
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class _Utils:
        @staticmethod
        def get_device_properties(device):
            return {
                "max_shared_mem": SHARED_LIMIT[arch],
                "max_num_regs": 65536,
                "multiprocessor_count": SM_COUNT[arch],
                "warpSize": 32,
                "sm_clock_rate": 1_980_000,
                "mem_clock_rate": 2_619_000,
                "mem_bus_width": 5120,
            }

    class StandInDriver(DriverBase):
        """Reports a CUDA target of ``arch``; never launches anything (the hook skips launches)."""

        utils = _Utils()

        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("meta")

        def get_current_device(self):
            return arch  # one Triton device cache per arch

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_device_capability(self, device=None):
            return divmod(arch, 10)

        def get_benchmarker(self):
            def bench(kernel_call, quantiles=None, **kwargs):
                kernel_call()
                return [1.0, 1.0, 1.0]

            return bench

        def get_empty_cache_for_benchmark(self):
            return torch.empty(0, device="meta")

        def clear_cache(self, cache):
            pass

    return StandInDriver()


# --------------------------------------------------------------------------- variants
@dataclass
class Variant:
    kernel: str
    arch: int
    options: str
    constants: str
    tags: list = field(default_factory=list)
    error: str = ""
    shared: int = 0
    regs: int = 0
    stack: int = 0
    local: int = 0
    ldl_stl: int = 0
    tensor_core_ops: int = 0
    global_loads: int = 0
    global_loads_128: int = 0
    dots: list = field(default_factory=list)  # (operand dtype, input precision)
    inputs_16bit: bool = False  # a pointer argument to fp16/bf16 data (the inputs are 16-bit)
    compile_s: float = 0.0

    @property
    def expects_tensor_cores(self) -> bool:
        """A dot on fp16/bf16 or TF32 operands, or any dot of a kernel whose inputs are 16-bit (an
        fp32 IEEE dot on upcast 16-bit data runs on the FMA units for no accuracy the inputs have)."""
        if self.inputs_16bit and self.dots:
            return True
        return any(t in ("f16", "bf16") or (t == "f32" and p in _TC_PRECISIONS) for t, p in self.dots)

    def problems(self) -> list[str]:
        if self.error:
            return ["compile error"]
        out = []
        if self.shared > SHARED_LIMIT[self.arch]:
            out.append("shared memory")
        if self.stack > 0 or self.local > 0 or self.ldl_stl > 0:
            out.append("spill")
        if self.expects_tensor_cores and self.tensor_core_ops == 0:
            out.append("no tensor cores")
        if STREAMING.get(self.kernel) in self.tags and self.global_loads_128 == 0:
            out.append("no 16-byte loads")
        return out


_DOT_RE = re.compile(r"tt\.dot .*?(?:inputPrecision = (\w+) )?: tensor<[0-9x]+x(\w+)>")


def _dots(ttir: str) -> list[tuple[str, str]]:
    out = []
    for line in ttir.splitlines():
        if "tt.dot " not in line:
            continue
        m = _DOT_RE.search(line)
        if m:
            out.append((m.group(2), m.group(1) or "ieee"))
    return out


def _inspect_cubin(v: Variant, cubin: bytes) -> None:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        tool = cuobjdump_path()
        res = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        )
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res.stdout)
        if m:
            v.regs, v.stack, _, v.local = (int(g) for g in m.groups())
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    ops = Counter(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass))
    v.ldl_stl = sum(c for op, c in ops.items() if op.startswith(("LDL", "STL")))
    v.tensor_core_ops = sum(c for op, c in ops.items() if op.startswith(("HMMA", "HGMMA")))
    loads = {op: c for op, c in ops.items() if op.startswith(("LDG.", "LDGSTS."))}
    v.global_loads = sum(loads.values())
    v.global_loads_128 = sum(c for op, c in loads.items() if ".128" in op)


class Gate:
    """Installs the stand-in driver and the compile hook for one arch; records variants and launches."""

    def __init__(self, arch: int, compile_kernels: bool = True):
        self.arch = arch
        self.compile_kernels = compile_kernels
        self.variants: dict[tuple, Variant] = {}
        self.launches: list[str] = []
        self._tags: tuple = ()

    @contextlib.contextmanager
    def active(self):
        import triton

        old_hook = triton.knobs.runtime.jit_cache_hook
        triton.runtime.driver.set_active(make_driver(self.arch))
        triton.knobs.runtime.jit_cache_hook = self._hook
        try:
            yield self
        finally:
            triton.knobs.runtime.jit_cache_hook = old_hook
            try:
                triton.runtime.driver.reset_active()
            except RuntimeError:  # no real driver on this machine ("0 active drivers")
                triton.runtime.driver.set_active(None)

    @contextlib.contextmanager
    def tag(self, *tags: str):
        old = self._tags
        self._tags = old + tags
        try:
            yield
        finally:
            self._tags = old

    def _hook(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled):
        jf = fn.jit_function
        name = jf.fn.__name__
        self.launches.append(name)
        ck = (name, str(key))
        v = self.variants.get(ck)
        if v is None:
            opts = json.loads(compile["specialization_data"])["options"]
            v = Variant(
                kernel=name,
                arch=self.arch,
                options=f"warps={compile['num_warps']} stages={compile['num_stages']}",
                constants=", ".join(
                    f"{k[0] if isinstance(k, tuple) and len(k) == 1 else k}={val}"
                    for k, val in compile["constants"].items()
                    if isinstance(val, (int, bool, str)) or hasattr(val, "name")
                ),
            )
            v.inputs_16bit = any(str(t) in ("*fp16", "*bf16") for t in compile["signature"].values())
            self.variants[ck] = v
            if self.compile_kernels:
                self._compile(v, jf, compile, opts)
        for t in self._tags:
            if t not in v.tags:
                v.tags.append(t)
        return True

    def _compile(self, v: Variant, jf, compile: dict, opts: dict) -> None:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        opts = {k: tuple(x) if isinstance(x, list) else x for k, x in opts.items()}
        t0 = time.perf_counter()
        try:
            src = ASTSource(jf, compile["signature"], compile["constants"], compile["configs"][0])
            kernel = triton.compile(src, target=GPUTarget("cuda", self.arch, 32), options=opts)
            v.shared = int(kernel.metadata.shared)
            v.dots = _dots(kernel.asm["ttir"])
            _inspect_cubin(v, kernel.asm["cubin"])
        except Exception as e:  # a compile failure is a finding, not a crash of the gate
            v.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        v.compile_s = time.perf_counter() - t0


# --------------------------------------------------------------------------- workloads
# (dtype name, float32 matmul precision) modes; 16-bit inputs under both precisions (the
# backward's fp32 dot used to depend on it). Identical variants are compiled once.
MODES = [
    ("float32", "high"),
    ("float32", "highest"),
    ("bfloat16", "high"),
    ("bfloat16", "highest"),
    ("float16", "high"),
    ("float16", "highest"),
    ("float64", "highest"),
]
# ResNet-18 block outputs of W1 (DESIGN.md section 6): features per example.
W1_GUIDE = [200704, 200704, 200704, 100352, 100352, 50176, 50176, 25088, 25088]


def _group_view(case: str, dt):
    """The (G, n, d) view ``fastguide._structure`` hands the grouped kernels, as a meta tensor."""
    import torch

    kind, shape = GROUP_CASES[case]
    x = torch.empty(shape, dtype=dt, device="meta")
    if len(shape) == 4:  # (B, C, H, W) -> (B, C, HW)
        x = x.flatten(2)
        return x.permute(2, 0, 1) if kind == "positions" else x.transpose(1, 2)
    return x.transpose(0, 1) if kind == "positions" else x  # (B, T, D)


# Grouped-mode activations: positions = G positions of n = B examples; structure = G = B samples
# of n tokens (T, or H*W). Odd n (196), n at one tile (16) and unit strides on either axis.
GROUP_CASES = {
    "positions seq": ("positions", (64, 128, 768)),
    "structure seq": ("structure", (32, 196, 384)),
    "positions conv": ("positions", (64, 256, 14, 14)),
    "structure conv": ("structure", (32, 256, 14, 14)),
    "positions small": ("positions", (16, 8, 100)),
}


@dataclass
class Sweep:
    """What one tier drives, per mode: the Cartesian product of these, plus the grouped cases."""

    ns: list
    widths: list
    layouts: list
    estimators: list
    stacks: list  # (La, Lb, P) for the pair launchers
    ks: list  # C's per grad_x call
    grad_widths: list
    odd_modes: list | None = None  # modes that get the odd layouts (None: every mode)
    odd_ns_modes: list | None = None  # modes that also get the odd sizes (None: as odd_modes)
    odd_ns: list = field(default_factory=list)
    odd_layouts: list = field(default_factory=list)
    groups: tuple = ("W1 target+guide", "W3", "mixed")  # gram_fwd layer lists
    bwd_cases: tuple = ("W1", "W3", "all pairs 12x12", "self and within")  # cka_pairs_bwd cases
    group_cases: tuple = tuple(GROUP_CASES)  # kernels/group.py views (tokens="positions"/"structure")


TIERS = {
    # CI: every autotune config and every mode on the W1 shapes (n 256, conv- and FCN-sized layers,
    # the W1 layer list, the W1 backward with 2 C's and grad_x with 4, the most per pass), and the
    # odd classes (n 64: small tiles; n 100: not a multiple of 16; transposed, unaligned and
    # strided layers) in fp32 (TF32) and bf16. The full tier covers the rest.
    "default": Sweep(
        ns=[256],
        widths=[4096, 200704],
        layouts=["contig"],
        estimators=["unbiased", "biased"],
        stacks=[(8, 9, 8)],
        ks=[4],
        grad_widths=[4096],
        odd_modes=[("float32", "high"), ("bfloat16", "high")],
        odd_ns_modes=[("float32", "high")],
        odd_ns=[64, 100],
        odd_layouts=["transposed", "offset", "strided"],
        groups=("W1 target+guide",),
        bwd_cases=("W1",),
        group_cases=("positions seq", "structure conv", "positions small"),
    ),
    # The sweep the before/after table of kernels/README.md was measured with (the first version
    # of this gate's default tier).
    "baseline": Sweep(
        ns=[100, 256],
        widths=[100, 4096, 200704],
        layouts=["contig", "transposed"],
        estimators=["unbiased"],
        stacks=[(8, 9, 8), (24, 24, 24)],
        ks=[1, 2, 4, 6],
        grad_widths=[100, 1000, 4096],
    ),
    # Everything: opt in with FASTGUIDE_COMPILE_GATE=full (hours on a 2-core machine).
    "full": Sweep(
        ns=[64, 100, 256, 1000, 4096],
        widths=[1, 7, 100, 1000, 4096, 50176, 200704, 20_000_000],
        layouts=["contig", "transposed", "offset", "strided"],
        estimators=["unbiased", "biased"],
        stacks=[(1, 1, 1), (8, 9, 8), (12, 12, 12), (24, 24, 24)],
        ks=[1, 2, 3, 4, 6],
        grad_widths=[1, 7, 100, 1000, 4096],
    ),
}


def _meta(shape, dtype, layout="contig"):
    import torch

    if layout == "contig":
        return torch.empty(shape, dtype=dtype, device="meta")
    if layout == "transposed":
        return torch.empty(shape[::-1], dtype=dtype, device="meta").T
    if layout == "offset":  # one column dropped: unaligned data pointer and an odd row stride
        return torch.empty((shape[0], shape[1] + 1), dtype=dtype, device="meta")[:, 1:]
    if layout == "strided":  # every other feature: no unit stride
        return torch.empty((shape[0], 2 * shape[1]), dtype=dtype, device="meta")[:, ::2]
    raise ValueError(layout)


def _x_tags(n: int, ds, layout: str, esize: int) -> tuple:
    """``aligned-x`` when the launchers' host check (``aligned_2d``) lets the x loads be vectors."""
    vec = 16 // esize
    if layout == "contig" and all(d % vec == 0 for d in ds):
        return ("aligned-x",)
    if layout == "transposed" and n % 16 == 0:  # vectors along n: Triton must know n % 16 == 0
        return ("aligned-x",)
    return ()


def _n_tags(n: int) -> tuple:
    """``aligned-n`` when Triton specialises n (a multiple of 16): the n x n operands are vectors."""
    return ("aligned-n",) if n % 16 == 0 else ()


def _call(gate: Gate, errors: list, what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # launcher-side failure (bad table, host assertion): a finding
        errors.append(f"{what}: {type(e).__name__}: {e}")
        return None


def drive(gate: Gate, tier: str, errors: list) -> None:
    """Call the public launchers over the sweep of ``tier`` (see :data:`TIERS`)."""
    import fastguide.kernels as K
    import torch

    sw = TIERS[tier]
    old_prec = torch.get_float32_matmul_precision()
    try:
        for mode in MODES:
            dname, prec = mode
            torch.set_float32_matmul_precision(prec)
            dt = getattr(torch, dname)
            es = torch.empty((), dtype=dt).element_size()
            acc = torch.float64 if dt == torch.float64 else torch.float32
            odd = sw.odd_modes is None or mode in sw.odd_modes
            odd_n = odd if sw.odd_ns_modes is None else mode in sw.odd_ns_modes
            ns = sw.ns + (sw.odd_ns if odd_n else [])
            layouts = sw.layouts + (sw.odd_layouts if odd else [])
            for est in sw.estimators:
                # Layouts only change the first pass (its kernel does not depend on the estimator).
                lay = layouts if est == sw.estimators[0] else sw.layouts
                _drive_gram(gate, K, dt, es, est, ns, sw.widths, lay, sw.groups, errors)
            _drive_pairs(gate, K, dt, acc, ns, sw.stacks, errors)
            _drive_backward(gate, K, dt, es, acc, ns, sw.grad_widths, layouts, sw.ks, sw.bwd_cases, errors)
            _drive_group(gate, dt, acc, sw.group_cases, errors)
    finally:
        torch.set_float32_matmul_precision(old_prec)


def _drive_gram(gate, K, dt, es, est, ns, widths, layouts, groups, errors):
    for n in ns:
        for d in widths:
            for lay in layouts:
                x = _meta((n, d), dt, lay)
                with gate.tag(*_x_tags(n, [d], lay, es), *_n_tags(n)):
                    _call(gate, errors, f"gram_fwd n={n} d={d} {lay}", K.gram_fwd, [x], est)
        cases = {"W1 target+guide": [4096] * 8 + W1_GUIDE, "W3": [2048] * 24, "mixed": [4096, 1000, 7]}
        for name, ds in ((g, cases[g]) for g in groups):
            xs = [_meta((n, d), dt) for d in ds]
            with gate.tag(*_x_tags(n, ds, "contig", es), *_n_tags(n)):
                _call(gate, errors, f"gram_fwd {name} n={n}", K.gram_fwd, xs, est)


def _pairs_of(La: int, Lb: int, P: int) -> list[tuple[int, int]]:
    return [(p % La, La + (p * 7) % Lb) for p in range(P)]


def _drive_pairs(gate, K, dt, acc, ns, stacks, errors):
    import torch

    stack_dtypes = [acc] + ([torch.float16] if dt == torch.float16 else [])
    for n in ns:
        for sdt in stack_dtypes:
            for La, Lb, P in stacks:
                A = _meta((La, n, n), sdt)
                B = _meta((Lb, n, n), sdt)
                pairs = _pairs_of(La, Lb, P)
                pi = torch.tensor([i for i, _ in pairs], device="meta")
                pj = torch.tensor([j - La for _, j in pairs], device="meta")
                with gate.tag(*_n_tags(n)):
                    _call(gate, errors, f"hsic_matrix {La}x{Lb} n={n}", K.hsic_matrix, A, B)
                    _call(gate, errors, f"hsic_pairs P={P} n={n}", K.hsic_pairs, A, B, pi, pj)
                if sdt != acc:
                    continue
                ha, hb = torch.empty(La, dtype=acc, device="meta"), torch.empty(Lb, dtype=acc, device="meta")
                oka = torch.empty(La, dtype=torch.bool, device="meta")
                okb = torch.empty(Lb, dtype=torch.bool, device="meta")
                with gate.tag(*_n_tags(n)):
                    if hasattr(K, "cka_matrix_fwd"):
                        args = (A, B, ha, hb, oka, okb, "unbiased")
                        _call(gate, errors, f"cka_matrix_fwd n={n}", K.cka_matrix_fwd, *args)
                        kw = {"C2": B, "h2": hb, "ok2": okb}
                        _call(gate, errors, f"cka_pairs_fwd P={P} n={n}", K.cka_pairs_fwd, A, ha, oka, pairs,
                              "unbiased", **kw)  # fmt: skip
                    else:  # the launchers before the rename (baseline measurement of the old kernels)
                        args = (A, B, ha, hb, oka, okb, "unbiased")
                        _call(gate, errors, f"cka_matrix n={n}", K.cka_matrix, *args)
                        _call(gate, errors, f"cka_pairs n={n}", K.cka_pairs, A, B, ha, hb, oka, okb, pi, pj,
                              "unbiased")  # fmt: skip


def _drive_backward(gate, K, dt, es, acc, ns, widths, layouts, ks, bwd_cases, errors):
    import torch

    for n in ns:
        for d in widths:
            for lay in layouts:
                x = _meta((n, d), dt, lay)
                for k in ks:
                    Cs = [torch.empty((n, n), dtype=acc, device="meta") for _ in range(k)]
                    w = torch.empty(k, dtype=acc, device="meta")
                    scale = torch.empty((), dtype=acc, device="meta")
                    with gate.tag(*_x_tags(n, [d], lay, es), *_n_tags(n)):
                        _call(gate, errors, f"grad_x n={n} d={d} k={k} {lay}", K.grad_x, x, Cs, w, scale)
        if not hasattr(K, "cka_pairs_bwd"):
            continue
        cases = {
            "W1": ([4096] * 8, W1_GUIDE, [(i, 8 + i) for i in range(8)]),
            "W3": ([2048] * 24, [2048] * 24, [(i, 24 + i) for i in range(24)]),
            "all pairs 12x12": ([1024] * 12, [768] * 12, [(i, 12 + j) for i in range(12) for j in range(12)]),
            "self and within": ([4096, 100, 7], [], [(0, 0), (0, 1), (1, 2), (2, 0)]),
        }
        for name, (dt_, dg, pairs) in ((c, cases[c]) for c in bwd_cases):
            xs = [_meta((n, d), dt) for d in dt_]
            L = len(dt_) + len(dg)
            C = torch.empty((L, n, n), dtype=acc, device="meta")
            vec = torch.empty(L, dtype=acc, device="meta")
            ok = torch.empty(L, dtype=torch.bool, device="meta")
            g = torch.empty(len(pairs), dtype=acc, device="meta")
            with gate.tag(*_x_tags(n, dt_, "contig", es), *_n_tags(n)):
                _call(gate, errors, f"cka_pairs_bwd {name} n={n}", K.cka_pairs_bwd, g, g, xs,
                      list(range(len(dt_))), C, vec, vec, ok, pairs, "unbiased")  # fmt: skip


def _drive_group(gate, dt, acc, cases, errors):
    import torch
    from fastguide.kernels import group

    for case in cases:
        x = _group_view(case, dt)
        G, n, d = x.shape
        shift = torch.empty((G, d), dtype=acc, device="meta")
        K = torch.empty((G, n, n), dtype=acc, device="meta")
        scale = torch.empty((G,), dtype=acc, device="meta")
        _call(gate, errors, f"group_gram_fwd {case}", group.group_gram_fwd, x, shift, K)
        _call(gate, errors, f"group_grad_bwd {case}", group.group_grad_bwd, K, x, shift, scale)


# --------------------------------------------------------------------------- W1 launch count
# aten ops that never launch a device kernel (allocation, views, metadata).
_FREE_OPS = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "_unsafe_view",
    "_reshape_alias", "as_strided",
    "t", "transpose", "permute", "expand", "expand_as", "slice", "select", "squeeze", "unsqueeze",
    "detach", "detach_", "alias", "lift_fresh", "resolve_conj", "resolve_neg", "unbind", "split",
    "chunk", "narrow", "diagonal", "numpy_T", "set_", "result_type", "_has_compatible_shallow_copy_type",
}  # fmt: skip
# aten ops that launch a kernel only through an op they call (a no-op `to` or `contiguous` is free).
_WRAPPER_OPS = {"to", "_to_copy", "contiguous", "reshape", "flatten", "view_as", "type_as", "clone"}
# aten ops that synchronise with the host.
_SYNC_OPS = {"item", "_local_scalar_dense", "is_nonzero", "nonzero", "cpu", "tolist"}


def _aten_name(evt) -> str | None:
    return evt.name[6:] if evt.name.startswith("aten::") else None


def _launches_kernel(evt) -> bool:
    name = _aten_name(evt)
    if name is None or name in _FREE_OPS:
        return False
    if name in _WRAPPER_OPS:
        return any(_launches_kernel(c) for c in evt.cpu_children)
    return True


def _aten_compute_ops(prof) -> tuple[list[str], list[str]]:
    """Top-level aten ops (no aten ancestor) that would launch a device kernel, and host syncs."""
    compute, syncs = [], []
    for evt in prof.events():
        name = _aten_name(evt)
        if name is None:
            continue
        if name in _SYNC_OPS:
            syncs.append(name)
        parent = evt.cpu_parent
        while parent is not None and _aten_name(parent) is None:
            parent = parent.cpu_parent
        if parent is None and _launches_kernel(evt):
            compute.append(name)
    return compute, syncs


def w1_pipeline(K, estimator: str = "unbiased"):
    """The W1 loss (DESIGN.md section 6) from the kernel launchers, as the library's Triton adapter
    is to run it: n = 256, 8 target layers of 4096 features, 9 ResNet-18 block outputs as guide
    maps, 8 pairs, ``loss = sum_p w_p (1 - CKA_p)``, forward and backward through autograd.

    Returns a function of (targets, guides) that computes the loss and calls ``backward()``.
    """
    import torch

    class W1Loss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, pairs, n_target, *acts):
            n = acts[0].shape[0]
            xs = [a.reshape(n, -1) for a in acts]  # views: conv maps are contiguous
            C, s, ok, h, _ = K.gram_fwd(xs, estimator)
            cka, _ = K.cka_pairs_fwd(C, h, ok, pairs, estimator)
            ctx.save_for_backward(*xs[:n_target], C, s, ok, h, cka)
            ctx.meta = (pairs, n_target, len(acts), [a.shape for a in acts[:n_target]])
            return cka

        @staticmethod
        def backward(ctx, grad):
            pairs, n_target, L, shapes = ctx.meta
            *xs, C, s, ok, h, cka = ctx.saved_tensors
            dxs = K.cka_pairs_bwd(grad, cka, xs, list(range(n_target)), C, s, h, ok, pairs, estimator)
            return (
                None,
                None,
                *[dx.view(sh) for dx, sh in zip(dxs, shapes, strict=True)],
                *[None] * (L - n_target),
            )

    def step(targets, guides, weights, pairs):
        cka = W1Loss.apply(pairs, len(targets), *targets, *guides)
        loss = (weights * (1.0 - cka)).sum()
        loss.backward()
        return loss

    return step


W1_GUIDE_SHAPES = [
    (64, 56, 56), (64, 56, 56), (64, 56, 56), (128, 28, 28), (128, 28, 28),
    (256, 14, 14), (256, 14, 14), (512, 7, 7), (512, 7, 7),
]  # fmt: skip


def w1_launch_count(arch: int = 90, dtype: str = "float32", precision: str = "high") -> dict:
    """Device kernels of one W1 loss forward + backward from the launchers (:func:`w1_pipeline`;
    no op layer, so no :func:`meta_as_cuda`): :func:`count_step` of the second of two calls."""
    import fastguide.kernels as K
    import torch

    def inputs(dt):
        targets, guides = w1_inputs(dt)
        weights = torch.empty(8, dtype=torch.float32, device="meta")
        return targets, guides, weights, [(i, 8 + i) for i in range(8)]

    return count_step(arch, w1_pipeline(K), inputs, dtype, precision, public=False)


@contextlib.contextmanager
def meta_as_cuda():
    """Let the op layer take meta tensors for CUDA ones (``backend="triton"`` accepts their device), so
    the public API runs over the stand-in driver exactly as on a GPU, with nothing allocated."""
    import torch

    import fastguide._ops as ops

    old = ops.triton_usable
    ops.triton_usable = lambda device: device.type in ("cuda", "meta") or old(device)
    # Meta tensors dispatch to the ops' fake implementations; run the real ones instead (this
    # process only: the gate runs in its own subprocess).
    lib = torch.library.Library("fastguide", "IMPL")
    for name, fn in ops.OP_IMPLS.items():
        lib.impl(name, fn, "Meta", allow_override=True)
    try:
        yield
    finally:
        ops.triton_usable = old


def public_w1_loss(estimator: str = "unbiased", weights=None):
    """The W1 loss through the PUBLIC API: ``fastguide.CKALoss`` (backend "triton", route "gram") of
    the 8 target layers against the ResNet-18 block outputs, 8 one-to-one pairs."""
    import fastguide

    return fastguide.CKALoss(
        pairs=[(i, i) for i in range(8)], weights=weights, estimator=estimator, backend="triton", route="gram"
    )


def public_w1_step(estimator: str = "unbiased", weights=None):
    """:func:`public_w1_loss`, forward + backward."""
    loss_fn = public_w1_loss(estimator, weights)

    def step(targets, guides):
        loss = loss_fn(targets, guides)
        loss.backward()
        return loss

    return step


def count_step(
    arch: int, step, make_inputs, dtype: str = "float32", precision: str = "high", public: bool = True
) -> dict:
    """Device kernels of ``step(*make_inputs(dtype))`` on the second call (tables cached, autotuning
    done): Triton launches (stand-in hook, launches skipped) + top-level aten compute ops (torch
    profiler), and the host syncs seen. ``public``: the step goes through the op layer (run under
    :func:`meta_as_cuda`); the first of ``make_inputs``'s values are the tensors whose grads reset."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    dt = getattr(torch, dtype)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    gate = Gate(arch, compile_kernels=False)
    try:
        with gate.active(), meta_as_cuda() if public else contextlib.nullcontext():
            args = make_inputs(dt)
            step(*args)
            gate.launches.clear()
            for t in args[0]:  # as optimizer.zero_grad(set_to_none=True) leaves them
                t.grad = None
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(*args)
            launches = list(gate.launches)
    finally:
        torch.set_float32_matmul_precision(old)
    compute, syncs = _aten_compute_ops(prof)
    return {
        "triton_launches": len(launches),
        "triton_kernels": dict(Counter(launches)),
        "aten_compute_ops": len(compute),
        "aten_ops": dict(Counter(compute)),
        "device_kernels": len(launches) + len(compute),
        "host_syncs": syncs,
    }


def w1_inputs(dt, n: int = 256):
    """Meta tensors of W1: 8 target layers (n, 4096) requiring grad, 9 ResNet-18 block outputs."""
    import torch

    targets = [torch.empty((n, 4096), dtype=dt, device="meta", requires_grad=True) for _ in range(8)]
    guides = [torch.empty((n, *s), dtype=dt, device="meta") for s in W1_GUIDE_SHAPES]
    return targets, guides


def guidance_w1_launch_count(arch: int = 90, dtype: str = "float32", precision: str = "high") -> dict:
    """W1 through ``fastguide.Guidance`` (backend "triton"): the device kernels a guided step adds to
    the same step without guidance. The target is 8 bias-free Linear(4096, 4096) layers, the guide
    9 modules that emit the ResNet-18 block-output shapes for free (``new_empty``), mapped
    one-to-one on the first 8; both steps run ``target(x)`` and ``backward()`` of a scalar loss."""
    import torch
    from torch import nn

    import fastguide

    class Emit(nn.Module):
        def __init__(self, shape):
            super().__init__()
            self.shape = shape
            self.register_buffer("anchor", torch.empty((), device="meta"))  # puts the guide on meta

        def forward(self, x):
            return x.new_empty((x.shape[0], *self.shape))

    class Guide(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Emit(s) for s in W1_GUIDE_SHAPES)

        def forward(self, x):
            return [b(x) for b in self.blocks]

    dt = getattr(torch, dtype)
    target = nn.Sequential(*[nn.Linear(4096, 4096, bias=False) for _ in range(8)]).to(device="meta", dtype=dt)
    guide = Guide()
    layers = {str(i): f"blocks.{i}" for i in range(8)}
    guidance = fastguide.Guidance(target, guide, layers=layers, backend="triton", route="gram")
    x = torch.empty((256, 4096), dtype=dt, device="meta")
    params = list(target.parameters())

    def guided(ps):
        (target(x).sum() + guidance.loss(x)).backward()

    def plain(ps):
        target(x).sum().backward()

    with_g = count_step(arch, guided, lambda _dt: (params,), dtype, precision)
    without = count_step(arch, plain, lambda _dt: (params,), dtype, precision)
    guidance.close()
    added = Counter(with_g["aten_ops"])
    added.subtract(without["aten_ops"])
    return {
        "triton_launches": with_g["triton_launches"] - without["triton_launches"],
        "triton_kernels": with_g["triton_kernels"],
        "aten_compute_ops": with_g["aten_compute_ops"] - without["aten_compute_ops"],
        "aten_ops": {k: v for k, v in added.items() if v},
        "device_kernels": with_g["device_kernels"] - without["device_kernels"],
        "host_syncs": with_g["host_syncs"],
    }


def public_w1_launch_count(arch: int = 90, dtype: str = "float32", precision: str = "high") -> dict:
    """:func:`count_step` of :func:`public_w1_step` (``fastguide.CKALoss``) on the W1 shapes."""
    return count_step(arch, public_w1_step(), w1_inputs, dtype, precision)


def public_w1_host_time(arch: int = 90, calls: int = 50, dtype: str = "float32") -> dict:
    """Host time of one W1 ``CKALoss`` forward+backward with every launch stubbed: the op layer, the
    launchers' host code, Triton's launch path up to its kernel-cache lookup, and aten dispatch on
    meta tensors. Medians over ``calls`` calls after two warm-up calls, in ms; the stub is a bare
    ``return True`` hook (no bookkeeping), so the figure excludes the driver's launch call itself
    (a few microseconds per launch on a GPU). Not a timed test: the figures depend on the machine."""
    import statistics

    import torch
    import triton

    dt = getattr(torch, dtype)
    loss_fn = public_w1_loss()
    gate = Gate(arch, compile_kernels=False)
    times, fwd = [], []
    with gate.active(), meta_as_cuda():
        triton.knobs.runtime.jit_cache_hook = lambda **kw: True
        targets, guides = w1_inputs(dt)
        for k in range(calls + 2):
            for t in targets:
                t.grad = None
            t0 = time.perf_counter()
            loss = loss_fn(targets, guides)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            if k >= 2:
                times.append(t2 - t0)
                fwd.append(t1 - t0)
    return {
        "calls": calls,
        "median_ms": 1e3 * statistics.median(times),
        "forward_median_ms": 1e3 * statistics.median(fwd),
        "min_ms": 1e3 * min(times),
    }


# --------------------------------------------------------------------------- report
def summarise(variants: list[Variant]) -> dict:
    """Per (kernel, arch): variants, clean, and each problem's count."""
    table: dict = defaultdict(Counter)
    for v in variants:
        row = table[(v.kernel, v.arch)]
        row["variants"] += 1
        probs = v.problems()
        if not probs:
            row["clean"] += 1
        for p in probs:
            row[p] += 1
    return {f"{k}@sm_{a}": dict(c) for (k, a), c in sorted(table.items())}


def markdown(variants: list[Variant]) -> str:
    cols = [
        "variants",
        "clean",
        "spill",
        "shared memory",
        "no tensor cores",
        "no 16-byte loads",
        "compile error",
    ]
    lines = [
        "| kernel | arch | " + " | ".join(cols) + " | max regs | max stack |",
        "|" + "---|" * (len(cols) + 4),
    ]
    groups = defaultdict(list)
    for v in variants:
        groups[(v.kernel, v.arch)].append(v)
    for (k, a), vs in sorted(groups.items()):
        counts = Counter(p for v in vs for p in v.problems())
        clean = sum(1 for v in vs if not v.problems())
        cells = [str(len(vs)), str(clean)] + [str(counts.get(c, 0)) for c in cols[2:]]
        regs = max(v.regs for v in vs)
        stack = max(v.stack for v in vs)
        lines.append(f"| `{k}` | sm_{a} | " + " | ".join(cells) + f" | {regs} | {stack} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, choices=ARCHES, required=True)
    p.add_argument("--tier", choices=tuple(TIERS), default="default")
    p.add_argument("--json", help="write the variants and the summary here")
    p.add_argument("--table", action="store_true", help="print the markdown table")
    p.add_argument(
        "--launch-count",
        choices=("kernels", "public", "guidance"),
        nargs="?",
        const="kernels",
        help="count the W1 loss's device kernels instead: from the launchers, or through fastguide.CKALoss",
    )
    p.add_argument("--host-time", action="store_true", help="median host time of a W1 CKALoss call instead")
    args = p.parse_args(argv)
    for var in ("TRITON_INTERPRET", "FASTGUIDE_SKIP_AUTOTUNE"):
        if os.environ.get(var, "0") not in ("", "0"):
            print(f"{var} must be unset for the compile gate", file=sys.stderr)
            return 2
    missing = missing_internals()
    if missing:
        print("missing triton internals: " + ", ".join(missing), file=sys.stderr)
        return 3
    if args.host_time:
        print(json.dumps(public_w1_host_time(args.arch)))
        return 0
    if args.launch_count:
        count = {"kernels": w1_launch_count, "public": public_w1_launch_count}.get(
            args.launch_count, guidance_w1_launch_count
        )
        result = count(args.arch)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        print(json.dumps(result))
        return 0
    t0 = time.perf_counter()
    gate = Gate(args.arch)
    errors: list[str] = []
    with gate.active():
        drive(gate, args.tier, errors)
    variants = list(gate.variants.values())
    result = {
        "arch": args.arch,
        "tier": args.tier,
        "seconds": time.perf_counter() - t0,
        "launcher_errors": errors,
        "summary": summarise(variants),
        "variants": [dict(asdict(v), problems=v.problems()) for v in variants],
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.table:
        print(markdown(variants))
    print(
        f"sm_{args.arch} {args.tier}: {len(variants)} variants, "
        f"{sum(1 for v in variants if v.problems())} with problems, {len(errors)} launcher errors, "
        f"{result['seconds']:.0f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
