"""``python -m fastguide guidability``: how easily one network guides another, over the demo zoo.

For each target (a deep BatchNorm FCN on scikit-learn's digits; a tanh RNN and a causal transformer on
copy-paste) and each untrained guide of the same modality (small ResNet and a shallow FCN for images;
transformer and RNN for sequences), a short guided run (task loss + 1.0 * sum_pairs (1 - CKA), biased
CKA per minibatch, the paper's loss) next to the unguided baseline of the same target initialisation
and data order. Reported per (target, guide), mean +- std over seeds: test loss and accuracy, and the
alignment, i.e. the mean over the guided layer pairs of the dataset-level (unbiased minibatch) CKA
between target and guide on the held-out set (:func:`fastguide.compare`), at initialisation, after
unguided training and after guided training. Writes ``guidability.json``, ``guidability.md`` and
``guidability.png``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from .._mapping import auto_pairs
from .._plot import matplotlib_figure
from .._utils import progress_bar
from ..compare import compare
from ..guidance import Guidance
from . import models, tasks
from .runner import code_version, default_workers, machine_line, render_table, run_jobs

TARGETS = ("fcn", "rnn", "transformer")
GUIDES = {"fcn": ("resnet", "fcn"), "rnn": ("transformer", "rnn"), "transformer": ("rnn", "transformer")}
TASK_OF = {"fcn": "digits", "rnn": "copy", "transformer": "copy"}
_GUIDE_IDS = {"resnet": 11, "fcn": 12, "rnn": 13, "transformer": 14}
LABELS = {"fcn": "deep FCN", "rnn": "tanh RNN", "transformer": "transformer"}
GUIDE_LABELS = {
    "resnet": "small ResNet",
    "fcn": "shallow FCN",
    "rnn": "tanh RNN",
    "transformer": "transformer",
}


@dataclass
class Config:
    """Sizes of one guidability run (per task: ``digits`` and ``copy``)."""

    steps: dict[str, int] = field(default_factory=lambda: dict(digits=300, copy=300))
    batch_size: int = 64
    lr: float = 1e-3
    weight: float = 1.0
    record_points: int = 15
    align_examples: int = 2048  # held-out examples the alignment is measured on (at most the test set)
    digits: dict[str, Any] = field(
        default_factory=lambda: dict(n_train=100, depth=24, hidden=128, dropout=0.1, guide_depth=3)
    )
    copy: dict[str, Any] = field(
        default_factory=lambda: dict(length=10, symbols=8, hidden=128, layers=4, d_model=64, n_test=256)
    )


def default_config(quick: bool = False, steps: int | None = None) -> Config:
    cfg = Config()
    if quick:
        cfg = replace(
            cfg,
            steps=dict(digits=30, copy=30),
            record_points=6,
            align_examples=256,
            digits=dict(n_train=100, depth=4, hidden=64, dropout=0.0, guide_depth=2),
            copy=dict(length=6, symbols=8, hidden=32, layers=2, d_model=32, n_test=128),
        )
    if steps is not None:
        if steps < 1:
            raise ValueError(f"--steps must be positive; got {steps}")
        cfg = replace(cfg, steps=dict(digits=steps, copy=steps))
    return cfg


# ---------------------------------------------------------------------------------------------- jobs
def _task(name: str, cfg: Config, seed: int) -> dict:
    """Data, model factories, loss, layer names of one task."""
    if name == "digits":
        p = cfg.digits
        data = tasks.digits(n_train=p["n_train"], seed=seed)
        make = {
            "fcn": lambda: models.DeepFCN(data.in_features, 10, p["hidden"], p["depth"], p["dropout"]),
            "resnet": lambda: models.SmallResNet(1, 10, (16, 32, 64), 1),
            "fcn_guide": lambda: models.DeepFCN(data.in_features, 10, 256, p["guide_depth"]),
        }

        def loss_correct(logits, y):
            return F.cross_entropy(logits, y), (logits.argmax(-1) == y).sum()

        return dict(
            make=make,
            loss_correct=loss_correct,
            count=lambda y: y.shape[0],
            batches=data.batches,
            test=(data.x_test, data.y_test),
            example=data.x_train[: cfg.batch_size],
            names=None,  # layers="auto"
            chance=0.1,
        )
    p = cfg.copy
    task = tasks.CopyPaste(p["length"], p["symbols"], n_test=p["n_test"], seed=seed)
    max_len = 4 * p["length"] + 4
    make = {
        "rnn": lambda: models.TanhRNN(task.vocab_size, task.num_classes, p["hidden"], p["layers"]),
        "transformer": lambda: models.CausalTransformer(
            task.vocab_size, task.num_classes, p["d_model"], p["layers"], max_len=max_len
        ),
    }
    names = {
        "rnn": [f"rnns.{i}" for i in range(p["layers"])],
        "transformer": [f"blocks.{i}" for i in range(p["layers"])],
    }
    return dict(
        make=make,
        loss_correct=task.loss_and_correct,
        count=task.count,
        batches=task.batches,
        test=(task.x_test, task.y_test),
        example=task.x_test[: cfg.batch_size],
        names=names,
        chance=task.chance,
    )


def _model(t: dict, name: str, role: str, seed: int):
    key = "fcn_guide" if (role == "guide" and name == "fcn") else name
    torch.manual_seed(1_000 * seed + (1 if role == "target" else _GUIDE_IDS[name]))
    return t["make"][key]()


def _layers(t: dict, target: str, guide: str):
    if t["names"] is None:
        return "auto"
    tn, gn = t["names"][target], t["names"][guide]
    return [(tn[i], gn[j]) for i, j in auto_pairs(len(tn), len(gn))]


def _alignment(target, guide, pairs, t: dict, cfg: Config) -> float:
    """Mean over the guided pairs of the held-out minibatch CKA between target and guide."""
    x = t["test"][0][: cfg.align_examples]
    batches = [xb for xb in x.split(256) if xb.shape[0] >= 4]
    tn = list(dict.fromkeys(a for a, _ in pairs))
    gn = list(dict.fromkeys(b for _, b in pairs))
    res = compare(target, guide, batches, layers_a=tn, layers_b=gn, progress=False)
    vals = [res.matrix[tn.index(a), gn.index(b)] for a, b in pairs]
    return float(torch.stack(vals).mean())


def _pairs_of(target, guide, t: dict, tname: str, gname: str, device) -> list[tuple[str, str]]:
    with Guidance(target, guide, layers=_layers(t, tname, gname), example=t["example"].to(device)) as g:
        return g.pairs


def run_job(job: dict) -> dict:
    """One (target, guide or None, seed) run. Top level, for spawned workers."""
    torch.set_num_threads(job.get("threads", 1))
    cfg = Config(**job["config"])
    tname, gname, seed = job["target"], job["guide"], job["seed"]
    device = torch.device(job.get("device", "cpu"))
    t0 = time.perf_counter()
    t = _task(TASK_OF[tname], cfg, seed)
    steps = cfg.steps[TASK_OF[tname]]
    target = _model(t, tname, "target", seed).to(device)
    guides = {g: _model(t, g, "guide", seed).to(device) for g in ([gname] if gname else GUIDES[tname])}
    pairs = {g: _pairs_of(target, m, t, tname, g, device) for g, m in guides.items()}
    align_init = {g: _alignment(target, m, pairs[g], t, cfg) for g, m in guides.items()}
    guidance = None
    if gname is not None:
        guidance = Guidance(
            target,
            guides[gname],
            layers=pairs[gname],
            weight=cfg.weight,
            estimator="biased",
            record_every=max(1, steps // cfg.record_points),
        )
    torch.manual_seed(1_000 * seed + 5)
    opt = torch.optim.Adam(target.parameters(), lr=cfg.lr)
    it = t["batches"](cfg.batch_size, torch.Generator().manual_seed(50_000 + seed))
    target.train()
    for _ in range(steps):
        x, y = next(it)
        x, y = x.to(device), y.to(device)
        loss, _ = t["loss_correct"](target(x), y)
        if guidance is not None:
            loss = loss + guidance.loss(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    test_loss, test_acc = tasks.evaluate(target, t["loss_correct"], t["count"], t["test"], device)
    out = dict(
        target=tname,
        guide=gname,
        seed=seed,
        task=TASK_OF[tname],
        steps=steps,
        test_loss=test_loss,
        test_acc=test_acc,
        chance=t["chance"],
        pairs={g: [list(p) for p in ps] for g, ps in pairs.items()},
        align_init=align_init,
        align_final={g: _alignment(target, m, pairs[g], t, cfg) for g, m in guides.items()},
    )
    if guidance is not None:
        h = guidance.history
        out["history"] = dict(steps=h.steps, mean_cka=h.mean().tolist())
        guidance.close()
    out["seconds"] = time.perf_counter() - t0
    return out


# -------------------------------------------------------------------------------------------- report
def _mean_std(vals: list[float]) -> tuple[float, float]:
    v = torch.tensor(vals, dtype=torch.float64)
    return float(v.mean()), float(v.std()) if len(vals) > 1 else 0.0


def summarize(runs: list[dict], targets: list[str]) -> list[dict]:
    """One row per (target, guide or unguided): means and stds over seeds, pairwise vs the baseline."""
    rows = []
    for tname in targets:
        base = {r["seed"]: r for r in runs if r["target"] == tname and r["guide"] is None}
        for gname in (None, *GUIDES[tname]):
            rs = sorted(
                (r for r in runs if r["target"] == tname and r["guide"] == gname), key=lambda r: r["seed"]
            )
            if not rs:
                continue
            row: dict[str, Any] = dict(target=tname, guide=gname, task=TASK_OF[tname], seeds=len(rs))
            for k in ("test_acc", "test_loss"):
                row[k], row[k + "_std"] = _mean_std([r[k] for r in rs])
            row["chance"] = rs[0]["chance"]
            if gname is not None:
                row["align_init"], row["align_init_std"] = _mean_std([r["align_init"][gname] for r in rs])
                row["align_guided"], row["align_guided_std"] = _mean_std(
                    [r["align_final"][gname] for r in rs]
                )
                un = [base[r["seed"]]["align_final"][gname] for r in rs if r["seed"] in base]
                if un:
                    row["align_unguided"], row["align_unguided_std"] = _mean_std(un)
                paired = [(r["test_acc"], base[r["seed"]]["test_acc"]) for r in rs if r["seed"] in base]
                if paired:
                    row["delta_test_acc"] = sum(a - b for a, b in paired) / len(paired)
                    row["wins"] = sum(a > b for a, b in paired)
                    row["paired"] = len(paired)
                row["pairs"] = len(rs[0]["pairs"][gname])
            rows.append(row)
    return rows


def format_table(rows: list[dict], markdown: bool = False) -> str:
    head = [
        "target (task)",
        "guide",
        "test acc",
        "test loss",
        "vs unguided (test acc)",
        "CKA at init",
        "CKA unguided",
        "CKA guided",
    ]
    pm = lambda r, k, s=1.0, f="{:.3f}": (  # noqa: E731
        f"{f.format(s * r[k])} ± {f.format(s * r[k + '_std'])}" if k in r else "—"
    )
    lines = []
    for r in rows:
        vs = "—"
        if "wins" in r:
            vs = f"{100 * r['delta_test_acc']:+.1f} pts, better on {r['wins']}/{r['paired']}"
        lines.append(
            [
                f"{LABELS[r['target']]} ({r['task']})",
                "unguided" if r["guide"] is None else f"{GUIDE_LABELS[r['guide']]} ({r['pairs']} pairs)",
                pm(r, "test_acc", 100, "{:.1f}") + " %",
                pm(r, "test_loss"),
                vs,
                pm(r, "align_init"),
                pm(r, "align_unguided"),
                pm(r, "align_guided"),
            ]
        )
    return render_table(head, lines, markdown)


def _row_label(r: dict) -> str:
    g = "unguided" if r["guide"] is None else f"← {GUIDE_LABELS[r['guide']]}"
    return f"{LABELS[r['target']]} {g}"


def plot(rows: list[dict], runs: list[dict], path: str) -> None:
    """Test accuracy per row, alignment (init / unguided / guided) per guided row, history curves."""
    fig = matplotlib_figure()(figsize=(16, 0.9 + 0.42 * len(rows) + 2.2))
    ax_acc, ax_cka, ax_hist = fig.subplots(1, 3, gridspec_kw=dict(width_ratios=[1, 1, 1.1]))
    ys = list(range(len(rows)))[::-1]
    for y, r in zip(ys, rows, strict=True):
        unguided = r["guide"] is None
        ax_acc.barh(
            y,
            100 * r["test_acc"],
            xerr=100 * r["test_acc_std"],
            color=f"C{TARGETS.index(r['target'])}",
            alpha=0.45 if unguided else 0.9,
            hatch="//" if unguided else None,
            capsize=3,
        )
        ax_acc.vlines(100 * r["chance"], y - 0.4, y + 0.4, colors="gray", linestyles=":")
    ax_acc.set_yticks(ys, [_row_label(r) for r in rows], fontsize=8)
    ax_acc.set_xlabel("test accuracy (%)   (dotted: chance)")
    ax_acc.set_title("task: test accuracy (mean ± std over seeds)", fontsize=10)
    guided = [r for r in rows if r["guide"] is not None]
    gys = list(range(len(guided)))[::-1]
    h = 0.27
    series = (
        ("align_init", "at init"),
        ("align_unguided", "after unguided training"),
        ("align_guided", "after guided training"),
    )
    for k, (key, name) in enumerate(series):
        ax_cka.barh(
            [y + (1 - k) * h for y in gys],
            [r.get(key, float("nan")) for r in guided],
            h,
            xerr=[r.get(key + "_std", 0.0) for r in guided],
            label=name,
            color=f"C{k + 3}",
            capsize=2,
        )
    ax_cka.set_yticks(gys, [_row_label(r) for r in guided], fontsize=8)
    ax_cka.set_xlabel("mean CKA over the guided pairs (held-out set)")
    ax_cka.set_xlim(0, 1)
    ax_cka.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)
    ax_cka.set_title("alignment with the guide", fontsize=10)
    for r in guided:
        hs = [x["history"] for x in runs if x["target"] == r["target"] and x["guide"] == r["guide"]]
        if hs:
            cka = torch.tensor([h["mean_cka"] for h in hs], dtype=torch.float64).mean(0)
            ax_hist.plot(hs[0]["steps"], cka.numpy(), label=_row_label(r))
    ax_hist.set_xlabel("training step")
    ax_hist.set_ylabel("mean CKA over pairs (training minibatch)")
    ax_hist.set_title("alignment during guided training (Guidance.history)", fontsize=10)
    ax_hist.grid(alpha=0.3)
    ax_hist.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")


# -------------------------------------------------------------------------------------------- runner
def run_guidability(
    out: str = "./fastguide-guidability",
    *,
    quick: bool = False,
    steps: int | None = None,
    seeds: int | None = None,
    targets: list[str] | None = None,
    device: str = "cpu",
    workers: int | None = None,
    progress: bool = True,
    verbose: bool = True,
) -> dict:
    """Run the guidability grid; write guidability.json / .md / .png under ``out``; return the results."""
    t_start = time.perf_counter()
    cfg = default_config(quick, steps)
    targets = list(targets or TARGETS)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown target(s) {unknown} in --targets; choose from {list(TARGETS)}")
    n_seeds = seeds if seeds is not None else (1 if quick else 3)
    if n_seeds < 1:
        raise ValueError(f"--seeds must be positive; got {n_seeds}")
    if workers is None:
        workers = default_workers(device)
    if workers < 1:
        raise ValueError(f"--workers must be positive; got {workers}")
    threads = 1 if workers > 1 else max(1, torch.get_num_threads())
    jobs = [
        dict(config=asdict(cfg), target=tn, guide=g, seed=s, device=device, threads=threads)
        for tn in targets
        for s in range(n_seeds)
        for g in (None, *GUIDES[tn])
    ]
    bar = progress_bar(len(jobs), progress, "guidability runs", "run")
    runs: list[dict] = []

    def done(r: dict) -> None:
        runs.append(r)
        if bar is not None:
            bar.set_postfix_str(f"{r['target']}<-{r['guide']}/seed{r['seed']}: {100 * r['test_acc']:.1f}%")
            bar.update(1)

    run_jobs(run_job, jobs, done, workers=workers, spawn=workers > 1 and len(jobs) > 1)
    if bar is not None:
        bar.close()
    rows = summarize(runs, targets)
    elapsed = time.perf_counter() - t_start
    os.makedirs(out, exist_ok=True)
    command = (
        " ".join(["python -m fastguide guidability", *sys.argv[2:]])
        if sys.argv[1:2] == ["guidability"]
        else "run_guidability()"
    )
    result = dict(
        command=command,
        machine=machine_line(device),
        fastguide=code_version(),
        seeds=n_seeds,
        workers=workers,
        elapsed_seconds=elapsed,
        loss="task cross-entropy + 1.0 * sum_pairs (1 - CKA), biased CKA per minibatch; Adam 1e-3; batch 64",
        alignment="mean over the guided pairs of the unbiased minibatch CKA on the held-out set "
        "(fastguide.compare)",
        config=asdict(cfg),
        summary=rows,
        runs=sorted(runs, key=lambda r: (r["target"], str(r["guide"]), r["seed"])),
    )
    paths = {k: os.path.join(out, f"guidability.{k}") for k in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(
            f"{format_table(rows, markdown=True)}\n\n{n_seeds} seed(s), {result['machine']}; "
            f"`{command}` ({elapsed:.0f} s).\n"
        )
    plot(rows, runs, paths["png"])
    if verbose:
        print(format_table(rows))
        print(f"\nmachine: {result['machine']}")
        print(
            f"{n_seeds} seed(s), {workers} worker process(es), {elapsed:.0f} s; "
            f"wrote {', '.join(paths.values())}"
        )
    result["paths"] = paths
    return result
