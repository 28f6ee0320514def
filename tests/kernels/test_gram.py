"""fastguide.kernels.gram.gram_fwd against the torch backend and the float64 oracle."""

from __future__ import annotations

import pytest
import torch
from fastguide.kernels import _configs
from fastguide.kernels.gram import _gram_fwd_kernel, gram_fwd
from helpers import assert_close_verbose
from kernel_oracle import device, oracle_stats, prune_gram

from fastguide import _torch_backend as tb

ESTIMATORS = ["unbiased", "biased"]
# Relative tolerance (to the largest magnitude) of C, s, h per input dtype.
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2}


def _layer(n: int, d: int, dtype, layout: str, dev) -> torch.Tensor:
    """An (n, d) layer in one of the stride layouts the kernels must accept."""
    if layout == "contig":
        return torch.randn(n, d).to(dtype).to(dev)
    if layout == "transposed":
        return torch.randn(d, n).to(dtype).to(dev).T
    if layout == "strided":  # every other feature column
        return torch.randn(n, 2 * d + 1).to(dtype).to(dev)[:, 1::2]
    if layout == "rowstep":  # every other example row
        return torch.randn(2 * n, d).to(dtype).to(dev)[::2]
    raise ValueError(layout)


def _check(xs, estimator, out, rtol, against_torch=True):
    C, s, ok, h, sig = out
    L, n = len(xs), xs[0].shape[0]
    acc = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    assert C.shape == (L, n, n) and C.dtype == acc
    assert s.shape == h.shape == ok.shape == sig.shape == (L,)
    assert ok.dtype == torch.bool and s.dtype == acc and h.dtype == acc
    assert torch.equal(sig, torch.ones_like(sig))
    refs = [oracle_stats(x, estimator) for x in xs]
    for l, (Co, so, oko, ho) in enumerate(refs):
        assert bool(ok[l]) == oko, f"layer {l}: ok {bool(ok[l])} != oracle {oko}"
        if not oko:
            continue
        assert_close_verbose(C[l], Co, rtol * Co.abs().max().item(), f"C[{l}] vs oracle")
        assert_close_verbose(s[l], so, rtol * so.abs().item(), f"s[{l}] vs oracle")
        assert_close_verbose(h[l], ho, rtol * ho.abs().item(), f"h[{l}] vs oracle")
    if against_torch:
        Ct, st, okt, ht, _ = tb.gram_fwd([x for x in xs], estimator)
        assert torch.equal(ok.cpu(), okt.cpu()), f"ok {ok.tolist()} != torch backend {okt.tolist()}"
        for l in range(L):
            if not bool(okt[l]):
                continue
            tol = max(rtol, 1e-5) if xs[l].dtype != torch.float64 else rtol
            assert_close_verbose(C[l], Ct[l], tol * Ct[l].abs().max().item(), f"C[{l}] vs torch backend")
            assert_close_verbose(h[l], ht[l], tol * ht[l].abs().item(), f"h[{l}] vs torch backend")
            assert_close_verbose(s[l], st[l], tol * st[l].abs().item(), f"s[{l}] vs torch backend")


SHAPES = [
    pytest.param(4, [1], id="n4-d1"),
    pytest.param(5, [3, 1, 2], id="n5-three-layers"),
    pytest.param(37, [33, 7, 70], id="n37-not-multiple-of-block"),
]


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("n,ds", SHAPES)
def test_gram_fwd_fp32(n, ds, estimator, dev, highest_precision):
    layouts = ["contig", "transposed", "strided", "rowstep"]
    xs = [_layer(n, d, torch.float32, layouts[i % 4], dev) for i, d in enumerate(ds)]
    _check(xs, estimator, gram_fwd(xs, estimator), RTOL[torch.float32])


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gram_fwd_fp64(estimator, dev):
    xs = [_layer(19, 5, torch.float64, "contig", dev), _layer(19, 40, torch.float64, "transposed", dev)]
    xs[1].add_(100.0)
    _check(xs, estimator, gram_fwd(xs, estimator), RTOL[torch.float64])


def test_gram_fwd_fp16(dev):
    xs = [_layer(21, 24, torch.float16, "contig", dev), _layer(21, 9, torch.float16, "transposed", dev)]
    C, s, ok, h, _ = gram_fwd(xs, "unbiased")
    Ct, st, okt, ht, _ = tb.gram_fwd([x.float() for x in xs], "unbiased")
    # The fp16 path multiplies fp16 operands with fp32 accumulation (tensor-core dot).
    assert torch.equal(ok.cpu(), okt.cpu())
    for l in range(2):
        assert_close_verbose(C[l], Ct[l], 1e-2 * Ct[l].abs().max().item(), f"C[{l}] fp16")
        assert_close_verbose(h[l], ht[l], 1e-2 * ht[l].item(), f"h[{l}] fp16")


