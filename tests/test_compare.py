"""fastguide.compare: all-pairs minibatch CKA of two models over a dataset, and its CompareResult."""

import copy
import gc
import json
import os
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_close_verbose, mlp
from torch import nn

import fastguide as fg
from fastguide import _reference as R
from fastguide._capture import Capture
from fastguide.compare import CompareResult, default_input

SIZES = [16, 16, 16, 7]  # an unequal last batch


def _mlp():
    return mlp(d_in=6, width=10, depth=3, d_out=3)


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = x.reshape(x.shape[0], 1, 2, 3)
        return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


def _batches(dtype=torch.float64, sizes=SIZES, d=6):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(n, d, generator=g, dtype=dtype), torch.zeros(n, dtype=torch.long)) for n in sizes]


def _acts(model, names, x):
    was = model.training
    model.eval()  # compare's default mode (BatchNorm uses its running statistics)
    with Capture(model, names) as cap, torch.no_grad():
        model(x)
    model.train(was)
    return [cap.outputs[n] for n in names]


def _reference(model_a, names_a, model_b, names_b, batches, estimator="unbiased"):
    """Float64 minibatch CKA of every pair, from independently captured activations."""
    per_a = [_acts(model_a, names_a, x) for x, _ in batches]
    per_b = [_acts(model_b, names_b, x) for x, _ in batches]
    out = torch.zeros(len(names_a), len(names_b), dtype=torch.float64)
    for i in range(len(names_a)):
        for j in range(len(names_b)):
            xs = [a[i].reshape(a[i].shape[0], -1) for a in per_a]
            ys = [b[j].reshape(b[j].shape[0], -1) for b in per_b]
            out[i, j] = R.minibatch_cka(xs, ys, estimator)
    return out


# ------------------------------------------------------------------------------ the metric entry
@pytest.mark.parametrize("symmetric", [False, True], ids=["two-sided", "symmetric"])
def test_update_stats_matches_update(symmetric):
    g = torch.Generator().manual_seed(0)
    batches = [
        ([torch.randn(n, d, generator=g) for d in (5, 40, 7)], [torch.randn(n, 9, generator=g)])
        for n in (12, 12, 5)
    ]
    ref, new = fg.MinibatchCKA(), fg.MinibatchCKA()
    for xs, ys in batches:
        ref.update(xs, None if symmetric else ys)
        new.update_stats(
            [fg.layer_stats(x) for x in xs], None if symmetric else [fg.layer_stats(y) for y in ys]
        )
    assert (new.batches, new.examples) == (ref.batches, ref.examples) == (3, 29)
    assert_close_verbose(new.compute(), ref.compute(), 1e-12, "update_stats vs update")
    # With pairs, and one stats object standing for a layer on both sides.
    sub = fg.MinibatchCKA(pairs=[(0, 0), (2, 1)])
    for xs, _ in batches:
        st = [fg.layer_stats(x) for x in xs]
        sub.update_stats(st, [st[0], st[1]])
    full = fg.MinibatchCKA()
    for xs, _ in batches:
        full.update(xs)
    assert_close_verbose(sub.compute(), full.compute()[[0, 2], [0, 1]], 1e-12, "pairs")


def test_update_stats_triton_backend():
    """The stats-only plan on the Triton backend (interpreter on CPU): its pair kernel over the stack."""
    g = torch.Generator().manual_seed(0)
    batches = [
        ([torch.randn(n, d, generator=g) for d in (5, 20)], [torch.randn(n, 9, generator=g)]) for n in (16, 7)
    ]
    ref, tri = fg.MinibatchCKA(backend="torch"), fg.MinibatchCKA(backend="triton")
    for xs, ys in batches:
        ref.update(xs, ys)
        tri.update_stats(
            [fg.layer_stats(x, backend="triton") for x in xs],
            [fg.layer_stats(y, backend="triton") for y in ys],
        )
    assert_close_verbose(tri.compute(), ref.compute(), 1e-5, "triton update_stats vs torch update")


