"""Config pruning of kernels/_configs.py with a device's limits stubbed (no GPU needed): what the
compile gate checks on compiled code, checked here on the rules themselves."""

from __future__ import annotations

import pytest
import torch
import triton.language as tl
from fastguide.kernels import _configs
from kernel_oracle import prune_gram


@pytest.fixture
def device(monkeypatch):
    """A GPU-like environment: full config lists, autotuning on, a settable arch and smem limit."""
    monkeypatch.setattr(_configs, "interpreting", lambda: False)
    monkeypatch.setattr(_configs, "skip_autotune", lambda: False)
    state = {"arch": 80, "smem": 166912}
    monkeypatch.setattr(_configs, "target_arch", lambda: state["arch"])
    monkeypatch.setattr(_configs, "max_shared_memory", lambda: state["smem"])
    return state


def _grad(esize=4, **kw):
    args = dict(
        BLOCK_M=128,
        BLOCK_N=128,
        NUM_C=2,
        ACC=tl.float32,
        ALIGNED=True,
        LAYOUT=0,
        N16=True,
        INPUT_PRECISION="tf32",
    )
    args.update(kw)
    x = torch.empty(1, dtype={2: torch.bfloat16, 4: torch.float32, 8: torch.float64}[esize])
    return _configs.prune_grad(_configs.grad_configs(), {"x_ref_ptr": x}, **args)


def test_gram_configs_fit_the_device(device):
    for arch, smem in ((80, 166912), (90, 232448)):
        device.update(arch=arch, smem=smem)
        kept = prune_gram()
        assert kept, arch
        for c in kept:
            assert _configs.gram_fwd_smem(128, c.kwargs["BLOCK_K"], c.num_stages, 4) <= smem
            assert c.num_warps == 8  # a 128 x 128 fp32 accumulator
    device.update(arch=90, smem=232448)
    assert any(c.kwargs["BLOCK_K"] == 64 for c in prune_gram())  # only sm_90 with vector loads
    device.update(arch=80, smem=166912)
    assert all(c.kwargs["BLOCK_K"] <= 32 for c in prune_gram())
    assert all(c.kwargs["BLOCK_K"] == 16 for c in prune_gram(ALIGNED=False))
    assert all(c.num_warps == 4 for c in prune_gram(BLOCK_M=64))


def test_grad_configs_by_operands(device):
    device.update(arch=80, smem=166912)
    for num_c in (1, 2, 4):
        for c in _grad(NUM_C=num_c):
            need = _configs.grad_smem(num_c, 128, 128, c.kwargs["BLOCK_J"], c.num_stages, 4)
            assert need <= 166912
    assert all(c.kwargs["BLOCK_J"] == 16 for c in _grad(NUM_C=4))
    assert all(c.kwargs["BLOCK_J"] == 16 and c.num_stages <= 3 for c in _grad(N16=False))
    assert all(c.kwargs["BLOCK_J"] == 16 for c in _grad(INPUT_PRECISION="ieee"))
    assert all(c.maxnreg == 255 for c in _grad())


def test_tiny_limit_keeps_the_smallest(device):
    device.update(smem=1)
    assert len(prune_gram()) == 1  # never empty: the smallest need stays (the launch then reports it)


def test_skip_autotune_keeps_one(device, monkeypatch):
    monkeypatch.setattr(_configs, "skip_autotune", lambda: True)
    assert len(prune_gram()) == 1 and len(_grad()) == 1


def test_traffic_model_runs_and_counts_the_input_once():
    """kernels/README.md's traffic tables come from tests/kernels/traffic_model.py; keep it working."""
    import traffic_model as tm

    w1 = tm.workloads(4)["W1"]["gram (fwd + centre)"]
    x_bytes = 256 * (8 * 4096 + sum(tm.W1_GUIDE)) * 4
    assert x_bytes <= w1.dram <= 1.1 * x_bytes  # x once, plus the small K/C traffic
    assert w1.l2 > w1.dram  # row blocks re-read through L2 by each tile program
    assert "| W1 | TF32 |" in tm.table()
