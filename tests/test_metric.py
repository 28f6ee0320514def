"""MinibatchCKA: accumulation with unequal batches, pairs, reset, and torch.distributed sync."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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
    assert torch.allclose(m.compute(), fg.cka_matrix(xs, estimator=estimator).double(), atol=1e-6)


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
        assert abs(got[a, 0].item() - want.item()) < 1e-6


def test_scale_and_offset_robust_accumulators():
    batches = _batches([16, 16], dims=(2000,))
    m = fg.MinibatchCKA()
    m_ref = fg.MinibatchCKA()
    for (x,) in batches:
        m.update([x * 1e6 + 1e7, x])
        m_ref.update([x.double(), x.double()])
    assert torch.isfinite(m.compute()).all()
    assert torch.allclose(m.compute(), m_ref.compute(), atol=1e-5)


def test_pairs_reset_and_degenerate():
    (xs,) = _batches([20])
    m = fg.MinibatchCKA(pairs=[(1, 0), (2, 1)])
    m.update(xs + [torch.zeros(20, 3)], [xs[1], torch.zeros(20, 2)])
    m.update(xs + [torch.zeros(20, 3)], [xs[1], torch.zeros(20, 2)])
    v = m.compute()
    assert v.shape == (2,)
    assert abs(v[0].item() - 1.0) < 1e-6 and v[1].item() == 0.0
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
        assert torch.allclose(torch.load(tmp_path / f"rank{r}.pt"), full.compute(), atol=1e-10)
