"""`python -m fastguide demo --quick`, the demo's models and tasks, and the CLI."""

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from helpers import assert_close

from fastguide.experiments import demo, models, tasks


def _finite(v):
    return isinstance(v, (int, float)) and math.isfinite(v)


def test_demo_quick_cli(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # run as a user would
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "fastguide", "demo", "--quick", "--no-progress", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test acc" in proc.stdout and "machine:" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert (out / "curves.png").stat().st_size > 10_000
    tasks_run = {t["name"]: t for t in res["tasks"]}
    assert set(tasks_run) == {"digits", "copy"}
    for name in tasks_run:
        rows = {r["arm"]: r for r in res["summary"] if r["task"] == name}
        assert set(rows) == set(demo.ALL_ARMS), name
        for arm, r in rows.items():
            for k in ("test_acc", "test_loss", "train_acc", "train_loss", "gap"):
                assert _finite(r[k]), (name, arm, k, r[k])
    for run in res["runs"]:
        for k, v in run["curve"].items():
            assert all(_finite(x) for x in v), (run["task"], run["arm"], k)
    # --quick must stay within a minute (generous margin for a loaded CI machine)
    assert elapsed < 120, elapsed


def test_run_job_reproducible():
    task = demo.replace(demo.default_tasks(quick=True)[0], steps=8, eval_every=4, until=4, guide_steps=4)
    job = dict(task=demo.asdict(task), arm="guided_until", seed=1)
    a, b = demo.run_job(job), demo.run_job(job)
    assert a["curve"] == b["curve"]
    assert a["pairs"] and a["final"]["test_acc"] >= 0


def test_table_and_summary():
    runs = []
    for seed, (base, arm) in enumerate([(0.5, 0.7), (0.6, 0.5)]):
        for name, acc in (("baseline", base), ("guided_untrained", arm)):
            final = dict(test_acc=acc, test_loss=1.0, train_acc=1.0, train_loss=0.1, gap=1.0 - acc)
            runs.append(dict(task="digits", arm=name, seed=seed, final=final, chance=0.1, seconds=1.0))
    task = demo.TaskConfig("digits", steps=10, eval_every=5, arms=("baseline", "guided_untrained"))
    rows = demo.summarize(runs, [task])
    g = rows[1]
    assert g["wins"] == 1 and g["paired"] == 2
    assert_close(g["delta_test_acc"], 0.05, "exact64", torch.float64, what="delta")
    text = demo.format_table(rows)
    assert "better on 1/2 seeds" in text
    assert demo.format_table(rows, markdown=True).startswith("| task |")


def test_resnet18_standard_shape():
    m = models.resnet18()
    assert sum(p.numel() for p in m.parameters()) == 11_689_512  # torchvision's resnet18
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    convs = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Conv2d)]
    assert len(convs) == 20


def test_paper_deep_fcn_shape():
    m = models.paper_deep_fcn(in_features=3 * 32 * 32, num_classes=10)
    lin = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    assert [l.out_features for l in lin[:3]] == [2048, 1024, 1024]
    assert len(lin) == 49 and lin[-1].out_features == 10
    assert sum(isinstance(mod, torch.nn.BatchNorm1d) for mod in m.modules()) == 48
    assert sum(isinstance(mod, torch.nn.Dropout) for mod in m.modules()) == 48
    m.eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_small_models_forward():
    x = torch.randn(5, 1, 8, 8)
    assert models.SmallResNet()(x).shape == (5, 10)
    assert models.DeepFCN(64, 10, 32, 3, dropout=0.1)(x).shape == (5, 10)
    tok = torch.randint(0, 9, (5, 7))
    assert models.TanhRNN(9, 9, hidden=16, num_layers=2)(tok).shape == (5, 7, 9)
    assert models.CausalTransformer(9, 9, d_model=16, num_layers=2, n_heads=2, max_len=8)(tok).shape == (
        5,
        7,
        9,
    )


def test_causal_transformer_is_causal():
    torch.manual_seed(0)
    m = models.CausalTransformer(9, 9, d_model=16, num_layers=2, n_heads=2, max_len=8).eval()
    a = torch.randint(0, 9, (1, 6))
    b = a.clone()
    b[0, 4:] = (b[0, 4:] + 1) % 9
    with torch.no_grad():
        torch.testing.assert_close(m(a)[:, :4], m(b)[:, :4])


def test_tasks():
    d = tasks.digits(n_train=100, seed=0)
    assert d.x_train.shape == (100, 1, 8, 8) and d.x_test.shape == (1697, 1, 8, 8)
    assert_close(d.x_train.mean(), 0.0, "value", torch.float32, what="standardised features")
    torch.testing.assert_close(tasks.digits(100, seed=0).x_train, d.x_train)
    c = tasks.CopyPaste(length=5, num_symbols=4, n_test=8)
    x, y = c.x_test, c.y_test
    assert x.shape == y.shape == (8, 10)
    assert (x[:, 5] == 4).all()  # separator
    torch.testing.assert_close(y[:, 5:], x[:, :5])  # after SEP the targets repeat the first half
    p = tasks.Parity(length=6, n_test=4)
    torch.testing.assert_close(p.y_test, p.x_test.cumsum(1) % 2)


def test_cli_help_and_bench_dispatch(monkeypatch):
    from fastguide import cli

    parser = cli.build_parser()
    args = parser.parse_args(["demo", "--quick", "--seeds", "2"])
    assert args.quick and args.seeds == 2 and args.out == "./fastguide-demo"
    called = {}
    fake = type(sys)("fastguide.bench")
    fake.main = lambda argv: called.setdefault("argv", argv) and 0
    monkeypatch.setattr(cli, "bench", fake)
    assert cli.main(["bench", "--x", "1"]) == 0
    assert called["argv"] == ["--x", "1"]


def test_demo_cli_reproducible_by_default(monkeypatch):
    """The demo runs with the reproducible settings unless --native asks for the native code paths."""
    from fastguide import cli

    seen = []
    monkeypatch.setattr(cli, "run_demo", lambda out, **kw: seen.append(kw["reproducible"]))
    assert cli.main(["demo", "--quick"]) == 0
    assert cli.main(["demo", "--quick", "--native"]) == 0
    assert seen == [True, False]


def test_heatmap(tmp_path):
    from fastguide.experiments.heatmap import run_heatmap

    res = run_heatmap("fcn", "resnet", n=64, out=str(tmp_path))
    mat = torch.tensor(res["cka"])
    # compare's layers="auto" keeps the logits layer (16 hidden blocks + head; 10 maps + fc).
    assert mat.shape == (len(res["layers_a"]), len(res["layers_b"])) == (17, 11)
    assert torch.isfinite(mat).all()
    assert (tmp_path / "heatmap.png").exists() and (tmp_path / "heatmap.json").exists()
    with pytest.raises(ValueError, match="both be image models"):
        run_heatmap("rnn", "fcn", n=16, out=str(tmp_path))
