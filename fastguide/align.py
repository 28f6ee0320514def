"""Alignment as initialization (Subramaniam et al.): optimise the target on the CKA loss alone, on noise."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .guidance import Guidance, as_args

__all__ = ["align", "AlignHistory"]


@dataclasses.dataclass
class AlignHistory:
    """Result of :func:`align`: ``cka`` (steps, P) per-pair CKA per step, ``loss`` (steps,) and ``pairs``."""

    pairs: list[tuple[str, str]]
    cka: torch.Tensor
    loss: torch.Tensor

    def __len__(self) -> int:
        return self.cka.shape[0]


def _noise_fn(noise, example, target: nn.Module, vocab_size: int | None):
    if callable(noise):
        return noise
    if example is None:
        raise ValueError("align needs example=<one input batch> (its shape and dtype define the noise)")
    if not isinstance(example, torch.Tensor):
        raise TypeError("align: example must be a tensor (pass noise=callable(generator) for other inputs)")
    shape, dtype, device = tuple(example.shape), example.dtype, example.device
    if noise == "tokens" or (noise == "auto" and not dtype.is_floating_point):
        if vocab_size is None:
            emb = [m for m in target.modules() if isinstance(m, nn.Embedding)]
            if not emb:
                raise ValueError("align: noise='tokens' needs vocab_size= (no nn.Embedding in the target)")
            vocab_size = emb[0].num_embeddings
        return lambda g: torch.randint(0, vocab_size, shape, generator=g).to(device)
    if noise in ("gaussian", "auto"):
        return lambda g: torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    if noise == "uniform":
        return lambda g: (torch.rand(shape, generator=g) * 2 - 1).to(device=device, dtype=dtype)
    raise ValueError(f"noise must be 'auto', 'gaussian', 'uniform', 'tokens' or a callable; got {noise!r}")


def align(
    target: nn.Module,
    guide: nn.Module,
    steps: int,
    noise: str | Callable[[torch.Generator], Any] = "auto",
    lr: float = 1e-3,
    *,
    example: Any = None,
    layers: Any = "auto",
    optimizer: torch.optim.Optimizer | None = None,
    vocab_size: int | None = None,
    seed: int | None = None,
    **guidance_kwargs,
) -> AlignHistory:
    """Alignment as initialization: optimise ``target`` on the CKA alignment loss alone, on random noise.

    Both networks see the same noise batches: Gaussian for float inputs, random tokens in
    ``[0, vocab_size)`` for integer inputs (``noise="auto"``); ``example`` (one real batch) fixes the
    noise's shape, dtype and device, or pass ``noise=callable(generator) -> input``. The target is
    trained with Adam(lr) (or ``optimizer``) in train mode and restored to its mode afterwards.
    ``guidance_kwargs`` go to :class:`Guidance` (e.g. ``estimator="biased"``).

    Returns an :class:`AlignHistory` with the per-pair CKA of every step (one host copy at the end).
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int; got {steps!r}")
    make = _noise_fn(noise, example, target, vocab_size)
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
    first = make(g)
    was_training = target.training
    opt = optimizer if optimizer is not None else torch.optim.Adam(target.parameters(), lr=lr)
    ckas, losses = [], []
    with Guidance(target, guide, layers=layers, **guidance_kwargs) as guidance:
        target.train()
        x = first
        for _ in range(steps):
            args, kwargs = as_args(x)
            target(*args, **kwargs)
            loss = guidance.loss(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ckas.append(guidance.last_cka)
            losses.append(loss.detach())
            x = make(g)
        pairs = guidance.pairs if guidance._mapping is not None else []
    target.train(was_training)
    cka = torch.stack(ckas).cpu() if ckas else torch.zeros(0, len(pairs))
    loss_t = torch.stack(losses).cpu() if losses else torch.zeros(0)
    return AlignHistory(pairs=pairs, cka=cka, loss=loss_t)
