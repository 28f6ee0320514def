"""The public ops with backend="triton" (the interpreter on CPU) against backend="torch"."""

import pytest
import torch
from helpers import assert_close

import fastguide as fg

ESTIMATORS = ["unbiased", "biased"]


def _layers(n, dims, dtype=torch.float32):
    base = torch.randn(n, 3, dtype=torch.float64)
    return [
        (base @ torch.randn(3, d, dtype=torch.float64) + 0.3 * torch.randn(n, d, dtype=torch.float64)).to(
            dtype
        )
        for d in dims
    ]


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_matrix_and_grads_match_torch_backend(estimator):
    xs = [x.requires_grad_(True) for x in _layers(19, (5, 17, 1))]
    w = torch.randn(3, 3)
    out = {}
    for backend in ("torch", "triton"):
        for x in xs:
            x.grad = None
        c = fg.cka_matrix(xs, estimator=estimator, backend=backend, route="gram")
        (c * w).sum().backward()
        out[backend] = (c.detach(), [x.grad.clone() for x in xs])
    assert_close(out["triton"][0], out["torch"][0], "cka", torch.float32, what="triton cka")
    for a, b in zip(out["triton"][1], out["torch"][1], strict=False):
        assert_close(a, b, "grad", torch.float32, what="triton grad")


def test_pairs_with_precomputed_guide_stats_and_strided_inputs():
    xs = [x.requires_grad_(True) for x in _layers(12, (6, 9))]
    ys = [y.T.contiguous().T for y in _layers(12, (4, 8))]  # column-major views
    stats = [fg.layer_stats(y, backend="triton") for y in ys]
    ref_stats = [fg.layer_stats(y, backend="torch") for y in ys]
    for a, b in zip(stats, ref_stats, strict=False):
        assert_close(a.C, b.C, "cka", torch.float32, what="layer_stats C")
    got = fg.cka_pairs(xs, stats, [(0, 1), (1, 0), (1, 1)], backend="triton")
    want = fg.cka_pairs(xs, ys, [(0, 1), (1, 0), (1, 1)], backend="torch")
    assert_close(got, want, "cka", torch.float32, what="pairs")


def test_degenerate_layer_through_triton():
    z = torch.full((8, 5), 3333.33, requires_grad=True)
    x = torch.randn(8, 4, requires_grad=True)
    c = fg.cka_pairs([z, x], [x], [(0, 0), (1, 0)], backend="triton")
    assert c[0].item() == 0.0
    assert_close(c[1], 1.0, "cka", torch.float32, what="CKA(x, x)")
    c.sum().backward()
    assert torch.count_nonzero(z.grad) == 0 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gradcheck_fp64_through_triton(estimator):
    a = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 4, dtype=torch.float64)

    def f(a, b):
        return fg.cka_pairs([a, b], [g, a], [(0, 0), (1, 0), (1, 1)], estimator=estimator, backend="triton")

    assert torch.autograd.gradcheck(f, (a, b))


def test_auto_uses_torch_on_cpu():
    from fastguide import _ops, _torch_backend, _triton_backend

    assert not _ops.use_triton("auto", torch.device("cpu"), "linear")
    assert _ops.use_triton("triton", torch.device("cpu"), "linear")  # interpreter is on in the tests
    assert _ops.backend_module("auto", torch.device("cpu"), "linear") is _torch_backend
    assert _ops.backend_module("triton", torch.device("cpu"), "linear") is _triton_backend
    with pytest.raises(ValueError, match="linear kernel"):
        _ops.use_triton("triton", torch.device("cpu"), "rbf")


def test_backends_expose_the_same_functions():
    from fastguide import _torch_backend, _triton_backend

    for name in ("gram_table", "pair_dots", "layer_grad", "feature_fwd", "feature_bwd"):
        assert callable(getattr(_torch_backend, name)) and callable(getattr(_triton_backend, name)), name


def test_load_kernels_reports_why_it_fails(monkeypatch):
    from fastguide import _triton_backend

    k = _triton_backend.load_kernels()
    assert callable(k.gram_fwd) and callable(k.hsic_pairs) and callable(k.grad_x)
    assert _triton_backend.load_kernels() is k
    monkeypatch.setattr(_triton_backend, "_KERNELS", None)
    monkeypatch.setattr(_triton_backend, "_LAUNCHERS", ("gram_fwd", "no_such_launcher"))
    with pytest.raises(RuntimeError, match="backend='triton' is not available.*no_such_launcher"):
        _triton_backend.load_kernels()
