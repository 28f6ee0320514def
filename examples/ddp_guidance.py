"""Representational guidance under DistributedDataParallel.

    torchrun --nproc-per-node 2 examples/ddp_guidance.py            # gloo on CPU, nccl on GPUs
    torchrun --nproc-per-node 2 examples/ddp_guidance.py --gather   # CKA over the global batch
    torchrun --nproc-per-node 2 examples/ddp_guidance.py --tiny     # a few seconds

A deep MLP target learns a synthetic classification task while its hidden layers are aligned with
an untrained convolutional guide's, which reads the input as an image (the paper's "untrained guide"
setting). Each rank draws its own batches; the guidance loss is per rank, or with ``--gather`` the CKA
of the global batch (activations all-gathered with autograd; after DDP's gradient averaging every
rank gets the global-batch gradient).
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fastguide


def make_target(d_in: int, width: int, depth: int, classes: int) -> nn.Sequential:
    layers, prev = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(prev, width), nn.BatchNorm1d(width), nn.ReLU()]
        prev = width
    return nn.Sequential(*layers, nn.Linear(prev, classes))


class ConvGuide(nn.Module):
    """An untrained conv net that reads the d_in = side * side input features as a 1-channel image."""

    def __init__(self, side: int, channels: int, classes: int):
        super().__init__()
        self.side = side
        self.body = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )  # fmt: skip
        self.head = nn.Linear(channels * 4, classes)

    def forward(self, x):
        return self.head(self.body(x.view(-1, 1, self.side, self.side)).flatten(1))


def batch(gen: torch.Generator, n: int, d_in: int, classes: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    # A fixed random teacher labels Gaussian inputs (the same teacher on every rank: seed 0).
    teacher = torch.randn(d_in, classes, generator=torch.Generator().manual_seed(0))
    x = torch.randn(n, d_in, generator=gen)
    return x.to(device), (x @ teacher).argmax(1).to(device)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64, help="per-rank batch size")
    p.add_argument("--gather", action="store_true", help="CKA of the global batch (all ranks)")
    p.add_argument("--until", type=int, default=None, help="guide only the first UNTIL steps")
    p.add_argument("--tiny", action="store_true", help="a few steps of a small model (a smoke test)")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.batch = 4, 16

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        return train(args, device)
    finally:
        # Everything that holds the process group (DDP, graphs of gathered activations) went with
        # train()'s frame; every rank finishes its collectives before the group is destroyed (a Gloo
        # group destroyed right after a collective can hang or abort at exit).
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def train(args: argparse.Namespace, device: torch.device) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    width, depth, side, classes = (32, 3, 4, 4) if args.tiny else (256, 12, 8, 10)
    d_in = side * side
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    target = make_target(d_in, width, depth, classes).to(device)
    guide = ConvGuide(side, 8 if args.tiny else 32, classes).to(device)
    model = nn.parallel.DistributedDataParallel(
        target, device_ids=[device.index] if device.type == "cuda" else None
    )
    # Hook names are the wrapped model's ("module.<name>"); layers="auto" maps them by execution order.
    guidance = fastguide.Guidance(
        model, guide, estimator="biased", gather=args.gather, until=args.until, step_on="optimizer"
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guidance.attach_optimizer(opt)  # the schedule counts optimizer steps
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    history = []
    for step in range(args.steps):
        x, y = batch(gen, args.batch, d_in, classes, device)
        task = F.cross_entropy(model(x), y)
        align = guidance.loss(x)
        opt.zero_grad(set_to_none=True)
        (task + align).backward()
        opt.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            stats = torch.stack([task.detach(), align.detach()])
            dist.all_reduce(stats)
            stats /= world
            cka = guidance.last_cka.mean().item() if guidance.last_cka is not None else float("nan")
            history.append((step, *stats.tolist(), cka))
            if rank == 0:
                print(f"step {step:4d}  task {stats[0]:.4f}  guidance {stats[1]:.4f}  mean CKA {cka:.3f}")
    if rank == 0:
        print(f"{world} ranks, gather={args.gather}, guidance steps {guidance.step}, pairs: {guidance.pairs}")
    result = {"history": history, "pairs": guidance.pairs, "step": guidance.step}
    guidance.close()
    return result


if __name__ == "__main__":
    main()
