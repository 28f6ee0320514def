"""MinibatchCKA: accumulation with unequal batches, pairs, reset, and torch.distributed sync."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_close

import fastguide as fg
from fastguide import _reference as R

# Every test here runs under both CPU Gram schedules (serial, layer-parallel): see conftest.
pytestmark = pytest.mark.usefixtures("cpu_gram_mode")


def _batches(sizes, dims=(6, 10), seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        base = torch.randn(n, 3, generator=g)
        out.append(
            [base @ torch.randn(3, d, generator=g) + 0.3 * torch.randn(n, d, generator=g) for d in dims]
        )
    return out


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_single_batch_equals_cka(estimator):
    (xs,) = _batches([32])
    m = fg.MinibatchCKA(estimator)
    m.update(xs)
    assert_close(m.compute(), fg.cka_matrix(xs, estimator=estimator), "cka", torch.float32, what="one batch")


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_unequal_batches_match_reference(estimator):
    batches = _batches([32, 17, 9])
    ys_batches = _batches([32, 17, 9], dims=(4,), seed=1)
    m = fg.MinibatchCKA(estimator)
    for xs, ys in zip(batches, ys_batches, strict=False):
        m.update(xs, ys)
    got = m.compute()
    assert got.shape == (2, 1) and got.dtype == torch.float64
    for a in range(2):
        want = R.minibatch_cka([b[a] for b in batches], [b[0] for b in ys_batches], estimator)
        assert_close(got[a, 0], want, "cka", torch.float32, what=f"layer {a}")


def test_scale_and_offset_robust_accumulators():
    batches = _batches([16, 16], dims=(2000,))
    m = fg.MinibatchCKA()
    m_ref = fg.MinibatchCKA()
    for (x,) in batches:
        m.update([x * 1e6 + 1e7, x])
        m_ref.update([x.double(), x.double()])
    assert torch.isfinite(m.compute()).all()
    assert_close(m.compute(), m_ref.compute(), "cka", torch.float32, what="1e6 scale, 1e7 offset")


def test_pairs_reset_and_degenerate():
    (xs,) = _batches([20])
    m = fg.MinibatchCKA(pairs=[(1, 0), (2, 1)])
    m.update(xs + [torch.zeros(20, 3)], [xs[1], torch.zeros(20, 2)])
    m.update(xs + [torch.zeros(20, 3)], [xs[1], torch.zeros(20, 2)])
    v = m.compute()
    assert v.shape == (2,)
    assert_close(v[0], 1.0, "cka", torch.float32, what="CKA(x, x)")
    assert v[1].item() == 0.0
    with pytest.raises(ValueError, match="earlier updates"):
        m.update(xs, xs)
    m.reset()
    with pytest.raises(RuntimeError, match="before any update"):
        m.compute()


def test_sync_without_process_group_is_identity():
    (xs,) = _batches([16])
    m = fg.MinibatchCKA()
    m.update(xs)
    before = m.compute().clone()
    m.sync()
    assert torch.equal(m.compute(), before)


def _worker(rank, world, path, out):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    batches = _batches([24, 13, 30, 8])
    m = fg.MinibatchCKA()
    for k in range(rank, len(batches), world):
        m.update(batches[k])
    m.sync()
    m.sync()  # a second sync must not double count
    torch.save(m.compute(), os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_sync_all_reduces_over_two_ranks(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    full = fg.MinibatchCKA()
    for b in _batches([24, 13, 30, 8]):
        full.update(b)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert_close(got, full.compute(), "cka", torch.float32, what=f"rank {r}: all-reduced sums")


# --------------------------------------------------------------------------- resumable state
def _split_run(make, batches, cut, tmp_path):
    """Accumulate all batches in one metric, and the same batches saved/loaded after ``cut``."""
    full = make()
    for b in batches:
        full.update(*b)
    first = make()
    for b in batches[:cut]:
        first.update(*b)
    path = tmp_path / "metric.pt"
    torch.save(first.state_dict(), path)
    resumed = make()
    resumed.load_state_dict(torch.load(path))  # weights_only=True: plain values and tensors only
    for b in batches[cut:]:
        resumed.update(*b)
    return full, resumed


@pytest.mark.parametrize(
    "kw, with_ys",
    [({}, False), ({"estimator": "biased"}, True), ({"pairs": [(1, 0), (-1, 0)]}, True)],
    ids=["symmetric", "biased-xy", "pairs"],
)
def test_state_dict_round_trip_resumes_exactly(tmp_path, kw, with_ys):
    xs = _batches([24, 13, 30, 9])
    ys = _batches([24, 13, 30, 9], dims=(4,), seed=1)
    batches = [(x, y) if with_ys else (x,) for x, y in zip(xs, ys, strict=True)]
    full, resumed = _split_run(lambda: fg.MinibatchCKA(**kw), batches, 2, tmp_path)
    assert torch.equal(resumed.compute(), full.compute())  # bit for bit: the sums continue exactly
    for k in ("cross", "self_x", "self_y"):
        assert (
            torch.equal(getattr(resumed, k), getattr(full, k)) and getattr(resumed, k).dtype == torch.float64
        )
    assert (resumed.batches, resumed.examples) == (full.batches, full.examples) == (4, 76)
    assert resumed.pairs == full.pairs and resumed.shape == full.shape


def test_state_dict_format_and_empty_state(tmp_path):
    m = fg.MinibatchCKA(pairs=[(0, 1)])
    sd = m.state_dict()
    assert sd["shape"] is None and sd["cross"] is None and sd["batches"] == 0
    other = fg.MinibatchCKA(pairs=[(0, 1)])
    other.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="before any update"):
        other.compute()
    with pytest.raises(ValueError, match="pairs"):
        fg.MinibatchCKA().load_state_dict(sd)
    (xs,) = _batches([16])
    m.update(xs)
    sd = m.state_dict()
    assert sd["shape"] == [2, 2] and sd["symmetric"] is True and sd["pairs"] == [[0, 1]]
    assert sd["estimator"] == "unbiased" and sd["kernel"] == "linear" and sd["tokens"] == "flatten"
    assert sd["cross"].shape == (1,) and sd["self_x"].shape == (2,) and sd["cross"].dtype == torch.float64
    assert (sd["batches"], sd["examples"]) == (1, 16)


def test_load_state_dict_moves_with_the_data():
    """Accumulators loaded on one device follow the data of the next update (here both CPU; the GPU
    case is the test below)."""
    (a,), (b,) = [_batches([20], seed=s) for s in (2, 3)]
    m = fg.MinibatchCKA()
    m.update(a)
    sd = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in m.state_dict().items()}
    n = fg.MinibatchCKA()
    n.load_state_dict(sd)
    assert n.cross.device.type == "meta"
    n.load_state_dict(m.state_dict())
    n.update(b)
    m.update(b)
    assert torch.equal(n.compute(), m.compute())


@pytest.mark.gpu
def test_state_saved_on_gpu_resumes_on_cpu(tmp_path):
    (a,), (b,) = [_batches([20], seed=s) for s in (2, 3)]
    m = fg.MinibatchCKA()
    m.update([x.cuda() for x in a])
    torch.save(m.state_dict(), tmp_path / "m.pt")
    n = fg.MinibatchCKA()
    n.load_state_dict(torch.load(tmp_path / "m.pt", map_location="cpu"))
    n.update(b)
    assert n.compute().device.type == "cpu"
    ref = fg.MinibatchCKA()
    ref.update(a)
    ref.update(b)
    assert_close(n.compute(), ref.compute(), "cka", torch.float32, what="loaded state")


def test_load_state_dict_names_what_differs():
    (xs,) = _batches([16])
    m = fg.MinibatchCKA(pairs=[(0, 1)])
    m.update(xs)
    sd = m.state_dict()
    cases = [
        (fg.MinibatchCKA(estimator="biased", pairs=[(0, 1)]), sd, "estimator='unbiased' was saved"),
        (fg.MinibatchCKA(tokens="mean", pairs=[(0, 1)]), sd, "tokens"),
        (fg.MinibatchCKA(pairs=[(1, 0)]), sd, "pairs"),
        (fg.MinibatchCKA(), sd, "pairs"),
        (fg.MinibatchCKA(pairs=[(0, 1)]), {**sd, "cross": sd["cross"].float()}, "cross must be a float64"),
        (fg.MinibatchCKA(pairs=[(0, 1)]), {**sd, "self_x": torch.zeros(3, dtype=torch.float64)}, "self_x"),
        (fg.MinibatchCKA(pairs=[(0, 1)]), {**sd, "shape": [2]}, "shape"),
        (fg.MinibatchCKA(pairs=[(0, 1)]), {**sd, "batches": -1}, "batches"),
        (fg.MinibatchCKA(pairs=[(0, 1)]), {k: v for k, v in sd.items() if k != "examples"}, "missing keys"),
        (fg.MinibatchCKA(pairs=[(0, 1)]), {**sd, "extra": 1}, "unexpected keys"),
        (fg.MinibatchCKA(pairs=[(0, 1)]), {**sd, "version": 99}, "version"),
    ]
    (other,) = _batches([12], seed=5)
    for metric, state, what in cases:
        metric.update(other)  # a failed load must leave these sums as they are
        before = metric.state_dict()
        with pytest.raises(ValueError, match=what):
            metric.load_state_dict(state)
        after = metric.state_dict()
        assert after.keys() == before.keys()
        for k, v in before.items():
            same = torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k]
            assert same, f"a failed load changed {k} ({what})"
