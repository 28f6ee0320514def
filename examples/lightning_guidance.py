"""Representational guidance in a Lightning training loop, with fastguide's GuidanceCallback.

    python examples/lightning_guidance.py              # a minute or two on a CPU
    python examples/lightning_guidance.py --tiny       # seconds (a smoke test)
    python examples/lightning_guidance.py --until 50   # guidance for the first 50 optimizer steps only

A deep MLP with BatchNorm (the kind of network the paper calls untrainable) is trained on a small
synthetic classification task, guided by an untrained residual MLP. The LightningModule holds the
Guidance, so its schedule is part of the model's checkpoint; the callback registers the hooks for the
fit and removes them afterwards, counts the schedule in optimizer steps (``accumulate_grad_batches``),
and logs the per-pair CKA (``cka/...`` in training, ``val_cka/...`` in validation).
"""

from __future__ import annotations

import argparse
import tempfile

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastguide
from fastguide.integrations.lightning import GuidanceCallback


def deep_mlp(d_in: int, width: int, depth: int, classes: int) -> nn.Sequential:
    layers, prev = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(prev, width), nn.BatchNorm1d(width), nn.ReLU()]
        prev = width
    return nn.Sequential(*layers, nn.Linear(prev, classes))


class ResidualGuide(nn.Module):
    def __init__(self, d_in: int, width: int, blocks: int, classes: int):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width)) for _ in range(blocks)
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + torch.relu(b(h))
        return self.head(h)


class GuidedClassifier(pl.LightningModule):
    def __init__(self, d_in: int, classes: int, width: int, depth: int, until: int | None, lr: float):
        super().__init__()
        torch.manual_seed(0)
        self.net = deep_mlp(d_in, width, depth, classes)
        self.guide = ResidualGuide(d_in, width, 4, classes)  # untrained, frozen by Guidance
        self.guidance = fastguide.Guidance(self.net, self.guide, estimator="biased", until=until)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        task = F.cross_entropy(self.net(x), y)
        self.log("train_loss", task)
        return task + self.guidance.loss(x)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.log("val_acc", (logits.argmax(1) == y).float().mean())
        self.guidance.loss(x)  # under no_grad: measures the alignment; the callback logs it

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=self.lr)


def data(n: int, d_in: int, classes: int, seed: int) -> TensorDataset:
    teacher = torch.randn(d_in, classes, generator=torch.Generator().manual_seed(0))
    x = torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, (torch.tanh(x @ teacher) + 0.3 * x[:, :classes]).argmax(1))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--accumulate", type=int, default=2, help="accumulate_grad_batches")
    p.add_argument("--until", type=int, default=None)
    p.add_argument("--tiny", action="store_true", help="a few steps of a small model (a smoke test)")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps = 3
    d_in, classes = 32, 6
    width, depth = (16, 3) if args.tiny else (128, 16)
    model = GuidedClassifier(d_in, classes, width, depth, args.until, lr=1e-3)
    train = DataLoader(data(256 if args.tiny else 512, d_in, classes, 1), batch_size=32, shuffle=True)
    val = DataLoader(data(128, d_in, classes, 2), batch_size=64)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            max_steps=args.steps,
            accumulate_grad_batches=args.accumulate,
            callbacks=[GuidanceCallback()],
            default_root_dir=tmp,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            val_check_interval=min(50, args.steps * args.accumulate),
            check_val_every_n_epoch=None,
            num_sanity_val_steps=0,
            accelerator="auto",
            devices=1,
        )
        trainer.fit(model, train, val)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for k, v in sorted(metrics.items()):
        print(f"{k:40s} {v:.4f}")
    print(
        f"guidance step {model.guidance.step} = global step {trainer.global_step}; "
        f"pairs {model.guidance.pairs}"
    )
    return {"metrics": metrics, "step": model.guidance.step, "global_step": trainer.global_step}


if __name__ == "__main__":
    main()
