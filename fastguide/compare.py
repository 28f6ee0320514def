"""Layer-by-layer CKA of two models over a dataset: :func:`compare` and its :class:`CompareResult`.

::

    result = fastguide.compare(resnet, fcn, loader)        # all layer pairs, minibatch CKA
    result.matrix                                          # (A, B) float64
    result.plot("heatmap.png"); result.save("heatmap.json")

Each hooked module's output is reduced to its :class:`fastguide.LayerStats` (one n x n matrix) inside
its forward hook, so activations are freed as the forward goes and memory does not grow with the
number of batches; the per-batch statistics go to :meth:`fastguide.MinibatchCKA.update_stats`.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# fastguide/__init__.py sets __version__ before it imports this module.
from . import __version__, _plot
from . import _compare_hooks as hk
from ._compare_hooks import default_input
from ._guide_side import _model_device, as_args
from ._saved import SavedJSON, check_header
from ._utils import progress_bar
from ._validate import GROUP_TOKENS, min_examples
from .metric import MinibatchCKA

__all__ = ["compare", "CompareResult", "default_input"]

_FORMAT = "fastguide.CompareResult"
_FORMAT_VERSION = 1
_MODES = ("eval", "train", None)

LayerSpec = str | Sequence[str] | Callable[[str, nn.Module], bool]


class CompareResult(SavedJSON):
    """The CKA matrix of :func:`compare`: ``matrix`` (A, B) float64 on the CPU, rows ``names_a`` (layers of
    model_a), columns ``names_b``, and ``metadata`` (estimator, kernel, tokens, batches, examples, model
    class names, fastguide version, ...). :meth:`save` / :meth:`load` round-trip it exactly as JSON."""

    def __init__(self, matrix: torch.Tensor, names_a: Sequence[str], names_b: Sequence[str], metadata=None):
        matrix = torch.as_tensor(matrix, dtype=torch.float64).detach().cpu()
        names_a, names_b = [str(n) for n in names_a], [str(n) for n in names_b]
        if matrix.dim() != 2 or tuple(matrix.shape) != (len(names_a), len(names_b)):
            raise ValueError(
                f"matrix of shape {tuple(matrix.shape)} does not fit {len(names_a)} names_a x "
                f"{len(names_b)} names_b"
            )
        self.matrix = matrix
        self.names_a = names_a
        self.names_b = names_b
        self.metadata: dict[str, Any] = dict(metadata or {})

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.matrix.shape)

    def __getitem__(self, key: tuple[str, str]) -> float:
        """``result["layer_of_a", "layer_of_b"]``: one CKA value."""
        a, b = key
        return float(self.matrix[self.names_a.index(a), self.names_b.index(b)])

    def best_matches(self) -> list[tuple[str, str, float]]:
        """For each layer of model_a, the layer of model_b with the highest CKA: ``(name_a, name_b, cka)``."""
        idx = self.matrix.argmax(dim=1).tolist()
        return [
            (a, self.names_b[j], float(self.matrix[i, j]))
            for i, (a, j) in enumerate(zip(self.names_a, idx, strict=True))
        ]

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "names_a": list(self.names_a),
            "names_b": list(self.names_b),
            # Python floats are float64 and json writes their repr: the round trip is exact.
            "matrix": self.matrix.tolist(),
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> CompareResult:
        check_header(d, _FORMAT, _FORMAT_VERSION, "CompareResult")
        for key in ("names_a", "names_b", "matrix"):
            if not isinstance(d.get(key), list):
                raise ValueError(f"saved CompareResult: {key} must be a list")
        A, B = len(d["names_a"]), len(d["names_b"])
        rows = d["matrix"]
        if len(rows) != A or any(not isinstance(r, list) or len(r) != B for r in rows):
            raise ValueError(f"saved CompareResult: matrix must be {A} rows of {B} numbers")
        matrix = torch.tensor(rows, dtype=torch.float64).reshape(A, B)
        return cls(matrix, d["names_a"], d["names_b"], d.get("metadata") or {})

    # ------------------------------------------------------------------ picture
    def plot(
        self,
        path: str | os.PathLike | None = None,
        *,
        ax: Any = None,
        title: str | None = None,
        cmap: str = "magma",
        vmin: float = 0.0,
        vmax: float = 1.0,
        max_ticks: int = 40,
        annotate: bool | None = None,
        dpi: int = 120,
    ):
        """A heatmap of the matrix (rows: model_a's layers, columns: model_b's), with a colour bar.

        Readable at 50+ layers: at most ``max_ticks`` labels per axis (every k-th layer, the last always
        shown), label size shrinking with the count, and a figure growing with the matrix up to 16 in.
        ``annotate`` writes each value into its cell (default: when the matrix has at most 12 x 12
        entries). Draws into ``ax`` when given, else a new figure made without pyplot (no GUI backend
        is needed or switched). Saves to ``path`` when given; returns the figure.
        """
        A, B = self.shape
        size = (min(16.0, 3.2 + 0.2 * B), min(16.0, 2.6 + 0.2 * A))
        fig, ax = _plot.new_axes(ax, size)
        im = ax.imshow(
            self.matrix.numpy(), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest"
        )
        ty, tx = _plot.tick_positions(A, max_ticks), _plot.tick_positions(B, max_ticks)
        ax.set_yticks(ty, [self.names_a[i] for i in ty], fontsize=_plot.label_fontsize(len(ty)))
        ax.set_xticks(tx, [self.names_b[i] for i in tx], fontsize=_plot.label_fontsize(len(tx)), rotation=90)
        md = self.metadata
        ax.set_ylabel(f"{md.get('model_a', 'model_a')} layers")
        ax.set_xlabel(f"{md.get('model_b', 'model_b')} layers")
        if title is None:
            title = f"CKA ({md.get('estimator', '?')}, {md.get('kernel', 'linear')})"
            if "examples" in md:
                b = md.get("batches", "?")
                title += f", {md['examples']} examples in {b} batch{'' if b == 1 else 'es'}"
        ax.set_title(title, fontsize=10)
        if annotate is None:
            annotate = A <= 12 and B <= 12
        if annotate:
            for i in range(A):
                for j in range(B):
                    v = float(self.matrix[i, j])
                    ax.text(
                        j,
                        i,
                        f"{v:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="black" if v > 0.6 * vmax + 0.4 * vmin else "white",
                    )
        fig.colorbar(im, ax=ax, label="CKA", fraction=0.046, pad=0.03)
        _plot.save(fig, path, dpi)
        return fig

    def __repr__(self) -> str:
        md = self.metadata
        return (
            f"CompareResult({self.shape[0]} x {self.shape[1]} layers, estimator={md.get('estimator')!r}, "
            f"examples={md.get('examples')}, batches={md.get('batches')})"
        )


# ---------------------------------------------------------------------------------------- compare
@torch.no_grad()
def compare(
    model_a: nn.Module,
    model_b: nn.Module | None,
    data: Iterable,
    *,
    layers_a: LayerSpec = "auto",
    layers_b: LayerSpec = "auto",
    estimator: str = "unbiased",
    kernel: str = "linear",
    sigma: float | None = None,
    tokens: str = "flatten",
    backend: str = "auto",
    input_fn: Callable[[Any], Any] | None = None,
    input_fn_b: Callable[[Any], Any] | None = None,
    mode: str | None = "eval",
    max_batches: int | None = None,
    progress: bool = True,
    sync: bool = True,
    process_group: Any = None,
) -> CompareResult:
    """Minibatch CKA (Nguyen et al. 2021) of every layer of ``model_a`` with every layer of ``model_b``
    over the batches of ``data``; a :class:`CompareResult` with the (A, B) float64 matrix.

    Per batch, each model runs one forward under ``torch.no_grad()`` (one forward in all when
    ``model_b`` is ``model_a`` or None and the inputs are the same); forward hooks reduce each selected
    layer's output to its centred Gram statistics on the spot, and the batch's HSICs are added to
    float64 sums (:meth:`fastguide.MinibatchCKA.update_stats`, each batch with its own U-statistic
    normaliser, so a short last batch counts as it should). Memory: the models, one activation at a
    time and one n x n matrix per selected layer of the current batch, whatever the number of
    batches. Batches with fewer examples than the estimator needs (4 unbiased, 2 biased) are skipped
    with a warning (``metadata["skipped_batches"]``).

    Args:
        model_a, model_b: any ``nn.Module``; ``model_b=None`` compares model_a with itself. Each keeps
            its device (the models may be on different devices): its inputs are moved to its first
            parameter's device and model_b's per-layer statistics to model_a's (n x n each).
        data: a DataLoader or any iterable of batches. The model input of a batch is
            ``input_fn(batch)`` (default :func:`default_input`: a tensor itself, the first element of a
            tuple/list such as ``(x, y)``, a dict as keyword arguments); an input that is a tuple is
            passed as positional arguments, a dict as keywords. ``input_fn_b`` gives model_b another
            input (then the same model runs twice, once per input).
        layers_a, layers_b: ``"auto"`` (the module types of ``Guidance(layers="auto")``, e.g. Linear,
            Conv2d, RNN, LayerNorm, transformer blocks of Hugging Face models, in execution order,
            *including* the last one: for analysis the logits are of interest, while Guidance drops
            them), a list of module names (in that order; DDP's ``module.`` prefix may be omitted), or
            a predicate ``(name, module) -> bool`` (execution order). A module that runs several times
            in one forward counts with its first call (a warning says which).
        estimator, kernel, sigma, tokens, backend: as in :class:`fastguide.MinibatchCKA` (``tokens``:
            how (B, T, D) outputs become examples: ``"flatten"``, ``"mean"`` or ``"samples"``).
        mode: ``"eval"`` (default) or ``"train"`` puts both models in that mode for the pass;
            ``None`` leaves them as they are. Every module's mode is restored afterwards, and in train
            mode also the buffers (BatchNorm statistics), also when an exception ends the pass; the
            hooks are always removed.
        max_batches: stop after this many batches.
        progress: a tqdm progress bar (if tqdm is installed; rank 0 only under torch.distributed).
        sync, process_group: under ``torch.distributed``, each rank passes its own shard of the data
            and the sums are all-reduced at the end (:meth:`fastguide.MinibatchCKA.sync`, plus one
            small all-reduce of the counts), so every rank returns the global result. Each rank needs
            at least one batch. Pass unwrapped modules (``ddp.module``): a DDP wrapper may broadcast
            buffers in every forward, which hangs when ranks hold different numbers of batches.
    """
    _check_args(model_a, model_b, data, mode, tokens, max_batches, input_fn, input_fn_b)
    same = model_b is None or model_b is model_a
    model_b = model_a if model_b is None else model_b
    metric = MinibatchCKA(estimator, kernel, sigma=sigma, backend=backend, tokens=tokens)
    opts = dict(estimator=estimator, kernel=kernel, sigma=sigma, tokens=tokens, backend=backend)
    spec_a = hk.candidates(model_a, layers_a, "layers_a")
    spec_b = hk.candidates(model_b, layers_b, "layers_b")
    fn_a = input_fn or default_input
    fn_b = input_fn_b or fn_a
    one_forward = same and input_fn_b is None
    distributed, world, rank = hk.dist_info(process_group)

    states = [hk.module_state(model_a, mode)] + ([] if same else [hk.module_state(model_b, mode)])
    sides: list[hk.Side] = []
    bar = None
    try:
        for m in (model_a,) if same else (model_a, model_b):
            if mode is not None:
                m.train(mode == "train")
        (names_a, explicit_a), (names_b, explicit_b) = spec_a, spec_b
        must_a = set(names_a) if explicit_a else set()
        must_b = set(names_b) if explicit_b else set()
        # Each side joins ``sides`` as soon as it holds hooks, so the finally block removes them.
        if one_forward:
            both = list(dict.fromkeys(names_a + names_b))
            sides.append(hk.Side(model_a, "model_a", both, must_a | must_b, opts))
            runs = [(sides[0], model_a, fn_a, _model_device(model_a))]
        else:
            sides.append(hk.Side(model_a, "model_a", names_a, must_a, opts))
            sides.append(hk.Side(model_b, "model_b", names_b, must_b, opts))
            runs = [
                (sides[0], model_a, fn_a, _model_device(model_a)),
                (sides[1], model_b, fn_b, _model_device(model_b)),
            ]
        total = len(data) if hasattr(data, "__len__") else None
        if total is not None and max_batches is not None:
            total = min(total, max_batches)
        bar = progress_bar(total, progress and rank == 0, "compare", "batch", leave=False)
        final, skipped = _run(data, runs, metric, spec_a, spec_b, max_batches, bar, tokens)
        multi = sorted(set().union(*(s.multi for s in sides)) & set(final[0] + final[1]))
        if multi:
            warnings.warn(
                f"fastguide.compare: module(s) {multi} ran several times in one forward; their first call "
                "is used",
                stacklevel=3,
            )
    finally:
        for s in sides:
            s.close()
        for st in states:
            hk.restore(st)
        if bar is not None:
            bar.close()

    counts = [metric.batches, metric.examples, skipped]
    if distributed and world > 1 and sync:
        counts = _sync(metric, counts, process_group)
    if counts[2]:
        warnings.warn(
            f"fastguide.compare: skipped {counts[2]} batch(es) with fewer than {min_examples(estimator)} "
            f"examples (the {estimator} estimator's minimum)",
            stacklevel=3,
        )
    if metric.cross is None:
        raise ValueError(
            f"no batch had the {min_examples(estimator)} examples the {estimator} estimator needs"
        )
    metadata = dict(
        estimator=estimator,
        kernel=kernel,
        sigma=sigma,
        tokens=tokens,
        batches=counts[0],
        examples=counts[1],
        skipped_batches=counts[2],
        model_a=type(model_a).__name__,
        model_b=type(model_b).__name__,
        same_model=same,
        forwards_per_batch=len(runs),
        mode=mode,
        world_size=world if sync else 1,
        fastguide=__version__,
        torch=str(torch.__version__),
    )
    return CompareResult(metric.compute().cpu(), final[0], final[1], metadata)


def _run(data, runs, metric: MinibatchCKA, spec_a, spec_b, max_batches, bar, tokens: str):
    """The loop over batches: forwards (statistics made in the hooks), then one metric update."""
    side_a, side_b = runs[0][0], runs[-1][0]
    symmetric = len(runs) == 1 and spec_a[0] == spec_b[0]
    final = None
    skipped = 0
    for batch in data if max_batches is None else itertools.islice(data, max_batches):
        for side, model, fn, dev in runs:
            args, kwargs = as_args(hk.to_device(fn(batch), dev))
            side.begin()
            try:
                model(*args, **kwargs)
            finally:
                side.end()
        if final is None:
            final = (
                hk.final_names(side_a, *spec_a, "layers_a"),
                hk.final_names(side_b, *spec_b, "layers_b"),
            )
            symmetric = symmetric and final[0] == final[1]
        if bar is not None:
            bar.update(1)
        if side_a.small is not None or side_b.small is not None:
            skipped += 1
            continue
        st_a = hk.batch_stats(side_a, final[0], "model_a")
        st_b = hk.batch_stats(side_b, final[1], "model_b")
        side_a.stats = side_b.stats = {}
        hk.check_n(st_a, st_b, final[0], final[1], tokens)
        dev = st_a[0].C.device
        st_b = [st if st.C.device == dev else st.to(dev) for st in st_b]
        metric.update_stats(st_a, None if symmetric else st_b)
        del st_a, st_b
    if final is None:
        raise ValueError("data yielded no batches")
    return final, skipped


def _sync(metric: MinibatchCKA, counts: list[int], group) -> list[int]:
    if metric.cross is None:
        raise RuntimeError("compare: this rank had no batch with enough examples; every rank needs one")
    metric.sync(group)
    c = torch.tensor(counts, dtype=torch.int64, device=metric.cross.device)
    dist.all_reduce(c, group=group)
    return c.tolist()


def _check_args(model_a, model_b, data, mode, tokens, max_batches, input_fn, input_fn_b) -> None:
    if not isinstance(model_a, nn.Module) or not (model_b is None or isinstance(model_b, nn.Module)):
        raise TypeError("model_a and model_b must be nn.Module instances (model_b may be None)")
    if mode not in _MODES:
        raise ValueError(f"mode must be 'eval', 'train' or None; got {mode!r}")
    if tokens in GROUP_TOKENS:
        raise ValueError(f"compare does not support tokens={tokens!r}; use 'flatten', 'mean' or 'samples'")
    if max_batches is not None and (
        not isinstance(max_batches, int) or isinstance(max_batches, bool) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be None or a positive int; got {max_batches!r}")
    for name, fn in (("input_fn", input_fn), ("input_fn_b", input_fn_b)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be a callable batch -> model input; got {type(fn).__name__}")
    if isinstance(data, (torch.Tensor, str, bytes)) or not isinstance(data, Iterable):
        hint = (
            " (split a tensor into batches, e.g. x.split(batch_size))"
            if isinstance(data, torch.Tensor)
            else ""
        )
        raise TypeError(
            f"data must be a DataLoader or an iterable of batches; got {type(data).__name__}{hint}"
        )
