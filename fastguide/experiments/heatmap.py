"""``python -m fastguide heatmap``: layer-by-layer CKA matrix of two models on a dataset (PNG + JSON)."""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from .._capture import Capture
from .._mapping import auto_candidates
from ..functional import cka_matrix


def layer_activations(model: nn.Module, x: torch.Tensor) -> tuple[list[str], list[torch.Tensor]]:
    """Outputs of the modules ``layers="auto"`` selects, in execution order, the last (logits) dropped."""
    with Capture(model, auto_candidates(model), detach=True, keep="first") as cap, torch.no_grad():
        model(x)
    names = [n for n in cap.order if n in cap.outputs][:-1]
    return names, [cap.outputs[n] for n in names]


def _models_and_data(a: str, b: str, n: int, seed: int):
    from . import models, tasks

    image = {"fcn", "resnet"}
    if (a in image) != (b in image):
        raise ValueError(
            f"--a and --b must both be image models (fcn, resnet) or both sequence models; got {a}, {b}"
        )
    if a in image:
        data = tasks.digits(n_train=min(n, 1700), seed=seed)
        x, y = data.x_train, data.y_train
        make = {
            "fcn": lambda: models.DeepFCN(64, 10, 256, 16),
            "resnet": lambda: models.SmallResNet(1, 10),
        }
        loss = lambda logits, yy: nn.functional.cross_entropy(logits, yy)  # noqa: E731
        batches = data.batches
    else:
        task = tasks.CopyPaste(length=12, n_test=n, seed=seed)
        x, y = task.x_test, task.y_test
        make = {
            "rnn": lambda: models.TanhRNN(task.vocab_size, task.num_classes),
            "transformer": lambda: models.CausalTransformer(task.vocab_size, task.num_classes, max_len=64),
        }
        loss = lambda logits, yy: task.loss_and_correct(logits, yy)[0]  # noqa: E731
        batches = task.batches
    torch.manual_seed(seed)
    return make[a](), make[b](), x, y, loss, batches


def run_heatmap(
    a: str = "fcn",
    b: str = "resnet",
    *,
    n: int = 256,
    estimator: str = "unbiased",
    kernel: str = "linear",
    train_steps: int = 0,
    seed: int = 0,
    device: str = "cpu",
    out: str = "./fastguide-heatmap",
) -> dict:
    ma, mb, x, y, loss_fn, batches = _models_and_data(a, b, n, seed)
    dev = torch.device(device)
    ma, mb = ma.to(dev), mb.to(dev)
    for m in (ma, mb):
        if train_steps:
            opt = torch.optim.Adam(m.parameters(), lr=1e-3)
            it = batches(64, torch.Generator().manual_seed(seed))
            m.train()
            for _ in range(train_steps):
                xb, yb = next(it)
                lo = loss_fn(m(xb.to(dev)), yb.to(dev))
                opt.zero_grad()
                lo.backward()
                opt.step()
        m.eval()
    x = x.to(dev)
    na, xa = layer_activations(ma, x)
    nb, xb = layer_activations(mb, x)
    mat = cka_matrix(xa, xb, estimator=estimator, kernel=kernel).detach().cpu()
    os.makedirs(out, exist_ok=True)
    result = dict(
        model_a=a,
        model_b=b,
        layers_a=na,
        layers_b=nb,
        n=int(x.shape[0]),
        estimator=estimator,
        kernel=kernel,
        train_steps=train_steps,
        seed=seed,
        cka=mat.tolist(),
    )
    with open(os.path.join(out, "heatmap.json"), "w") as f:
        json.dump(result, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.5 + 0.3 * len(nb), 1.5 + 0.3 * len(na)))
    im = ax.imshow(mat.numpy(), cmap="magma", vmin=0, vmax=1, aspect="auto")
    ax.set_yticks(range(len(na)), na, fontsize=6)
    ax.set_xticks(range(len(nb)), nb, fontsize=6, rotation=90)
    ax.set_ylabel(a)
    ax.set_xlabel(b)
    ax.set_title(f"CKA ({estimator}, {kernel}), n={x.shape[0]}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "heatmap.png"), dpi=110)
    plt.close(fig)
    print(f"{len(na)} x {len(nb)} CKA matrix; wrote {out}/heatmap.json and {out}/heatmap.png")
    return result
