"""Knowledge-distillation baseline (Hinton et al. 2015), for comparisons with guidance."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["distill_loss"]


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 4.0,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Soft-target distillation loss ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``.

    Logits are (n, C) or (..., C) (e.g. per-token logits (B, T, C): every position is one example).
    The teacher is detached. ``reduction="batchmean"`` (default) averages the per-example KL over all
    examples; ``"sum"`` sums it; ``"none"`` returns the per-example values with the leading shape.
    The ``T^2`` factor keeps gradient magnitudes comparable across temperatures.
    """
    if not isinstance(student_logits, torch.Tensor) or not isinstance(teacher_logits, torch.Tensor):
        raise TypeError("student_logits and teacher_logits must be tensors")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape; got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    if student_logits.dim() == 0:
        raise ValueError("logits must have a class dimension (last dim)")
    if not student_logits.is_floating_point():
        raise TypeError(f"student_logits must be floating point; got {student_logits.dtype}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number; got {temperature!r}")
    if reduction not in ("batchmean", "sum", "none"):
        raise ValueError(f"reduction must be 'batchmean', 'sum' or 'none'; got {reduction!r}")
    t = float(temperature)
    lead = student_logits.shape[:-1]
    s = student_logits.reshape(-1, student_logits.shape[-1]).float() / t
    q = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1]).to(s.device).float() / t
    log_p_s = F.log_softmax(s, dim=-1)
    log_p_t = F.log_softmax(q, dim=-1)
    per = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * (t * t)  # (n,)
    if reduction == "none":
        return per.reshape(lead).to(student_logits.dtype)
    out = per.sum() if reduction == "sum" else per.mean()
    return out.to(student_logits.dtype)
