"""Guidance wrapper and align(): hooks, frozen guide, memory, gradients, mapping, schedules, errors."""

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, mlp
from torch import nn

import fastguide
from fastguide.experiments import models
from fastguide.guidance import auto_pairs


def _mlp(**kw):
    return mlp(flatten=True, **kw)


def _n_hooks(*ms):
    return sum(len(m._forward_hooks) for net in ms for m in net.modules())


def _step(target, guidance, x, y, opt=None):
    logits = target(x)
    loss = F.cross_entropy(logits, y) + guidance.loss(x)
    if opt is not None:
        opt.zero_grad()
    loss.backward()
    if opt is not None:
        opt.step()
    return loss


@pytest.fixture
def pair():
    torch.manual_seed(0)
    return _mlp(depth=3), _mlp(width=24, depth=5)


# --------------------------------------------------------------------------- mapping


@pytest.mark.parametrize(
    "nt,ng,expected",
    [
        (3, 3, [(0, 0), (1, 1), (2, 2)]),
        (3, 5, [(0, 0), (1, 2), (2, 4)]),
        (5, 3, [(0, 0), (2, 1), (4, 2)]),
        (1, 4, [(0, 0)]),
        (2, 7, [(0, 0), (1, 6)]),
    ],
    ids=["equal", "guide-deeper", "target-deeper", "single", "two"],
)
def test_auto_pairs(nt, ng, expected):
    assert auto_pairs(nt, ng) == expected


def test_auto_mapping_paper_fcn_resnet18():
    torch.manual_seed(0)
    target = models.paper_deep_fcn(in_features=3 * 32 * 32, num_classes=10)
    guide = models.resnet18(num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    bn_before = target.features[1][1].running_mean.clone()
    with fastguide.Guidance(target, guide, example=x) as g:
        pairs = g.pairs
    # The probe forward must not move BatchNorm statistics.
    assert torch.equal(target.features[1][1].running_mean, bn_before)
    t_layers = [f"features.{i}.0" for i in range(1, 49)]  # 48 hidden Linears; the head is dropped
    assert len(pairs) == 21  # ResNet-18: 20 convs + avgpool (fc dropped)
    assert [g for _, g in pairs][:3] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]
    assert pairs[-1] == ("features.48.0", "avgpool")
    assert pairs[0] == ("features.1.0", "conv1")
    # one-to-one and evenly spaced over the 48 target layers
    assert len({t for t, _ in pairs}) == 21 and len({g for _, g in pairs}) == 21
    idx = [t_layers.index(t) for t, _ in pairs]
    assert idx == [int(j * 47 / 20 + 0.5) for j in range(21)]
    gaps = [b - a for a, b in zip(idx, idx[1:], strict=False)]
    assert set(gaps) <= {2, 3}
    # torchvision order: a block's shortcut conv runs after its conv2
    gnames = [g for _, g in pairs]
    assert gnames.index("layer2.0.downsample.0") == gnames.index("layer2.0.conv2") + 1


def test_auto_resolves_on_first_step(pair):
    target, guide = pair
    g = fastguide.Guidance(target, guide, estimator="biased")
    with pytest.raises(RuntimeError, match="resolved"):
        _ = g.pairs
    x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
    _step(target, g, x, y)
    # target: 3 hidden Linears (head dropped); guide: 5 hidden Linears
    assert g.pairs == [("1", "1"), ("3", "5"), ("5", "9")]
    assert g.last_cka.shape == (3,)
    # only the mapped modules keep hooks
    assert _n_hooks(target) == 3 and _n_hooks(guide) == 3
    g.close()


def test_explicit_dict_and_unknown_names(pair):
    target, guide = pair
    with fastguide.Guidance(target, guide, layers={"3": "5", "5": "9"}) as g:
        assert g.pairs == [("3", "5"), ("5", "9")]
    with pytest.raises(ValueError, match="unknown target module name '33'"):
        fastguide.Guidance(target, guide, layers={"33": "5"})
    with pytest.raises(ValueError, match="unknown guide module name 'nope'"):
        fastguide.Guidance(target, guide, layers={"3": "nope"})
    assert _n_hooks(target, guide) == 0


# --------------------------------------------------------------------------- hooks and memory


