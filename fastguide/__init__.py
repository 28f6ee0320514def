"""fastguide: fused centred-Gram / CKA ops and a representational-guidance training wrapper."""

__version__ = "0.1.0"

from ._history import CKAHistory
from .align import AlignHistory, align
from .compare import CompareResult, compare
from .distill import distill_loss
from .functional import (
    GroupCKA,
    GroupStats,
    LayerStats,
    cka,
    cka_groups,
    cka_matrix,
    cka_pairs,
    gram,
    layer_stats,
)
from .guidance import Guidance
from .loss import CKALoss
from .metric import MinibatchCKA

__all__ = [
    "__version__",
    "LayerStats",
    "GroupStats",
    "GroupCKA",
    "layer_stats",
    "gram",
    "cka",
    "cka_matrix",
    "cka_pairs",
    "cka_groups",
    "CKALoss",
    "MinibatchCKA",
    "Guidance",
    "align",
    "AlignHistory",
    "CKAHistory",
    "compare",
    "CompareResult",
    "distill_loss",
]