def test_gram_fwd_bf16_inputs(dev):
    """bf16 inputs: fp32 accumulation (under the interpreter the dot itself stays fp32)."""
    xs = [_layer(21, 24, torch.bfloat16, "contig", dev), _layer(21, 9, torch.bfloat16, "transposed", dev)]
    C, s, ok, h, _ = gram_fwd(xs, "biased")
    Ct, st, okt, ht, _ = tb.gram_fwd(xs, "biased")
    assert torch.equal(ok.cpu(), okt.cpu()) and C.dtype == torch.float32
    tol = 1e-5 if dev.type == "cpu" else 1e-2
    for l in range(2):
        assert_close_verbose(C[l], Ct[l], tol * Ct[l].abs().max().item(), f"C[{l}] bf16")
        assert_close_verbose(h[l], ht[l], tol * ht[l].item(), f"h[{l}] bf16")


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gram_fwd_split_features(estimator, dev, highest_precision):
    """Feature-axis split (partial Grams summed in the row-sum pass), uneven per layer."""
    xs = [_layer(20, 70, torch.float32, "contig", dev), _layer(20, 33, torch.float32, "strided", dev)]
    out = gram_fwd(xs, estimator, split=3, block_m=16)
    _check(xs, estimator, out, RTOL[torch.float32])


def test_gram_fwd_pointer_table_groups(dev, highest_precision):
    """Mixed dtypes and feature strides: several grouped launches, each through a pointer table."""
    xs = [
        _layer(18, 9, torch.float32, "contig", dev),
        _layer(18, 20, torch.float16, "contig", dev),
        _layer(18, 5, torch.float32, "strided", dev),
        _layer(18, 12, torch.float32, "transposed", dev),
        _layer(18, 7, torch.float16, "strided", dev),
    ]
    C, s, ok, h, _ = gram_fwd(xs, "unbiased", block_m=16)
    assert ok.all()
    for l, x in enumerate(xs):
        Co, so, _, ho = oracle_stats(x, "unbiased")
        tol = RTOL[x.dtype]
        assert_close_verbose(C[l], Co, tol * Co.abs().max().item(), f"C[{l}]")
        assert_close_verbose(h[l], ho, tol * ho.item(), f"h[{l}]")


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gram_fwd_degenerate_and_scales(estimator, dev, highest_precision):
    n, d = 12, 6
    base = torch.randn(n, d)
    xs = [
        torch.zeros(n, d),  # all-zero layer
        torch.full((n, d), 3333.33),  # constant whose fp32 mean is inexact
        base + 1e4,  # large offset
        base * 1e-6,  # tiny scale
        base * 1e6,  # huge scale
        torch.randn(n, 1).expand(n, d),  # stride-0 columns (rank one, legitimate)
        base,
    ]
    xs = [x.to(dev) for x in xs]
    out = gram_fwd(xs, estimator)
    C, s, ok, h, _ = out
    assert ok.tolist() == [False, False, True, True, True, True, True]
    assert torch.isfinite(C).all() and torch.isfinite(h).all() and torch.isfinite(s).all()
    assert torch.equal(s[:2].cpu(), torch.ones(2))
    _check(xs, estimator, out, RTOL[torch.float32])
    # Scale invariance of the normalised Gram (the +1e4 layer differs by its fp32 input rounding).
    for l in (3, 4):
        assert_close_verbose(C[l], C[6], 1e-4 * C[6].abs().max().item(), f"C[{l}] vs unscaled")


def test_gram_fwd_nan_propagates(dev):
    x = torch.randn(8, 5, device=dev)
    x[3, 2] = float("nan")
    C, s, ok, h, _ = gram_fwd([x, torch.randn(8, 3, device=dev)], "unbiased")
    Ct, st, okt, ht, _ = tb.gram_fwd([x, torch.randn(8, 3, device=dev)], "unbiased")
    assert bool(ok[0]) == bool(okt[0]) is True
    assert torch.isnan(h[0]) and torch.isnan(C[0]).any()
    assert torch.isfinite(C[1]).all()


def test_gram_fwd_bad_input(dev):
    x = torch.randn(6, 3, device=dev)
    with pytest.raises(ValueError, match="estimator"):
        gram_fwd([x], "median")
    with pytest.raises(ValueError, match="same n"):
        gram_fwd([x, torch.randn(5, 3, device=dev)], "biased")
    with pytest.raises(ValueError, match="n >= 4"):
        gram_fwd([torch.randn(3, 3, device=dev)], "unbiased")
    with pytest.raises(TypeError):
        gram_fwd([x.to(torch.int32)], "biased")
    with pytest.raises(TypeError, match="accumulation"):
        gram_fwd([x, x.double()], "biased")
    with pytest.raises(ValueError, match="2-D"):
        gram_fwd([x.reshape(6, 3, 1)], "biased")