def test_hooks_removed_after_close_and_context_manager(pair):
    target, guide = pair
    before = _n_hooks(target, guide)
    x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
    with fastguide.Guidance(target, guide) as g:
        assert _n_hooks(target, guide) > before
        _step(target, g, x, y)
        assert _n_hooks(target, guide) > before
    assert _n_hooks(target, guide) == before
    g2 = fastguide.Guidance(target, guide, layers={"1": "1"})
    assert _n_hooks(target, guide) == before + 2
    g2.close()
    g2.close()  # idempotent
    assert _n_hooks(target, guide) == before
    with pytest.raises(RuntimeError, match="closed"):
        g2.loss(x)


def test_guide_frozen_params_unchanged_no_grad(pair):
    target, guide = pair
    guide.train()
    snapshot = copy.deepcopy(guide.state_dict())
    opt = torch.optim.SGD(list(target.parameters()), lr=0.1)
    x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
    t_before = [p.detach().clone() for p in target.parameters()]
    with fastguide.Guidance(target, guide) as g:
        for _ in range(3):
            _step(target, g, x, y, opt)
    assert not guide.training  # guide_mode="eval"
    for k, v in guide.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    assert all(p.grad is None and not p.requires_grad for p in guide.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(t_before, target.parameters(), strict=True))


def test_guide_activations_not_retained(pair):
    target, guide = pair
    refs = []
    probe = [guide[i].register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o))) for i in (1, 5, 9)]
    x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
    with fastguide.Guidance(target, guide, estimator="biased") as g:
        logits = target(x)
        loss = F.cross_entropy(logits, y) + g.loss(x)
        gc.collect()
        assert len(refs) >= 3
        # Before backward: guide activations are gone, only their LayerStats were used.
        assert all(r() is None for r in refs)
        loss.backward()
        assert g._t_acts == {} and g._call is None
    for h in probe:
        h.remove()


def test_target_activations_not_kept_after_backward(pair):
    target, guide = pair
    refs = []
    probe = target[3].register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))
    x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
    with fastguide.Guidance(target, guide) as g:
        _step(target, g, x, y)
        gc.collect()
        assert refs and refs[-1]() is None
    probe.remove()


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gradients_match_explicit_ckaloss(pair, estimator, reduction):
    target, guide = pair
    target = target.double()
    guide = guide.double()
    target2 = copy.deepcopy(target)
    layers = {"1": "3", "3": "5", "5": "9"}
    x = torch.randn(20, 12, dtype=torch.float64)
    with fastguide.Guidance(
        target, guide, layers=layers, estimator=estimator, reduction=reduction, weight=0.7
    ) as g:
        target(x)
        g.loss(x).backward()

    acts, gacts = {}, {}
    hs = [target2[int(k)].register_forward_hook(lambda m, i, o, k=k: acts.__setitem__(k, o)) for k in layers]
    hs += [
        guide[int(v)].register_forward_hook(lambda m, i, o, v=v: gacts.__setitem__(v, o))
        for v in layers.values()
    ]
    target2(x)
    with torch.no_grad():
        guide(x)
    for h in hs:
        h.remove()
    crit = fastguide.CKALoss(estimator=estimator, reduction=reduction)
    loss = 0.7 * crit([acts[k] for k in layers], [gacts[v] for v in layers.values()])
    loss.backward()
    for (n, p1), p2 in zip(target.named_parameters(), target2.parameters(), strict=True):
        if n.startswith("7."):  # the head is not in any pair
            assert p1.grad is None and p2.grad is None
            continue
        assert p1.grad is not None, n
        assert_close(p1.grad, p2.grad, "grad", p1.grad.dtype, what=n)
    ckas = fastguide.cka_pairs(
        [acts[k] for k in layers], [gacts[v] for v in layers.values()], estimator=estimator
    )
    torch.testing.assert_close(g.last_cka, ckas.detach())


