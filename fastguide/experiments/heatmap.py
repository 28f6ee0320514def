"""``python -m fastguide heatmap``: layer-by-layer CKA matrix of two models on a dataset (PNG + JSON).

Models: the built-in ``fcn``, ``resnet``, ``rnn``, ``transformer`` (untrained unless ``train_steps``), or
the user's own as ``module:attr`` (an ``nn.Module`` or a zero-argument factory, importable from the
current directory). Data: ``digits``, ``copy``, ``random:SHAPE`` (Gaussian inputs, e.g. ``random:3x32x32``),
``tokens:VOCAB:LENGTH`` (uniform token ids) or ``module:attr`` (a DataLoader, an iterable of batches, a
Dataset or a tensor, or a zero-argument function returning one). The matrix is :func:`fastguide.compare`'s.
"""

from __future__ import annotations

import importlib
import itertools
import math
import os
import sys
from typing import Any

import torch
from torch import nn

from ..compare import CompareResult, compare, default_input
from . import models, tasks

__all__ = ["run_heatmap", "load_model", "load_data", "SpecError", "BUILTIN_MODELS"]

BUILTIN_MODELS = ("fcn", "resnet", "rnn", "transformer")
_IMAGE, _SEQUENCE = ("fcn", "resnet"), ("rnn", "transformer")
_GENERATED = ("digits", "copy")


class SpecError(ValueError):
    """A bad command-line spec; the message names the argument."""


def load_object(spec: str, arg: str) -> Any:
    """``module:attr`` (attr may be dotted) imported with the current directory on ``sys.path``."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise SpecError(f"{arg} {spec!r}: expected module:attr (e.g. mymodels:Net)")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise SpecError(f"{arg} {spec!r}: cannot import module {mod_name!r} ({e})") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SpecError(
                f"{arg} {spec!r}: {getattr(obj, '__name__', type(obj).__name__)} has no attribute {part!r}"
            )
        obj = getattr(obj, part)
    return obj


def _call0(obj: Any, spec: str, arg: str) -> Any:
    try:
        return obj()
    except TypeError as e:
        raise SpecError(
            f"{arg} {spec!r}: calling it with no arguments failed ({e}); pass a zero-argument factory"
        ) from e


# ------------------------------------------------------------------------------------------ data
def _shape(text: str, spec: str, arg: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise SpecError(f"{arg} {spec!r}: expected positive sizes joined by 'x' (e.g. random:3x32x32)")
    return dims


def _split(x: torch.Tensor, y: torch.Tensor | None, batch_size: int) -> list:
    xs = x.split(batch_size)
    return list(zip(xs, y.split(batch_size), strict=True)) if y is not None else list(xs)


def load_data(spec: str, *, n: int, batch_size: int, seed: int = 0, arg: str = "--data") -> tuple[Any, dict]:
    """The batches of a data spec and what they are (``kind``: image / tokens / other, shape, vocab)."""
    if n < 4:
        raise SpecError(f"--n must be at least 4; got {n}")
    if batch_size < 1:
        raise SpecError(f"--batch-size must be positive; got {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    if spec == "digits":
        d = tasks.digits(n_train=min(n, 1796), seed=seed)
        return _split(d.x_train, d.y_train, batch_size), dict(kind="image", shape=(1, 8, 8), task="digits")
    if spec == "copy":
        task = tasks.CopyPaste(length=12, n_test=n, seed=seed)
        info = dict(kind="tokens", vocab=task.vocab_size, classes=task.num_classes, length=24, task="copy")
        return _split(task.x_test, task.y_test, batch_size), info
    head, _, rest = spec.partition(":")
    if head == "random":
        shape = _shape(rest, spec, arg)
        return _split(torch.randn((n, *shape), generator=gen), None, batch_size), dict(
            kind="image", shape=shape
        )
    if head == "tokens":
        parts = rest.split(":")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SpecError(f"{arg} {spec!r}: expected tokens:VOCAB:LENGTH (e.g. tokens:1000:32)")
        vocab, length = int(parts[0]), int(parts[1])
        x = torch.randint(0, vocab, (n, length), generator=gen)
        return _split(x, None, batch_size), dict(kind="tokens", vocab=vocab, classes=vocab, length=length)
    if ":" not in spec:
        raise SpecError(
            f"{arg} {spec!r}: expected digits, copy, random:SHAPE, tokens:VOCAB:LENGTH or module:attr"
        )
    obj = load_object(spec, arg)
    if callable(obj) and not isinstance(obj, (torch.Tensor, torch.utils.data.DataLoader, nn.Module)):
        obj = _call0(obj, spec, arg)
    if isinstance(obj, torch.Tensor):
        if obj.dim() == 0 or obj.shape[0] < 4:
            raise SpecError(f"{arg} {spec!r}: a tensor of data needs a batch dimension of at least 4 rows")
        return list(obj.split(batch_size)), dict(kind="other")
    if isinstance(obj, torch.utils.data.Dataset) and hasattr(obj, "__getitem__") and hasattr(obj, "__len__"):
        return torch.utils.data.DataLoader(obj, batch_size=batch_size), dict(kind="other")
    if isinstance(obj, (str, bytes)) or not hasattr(obj, "__iter__"):
        raise SpecError(
            f"{arg} {spec!r}: got a {type(obj).__name__}; expected a DataLoader, an iterable of batches, "
            "a Dataset or a tensor (or a zero-argument function returning one)"
        )
    return obj, dict(kind="other")


# ------------------------------------------------------------------------------------------ models
def _builtin(name: str, info: dict) -> nn.Module:
    if name in _IMAGE:
        if info.get("kind") != "image":
            raise SpecError(f"the built-in {name!r} model takes images (--data digits or random:CxHxW)")
        shape = info["shape"]
        if name == "fcn":
            return models.DeepFCN(math.prod(shape), 10, 256, 16)
        if len(shape) != 3:
            raise SpecError(
                f"the built-in 'resnet' takes (C, H, W) images; --data gives examples of shape {shape}"
            )
        return models.SmallResNet(shape[0], 10)
    if info.get("kind") != "tokens":
        raise SpecError(f"the built-in {name!r} model takes token ids (--data copy or tokens:VOCAB:LENGTH)")
    if name == "rnn":
        return models.TanhRNN(info["vocab"], info["classes"])
    return models.CausalTransformer(info["vocab"], info["classes"], max_len=max(64, info["length"]))


def load_model(spec: str, arg: str, info: dict) -> nn.Module:
    """A built-in model (sized for the data) or the user's ``module:attr`` (a module or factory)."""
    if spec in BUILTIN_MODELS:
        return _builtin(spec, info)
    if ":" not in spec:
        raise SpecError(f"{arg} {spec!r}: expected one of {', '.join(BUILTIN_MODELS)} or module:attr")
    obj = load_object(spec, arg)
    if not isinstance(obj, nn.Module):
        if not callable(obj):
            raise SpecError(f"{arg} {spec!r} is not an nn.Module or a factory (got {type(obj).__name__})")
        obj = _call0(obj, spec, arg)
        if not isinstance(obj, nn.Module):
            raise SpecError(f"{arg} {spec!r}: the factory returned a {type(obj).__name__}, not an nn.Module")
    return obj


