"""Demo tasks, models and the demo runner (``python -m fastguide demo``).

Models (no torchvision): :class:`DeepFCN`, :func:`paper_deep_fcn`, :class:`SmallResNet`, :func:`resnet18`,
:class:`TanhRNN`, :class:`CausalTransformer`. Tasks: :func:`digits`, :class:`CopyPaste`, :class:`Parity`.
"""

from .models import (
    BasicBlock,
    CausalTransformer,
    DeepFCN,
    ResNet,
    SmallResNet,
    TanhRNN,
    TransformerBlock,
    paper_deep_fcn,
    resnet18,
)
from .tasks import CopyPaste, ImageData, Parity, digits

__all__ = [
    "BasicBlock",
    "CausalTransformer",
    "DeepFCN",
    "ResNet",
    "SmallResNet",
    "TanhRNN",
    "TransformerBlock",
    "paper_deep_fcn",
    "resnet18",
    "CopyPaste",
    "ImageData",
    "Parity",
    "digits",
]
