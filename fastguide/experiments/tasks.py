"""Demo tasks whose data ships with an installed package or is generated (no downloads).

- :func:`digits`: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), a small random
  training split (the regime where a deep FCN overfits or fails) and the rest as the test set.
- :class:`CopyPaste`: ``x_1 .. x_L SEP x_1 .. x_L``; a causal model must reproduce the first half
  after the separator. Loss and accuracy on the copied half only; chance is ``1 / num_symbols``.
- :class:`Parity`: running parity of a bit string (the label at position t is the XOR of bits 0..t).

Sequence tasks draw fresh training batches from a generator (so they cannot be memorised: the
train/test gap is ~0) and keep a fixed test set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["ImageData", "digits", "CopyPaste", "Parity", "evaluate"]


@dataclass
class ImageData:
    """A small image classification split: ``x_*`` (n, C, H, W) float32, ``y_*`` (n,) int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def in_features(self) -> int:
        return int(self.x_train[0].numel())

    def batches(self, batch_size: int, generator: torch.Generator):
        """Endless shuffled minibatches of the training split (reshuffled every epoch)."""
        n = self.x_train.shape[0]
        while True:
            perm = torch.randperm(n, generator=generator)
            for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
                idx = perm[i : i + batch_size]
                yield self.x_train[idx], self.y_train[idx]


def digits(n_train: int = 200, seed: int = 0) -> ImageData:
    """scikit-learn's digits as (n, 1, 8, 8) images standardised with the training split's statistics.

    ``n_train`` examples (drawn with ``seed``) form the training set, the other 1797 - n_train the test set.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits task needs scikit-learn (pip install scikit-learn, or fastguide[demo])"
        ) from e
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.tensor(data.target, dtype=torch.int64)
    if not 0 < n_train < x.shape[0]:
        raise ValueError(f"n_train must be in 1..{x.shape[0] - 1}; got {n_train}")
    g = torch.Generator().manual_seed(10_000 + seed)
    perm = torch.randperm(x.shape[0], generator=g)
    tr, te = perm[:n_train], perm[n_train:]
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return ImageData(x[tr], y[tr], x[te], y[te], num_classes=10)


class CopyPaste:
    """Copy task for causal sequence models, as next-token prediction.

    A sequence is ``x_1 .. x_L SEP x_1 .. x_L`` with ``x_i`` uniform over ``num_symbols`` symbols and
    ``SEP = num_symbols``. The model sees the sequence without its last token (length 2L) and predicts
    the next token at every position; only the L positions from SEP on (targets ``x_1 .. x_L``) count.
    """

    def __init__(self, length: int = 12, num_symbols: int = 8, n_test: int = 512, seed: int = 0):
        self.length = length
        self.num_symbols = num_symbols
        self.vocab_size = num_symbols + 1
        self.num_classes = self.vocab_size
        g = torch.Generator().manual_seed(20_000 + seed)
        self.x_test, self.y_test = self.sample(n_test, g)

    @property
    def chance(self) -> float:
        return 1.0 / self.num_symbols

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        L = self.length
        sym = torch.randint(0, self.num_symbols, (n, L), generator=generator)
        sep = torch.full((n, 1), self.num_symbols, dtype=torch.int64)
        seq = torch.cat([sym, sep, sym], dim=1)  # (n, 2L+1)
        return seq[:, :-1], seq[:, 1:]

    def batches(self, batch_size: int, generator: torch.Generator):
        while True:
            yield self.sample(batch_size, generator)

    def loss_and_correct(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy over the copied half, and the number of correct copied tokens (a tensor)."""
        L = self.length
        lg, yy = logits[:, L:], y[:, L:]
        loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), yy.reshape(-1))
        return loss, (lg.argmax(-1) == yy).sum()

    def count(self, y: torch.Tensor) -> int:
        return y.shape[0] * self.length


class Parity:
    """Running parity: input bits b_0 .. b_{T-1}; the label at position t is b_0 xor .. xor b_t."""

    def __init__(self, length: int = 16, n_test: int = 512, seed: int = 0):
        self.length = length
        self.vocab_size = 2
        self.num_classes = 2
        g = torch.Generator().manual_seed(30_000 + seed)
        self.x_test, self.y_test = self.sample(n_test, g)

    @property
    def chance(self) -> float:
        return 0.5

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        bits = torch.randint(0, 2, (n, self.length), generator=generator)
        return bits, bits.cumsum(dim=1) % 2

    def batches(self, batch_size: int, generator: torch.Generator):
        while True:
            yield self.sample(batch_size, generator)

    def loss_and_correct(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        return loss, (logits.argmax(-1) == y).sum()

    def count(self, y: torch.Tensor) -> int:
        return y.numel()


@torch.no_grad()
def evaluate(model, loss_correct, count, xy, device, batch: int = 1024) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on ``xy`` = (x, y) in batches, in eval mode (mode restored)."""
    was = model.training
    model.eval()
    x, y = xy
    tot_loss, tot_correct, n = 0.0, 0.0, 0
    for i in range(0, x.shape[0], batch):
        xb, yb = x[i : i + batch].to(device), y[i : i + batch].to(device)
        loss, correct = loss_correct(model(xb), yb)
        k = count(yb)
        tot_loss += float(loss) * k
        tot_correct += float(correct)
        n += k
    model.train(was)
    return tot_loss / n, tot_correct / n