def test_update_stats_rejects_bad_input():
    m = fg.MinibatchCKA()
    x = torch.randn(8, 3)
    with pytest.raises(TypeError, match=r"stats_x\[0\] must be a fastguide.LayerStats"):
        m.update_stats([x])
    with pytest.raises(ValueError, match="stats_x must hold at least one layer"):
        m.update_stats([])
    with pytest.raises(ValueError, match="estimator='biased'"):
        m.update_stats([fg.layer_stats(x, estimator="biased")])
    with pytest.raises(ValueError, match="same number of examples"):
        m.update_stats([fg.layer_stats(x)], [fg.layer_stats(torch.randn(9, 3))])
    m.update_stats([fg.layer_stats(x)], [fg.layer_stats(x)])
    with pytest.raises(ValueError, match="earlier updates had"):
        m.update_stats([fg.layer_stats(x)] * 2, [fg.layer_stats(x)])


# ------------------------------------------------------------------------------ compare: values
def test_compare_equals_float64_reference_with_short_last_batch():
    torch.manual_seed(0)
    a, b = _mlp().double(), _Conv().double()
    batches = _batches()
    res = fg.compare(a, b, batches, progress=False)
    assert res.names_a == ["0", "2", "4", "6"]  # the logits layer is kept for analysis
    assert res.names_b == ["conv", "pool", "fc"]
    ref = _reference(a, res.names_a, b, res.names_b, batches)
    assert_close_verbose(res.matrix, ref, 1e-10, "compare vs float64 minibatch CKA")
    md = res.metadata
    assert (md["batches"], md["examples"], md["skipped_batches"]) == (4, sum(SIZES), 0)
    assert (md["model_a"], md["model_b"], md["forwards_per_batch"]) == ("Sequential", "_Conv", 2)
    assert md["fastguide"] == fg.__version__ and res.matrix.dtype == torch.float64
    # The biased estimator, a DataLoader of a TensorDataset (list batches), explicit layer lists.
    ds = torch.utils.data.TensorDataset(torch.cat([x for x, _ in batches]))
    loader = torch.utils.data.DataLoader(ds, batch_size=16)
    res_b = fg.compare(a, b, loader, layers_a=["2", "0"], layers_b=["fc"], estimator="biased", progress=False)
    assert res_b.names_a == ["2", "0"] and res_b.shape == (2, 1)
    ref_b = _reference(a, ["2", "0"], b, ["fc"], batches, "biased")
    assert_close_verbose(res_b.matrix, ref_b, 1e-10, "biased")


def test_same_model_runs_one_forward_per_batch():
    torch.manual_seed(0)
    a = _mlp().double()
    calls = []
    a.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    batches = _batches()
    res = fg.compare(a, a, batches, progress=False)
    assert calls == SIZES and res.metadata["forwards_per_batch"] == 1
    assert torch.allclose(res.matrix, res.matrix.T, atol=1e-14) and torch.allclose(
        res.matrix.diagonal(), torch.ones(4, dtype=torch.float64), atol=1e-12
    )
    calls.clear()
    assert torch.equal(fg.compare(a, None, batches, progress=False).matrix, res.matrix)
    # Different layer lists of the same model: still one forward; equals a two-model comparison.
    calls.clear()
    part = fg.compare(a, a, batches, layers_a=["0", "4"], layers_b=lambda n, m: n == "6", progress=False)
    assert calls == SIZES and part.names_b == ["6"]
    two = fg.compare(a, copy.deepcopy(a), batches, layers_a=["0", "4"], layers_b=["6"], progress=False)
    assert_close_verbose(part.matrix, two.matrix, 1e-12, "one forward vs two")
    # input_fn_b: the same model on other inputs runs twice.
    calls.clear()
    noisy = fg.compare(a, a, batches, input_fn_b=lambda b: b[0] + 0.1, progress=False)
    assert len(calls) == 2 * len(SIZES) and noisy.metadata["forwards_per_batch"] == 2


def test_batch_forms_and_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(6, 5)
            self.g = nn.Linear(6, 5)

        def forward(self, x, z):
            return self.f(x) + self.g(z)

    torch.manual_seed(0)
    m = Two()
    x, z = torch.randn(12, 6), torch.randn(12, 6)
    as_dict = fg.compare(m, None, [{"x": x, "z": z}], progress=False)
    as_tuple = fg.compare(m, None, [(x, z, "label")], input_fn=lambda b: (b[0], b[1]), progress=False)
    assert torch.equal(as_dict.matrix, as_tuple.matrix) and as_dict.names_a == ["f", "g"]
    assert default_input((x, 1)) is x and default_input([x]) is x and default_input(x) is x
    with pytest.raises(TypeError, match="input_fn"):
        fg.compare(m, None, [object()], progress=False)
    with pytest.raises(TypeError, match="split a tensor into batches"):
        fg.compare(m, None, x, progress=False)
    with pytest.raises(ValueError, match="no batches"):
        fg.compare(m, None, [], progress=False)


