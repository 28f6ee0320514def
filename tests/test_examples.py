"""The examples run as a user would start them, at tiny size."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ddp_example_under_torchrun():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(EXAMPLES / "ddp_guidance.py"), "--tiny", "--gather"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 ranks, gather=True, guidance steps 4" in out.stdout
    assert out.stdout.count("mean CKA") == 4


def test_hf_causal_lm_example(capsys):
    pytest.importorskip("transformers")
    result = _load("hf_causal_lm").main(["--tiny"])
    assert result["step"] == result["guidance_step"] == 3
    assert any(k.startswith("eval_cka/") for k in result["metrics"])


def test_lightning_example():
    pytest.importorskip("lightning")
    result = _load("lightning_guidance").main(["--tiny"])
    assert result["step"] == result["global_step"] == 3
    assert any(k.startswith("cka/") for k in result["metrics"])
    assert any(k.startswith("val_cka/") for k in result["metrics"])
