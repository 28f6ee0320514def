"""fastguide: fused centred-Gram / CKA ops and a representational-guidance training wrapper."""

__version__ = "0.1.0"

from .functional import LayerStats, cka, cka_matrix, cka_pairs, gram, layer_stats
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
]

try:  # the training wrapper and baselines (issue 5) live in their own modules
    from .distill import distill_loss
    from .guidance import Guidance, align

    __all__ += ["Guidance", "align", "distill_loss"]
except ImportError:  # pragma: no cover - only while those modules are being written
    pass
