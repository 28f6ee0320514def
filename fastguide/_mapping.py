"""Layer selection for ``Guidance(layers="auto")``: module types, Hugging Face blocks, pair mapping."""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "AUTO_TYPES",
    "auto_pairs",
    "auto_candidates",
    "first_tensor",
    "batch_first",
    "resolve_name",
    "resolve_pairs",
    "explicit_pairs",
    "make_mapping",
    "auto_mapping",
]

#: Module types that ``layers="auto"`` hooks (the paper's code), in execution order; the last is dropped.
#: Hugging Face's ``Conv1D`` (GPT-2's Linear with transposed weights) counts as well, matched by class name
#: (:func:`is_auto_module`) so that transformers stays optional.
AUTO_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv2d,
    nn.Linear,
    nn.AdaptiveAvgPool2d,
    nn.RNN,
    nn.LSTM,
    nn.GRU,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.LayerNorm,
    nn.MultiheadAttention,
)

# Modules whose 3-D output is (T, B, D) unless they were built with batch_first=True.
_SEQ_FIRST_TYPES = (nn.RNNBase, nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)

# DDP / FSDP / torch.compile wrappers prefix the names of the modules they wrap.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")


def _from_transformers(cls: type) -> bool:
    return cls.__module__.split(".", 1)[0] == "transformers"


def is_auto_module(m: nn.Module) -> bool:
    """Whether ``m`` is one of :data:`AUTO_TYPES` or Hugging Face's ``Conv1D``."""
    return isinstance(m, AUTO_TYPES) or (type(m).__name__ == "Conv1D" and _from_transformers(type(m)))


def is_hf_model(m: nn.Module) -> bool:
    """Whether ``m`` is a Hugging Face ``PreTrainedModel`` (by class name: no transformers import)."""
    return any(c.__name__ == "PreTrainedModel" and _from_transformers(c) for c in type(m).__mro__)


def _block_lists(model: nn.Module) -> list[str]:
    """Names of the outermost ``nn.ModuleList``s of a Hugging Face model whose elements are all of one
    class that is not a torch.nn building block: the model's stacks of transformer blocks
    (``transformer.h``, ``encoder.layer``, ``model.layers``, T5's ``encoder.block`` and ``decoder.block``)."""
    found: list[str] = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        if any(name.startswith(f + ".") for f in found):
            continue
        classes = {type(b) for b in m}
        if len(classes) == 1 and not next(iter(classes)).__module__.startswith("torch."):
            found.append(name)
    return found


def auto_candidates(model: nn.Module) -> list[str]:
    """Names of the modules ``layers="auto"`` hooks in ``model`` (in registration order; the mapping
    uses execution order).

    Plain torch models: every module of :data:`AUTO_TYPES` (and ``Conv1D``), as in the paper's code.
    Inside a Hugging Face ``PreTrainedModel`` that keeps its transformer blocks in a ``ModuleList``, the
    blocks' outputs replace the modules inside them (the residual stream that ``output_hidden_states``
    reports; internal projections differ between architectures, e.g. GPT-2's fused ``c_attn`` vs BERT's
    separate query/key/value), and auto-type modules outside the blocks stay (embedding LayerNorm,
    final norm, pooler, head).
    """
    mods = dict(model.named_modules())
    blocks: list[str] = []  # names of block modules (elements of a block stack)
    roots: list[str] = []  # outermost Hugging Face models (GPT2LMHeadModel holds a GPT2Model)
    for name, m in mods.items():
        if not is_hf_model(m) or any(r == "" or name.startswith(r + ".") for r in roots):
            continue
        roots.append(name)
        pre = f"{name}." if name else ""
        for lst in _block_lists(m):
            blocks += [f"{pre}{lst}.{k}" for k in range(len(m.get_submodule(lst)))]
    inside = tuple(b + "." for b in blocks)
    out = []
    for name, m in mods.items():
        if name in blocks:
            out.append(name)
        elif is_auto_module(m) and not name.startswith(inside):
            out.append(name)
    return out


