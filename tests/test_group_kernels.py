"""The grouped Triton launchers (fastguide.kernels.group) under the interpreter, against plain torch."""

import pytest
import torch
from fastguide.kernels import group
from helpers import assert_close

from fastguide._torch_backend import group_shift
from fastguide._validate import group_view

# CUDA when present (the kernels then run compiled, IEEE fp32), else the interpreter on CPU.
DEV = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture(autouse=True)
def _ieee_fp32():
    prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(prec)


def _randn(*shape):
    return torch.randn(*shape).to(DEV)


def _views():
    # n = 33 crosses a 32-row tile (two tiles per side), d = 40 a 32-feature step; all read in place.
    seq = _randn(70, 3, 80)  # positions: 3 groups of 70 examples (crosses 32- and 64-row tiles)
    maps = _randn(2, 40, 3, 11)  # structure: 2 samples of 33 spatial positions, C = 40
    return {
        "positions (T, B, D) strides": group_view(seq, "positions", "seq"),
        "structure of a map": group_view(maps, "structure", "maps"),
        "channels-last map": group_view(maps.contiguous(memory_format=torch.channels_last), "structure", "m"),
        "small": group_view(_randn(5, 7, 3), "structure", "s"),
    }


def _torch_gram(X, dt):
    Xh = X.to(dt) - group_shift(X).to(dt)[:, None]
    return Xh @ Xh.transpose(1, 2)


@pytest.mark.parametrize("name", list(_views()))
def test_group_gram_matches_torch(name):
    X = _views()[name]
    K, sq = group.group_gram_fwd(X, group_shift(X).contiguous())
    assert K.shape == (X.shape[0], X.shape[1], X.shape[1]) and K.dtype == torch.float32
    d = X.shape[2]
    assert_close(K, _torch_gram(X.double(), torch.float64), "gram", torch.float32, length=d, what=f"{name} K")
    want = X.double().square().sum(dim=(1, 2))
    assert_close(sq, want, "gram", torch.float32, length=X[0].numel(), what=f"{name} ||x||^2")


def test_group_gram_into_a_float64_slot_and_fp64_inputs():
    X = _views()["positions (T, B, D) strides"]
    out = torch.full((2, *X.shape[:2], X.shape[1]), float("nan"), dtype=torch.float64, device=DEV)
    K, sq = group.group_gram_fwd(X, group_shift(X).contiguous(), out[1])
    assert K.data_ptr() == out[1].data_ptr() and sq.dtype == torch.float64
    assert torch.isnan(out[0]).all() and not torch.isnan(out[1]).any()
    want = _torch_gram(X.double(), torch.float64)
    assert_close(out[1], want, "gram", torch.float32, length=X.shape[2], what="fp32 -> fp64 slot")
    X64 = X.double()
    K64, _ = group.group_gram_fwd(X64, group_shift(X64).contiguous())
    assert_close(K64, _torch_gram(X64, torch.float64), "gram", torch.float64, length=X.shape[2], what="fp64")


@pytest.mark.parametrize("name", list(_views()))
def test_group_grad_matches_torch(name):
    X = _views()[name]
    G, n, _ = X.shape
    W = _randn(G, n, n)
    scale = torch.rand(G).to(DEV) + 0.5
    dx = group.group_grad_bwd(W, X, group_shift(X).contiguous(), scale)
    Xh = X.double() - group_shift(X).double()[:, None]
    want = (W.double() @ Xh) * scale.double()[:, None, None]
    assert dx.shape == X.shape and dx.dtype == X.dtype and dx.is_contiguous()
    assert_close(dx, want, "gram", torch.float32, length=n, what=name)


def test_bf16_view_accumulates_in_fp32():
    X = group_view(_randn(6, 18, 20).bfloat16(), "positions", "x")
    K, _ = group.group_gram_fwd(X, group_shift(X).contiguous())
    assert K.dtype == torch.float32
    assert_close(K, _torch_gram(X.double(), torch.float64), "gram", torch.bfloat16, length=20, what="bf16")


def test_launchers_check_their_arguments():
    X = _views()["small"]
    sh = group_shift(X).contiguous()
    with pytest.raises(ValueError, match="shift must be"):
        group.group_gram_fwd(X, sh[:, :2])
    with pytest.raises(ValueError, match=r"\(G, n, d\) view"):
        group.group_gram_fwd(X[0], sh)
    with pytest.raises(ValueError, match="out must be"):
        group.group_gram_fwd(X, sh, torch.empty(5, 7, 7, dtype=torch.float16, device=DEV))
    with pytest.raises(ValueError, match="W must be"):
        group.group_grad_bwd(_randn(5, 7, 7).double(), X, sh, torch.ones(5, device=DEV))
    with pytest.raises(ValueError, match="scale must be"):
        group.group_grad_bwd(_randn(5, 7, 7), X, sh, torch.ones(4, device=DEV))
    with pytest.raises(TypeError, match="float16, bfloat16"):
        group.group_gram_fwd(X.to(torch.int32), sh)
