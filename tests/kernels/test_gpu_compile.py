"""GPU readiness without a GPU (DESIGN.md section 6): every kernel variant the launchers reach
compiles for sm_80 and sm_90 with no spills, shared memory within the per-block limit, tensor
cores in fp16/bf16/TF32 matmuls and 16-byte loads on aligned streaming operands (the grouped
kernels of kernels/group.py included); a W1 loss forward+backward is at most 16 device kernels with
no host sync, from the launchers and through ``fastguide.CKALoss``; a ``Guidance`` step adds only
its hooks' Grams and the fused loss.

Each check runs ``tests/kernels/gpu_compile.py`` in a subprocess (its stand-in driver must never
leak into the interpreter tests). Tiers: the default sweep (every autotune config the launchers
keep, every precision mode and dtype, shapes chosen so each specialisation class is reached) runs
in the default suite; the full sweep (more n, widths, layouts, pair counts, both estimators) runs
only with ``FASTGUIDE_COMPILE_GATE=full``. Compiled kernels are cached by Triton on disk
(``TRITON_CACHE_DIR``), so a rerun only re-inspects the cubins.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gpu_compile  # noqa: E402

# Every kernel the default sweep must reach (a sweep that compiles nothing must not pass).
EXPECTED_KERNELS = {
    "_gram_fwd_kernel",
    "_gram_rowsum_kernel",
    "_gram_center_kernel",
    "_gram_finish_kernel",
    "_cka_pairs_fwd_kernel",
    "_cka_matrix_fwd_kernel",
    "_cka_pairs_bwd_kernel",
    "_group_gram_fwd_kernel",
    "_group_grad_bwd_kernel",
}
MATMUL_KERNELS = {
    "_gram_fwd_kernel",
    "_cka_matrix_fwd_kernel",
    "_cka_pairs_bwd_kernel",
    "_group_gram_fwd_kernel",
    "_group_grad_bwd_kernel",
}
MAX_W1_KERNELS = 16


def _skip_reason() -> str | None:
    import triton

    if triton.__version__ != gpu_compile.PINNED_TRITON:
        return (
            f"the compile gate is written against triton {gpu_compile.PINNED_TRITON} (its internals and "
            f"register counts are version-specific); found triton {triton.__version__}"
        )
    missing = gpu_compile.missing_internals()
    if missing:
        return "triton internals the compile gate relies on are missing: " + ", ".join(missing)
    return None


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTGUIDE_SKIP_AUTOTUNE")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences a warning)
    return env


def _run_gate(tier: str, tmp: Path, timeout: int) -> dict[int, dict]:
    """Both arches concurrently (one process each); returns the parsed JSON per arch."""
    procs = {}
    for arch in gpu_compile.ARCHES:
        out = tmp / f"gate_{arch}.json"
        cmd = [
            sys.executable,
            str(HERE / "gpu_compile.py"),
            "--arch",
            str(arch),
            "--tier",
            tier,
            "--json",
            str(out),
        ]
        procs[arch] = (
            subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            out,
        )
    results = {}
    for arch, (proc, out) in procs.items():
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"compile gate sm_{arch} ({tier}) did not finish within {timeout} s")
        assert proc.returncode == 0, f"compile gate sm_{arch} failed:\n{err[-4000:]}"
        results[arch] = json.loads(out.read_text())
    return results


def _check(result: dict) -> None:
    arch = result["arch"]
    assert not result["launcher_errors"], f"sm_{arch}: launcher errors:\n" + "\n".join(
        result["launcher_errors"]
    )
    reached = {v["kernel"] for v in result["variants"]}
    assert EXPECTED_KERNELS <= reached, (
        f"sm_{arch}: the sweep did not reach {sorted(EXPECTED_KERNELS - reached)}"
    )
    for v in result["variants"]:
        if v["kernel"] in MATMUL_KERNELS and not v["error"]:
            assert v["dots"], f"sm_{arch}: {v['kernel']} compiled without a tt.dot ({v['constants']})"
    bad = [v for v in result["variants"] if v["problems"]]
    lines = [
        f"{v['kernel']} [{v['options']}] {', '.join(v['problems'])}: shared {v['shared']} B, "
        f"regs {v['regs']}, "
        f"stack {v['stack']}, LDL/STL {v['ldl_stl']}, MMA {v['tensor_core_ops']}, dots {v['dots']}, "
        f"16-byte loads {v['global_loads_128']}/{v['global_loads']} {v['error']} | {v['constants']}"
        for v in bad[:30]
    ]
    assert not bad, (
        f"sm_{arch}: {len(bad)} of {len(result['variants'])} variants have problems:\n" + "\n".join(lines)
    )


@pytest.fixture(scope="module")
def default_gate(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    return _run_gate("default", tmp_path_factory.mktemp("gate"), timeout=1500)


@pytest.mark.parametrize("arch", gpu_compile.ARCHES, ids=[f"sm_{a}" for a in gpu_compile.ARCHES])
def test_every_variant_compiles_clean(default_gate, arch):
    _check(default_gate[arch])


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("FASTGUIDE_COMPILE_GATE") != "full", reason="set FASTGUIDE_COMPILE_GATE=full"
)
def test_full_sweep_compiles_clean(tmp_path):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    for result in _run_gate("full", tmp_path, timeout=6 * 3600).values():
        _check(result)


def _launch_count(tmp_path, level: str) -> dict:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path / f"w1_{level}.json"
    cmd = [
        sys.executable,
        str(HERE / "gpu_compile.py"),
        "--arch",
        "90",
        "--launch-count",
        level,
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("level", ["kernels", "public"])
def test_w1_loss_is_at_most_16_device_kernels(tmp_path, level):
    """W1 (n 256, 8 x 4096 targets vs ResNet-18 block outputs, 8 pairs) forward + backward, launches
    stubbed, second call: Triton launches + aten compute ops, no host sync. ``kernels``: from the
    launchers; ``public``: ``fastguide.CKALoss(backend="triton")`` through the op layer."""
    count = _launch_count(tmp_path, level)
    assert count["host_syncs"] == [], f"host synchronisation in the W1 step: {count['host_syncs']}"
    # gram 4 (fwd, rowsum, centre, finish), CKA pairs 1 (HSIC + epilogue), backward 1 (all targets)
    assert count["triton_kernels"] == {
        "_gram_fwd_kernel": 1,
        "_gram_rowsum_kernel": 1,
        "_gram_center_kernel": 1,
        "_gram_finish_kernel": 1,
        "_cka_pairs_fwd_kernel": 1,
        "_cka_pairs_bwd_kernel": 1,
    }, count
    assert count["device_kernels"] <= MAX_W1_KERNELS, count


def test_guidance_w1_step_adds_only_the_hook_grams_and_the_fused_loss(tmp_path):
    """W1 through ``fastguide.Guidance``: what a guided step adds to the unguided one. Each of the 8
    guide hooks reduces its layer with one ``gram_fwd`` (4 launches: the guide's activations are
    freed layer by layer, DESIGN.md section 4), the loss is one ``gram_fwd`` of the targets, one
    ``cka_pairs_fwd`` with the guide statistics as its second stack and one ``cka_pairs_bwd``; no
    host synchronisation (kernels/README.md records the full count)."""
    count = _launch_count(tmp_path, "guidance")
    assert count["host_syncs"] == [], f"host synchronisation in the guided step: {count['host_syncs']}"
    grams = {
        k: 9
        for k in ("_gram_fwd_kernel", "_gram_rowsum_kernel", "_gram_center_kernel", "_gram_finish_kernel")
    }
    assert count["triton_kernels"] == {**grams, "_cka_pairs_fwd_kernel": 1, "_cka_pairs_bwd_kernel": 1}, count