def test_layer_spec_errors():
    a = _mlp()
    data = _batches(torch.float32)
    with pytest.raises(ValueError, match=r"layers_a must be 'auto'.*for one module pass \['0'\]"):
        fg.compare(a, None, data, layers_a="0")
    with pytest.raises(ValueError, match="unknown model_b module name 'nope'"):
        fg.compare(a, None, data, layers_b=["nope"])
    with pytest.raises(ValueError, match="layers_a is empty"):
        fg.compare(a, None, data, layers_a=[])
    with pytest.raises(ValueError, match="more than once"):
        fg.compare(a, None, data, layers_a=["0", "0"])
    with pytest.raises(ValueError, match="predicate selected no module"):
        fg.compare(a, None, data, layers_a=lambda n, m: False)
    with pytest.raises(TypeError, match="layers_b must be"):
        fg.compare(a, None, data, layers_b=3)
    with pytest.raises(ValueError, match="mode must be"):
        fg.compare(a, None, data, mode="test")
    with pytest.raises(ValueError, match="tokens='positions'"):
        fg.compare(a, None, data, tokens="positions")
    with pytest.raises(ValueError, match="max_batches"):
        fg.compare(a, None, data, max_batches=0)


def test_small_batches_are_skipped_with_a_warning():
    a = _mlp()
    data = _batches(torch.float32, sizes=[10, 10, 3])
    with pytest.warns(UserWarning, match="skipped 1 batch"):
        res = fg.compare(a, None, data, progress=False)
    assert (res.metadata["batches"], res.metadata["examples"], res.metadata["skipped_batches"]) == (2, 20, 1)
    assert fg.compare(a, None, data, estimator="biased", progress=False).metadata["batches"] == 3
    with pytest.raises(ValueError, match="no batch had the 4 examples"), pytest.warns(UserWarning):
        fg.compare(a, None, data[2:], progress=False)
    pulled = []

    def gen():
        for x, _ in data:
            pulled.append(x.shape[0])
            yield x

    assert fg.compare(a, None, gen(), max_batches=1, progress=False).metadata["batches"] == 1
    assert pulled == [10]  # no batch is drawn beyond max_batches


def test_sequence_models_and_tokens():
    torch.manual_seed(0)
    rnn = nn.RNN(4, 8)  # (T, B, D) outputs, made batch-first; the root module itself is the hooked layer
    lin = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6))
    x = torch.randn(5, 12, 4)  # (T, B, D) for the RNN, (B, T, D) for the MLP
    kw = dict(input_fn_b=lambda b: b.transpose(0, 1), progress=False)
    res = fg.compare(rnn, lin, [x], tokens="samples", **kw)
    assert res.names_a == [""] and res.names_b == ["0", "2"] and res.metadata["examples"] == 60
    per_token = torch.stack(
        [
            R.minibatch_cka([rnn(x)[0].transpose(0, 1).reshape(60, 8)], [y.reshape(60, 6)])
            for y in _seq(lin, x)
        ]
    )
    assert_close_verbose(res.matrix[0], per_token, 1e-5, "tokens='samples'")
    res = fg.compare(rnn, lin, [x], tokens="mean", layers_a=lambda n, m: isinstance(m, nn.RNN), **kw)
    assert res.names_a == [""] and res.metadata["examples"] == 12


def _seq(lin, x):
    with Capture(lin, ["0", "2"]) as cap, torch.no_grad():
        lin(x.transpose(0, 1))
    return [cap.outputs["0"], cap.outputs["2"]]


