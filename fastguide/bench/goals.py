"""The benchmark goals (issue 6) and their evaluation from a run's records."""

from __future__ import annotations

import torch

__all__ = ["GOALS_CPU", "GOALS_GPU", "evaluate_goals"]

MB = 1024.0 * 1024.0

# (text, case, what is measured, comparison, target). ``what``: a provider name (its paired ratio to
# fastguide), "step_ratio", "memory" (peak extra per Gram budget) or "floor" (median / roofline floor).
GOALS_CPU = [
    ("W1 loss fwd+bwd: >= 5x faster than naive per-pair", "W1 loss fwd+bwd", "naive", ">=", 5.0),
    (
        "W1 loss fwd+bwd: >= 1.5x faster than careful torch autograd",
        "W1 loss fwd+bwd",
        "torch-careful",
        ">=",
        1.5,
    ),
    ("all-pairs matrix (W3): >= 1.2x faster than pytorch-cka", "W3 matrix fwd", "pytorch-cka", ">=", 1.2),
    (
        "feature route >= 5x faster than the Gram route (n=8192, d=256)",
        "tokens loss fwd+bwd",
        "fastguide-torch:gram-route",
        ">=",
        5.0,
    ),
    ("guided step (W1) <= 1.10x (target step + guide forward)", "W1 guided step", "step_ratio", "<=", 1.10),
    ("guided step (W4) <= 1.10x (target step + guide forward)", "W4 guided step", "step_ratio", "<=", 1.10),
    (
        "loss peak extra memory <= one Gram per layer + 10% (W1 fwd+bwd)",
        "W1 loss fwd+bwd",
        "memory",
        "<=",
        1.10,
    ),
]
GOALS_GPU = [
    ("W1 loss fwd+bwd <= 1.3x the roofline floor", "W1 loss fwd+bwd", "floor", "<=", 1.3),
    ("W3 all-pairs <= 1.5x the roofline floor", "W3 matrix fwd", "floor", "<=", 1.5),
    ("guided step (W1) <= 1.05x (target step + guide forward)", "W1 guided step", "step_ratio", "<=", 1.05),
    ("guided step (W4) <= 1.05x (target step + guide forward)", "W4 guided step", "step_ratio", "<=", 1.05),
]


def _memory(rec: dict) -> tuple[float | None, str]:
    # Allocator level (tensors) on both devices: max_memory_allocated on CUDA, the profiler's
    # allocation events on CPU (cpu_tensor_peak); the CPU resident-set figure goes in the detail.
    tensor = rec.get("peak_tensor_per_gram_budget")
    val = tensor if tensor is not None else rec.get("peak_extra_per_gram_budget")
    if val is None:
        return None, ""
    grads = rec.get("grad_bytes", 0.0)
    got = rec["peak_tensor_bytes"] if tensor is not None else rec["peak_extra_bytes"]
    detail = (
        f"peak extra {(got - grads) / MB:.2f} MB (excluding the {grads / MB:.2f} MB of input "
        f"gradients) vs {rec['gram_bytes'] / MB:.2f} MB of Grams"
    )
    if tensor is not None and rec.get("peak_extra_per_gram_budget") is not None:
        detail += (
            f" (tensors; resident set: {rec['peak_extra_minus_grads_bytes'] / MB:.2f} MB, "
            f"ratio {rec['peak_extra_per_gram_budget']:.2f})"
        )
    return val, detail


def _measure(by: dict, case: str, what: str, rec: dict) -> tuple[float | None, str]:
    if what == "step_ratio":
        detail = ""
        if rec.get("step_ratio_with_grams") is not None:
            detail = f"with Gram GEMMs in the denominator: {rec['step_ratio_with_grams']:.3f}"
        return rec.get("step_ratio"), detail
    if what == "memory":
        return _memory(rec)
    if what == "floor":
        return rec.get("floor_ratio"), ""
    other = by.get((case, what))
    if other is None or other.get("ratio_to_baseline") is None:
        return None, ""
    detail = f"{what} {other['median_ms']:.2f} ms vs fastguide {rec['median_ms']:.2f} ms (medians)"
    return other["ratio_to_baseline"], detail


def evaluate_goals(records: list[dict], device: torch.device) -> list[dict]:
    """The issue's goals, measured from the records (medians of paired ratios)."""
    by = {(r["case"], r["provider"]): r for r in records}
    out = []
    for text, case, what, op, target in GOALS_GPU if device.type == "cuda" else GOALS_CPU:
        # The Triton provider on CUDA, unless it was skipped there (then the torch backend, the baseline).
        rec = by.get((case, "fastguide-triton")) if device.type == "cuda" else None
        if rec is None or "median_ms" not in rec:
            rec = by.get((case, "fastguide-torch"))
        val, detail = None, ""
        if rec is not None and "median_ms" in rec:
            val, detail = _measure(by, case, what, rec)
        met = None if val is None else (val >= target if op == ">=" else val <= target)
        out.append(
            {
                "goal": text,
                "case": case,
                "target": f"{op} {target}",
                "measured": val,
                "met": met,
                "detail": detail,
            }
        )
    return out
