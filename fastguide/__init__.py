"""fastguide: fused centred-Gram / CKA ops and a representational-guidance training wrapper."""

__version__ = "0.1.0"

from .align import AlignHistory, align
from .distill import distill_loss
from .functional import LayerStats, cka, cka_matrix, cka_pairs, gram, layer_stats
from .guidance import Guidance
from .loss import CKALoss
from .metric import MinibatchCKA

__all__ = [
    "__version__",
    "LayerStats",
    "layer_stats",
    "gram",
    "cka",
    "cka_matrix",
    "cka_pairs",
    "CKALoss",
    "MinibatchCKA",
    "Guidance",
    "align",
    "AlignHistory",
    "distill_loss",
]