# ------------------------------------------------------------------------------ compare: state
class _Boom(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(6, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("boom in batch 3")
        return self.head(self.drop(self.bn(self.lin(x))))


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_exception_removes_hooks_and_restores_modes(mode):
    a, b = _Boom(), _mlp()
    a.train()
    a.drop.eval()  # mixed modes come back module by module
    b.eval()
    stats = a.bn.running_mean.clone()
    with pytest.raises(RuntimeError, match="boom in batch 3"):
        fg.compare(a, b, _batches(torch.float32), mode=mode, progress=False)
    assert _hooks(a) == _hooks(b) == 0
    assert a.training and not a.drop.training and a.lin.training and not b.training
    assert torch.equal(a.bn.running_mean, stats)  # train-mode BatchNorm statistics are restored
    a.calls = -100
    ok = fg.compare(a, b, _batches(torch.float32), mode=mode, progress=False)
    assert _hooks(a) == _hooks(b) == 0 and a.training and not b.training and ok.metadata["mode"] == mode
    assert torch.equal(a.bn.running_mean, stats)


def test_memory_does_not_grow_with_batches():
    class Probe(nn.Module):
        """Checks at every call that the outputs of earlier batches are gone."""

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 64)
            self.out = nn.Linear(64, 64)
            self.refs = []
            self.alive = []

        def forward(self, x):
            self.alive.append(sum(r() is not None for r in self.refs))
            h = self.lin(x)
            y = self.out(h)
            self.refs += [weakref.ref(h), weakref.ref(y)]
            return y

    torch.manual_seed(0)
    probe = Probe()
    counts = []

    def data(n):
        for k in range(n):
            if k in (3, n - 1):
                gc.collect()
                counts.append(sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects()))
            yield torch.randn(32, 6)

    fg.compare(probe, _mlp(), data(30), progress=False)
    assert probe.alive == [0] * 30, "activations of an earlier batch were still alive"
    assert counts[1] <= counts[0], f"live tensors grew from {counts[0]} (batch 3) to {counts[1]} (batch 29)"


@pytest.mark.gpu
def test_models_on_different_devices():
    a, b = _mlp().double(), _mlp().double().cuda()
    batches = _batches()
    res = fg.compare(a, b, batches, progress=False)
    ref = fg.compare(a, copy.deepcopy(b).cpu(), batches, progress=False)
    assert_close_verbose(res.matrix, ref.matrix, 1e-10, "cpu model vs cuda model")


# ------------------------------------------------------------------------------ result object
def test_result_save_load_plot(tmp_path):
    torch.manual_seed(0)
    res = fg.compare(_mlp().double(), _Conv().double(), _batches(), progress=False)
    path = tmp_path / "sub" / "r.json"
    res.save(path)
    back = CompareResult.load(path)
    assert torch.equal(back.matrix, res.matrix) and back.matrix.dtype == torch.float64
    assert back.names_a == res.names_a and back.names_b == res.names_b and back.metadata == res.metadata
    assert res["2", "fc"] == float(res.matrix[1, 2])
    assert [m[0] for m in res.best_matches()] == res.names_a
    with open(path) as f:
        d = json.load(f)
    d["matrix"] = d["matrix"][:-1]
    with pytest.raises(ValueError, match="matrix must be 4 rows of 3"):
        CompareResult.from_dict(d)
    with pytest.raises(ValueError, match="not a saved CompareResult"):
        CompareResult.from_dict({"names_a": []})
    fig = res.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000 and fig.axes
    # 60 x 55 layers: labels thinned to at most max_ticks per axis; drawing into a given axes.
    big = CompareResult(
        torch.rand(60, 55, dtype=torch.float64), [f"a{i}" for i in range(60)], [f"b{i}" for i in range(55)]
    )
    fig = big.plot(tmp_path / "big.png", max_ticks=30)
    ax = fig.axes[0]
    assert 20 <= len(ax.get_yticks()) <= 31 and len(ax.get_xticks()) <= 31
    assert ax.get_yticklabels()[-1].get_text() == "a59"
    from matplotlib.figure import Figure

    own = Figure()
    target_ax = own.add_subplot()
    assert big.plot(ax=target_ax) is own
    assert os.path.getsize(tmp_path / "big.png") < 400_000


# ------------------------------------------------------------------------------ distributed
def _ddp_worker(rank, world, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        a, b = _mlp().double(), _Conv().double()
        batches = _batches()[rank::world]  # each rank its shard (rank 1 holds the short batch)
        res = fg.compare(a, b, batches, progress=False)
        torch.save({"matrix": res.matrix, "metadata": res.metadata}, os.path.join(out, f"rank{rank}.pt"))
        del res
    finally:
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def test_two_ranks_sync(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    ref = fg.compare(_mlp().double(), _Conv().double(), _batches(), progress=False)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert_close_verbose(got["matrix"], ref.matrix, 1e-12, f"rank {r} vs single process")
        assert got["metadata"]["batches"] == 4 and got["metadata"]["examples"] == sum(SIZES)
        assert got["metadata"]["world_size"] == 2