def first_tensor(out: Any) -> torch.Tensor | None:
    """The first tensor in a module output: the tensor itself, the first tensor of a tuple/list
    (RNN ``(output, h)``, attention ``(out, weights)``), of a mapping or of a dataclass (Hugging Face
    model outputs). ``None`` if there is none."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, nn.utils.rnn.PackedSequence):
        raise TypeError(
            "PackedSequence outputs are not supported: their data rows are tokens of varying "
            "sequences, not examples; hook a module that returns a padded (B, T, D) tensor"
        )
    if isinstance(out, Mapping):
        items: Iterable = out.values()
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        items = (getattr(out, f.name) for f in dataclasses.fields(out))
    elif isinstance(out, (tuple, list)):
        items = out
    else:
        return None
    for item in items:
        t = first_tensor(item)
        if t is not None:
            return t
    return None


def batch_first(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """(T, B, D) sequence outputs of modules built without ``batch_first`` become (B, T, D) views."""
    if isinstance(module, _SEQ_FIRST_TYPES) and not getattr(module, "batch_first", False) and t.dim() == 3:
        return t.transpose(0, 1)
    return t


def auto_pairs(n_target: int, n_guide: int) -> list[tuple[int, int]]:
    """Evenly spaced one-to-one mapping of the shallower network's layers over the deeper one's.

    Layer ``i`` of the shallower network maps to ``round(i * (N_deep - 1) / (N_shallow - 1))`` of the
    deeper one (first and last always paired); every pair appears once. Returns (target, guide) indices.
    """
    if n_target < 1 or n_guide < 1:
        raise ValueError(f"need at least one layer on each side; got {n_target} target, {n_guide} guide")
    shallow, deep = min(n_target, n_guide), max(n_target, n_guide)
    if shallow == 1:
        mapped = [0]
    else:
        # Python's round() is round-half-even; floor(x + 0.5) is the usual half-up rounding.
        mapped = [int(math.floor(i * (deep - 1) / (shallow - 1) + 0.5)) for i in range(shallow)]
    if n_target <= n_guide:
        return [(i, j) for i, j in enumerate(mapped)]
    return [(i, j) for j, i in enumerate(mapped)]


def resolve_name(name: str, modules: Mapping[str, nn.Module], which: str) -> str:
    """``name`` as a key of ``modules``, also when a DDP/FSDP/compile wrapper prefixed it."""
    if not isinstance(name, str):
        raise TypeError(f"{which} module names in layers must be strings; got {type(name).__name__}")
    if name in modules:
        return name
    for prefix in WRAPPER_PREFIXES:
        if prefix + name in modules:
            return prefix + name
    close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown {which} module name {name!r} in layers{hint}")


def resolve_pairs(
    pairs: Iterable[tuple[str, str]], t_modules: Mapping[str, nn.Module], g_modules: Mapping[str, nn.Module]
) -> list[tuple[str, str]]:
    """``(target_name, guide_name)`` pairs with each name resolved by :func:`resolve_name`."""
    return [(resolve_name(t, t_modules, "target"), resolve_name(g, g_modules, "guide")) for t, g in pairs]


def explicit_pairs(
    layers: Mapping[str, str] | Iterable[tuple[str, str]],
    t_modules: Mapping[str, nn.Module],
    g_modules: Mapping[str, nn.Module],
) -> list[tuple[str, str]]:
    """The resolved pairs of a ``{target_name: guide_name}`` dict or a list of pairs (``layers=``)."""
    items = list(layers.items()) if isinstance(layers, Mapping) else [tuple(p) for p in layers]
    if not items:
        raise ValueError("layers is empty")

    def checked():  # lazily, so each entry is checked just before its names are resolved
        for item in items:
            if len(item) != 2:
                raise ValueError(f"layers entries must be (target_name, guide_name); got {item!r}")
            yield item

    return resolve_pairs(checked(), t_modules, g_modules)


def make_mapping(pairs: list[tuple[str, str]]) -> tuple[list[str], list[str], list[tuple[int, int]]]:
    """A Guidance mapping: target names and guide names (each once, first-seen order) and the index pairs."""
    t_names = list(dict.fromkeys(t for t, _ in pairs))
    g_names = list(dict.fromkeys(g for _, g in pairs))
    return t_names, g_names, [(t_names.index(t), g_names.index(g)) for t, g in pairs]


def auto_mapping(t_order: list[str], g_order: list[str]):
    """The ``layers="auto"`` mapping of two execution orders: the last module (the logits) of each side is
    dropped and the rest paired by :func:`auto_pairs`."""
    if len(t_order) < 2:
        raise RuntimeError(
            f"layers='auto': the target ran {len(t_order)} hookable module(s) ({t_order}); need at least "
            "two (the last one, the logits, is dropped)"
        )
    if len(g_order) < 2:
        raise RuntimeError(
            f"layers='auto': the guide ran {len(g_order)} hookable module(s) ({g_order}); need at least two"
        )
    t_order, g_order = t_order[:-1], g_order[:-1]
    return make_mapping([(t_order[i], g_order[j]) for i, j in auto_pairs(len(t_order), len(g_order))])