def _peek_shape(batches: Any, data: str) -> tuple[Any, dict]:
    """Size built-in image models for the user's data from its first batch."""
    it = iter(batches)
    try:
        first = next(it)
    except StopIteration:
        raise SpecError(f"--data {data!r} yielded no batches") from None
    x = default_input(first)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise SpecError(
            f"--data {data!r}: built-in models need float image batches from it (got "
            f"{type(x).__name__} {getattr(x, 'dtype', '')}); built-in sequence models take --data copy or "
            "tokens:VOCAB:LENGTH"
        )
    rest = batches if iter(batches) is not batches else itertools.chain([first], it)
    return rest, dict(kind="image", shape=tuple(x.shape[1:]))


def _layers(spec: str | None, arg: str):
    if spec is None or spec == "auto":
        return "auto"
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise SpecError(f"{arg} {spec!r}: expected 'auto' or comma-separated module names")
    return names


def _train(model: nn.Module, info: dict, steps: int, seed: int, device: torch.device) -> None:
    """The old built-in behaviour: train a model on its task for a few steps (Adam 1e-3, batch 64)."""
    if info.get("task") == "digits":
        data = tasks.digits(n_train=1000, seed=seed)
        it = data.batches(64, torch.Generator().manual_seed(seed))

        def loss_fn(lg, y):
            return nn.functional.cross_entropy(lg, y)
    else:
        task = tasks.CopyPaste(length=12, n_test=4, seed=seed)
        it = task.batches(64, torch.Generator().manual_seed(seed))

        def loss_fn(lg, y):
            return task.loss_and_correct(lg, y)[0]

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    was = model.training
    model.train()
    for _ in range(steps):
        x, y = next(it)
        loss = loss_fn(model(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.train(was)


def _count(k: int, word: str) -> str:
    return f"{k} {word}" + ("" if k == 1 else "es" if word.endswith("ch") else "s")


def run_heatmap(
    a: str = "fcn",
    b: str = "resnet",
    *,
    data: str | None = None,
    n: int = 256,
    batch_size: int = 128,
    layers_a: str | None = "auto",
    layers_b: str | None = "auto",
    estimator: str = "unbiased",
    kernel: str = "linear",
    tokens: str = "flatten",
    train_steps: int = 0,
    max_batches: int | None = None,
    mode: str = "eval",
    seed: int = 0,
    device: str = "cpu",
    out: str = "./fastguide-heatmap",
    progress: bool = True,
    verbose: bool = True,
) -> dict:
    """Compare two models layer by layer; write ``heatmap.json`` (:class:`CompareResult`) and ``heatmap.png``.

    Returns a dict with ``result`` (the :class:`CompareResult`), ``cka`` (the matrix as lists),
    ``layers_a``, ``layers_b``, ``n`` (examples), the options, and the written paths.
    """
    builtin = [s for s in (a, b) if s in BUILTIN_MODELS]
    if data is None:
        if len(builtin) < 2:
            raise SpecError("--data is required with a user model (--a/--b module:attr)")
        if (a in _IMAGE) != (b in _IMAGE):
            raise SpecError(
                f"--a and --b must both be image models (fcn, resnet) or both sequence models (rnn, "
                f"transformer) for a built-in dataset; got {a}, {b} (or pass --data)"
            )
        data = "digits" if a in _IMAGE else "copy"
    if train_steps:
        if len(builtin) < 2 or data not in _GENERATED:
            raise SpecError("--train-steps trains built-in models on their own task (--data digits or copy)")
    batches, info = load_data(data, n=n, batch_size=batch_size, seed=seed)
    if builtin and info["kind"] == "other":
        batches, info = _peek_shape(batches, data)
    dev = torch.device(device)
    torch.manual_seed(seed)
    ma = load_model(a, "--a", info).to(dev)
    mb = load_model(b, "--b", info).to(dev)
    if train_steps:
        for m in (ma, mb):
            _train(m, info, train_steps, seed, dev)
    res: CompareResult = compare(
        ma,
        mb,
        batches,
        layers_a=_layers(layers_a, "--layers-a"),
        layers_b=_layers(layers_b, "--layers-b"),
        estimator=estimator,
        kernel=kernel,
        tokens=tokens,
        max_batches=max_batches,
        mode=mode,
        progress=progress,
    )
    res.metadata.update(
        spec_a=a, spec_b=b, data=data, batch_size=batch_size, seed=seed, train_steps=train_steps
    )
    os.makedirs(out, exist_ok=True)
    json_path, png_path = os.path.join(out, "heatmap.json"), os.path.join(out, "heatmap.png")
    res.save(json_path)
    label = lambda s, m: s if s in BUILTIN_MODELS else type(m).__name__  # noqa: E731
    res.plot(
        png_path,
        title=f"CKA ({estimator}) of {label(a, ma)} vs {label(b, mb)} on {data}"
        + (f" (both trained {train_steps} steps)" if train_steps else "")
        + f": {res.metadata['examples']} examples, {_count(res.metadata['batches'], 'batch')}",
    )
    if verbose:
        A, B = res.shape
        print(
            f"{A} x {B} CKA matrix ({type(ma).__name__} vs {type(mb).__name__}, {res.metadata['examples']} "
            f"examples in {_count(res.metadata['batches'], 'batch')}, {estimator} estimator)"
        )
        if A <= 24:
            w = max(len(x) for x in res.names_a)
            print(f"{'layer of a':<{w}}  best match in b (CKA)")
            for name_a, name_b, v in res.best_matches():
                print(f"{name_a:<{w}}  {name_b} ({v:.3f})")
        print(f"wrote {json_path} and {png_path}")
    return dict(
        result=res,
        model_a=a,
        model_b=b,
        layers_a=res.names_a,
        layers_b=res.names_b,
        n=res.metadata["examples"],
        data=data,
        estimator=estimator,
        kernel=kernel,
        train_steps=train_steps,
        seed=seed,
        cka=res.matrix.tolist(),
        json=json_path,
        png=png_path,
    )
