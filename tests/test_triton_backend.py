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


# --------------------------------------------------------------------------- the fused path
@pytest.fixture
def launcher_calls(monkeypatch):
    """Counts the calls of each fastguide.kernels launcher (they still run)."""
    import fastguide.kernels as K

    calls = {}
    for name in K.__all__:  # every launcher
        fn = getattr(K, name)

        def counted(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(K, name, counted)
    return calls


def test_loss_runs_one_gram_one_pairs_and_one_backward_launcher(launcher_calls):
    xs = [x.requires_grad_(True) for x in _layers(12, (6, 9, 5))]
    ys = _layers(12, (4, 8, 7))
    loss = fg.CKALoss(pairs=[(0, 0), (1, 1), (2, 2), (0, 2)], backend="triton", route="gram")
    loss(xs, ys).backward()
    assert launcher_calls == {"gram_fwd": 1, "cka_pairs_fwd": 1, "cka_pairs_bwd": 1}
    want = fg.CKALoss(pairs=[(0, 0), (1, 1), (2, 2), (0, 2)], backend="torch", route="gram")
    refs = [x.detach().clone().requires_grad_(True) for x in xs]
    want(refs, ys).backward()
    for a, b in zip(xs, refs, strict=True):
        assert_close(a.grad, b.grad, "grad", torch.float32, what="CKALoss grad")


def test_matrix_runs_the_matrix_launcher(launcher_calls):
    xs = [x.requires_grad_(True) for x in _layers(10, (6, 9))]
    ys = _layers(10, (4, 8, 7))
    c = fg.cka_matrix(xs, ys, backend="triton", route="gram")
    c.sum().backward()
    assert launcher_calls == {"gram_fwd": 1, "cka_matrix_fwd": 1, "cka_pairs_bwd": 1}
    assert_close(c, fg.cka_matrix(xs, ys, backend="torch", route="gram"), "cka", torch.float32, what="matrix")


def test_precomputed_stats_are_the_second_stack(launcher_calls):
    xs = [x.requires_grad_(True) for x in _layers(12, (6, 9))]
    ys = _layers(12, (4, 8))
    stats = [fg.layer_stats(y, backend="triton") for y in ys]
    launcher_calls.clear()
    c = fg.cka_pairs(xs, stats, [(0, 1), (1, 0)], backend="triton")
    c.sum().backward()
    assert launcher_calls == {"gram_fwd": 1, "cka_pairs_fwd": 1, "cka_pairs_bwd": 1}
    refs = [x.detach().clone().requires_grad_(True) for x in xs]
    want = fg.cka_pairs(refs, ys, [(0, 1), (1, 0)], backend="torch")
    want.sum().backward()
    assert_close(c, want, "cka", torch.float32, what="pairs with LayerStats")
    for a, b in zip(xs, refs, strict=True):
        assert_close(a.grad, b.grad, "grad", torch.float32, what="grad with LayerStats")


def test_mixed_dtypes_accumulate_in_float64():
    x32, y64 = _layers(11, (6,))[0], _layers(11, (5,), torch.float64)[0]
    out = {}
    for backend in ("torch", "triton"):
        x = x32.clone().requires_grad_(True)
        y = y64.clone().requires_grad_(True)
        c = fg.cka_pairs([x, y], [y], [(0, 0), (1, 0)], backend=backend, route="gram")
        assert c.dtype == torch.float64
        (c * torch.tensor([1.0, -0.5], dtype=torch.float64)).sum().backward()
        out[backend] = (c.detach(), x.grad, y.grad)
    assert_close(out["triton"][0], out["torch"][0], "cka", torch.float32, what="mixed cka")
    assert out["triton"][1].dtype == torch.float32 and out["triton"][2].dtype == torch.float64
    assert_close(out["triton"][1], out["torch"][1], "grad", torch.float32, what="mixed grad fp32 layer")
    # Its partner's C comes from the fp32 launch group (docs/numerics.md "Mixed dtypes"): fp32-accurate.
    assert_close(out["triton"][2], out["torch"][2], "grad", torch.float32, what="mixed grad fp64 layer")


def test_nan_propagates_only_to_its_pairs():
    xs = _layers(9, (4, 6))
    xs[0][2, 1] = float("nan")
    xs = [x.requires_grad_(True) for x in xs]
    ys = _layers(9, (5, 3))
    c = fg.cka_pairs(xs, ys, [(0, 0), (1, 1)], backend="triton")
    assert torch.isnan(c[0]) and torch.isfinite(c[1])
    c[1].backward()
    assert torch.isfinite(xs[1].grad).all() and not xs[1].grad.eq(0).all()


def _holds_address(key) -> bool:
    """A table key with a data pointer in it (addresses are far above any index, size or stride)."""
    if isinstance(key, tuple):
        return any(_holds_address(v) for v in key)
    return isinstance(key, int) and key > 2**32


def test_device_tables_stay_put_between_steps(monkeypatch):
    """A second identical step rebuilds no index table (pairs, programs, slots, contributions): the
    same device tensors are used. Tables of data pointers (layers, outputs) are reused while the
    allocator hands back the same addresses, as the CUDA caching allocator does in a training loop
    and a CUDA graph always does; they are not checked here (CPU malloc may move them)."""
    from collections import OrderedDict

    from fastguide.kernels import _common

    # An empty LRU: filled by earlier tests, evictions during these steps would make the check depend
    # on test order.
    monkeypatch.setattr(_common, "_TABLES", OrderedDict())
    xs = [x.requires_grad_(True) for x in _layers(12, (6, 9))]
    ys = _layers(12, (4, 8))
    loss = fg.CKALoss(backend="triton", route="gram")

    def step():
        for x in xs:
            x.grad = None
        loss(xs, ys).backward()

    step()
    before = {k: v[0] for k, v in _common._TABLES.items() if not _holds_address(k)}
    step()
    after = {k: v[0] for k, v in _common._TABLES.items() if not _holds_address(k)}
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)
    assert len(before) >= 5  # pairs, Gram programs, centring tiles, slots, contributions, programs


@pytest.mark.parametrize("pre", [False, True], ids=["raw", "layer-stats"])
def test_opcheck_fused_forward(pre):
    """The custom op on the fused path: fake, schema, autograd registration (torch.library.opcheck)."""
    from fastguide import _ops
    from fastguide._validate import Options

    xs = [x.double().requires_grad_(True) for x in _layers(10, (4, 6))]
    ys = [y.double() for y in _layers(10, (5,))]
    opts = Options(estimator="unbiased", backend="triton", route="gram")
    if pre:
        plan = _ops.build_plan(xs, [fg.layer_stats(ys[0], backend="triton")], [(0, 2), (1, 2), (0, 1)], opts)
    else:
        plan = _ops.build_plan(xs + ys, [], [(0, 2), (1, 2), (0, 1)], opts)
    assert plan.backend == "triton" and _ops._fused(plan) is not None
    torch.library.opcheck(torch.ops.fastguide.cka_fwd.default, plan.args())


def test_single_pair_and_single_row_use_the_pair_kernel(launcher_calls):
    x, y, z = _layers(9, (4, 6, 5))
    fg.cka(x, y, backend="triton", route="gram")
    fg.cka_matrix([x], [y, z], backend="triton", route="gram")
    assert launcher_calls == {"gram_fwd": 2, "cka_pairs_fwd": 2}
