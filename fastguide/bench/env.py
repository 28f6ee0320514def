"""Device and software versions recorded with every result file."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import version
from pathlib import Path

import torch

from .. import __version__
from ._lib import cpu_name, describe_layer_parallel, syrk_available

__all__ = ["device_name", "env_info"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()})"


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None
    except Exception:
        return None


def env_info(device: torch.device) -> dict:
    """Device, versions (torch, triton, numpy, scipy, the peer libraries), CPU Gram path, git commit."""
    info = {
        "device": str(device),
        "device_name": device_name(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fastguide": __version__,
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
            info[dist] = version(dist)
        except Exception:
            info[dist] = None
    try:
        info["cpu_syrk"] = "mkl_blas_ssyrk (torch's MKL)" if syrk_available() else "torch.mm (no syrk)"
        info["cpu_layer_parallel"] = describe_layer_parallel()
    except Exception:
        info["cpu_syrk"] = info["cpu_layer_parallel"] = None
    info["git_commit"] = _git_commit()
    return info
