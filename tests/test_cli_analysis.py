"""The analysis commands as a new user runs them: ``heatmap`` with their own models, ``guidability``."""

import json
import textwrap

import pytest
import torch

from fastguide import CompareResult, cli

USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
            return self.fc(self.pool(x).flatten(1))

    def make_mlp():
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 5))

    net = Net()

    def loader():
        g = torch.Generator().manual_seed(0)
        ds = torch.utils.data.TensorDataset(torch.randn(40, 3, 6, 6, generator=g), torch.zeros(40))
        return torch.utils.data.DataLoader(ds, batch_size=16)

    not_a_model = 3
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "fg_usermods.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_heatmap_with_user_models_and_random_data(user_module, capsys):
    out = user_module / "out"
    argv = ["heatmap", "--a", "fg_usermods:Net", "--b", "fg_usermods:make_mlp", "--data", "random:3x6x6"]
    rc = cli.main([*argv, "--n", "40", "--batch-size", "16", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "4 x 2 CKA matrix (Net vs Sequential, 40 examples in 3 batches" in printed and "wrote" in printed
    res = CompareResult.load(out / "heatmap.json")
    assert res.names_a == ["conv1", "conv2", "pool", "fc"] and res.names_b == ["1", "3"]
    assert res.metadata["data"] == "random:3x6x6" and res.metadata["examples"] == 40
    assert torch.isfinite(res.matrix).all()
    assert (out / "heatmap.png").stat().st_size > 1000
    # A module instance against a built-in model sized from the user's own DataLoader; named layers.
    out2 = user_module / "out2"
    rc = cli.main(
        ["heatmap", "--a", "fg_usermods:net", "--b", "resnet", "--data", "fg_usermods:loader"]
        + ["--layers-a", "conv1,fc", "--out", str(out2), "--no-progress"]
    )
    assert rc == 0
    res2 = CompareResult.load(out2 / "heatmap.json")
    assert res2.names_a == ["conv1", "fc"] and res2.metadata["batches"] == 3 and res2.names_b[0] == "conv1"


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--a", "fg_usermods:Nope", "--data", "random:3x6x6"],
            "--a 'fg_usermods:Nope': fg_usermods has no attribute",
        ),
        (["--a", "no_such_module_xyz:Net", "--data", "digits"], "cannot import module 'no_such_module_xyz'"),
        (
            ["--a", "fg_usermods:not_a_model", "--data", "digits"],
            "is not an nn.Module or a factory (got int)",
        ),
        (["--a", "fg_usermods:Net"], "--data is required with a user model"),
        (["--a", "fg_usermods:Net", "--data", "random:3x0"], "--data 'random:3x0': expected positive sizes"),
        (["--a", "fg_usermods:Net", "--data", "tokens:5"], "expected tokens:VOCAB:LENGTH"),
        (["--a", "fg_usermods:Net", "--data", "imagenet"], "--data 'imagenet': expected digits, copy"),
        (["--a", "mlp", "--data", "digits"], "--a 'mlp': expected one of fcn, resnet"),
        (["--a", "rnn", "--b", "fcn"], "both be image models"),
        (
            ["--a", "fg_usermods:Net", "--data", "random:3x6x6", "--train-steps", "3"],
            "--train-steps trains built-in",
        ),
        (["--a", "rnn", "--b", "rnn", "--data", "random:3x6x6"], "the built-in 'rnn' model takes token ids"),
    ],
)
def test_heatmap_bad_specs_name_the_argument(user_module, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        cli.main(["heatmap", *args, "--out", str(user_module / "bad"), "--no-progress"])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_heatmap_model_failure_is_reported(user_module, capsys):
    rc = cli.main(
        ["heatmap", "--a", "fg_usermods:make_mlp", "--b", "fcn", "--data", "random:3x5x5"]
        + ["--out", str(user_module / "o"), "--no-progress"]
    )
    assert rc == 1
    assert "check that --data fits both models' inputs" in capsys.readouterr().err


def test_guidability_small(tmp_path):
    from fastguide.experiments.guidability import run_guidability

    res = run_guidability(
        str(tmp_path), quick=True, steps=4, targets=["fcn"], workers=1, progress=False, verbose=False
    )
    rows = res["summary"]
    assert [(r["target"], r["guide"]) for r in rows] == [("fcn", None), ("fcn", "resnet"), ("fcn", "fcn")]
    for r in rows[1:]:
        assert 0 <= r["align_init"] <= 1 and 0 <= r["align_guided"] <= 1 and "align_unguided" in r
        assert r["paired"] == 1 and r["pairs"] >= 2
    for kind in ("json", "md", "png"):
        assert (tmp_path / f"guidability.{kind}").stat().st_size > 100
    saved = json.loads((tmp_path / "guidability.json").read_text())
    assert saved["seeds"] == 1 and len(saved["runs"]) == 3 and "machine" in saved
    guided = [r for r in saved["runs"] if r["guide"] is not None]
    assert all(r["history"]["steps"] == [0, 1, 2, 3] for r in guided)  # 4 steps, recorded every step
    table = (tmp_path / "guidability.md").read_text()
    assert "| deep FCN (digits) | unguided |" in table and "small ResNet" in table
    with pytest.raises(SystemExit) as e:
        cli.main(["guidability", "--targets", "cnn", "--out", str(tmp_path)])
    assert e.value.code == 2
