"""Model builders for the demo and the benchmarks (no torchvision: it does not import beside CPU torch).

Demo-size models:

- :class:`DeepFCN`: ``Flatten`` then ``depth`` blocks of Linear -> BatchNorm1d -> ReLU -> Dropout and a
  Linear head, the paper's deep fully connected target (hard to optimise at depth, overfits small data).
- :class:`SmallResNet`: a small ResNet-style conv guide (3x3 convs, BatchNorm, residual blocks,
  ``AdaptiveAvgPool2d``).
- :class:`TanhRNN`: token embedding, a stack of single-layer tanh ``nn.RNN`` modules (so that each
  layer is its own hookable module) and a per-token head.
- :class:`CausalTransformer`: a small pre-LayerNorm causal transformer with per-token head; its
  blocks (:class:`TransformerBlock`) return the residual stream.

Workload-size models:

- :func:`resnet18`: ResNet-18 of the standard (torchvision) shape; ``layers="auto"`` hooks its 20 convs
  and the average pool (21 maps) in execution order, the logits Linear being dropped.
- :func:`paper_deep_fcn`: the paper's deep FCN, Linear 2048 then 47 x Linear 1024, each with
  BatchNorm1d/ReLU/Dropout, and a Linear head.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "DeepFCN",
    "SmallResNet",
    "TanhRNN",
    "CausalTransformer",
    "TransformerBlock",
    "BasicBlock",
    "ResNet",
    "resnet18",
    "paper_deep_fcn",
]


class DeepFCN(nn.Module):
    """Deep fully connected network: blocks of Linear -> BatchNorm1d -> ReLU -> Dropout, then a head.

    ``widths`` gives the width of every hidden block (``depth`` blocks of ``hidden`` when it is an int).
    Inputs of any shape (n, ...) are flattened.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: int | list[int] = 256,
        depth: int = 16,
        dropout: float = 0.0,
        batchnorm: bool = True,
    ):
        super().__init__()
        widths = list(hidden) if isinstance(hidden, (list, tuple)) else [int(hidden)] * int(depth)
        if not widths:
            raise ValueError("DeepFCN needs at least one hidden block")
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for w in widths:
            block = [nn.Linear(prev, w)]
            if batchnorm:
                block.append(nn.BatchNorm1d(w))
            block.append(nn.ReLU())
            if dropout > 0:
                block.append(nn.Dropout(dropout))
            layers.append(nn.Sequential(*block))
            prev = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def paper_deep_fcn(in_features: int = 3 * 32 * 32, num_classes: int = 10, dropout: float = 0.1) -> DeepFCN:
    """The paper's deep FCN: Linear 2048 then 47 x Linear 1024, each with BatchNorm1d/ReLU/Dropout.

    ``layers="auto"`` sees its 48 hidden Linear layers (the head is the dropped logits layer).
    """
    return DeepFCN(in_features, num_classes, hidden=[2048] + [1024] * 47, dropout=dropout)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs with BatchNorm, identity or 1x1-conv shortcut)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # torchvision order: the shortcut runs after conv2, which fixes the hook execution order.
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with basic blocks. ``small_input=True`` uses a 3x3 stem without max-pool (8x8 or 32x32
    images); otherwise the standard 7x7 stride-2 stem and 3x3 max-pool (224x224 images)."""

    def __init__(
        self,
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        widths: tuple[int, ...] = (64, 128, 256, 512),
        num_classes: int = 1000,
        in_channels: int = 3,
        small_input: bool = False,
    ):
        super().__init__()
        if len(blocks) != len(widths):
            raise ValueError(f"blocks and widths must have the same length; got {blocks} and {widths}")
        w0 = widths[0]
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, w0, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, w0, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(w0)
        self.relu = nn.ReLU()
        stages = []
        prev = w0
        for i, (nb, w) in enumerate(zip(blocks, widths, strict=True)):
            stride = 1 if i == 0 else 2
            stage = []
            for b in range(nb):
                stage.append(BasicBlock(prev, w, stride if b == 0 else 1))
                prev = w
            stages.append(nn.Sequential(*stage))
        # Named layer1..layerK like torchvision, so module names read the same.
        for i, stage in enumerate(stages, start=1):
            self.add_module(f"layer{i}", stage)
        self.num_stages = len(stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(num_classes: int = 1000, in_channels: int = 3, small_input: bool = False) -> ResNet:
    """ResNet-18 of the standard shape (11.7 M parameters at 1000 classes)."""
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, in_channels, small_input)


class SmallResNet(ResNet):
    """Small ResNet-style conv guide for tiny images (e.g. 8x8 digits): a 3x3 stem, ``len(widths)``
    stages of ``blocks_per_stage`` basic blocks (stride 2 from the second stage), average pool, head."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: tuple[int, ...] = (16, 32, 64),
        blocks_per_stage: int = 1,
    ):
        super().__init__(
            tuple([blocks_per_stage] * len(widths)), tuple(widths), num_classes, in_channels, small_input=True
        )


class TanhRNN(nn.Module):
    """Token embedding, ``num_layers`` single-layer tanh RNNs (each its own module), per-token head.

    Input (B, T) integer tokens; output (B, T, num_classes) logits.
    """

    def __init__(self, vocab_size: int, num_classes: int, hidden: int = 128, num_layers: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.rnns = nn.ModuleList(
            [nn.RNN(hidden, hidden, nonlinearity="tanh", batch_first=True) for _ in range(num_layers)]
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for rnn in self.rnns:
            h, _ = rnn(h)
        return self.head(h)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm causal self-attention block; returns the residual stream (B, T, d)."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(), nn.Linear(mlp_ratio * d_model, d_model)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class CausalTransformer(nn.Module):
    """Small causal transformer: token + learned position embeddings, ``num_layers`` blocks, final
    LayerNorm, per-token head. Input (B, T) tokens; output (B, T, num_classes) logits."""

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        d_model: int = 64,
        num_layers: int = 4,
        n_heads: int = 4,
        max_len: int = 256,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        self.blocks = nn.ModuleList([TransformerBlock(d_model, n_heads) for _ in range(num_layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.pos.shape[0]:
            raise ValueError(f"sequence length {t} exceeds max_len={self.pos.shape[0]}")
        x = self.embed(tokens) + self.pos[:t]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