def test_autotune_reduced_to_one_config():
    if not _configs.skip_autotune():
        pytest.skip("autotuning is active (GPU without FASTGUIDE_SKIP_AUTOTUNE)")
    from fastguide.kernels.backward import _cka_pairs_bwd_kernel
    from fastguide.kernels.cka import _cka_matrix_fwd_kernel

    if _configs.interpreting():
        for kern in (_gram_fwd_kernel, _cka_matrix_fwd_kernel, _cka_pairs_bwd_kernel):
            assert len(kern.configs) == 1
        assert len(_configs.gram_fwd_configs()) == 1
        return
    # On a GPU the lists stay whole and the pruning keeps the first config that fits.
    assert len(prune_gram(_gram_fwd_kernel.configs)) == 1


def test_split_heuristic(monkeypatch):
    """W1-like shapes: a lone conv-sized guide layer is split, FCN-sized target layers are not."""
    import fastguide.kernels._tables as tables

    monkeypatch.setattr(tables, "gram_split_target", lambda: 264)
    # n = 256, BLOCK_M = 128: 3 upper tiles per layer.
    assert tables._splits([200704], 3, 64, None, 256, 4) == [49]
    assert tables._splits([200704], 3, 64, None, 256, 2) == [24]
    assert tables._splits([4096] * 8, 3, 64, None, 256, 4) == [1] * 8
    # Enough tiles already: no split.
    assert tables._splits([1024] * 24, 528, 64, None, 4096, 4) == [1] * 24
    # Forced splits are capped by the number of BLOCK_K granules.
    assert tables._splits([70, 33], 1, 32, 3, 20, 4) == [3, 2]
    with pytest.raises(ValueError, match="split"):
        tables._splits([70], 1, 32, 0, 20, 4)


# --------------------------------------------------------------------------- GPU-only checks
@pytest.mark.gpu
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gram_fwd_gpu_large(estimator, highest_precision):
    """Large shapes (multi-tile, automatic feature split) at IEEE fp32 against the torch backend."""
    xs = [
        torch.randn(300, 5000, device="cuda"),
        torch.randn(4000, 300, device="cuda").T + 3.0,
        torch.randn(300, 129, device="cuda"),
    ]
    _check(xs, estimator, gram_fwd(xs, estimator), 1e-5, against_torch=True)


@pytest.mark.gpu
def test_gram_fwd_gpu_bf16_fp16():
    xs = [
        torch.randn(256, 3000, device="cuda", dtype=torch.bfloat16),
        torch.randn(256, 700, device="cuda", dtype=torch.float16),
    ]
    C, s, ok, h, _ = gram_fwd(xs, "unbiased")
    Ct, st, okt, ht, _ = tb.gram_fwd([x.float() for x in xs], "unbiased")
    assert torch.equal(ok, okt)
    for l in range(2):
        assert_close_verbose(C[l], Ct[l], 2e-2 * Ct[l].abs().max().item(), f"C[{l}] 16-bit")


@pytest.mark.gpu
def test_gram_fwd_gpu_tf32_tolerance():
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        xs = [torch.randn(512, 4096, device="cuda")]
        C, _, _, h, _ = gram_fwd(xs, "unbiased")
    finally:
        torch.set_float32_matmul_precision(old)
    Co, _, _, ho = oracle_stats(xs[0], "unbiased")
    assert_close_verbose(C[0], Co, 5e-3 * Co.abs().max().item(), "C tf32")


@pytest.mark.gpu
def test_gram_fwd_gpu_deterministic(highest_precision):
    """No atomics: two runs (with feature splits) agree bit for bit."""
    xs = [torch.randn(256, 20000, device="cuda"), torch.randn(256, 100, device="cuda")]
    a = gram_fwd(xs, "unbiased")
    b = gram_fwd(xs, "unbiased")
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


def test_device_helper_matches_fixture(dev):
    assert dev == device()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_degeneracy_rule_is_the_torch_backends(dtype):
    """The kernels apply the library's degeneracy rule (trace factor per dtype, vanishing units)."""
    from fastguide.kernels import _common

    assert _common.degenerate_factor(dtype) == tb.degenerate_factor(dtype)
    assert _common.VANISH_UNITS == tb.VANISH_UNITS


def test_gram_fwd_flags_a_vanishing_centred_gram(dev):
    """Examples all equal but one: U(K) is 0 up to rounding, so the layer is degenerate on the kernel
    path too (the rule once applied by torch ops after the launch: docs/numerics.md)."""
    x = torch.ones(8, 5, device=dev) * torch.randn(1, 5, device=dev)
    x[3] += torch.randn(5, device=dev)
    C, s, ok, h, _ = gram_fwd([x, torch.randn(8, 3, device=dev)], "unbiased")
    _, _, okt, _, _ = tb.gram_fwd([x.cpu(), torch.randn(8, 3)], "unbiased")
    assert ok.tolist() == [False, True] == okt.tolist()
    assert s[0].item() == 1.0