def test_guided_target_cka_rises():
    torch.manual_seed(0)
    target, guide = _mlp(depth=3), _mlp(width=24, depth=3)
    opt = torch.optim.Adam(target.parameters(), lr=1e-2)
    x = torch.randn(64, 12)
    history = []
    with fastguide.Guidance(target, guide, estimator="biased") as g:
        for _ in range(40):
            target(x)
            loss = g.loss(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append(g.last_cka)
    h = torch.stack(history)
    assert h.shape == (40, 3)
    assert h[-1].mean() > h[0].mean() + 0.05
    assert h[-1].mean() > 0.9


def test_last_cka_detached_and_none_before(pair):
    target, guide = pair
    with fastguide.Guidance(target, guide) as g:
        assert g.last_cka is None
        _step(target, g, torch.randn(16, 12), torch.randint(0, 5, (16,)))
        assert not g.last_cka.requires_grad and g.last_cka.grad_fn is None


# --------------------------------------------------------------------------- sequence models, tuple outputs


class _SeqFirstRNN(nn.Module):
    """nn.RNN without batch_first: its output is (T, B, D) and a tuple (output, h)."""

    def __init__(self, vocab=7, d=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.rnn = nn.RNN(d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tok):  # tok (B, T)
        h, _ = self.rnn(self.embed(tok).transpose(0, 1))
        return self.head(h.transpose(0, 1))


class _Attn(nn.Module):
    def __init__(self, vocab=7, d=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tok):
        e = self.embed(tok)
        return self.head(self.ln(self.attn(e, e, e)[0]))


def test_tuple_and_seq_first_outputs():
    torch.manual_seed(0)
    target, guide = _SeqFirstRNN(), _Attn()
    tok = torch.randint(0, 7, (10, 6))
    with fastguide.Guidance(target, guide, layers={"rnn": "attn"}, estimator="biased") as g:
        target(tok)
        loss = g.loss(tok)
        loss.backward()
    assert torch.isfinite(loss)
    assert target.rnn.weight_ih_l0.grad is not None
    # the value equals CKA of the batch-first RNN output vs the attention output
    with torch.no_grad():
        h = target.rnn(target.embed(tok).transpose(0, 1))[0].transpose(0, 1)
        e = guide.embed(tok)
        a = guide.attn(e, e, e)[0]
        expected = fastguide.cka(h, a, estimator="biased")
    assert_close(g.last_cka[0], expected, "cka", torch.float32, what="last_cka")


def test_demo_sequence_models_auto():
    torch.manual_seed(0)
    target = models.TanhRNN(9, 9, hidden=16, num_layers=2)
    guide = models.CausalTransformer(9, 9, d_model=16, num_layers=2, n_heads=2, max_len=16)
    tok = torch.randint(0, 9, (8, 10))
    with fastguide.Guidance(target, guide, estimator="biased") as g:
        target(tok)
        loss = g.loss(tok)
        loss.backward()
        pairs = g.pairs
    assert torch.isfinite(loss)
    assert [t for t, _ in pairs] == ["rnns.0", "rnns.1"]
    assert pairs[0][1] == "blocks.0.ln1" and pairs[-1][1] == "ln_f"


# --------------------------------------------------------------------------- schedules


def test_every_and_until(pair):
    target, guide = pair
    x = torch.randn(16, 12)
    with fastguide.Guidance(target, guide, every=2, until=5) as g:
        guided = []
        for step in range(8):
            assert g.active == (step in (0, 2, 4))
            target(x)
            assert (len(g._t_acts) > 0) == (step in (0, 2, 4))
            loss = g.loss(x)
            guided.append(bool(loss.detach() != 0))
        assert guided == [True, False, True, False, True, False, False, False]
        assert g.step == 8


def test_weight_schedule(pair):
    target, guide = pair
    x = torch.randn(16, 12)
    with fastguide.Guidance(target, guide, layers={"1": "1"}, weight=lambda s: 0.5 * s) as g:
        values = []
        for _ in range(3):
            target(x)
            values.append(g.loss(x).detach())
        cka = g.last_cka
    assert values[0] == 0
    torch.testing.assert_close(values[2], 1.0 * (1 - cka[0]))


def test_no_grad_forwards_not_captured(pair):
    target, guide = pair
    x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
    with fastguide.Guidance(target, guide, layers={"1": "1"}) as g:
        with torch.no_grad():
            target(torch.randn(3, 12))  # evaluation forward, different batch size
        assert g._t_acts == {}
        _step(target, g, x, y)


# --------------------------------------------------------------------------- errors


def test_error_module_never_fired(pair):
    target, guide = pair
    with fastguide.Guidance(target, guide, layers={"1": "1"}) as g:
        with pytest.raises(RuntimeError, match=r"target module\(s\) \['1'\] did not fire"):
            g.loss(torch.randn(16, 12))

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(12, 5), nn.Linear(12, 5)

        def forward(self, x):
            return self.a(x)

    with fastguide.Guidance(target, Skip(), layers={"1": "b"}) as g:
        target(torch.randn(16, 12))
        with pytest.raises(RuntimeError, match=r"guide module\(s\) \['b'\] did not fire"):
            g.loss(torch.randn(16, 12))


def test_error_batch_size_mismatch(pair):
    target, guide = pair
    with fastguide.Guidance(target, guide, layers={"1": "1"}) as g:
        target(torch.randn(16, 12))
        with pytest.raises(ValueError, match="batch-size mismatch.*'1' has batch size 16.*has 8"):
            g.loss(torch.randn(8, 12))


def test_error_guide_requires_grad(pair):
    target, guide = pair
    with fastguide.Guidance(target, guide, layers={"1": "1"}) as g:
        guide[1].weight.requires_grad_(True)
        target(torch.randn(16, 12))
        with pytest.raises(RuntimeError, match="guide parameter '1.weight' requires grad"):
            g.loss(torch.randn(16, 12))
    with pytest.raises(ValueError, match="shares parameters"):
        fastguide.Guidance(target, nn.Sequential(target[1]))
    with pytest.raises(ValueError, match="different modules"):
        fastguide.Guidance(target, target)


def test_inplace_modification_detected(pair):
    torch.manual_seed(0)
    target = nn.Sequential(nn.Linear(12, 16), nn.ReLU(inplace=True), nn.Linear(16, 5))
    guide = _mlp()
    x = torch.randn(16, 12)
    with fastguide.Guidance(target, guide, layers={"0": "1"}) as g:
        target(x)
        with pytest.raises(RuntimeError, match="target module '0' was modified in place.*clone_inplace"):
            g.loss(x)
    with fastguide.Guidance(target, guide, layers={"0": "1"}, clone_inplace=True, estimator="biased") as g:
        target(x)
        g.loss(x).backward()
        with torch.no_grad():
            pre = target[0](x)
            expected = fastguide.cka(pre, guide[1](guide[0](x)), estimator="biased")
        torch.testing.assert_close(g.last_cka[0], expected)


def test_check_finite_names_layer(pair):
    target, guide = pair
    x = torch.randn(16, 12)
    x[0, 0] = float("nan")
    with fastguide.Guidance(target, guide, layers={"3": "3"}, check_finite=True) as g:
        target(x)
        with pytest.raises(FloatingPointError, match="target layer '3'"):
            g.loss(x)


def test_bad_options(pair):
    target, guide = pair
    for kw, msg in [
        (dict(reduction="max"), "reduction"),
        (dict(every=0), "every"),
        (dict(until=-1), "until"),
        (dict(guide_mode="frozen"), "guide_mode"),
        (dict(estimator="fast"), "estimator"),
        (dict(layers="all"), "layers"),
        (dict(weight="1"), "weight"),
    ]:
        with pytest.raises((ValueError, TypeError), match=msg):
            fastguide.Guidance(target, guide, **kw)
    assert _n_hooks(target, guide) == 0


def test_guide_bf16_autocast(pair):
    target, guide = pair
    x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
    with fastguide.Guidance(target, guide, guide_dtype=torch.bfloat16, estimator="biased") as g:
        loss = _step(target, g, x, y)
    assert torch.isfinite(loss)
    assert guide[1].weight.dtype == torch.float32


# --------------------------------------------------------------------------- align


def test_align_history_and_rise():
    torch.manual_seed(0)
    target, guide = _mlp(depth=3), _mlp(width=24, depth=3)
    t_mode = target.training
    hist = fastguide.align(
        target, guide, 30, lr=1e-2, example=torch.randn(64, 12), estimator="biased", seed=0
    )
    assert hist.cka.shape == (30, 3) and hist.loss.shape == (30,)
    assert len(hist.pairs) == 3
    assert hist.cka[-5:].mean() > hist.cka[:5].mean() + 0.05
    assert target.training == t_mode
    assert _n_hooks(target, guide) == 0
    assert all(p.grad is None for p in guide.parameters())


def test_align_tokens_reproducible():
    def run():
        torch.manual_seed(0)
        target = models.TanhRNN(9, 9, hidden=16, num_layers=2)
        guide = models.CausalTransformer(9, 9, d_model=16, num_layers=2, n_heads=2, max_len=16)
        layers = {"rnns.0": "blocks.0", "rnns.1": "blocks.1"}
        return fastguide.align(
            target, guide, 5, example=torch.zeros(8, 10, dtype=torch.long), layers=layers, seed=3
        )

    a, b = run(), run()
    assert a.pairs == [("rnns.0", "blocks.0"), ("rnns.1", "blocks.1")]
    assert torch.equal(a.cka, b.cka)  # bitwise: the same run twice


# ------------------------------------------------------------ guide statistics: features or Grams


class _Tokens(nn.Module):
    """(B, T, d_in) -> per-token Linear layers; the hooked outputs are (B, T, width) token activations."""

    def __init__(self, widths, d_in=6, inplace=False):
        super().__init__()
        dims = [d_in, *widths]
        self.lins = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.act = nn.ReLU(inplace=inplace)

    def forward(self, x):
        for lin in self.lins:
            x = self.act(lin(x))
        return x


def _token_guidance(target, guide, route, pairs, **kw):
    return fastguide.Guidance(
        target, guide, layers=pairs, tokens="samples", estimator="unbiased", route=route, **kw
    )


@pytest.mark.parametrize("route", ["auto", "feature"])
def test_guide_kept_as_features_matches_gram_route(route, monkeypatch):
    # n = B*T = 48 token examples; guide widths 8 and 12 < n: "auto" keeps the features, not Grams.
    torch.manual_seed(0)
    target, guide = _Tokens([10, 7]), _Tokens([8, 12])
    pairs = [("lins.0", "lins.1"), ("lins.1", "lins.0")]
    x = torch.randn(4, 12, 6)
    out = {}
    for r in ("gram", route):
        g = _token_guidance(target, guide, r, pairs)
        target.zero_grad()
        if r != "gram":  # the features route must not reduce guide layers to Grams in the hooks
            monkeypatch.setattr(fastguide, "layer_stats", lambda *a, **k: pytest.fail("Gram stats made"))
        target(x)
        loss = g.loss(x)
        loss.backward()
        out[r] = (loss.detach(), g.last_cka, [p.grad.clone() for p in target.parameters()])
        g.close()
        monkeypatch.undo()
    assert_close(out[route][0], out["gram"][0], "loss", torch.float32, length=2, what="loss")
    assert_close(out[route][1], out["gram"][1], "cka", torch.float32, what="last_cka")
    scale = float(torch.cat([g.flatten() for g in out["gram"][2]]).norm())  # biases: ~0 (shift invariance)
    for a, b in zip(out[route][2], out["gram"][2], strict=True):
        assert_close(a, b, "grad", torch.float32, floor=scale, what="parameter gradient")


def test_mixed_guide_statistics_keep_pair_order():
    # Guide widths 5 (< n = 16: features) and 40 (> n: Gram); pairs interleave the two kinds.
    torch.manual_seed(1)
    target, guide = _Tokens([9, 11, 7]), _Tokens([5, 40, 6])
    pairs = [("lins.0", "lins.1"), ("lins.1", "lins.0"), ("lins.2", "lins.1"), ("lins.2", "lins.2")]
    x = torch.randn(2, 8, 6)
    res = {}
    for r in ("gram", "auto"):
        g = _token_guidance(target, guide, r, pairs)
        target(x)
        res[r] = (g.loss(x).detach(), g.last_cka)
        g.close()
    assert_close(res["auto"][1], res["gram"][1], "cka", torch.float32, what="last_cka")
    assert_close(res["auto"][0], res["gram"][0], "loss", torch.float32, length=2, what="loss")


def test_feature_copy_survives_inplace_guide_ops():
    # The guide's ReLU(inplace=True) rewrites each hooked Linear output after the hook ran.
    torch.manual_seed(2)
    target = _Tokens([9, 7])
    guide_a, guide_b = _Tokens([5, 6], inplace=True), _Tokens([5, 6])
    guide_b.load_state_dict(guide_a.state_dict())
    pairs = [("lins.0", "lins.0"), ("lins.1", "lins.1")]
    x = torch.randn(3, 8, 6)
    vals = []
    for guide, r in ((guide_a, "auto"), (guide_b, "gram")):
        g = _token_guidance(target, guide, r, pairs)
        target(x)
        vals.append(g.loss(x).detach())
        g.close()
    assert_close(vals[0], vals[1], "loss", torch.float32, length=2, what="loss")


def test_route_option_errors(pair):
    target, guide = pair
    with pytest.raises(ValueError, match="route"):
        fastguide.Guidance(target, guide, route="fast")
    with pytest.raises(ValueError, match="route='feature' needs kernel='linear'"):
        fastguide.Guidance(target, guide, route="feature", kernel="rbf")
