"""``python -m fastguide demo``: the paper's claims at CPU size, on shipped or generated data.

Arms (each on every task, over several seeds; the same target initialisation and data order per seed
across arms, so arms are compared pairwise):

- ``baseline``: task loss only.
- ``guided_untrained``: task loss + 1.0 * sum_pairs (1 - CKA) to an untrained guide (biased CKA,
  the paper's loss).
- ``guided_trained``: the same, with a guide first trained on the task.
- ``guided_until``: guidance by the untrained guide for the first ``until`` steps only.
- ``align_then_train``: ``fastguide.align`` on random noise for ``align_steps`` steps, then the task
  loss only.
- ``distill_untrained``: task loss + knowledge distillation from the untrained guide's logits.

Tasks: ``digits`` (scikit-learn's 8x8 digits, a small training split; deep BatchNorm FCN target,
small ResNet-style conv guide), ``copy`` (copy-paste; 4-layer tanh RNN target, 4-layer causal
transformer guide) and, under ``--full``, ``parity`` (running parity; transformer target, RNN guide).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from .._mapping import auto_pairs
from .._utils import progress_bar
from ..align import align
from ..distill import distill_loss
from ..guidance import Guidance
from . import models, tasks
from .reproducibility import REPRODUCIBLE_CPU_ENV
from .runner import code_version, default_workers, machine_line, render_table, run_jobs

ALL_ARMS = (
    "baseline",
    "guided_untrained",
    "guided_trained",
    "guided_until",
    "align_then_train",
    "distill_untrained",
)
ARM_LABELS = {
    "baseline": "baseline",
    "guided_untrained": "guided (untrained guide)",
    "guided_trained": "guided (trained guide)",
    "guided_until": "guided first {until} steps",
    "align_then_train": "noise align {align_steps} + plain",
    "distill_untrained": "distill (untrained teacher)",
}


@dataclass
class TaskConfig:
    """Sizes of one demo task. ``steps`` counts optimiser steps of the target (batch ``batch_size``)."""

    name: str
    steps: int
    eval_every: int
    until: int = 150
    align_steps: int = 150
    guide_steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    weight: float = 1.0
    temperature: float = 4.0
    guide_mode: str = "eval"
    arms: tuple[str, ...] = ALL_ARMS
    params: dict[str, Any] = field(default_factory=dict)


def default_tasks(quick: bool = False, full: bool = False) -> list[TaskConfig]:
    """The task list of a run. Default: the strongest arms at sizes that fit 10 minutes on 2 cores."""
    digits = TaskConfig(
        "digits",
        steps=600,
        eval_every=100,
        params=dict(
            n_train=100, depth=32, hidden=128, dropout=0.1, guide_widths=(16, 32, 64), guide_blocks=1
        ),
    )
    copy_task = TaskConfig(
        "copy",
        steps=500,
        eval_every=100,
        arms=("baseline", "guided_untrained", "guided_until"),
        params=dict(length=12, symbols=8, hidden=128, rnn_layers=4, d_model=64, tf_layers=4, n_test=256),
    )
    tasks = [digits, copy_task]
    if full:
        tasks = [replace(t, arms=ALL_ARMS, steps=t.steps * 2, eval_every=2 * t.eval_every) for t in tasks]
        # A transformer needs longer than the FCN's conv guide to learn copying well.
        tasks[1] = replace(tasks[1], guide_steps=1000, params=dict(tasks[1].params, n_test=512))
        tasks.append(
            TaskConfig(
                "parity",
                steps=1500,
                eval_every=50,
                arms=ALL_ARMS,
                params=dict(length=16, hidden=128, rnn_layers=4, d_model=64, tf_layers=4, n_test=512),
            )
        )
    if quick:
        tasks = [
            replace(t, steps=30, eval_every=15, until=15, align_steps=10, guide_steps=20, arms=ALL_ARMS)
            for t in tasks
        ]
        tasks[0].params.update(depth=4, hidden=64, dropout=0.0)
        tasks[1].params.update(length=6, hidden=32, d_model=32, tf_layers=2, rnn_layers=2, n_test=128)
    return tasks


# ---------------------------------------------------------------------------------------------- jobs


def _build(task: TaskConfig, seed: int, device: torch.device):
    """Data, target factory, guide factory, loss/accuracy function for one task and seed."""
    p = task.params
    if task.name == "digits":
        data = tasks.digits(n_train=p["n_train"], seed=seed)

        def make_target():
            return models.DeepFCN(data.in_features, data.num_classes, p["hidden"], p["depth"], p["dropout"])

        def make_guide():
            return models.SmallResNet(1, data.num_classes, tuple(p["guide_widths"]), p["guide_blocks"])

        def loss_correct(logits, y):
            return F.cross_entropy(logits, y), (logits.argmax(-1) == y).sum()

        def count(y):
            return y.shape[0]

        train_eval = (data.x_train, data.y_train)
        test_eval = (data.x_test, data.y_test)
        batches = data.batches
        layers = "auto"
        example = data.x_train[: task.batch_size]
        chance = 0.1
    elif task.name in ("copy", "parity"):
        if task.name == "copy":
            data = tasks.CopyPaste(p["length"], p["symbols"], n_test=p["n_test"], seed=seed)
        else:
            data = tasks.Parity(p["length"], n_test=p["n_test"], seed=seed)
        rnn = lambda: models.TanhRNN(data.vocab_size, data.num_classes, p["hidden"], p["rnn_layers"])  # noqa: E731
        tf = lambda: models.CausalTransformer(  # noqa: E731
            data.vocab_size, data.num_classes, p["d_model"], p["tf_layers"], max_len=4 * p["length"] + 4
        )
        rnn_names = [f"rnns.{i}" for i in range(p["rnn_layers"])]
        tf_names = [f"blocks.{i}" for i in range(p["tf_layers"])]
        # RNN layer i <-> transformer block i (block outputs are the residual stream), evenly spaced.
        if task.name == "copy":
            make_target, make_guide = rnn, tf
            layers = [(rnn_names[i], tf_names[j]) for i, j in auto_pairs(len(rnn_names), len(tf_names))]
        else:
            make_target, make_guide = tf, rnn
            layers = [(tf_names[i], rnn_names[j]) for i, j in auto_pairs(len(tf_names), len(rnn_names))]
        loss_correct = data.loss_and_correct
        count = data.count
        g = torch.Generator().manual_seed(40_000 + seed)
        train_eval = data.sample(p["n_test"], g)
        test_eval = (data.x_test, data.y_test)
        batches = data.batches
        example = data.x_test[: task.batch_size]
        chance = data.chance
    else:
        raise ValueError(f"unknown task {task.name!r}")
    return dict(
        make_target=make_target,
        make_guide=make_guide,
        loss_correct=loss_correct,
        count=count,
        train_eval=train_eval,
        test_eval=test_eval,
        batches=batches,
        layers=layers,
        example=example,
        chance=chance,
    )


def _train_plain(model, b, task: TaskConfig, steps: int, seed: int, device) -> None:
    """Train ``model`` on the task loss alone (used for the trained guide)."""
    opt = torch.optim.Adam(model.parameters(), lr=task.lr)
    gen = torch.Generator().manual_seed(60_000 + seed)
    it = b["batches"](task.batch_size, gen)
    model.train()
    for _ in range(steps):
        x, y = next(it)
        x, y = x.to(device), y.to(device)
        loss, _ = b["loss_correct"](model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def run_job(job: dict) -> dict:
    """One (task, arm, seed) training run; returns curves and final metrics. Top level for spawn."""
    torch.set_num_threads(job.get("threads", 1))
    if job.get("reproducible") and job.get("device", "cpu") == "cpu":
        # oneDNN's convolutions move to ATen + MKL GEMMs, which MKL_CBWR pins (reproducibility.py)
        torch.backends.mkldnn.enabled = False
        torch.use_deterministic_algorithms(True)
    task = TaskConfig(**job["task"])
    arm, seed = job["arm"], job["seed"]
    device = torch.device(job.get("device", "cpu"))
    t0 = time.perf_counter()
    b = _build(task, seed, device)

    # Same target init per seed across arms; guide init from its own stream.
    torch.manual_seed(1_000 * seed + 1)
    target = b["make_target"]().to(device)
    torch.manual_seed(1_000 * seed + 2)
    guide = b["make_guide"]().to(device)
    extra: dict[str, Any] = {}

    if arm == "guided_trained":
        _train_plain(guide, b, task, task.guide_steps, seed, device)
        extra["guide_test_loss"], extra["guide_test_acc"] = tasks.evaluate(
            guide, b["loss_correct"], b["count"], b["test_eval"], device
        )
    if arm == "align_then_train":
        torch.manual_seed(1_000 * seed + 3)
        hist = align(
            target,
            guide,
            task.align_steps,
            lr=task.lr,
            example=b["example"].to(device),
            layers=b["layers"],
            estimator="biased",
            seed=1_000 * seed + 4,
            guide_mode=task.guide_mode,
        )
        extra["align_cka_first"] = hist.cka[0].tolist() if len(hist) else []
        extra["align_cka_last"] = hist.cka[-1].tolist() if len(hist) else []

    guidance = None
    if arm in ("guided_untrained", "guided_trained", "guided_until"):
        guidance = Guidance(
            target,
            guide,
            layers=b["layers"],
            weight=task.weight,
            estimator="biased",
            reduction="sum",
            until=task.until if arm == "guided_until" else None,
            guide_mode=task.guide_mode,
        )
    teacher = guide.eval() if arm == "distill_untrained" else None

    torch.manual_seed(1_000 * seed + 5)
    opt = torch.optim.Adam(target.parameters(), lr=task.lr)
    gen = torch.Generator().manual_seed(50_000 + seed)
    it = b["batches"](task.batch_size, gen)
    curve: dict[str, list] = {k: [] for k in ("step", "train_loss", "train_acc", "test_loss", "test_acc")}
    ckas = []

    def record(step):
        trl, tra = tasks.evaluate(target, b["loss_correct"], b["count"], b["train_eval"], device)
        tel, tea = tasks.evaluate(target, b["loss_correct"], b["count"], b["test_eval"], device)
        for k, v in zip(curve, (step, trl, tra, tel, tea), strict=True):
            curve[k].append(v)

    target.train()
    record(0)
    for step in range(1, task.steps + 1):
        x, y = next(it)
        x, y = x.to(device), y.to(device)
        logits = target(x)
        loss, _ = b["loss_correct"](logits, y)
        if guidance is not None:
            loss = loss + guidance.loss(x)
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(x)
            loss = loss + distill_loss(logits, t_logits, task.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if guidance is not None and guidance.last_cka is not None and step % task.eval_every == 0:
            ckas.append((step, guidance.last_cka.tolist()))
        if step % task.eval_every == 0 or step == task.steps:
            record(step)
    if guidance is not None:
        extra["pairs"] = guidance.pairs
        guidance.close()
    final = {k: curve[k][-1] for k in ("train_loss", "train_acc", "test_loss", "test_acc")}
    final["gap"] = final["train_acc"] - final["test_acc"]
    return dict(
        task=task.name,
        arm=arm,
        seed=seed,
        curve=curve,
        final=final,
        cka=ckas,
        chance=b["chance"],
        seconds=time.perf_counter() - t0,
        **extra,
    )


# -------------------------------------------------------------------------------------------- runner


def summarize(runs: list[dict], tasks: list[TaskConfig]) -> list[dict]:
    """Mean ± std over seeds per (task, arm), and the per-seed comparison with the baseline."""
    rows = []
    for task in tasks:
        base = {r["seed"]: r for r in runs if r["task"] == task.name and r["arm"] == "baseline"}
        for arm in task.arms:
            rs = sorted(
                (r for r in runs if r["task"] == task.name and r["arm"] == arm), key=lambda r: r["seed"]
            )
            if not rs:
                continue
            row: dict[str, Any] = dict(task=task.name, arm=arm, label=_label(arm, task), seeds=len(rs))
            for k in ("test_acc", "test_loss", "train_acc", "train_loss", "gap"):
                v = torch.tensor([r["final"][k] for r in rs], dtype=torch.float64)
                row[k] = float(v.mean())
                row[k + "_std"] = float(v.std()) if len(v) > 1 else 0.0
            if arm != "baseline" and base:
                paired = [
                    (r["final"]["test_acc"], base[r["seed"]]["final"]["test_acc"])
                    for r in rs
                    if r["seed"] in base
                ]
                row["delta_test_acc"] = sum(a - c for a, c in paired) / len(paired)
                row["wins"] = sum(a > c for a, c in paired)
                row["paired"] = len(paired)
            row["chance"] = rs[0]["chance"]
            row["seconds"] = sum(r["seconds"] for r in rs) / len(rs)
            rows.append(row)
    return rows


def _label(arm: str, task: TaskConfig) -> str:
    return ARM_LABELS[arm].format(until=task.until, align_steps=task.align_steps)


def format_table(rows: list[dict], markdown: bool = False) -> str:
    head = [
        "task",
        "arm",
        "test acc",
        "test loss",
        "train acc",
        "gap (train-test acc)",
        "vs baseline (test acc)",
    ]
    lines = []
    for r in rows:
        pct = lambda m, s: f"{100 * m:5.1f} ± {100 * s:4.1f}"  # noqa: E731
        vs = "—"
        if "wins" in r:
            vs = f"{100 * r['delta_test_acc']:+5.1f} pts, better on {r['wins']}/{r['paired']} seeds"
        lines.append(
            [
                r["task"],
                r["label"],
                pct(r["test_acc"], r["test_acc_std"]),
                f"{r['test_loss']:.3f} ± {r['test_loss_std']:.3f}",
                pct(r["train_acc"], r["train_acc_std"]),
                f"{100 * r['gap']:+5.1f}",
                vs,
            ]
        )
    return render_table(head, lines, markdown)


def plot(runs: list[dict], tasks: list[TaskConfig], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for arm in task.arms:
            rs = [r for r in runs if r["task"] == task.name and r["arm"] == arm]
            if not rs:
                continue
            steps = torch.tensor(rs[0]["curve"]["step"], dtype=torch.float64)
            acc = torch.tensor([r["curve"]["test_acc"] for r in rs], dtype=torch.float64)
            m = acc.mean(0)
            s = acc.std(0) if acc.shape[0] > 1 else torch.zeros_like(m)
            color = f"C{ALL_ARMS.index(arm)}"  # one colour per arm across panels
            ax.plot(steps, 100 * m, label=_label(arm, task), color=color)
            ax.fill_between(steps, 100 * (m - s), 100 * (m + s), color=color, alpha=0.15)
        chance = next((r["chance"] for r in runs if r["task"] == task.name), None)
        if chance is not None:
            ax.axhline(100 * chance, color="gray", ls=":", lw=1, label="chance")
        ax.set_title(f"{task.name}: test accuracy (mean ± std over seeds)")
        ax.set_xlabel("training step")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(
    out: str = "./fastguide-demo",
    *,
    quick: bool = False,
    full: bool = False,
    seeds: int | None = None,
    steps: int | None = None,
    device: str = "cpu",
    workers: int | None = None,
    tasks: list[str] | None = None,
    progress: bool = True,
    verbose: bool = True,
    reproducible: bool = True,
) -> dict:
    """Run the demo; write ``results.json`` and ``curves.png`` under ``out``; return the results dict.

    ``steps`` scales every task's step count (and eval interval) to the given number for the first
    task, proportionally for the others. ``reproducible`` (CPU): every job runs single-threaded in a
    spawned worker with :data:`REPRODUCIBLE_CPU_ENV`, oneDNN off and deterministic algorithms, so a
    seed gives the same numbers whatever code paths the processor's instruction set would select
    (docs/reproducibility.md says how far that was verified) and with any number of workers;
    ``False`` runs the libraries' native code paths (and, with one worker, all threads here).
    """
    t_start = time.perf_counter()
    task_cfgs = default_tasks(quick=quick, full=full)
    if tasks:
        unknown = set(tasks) - {t.name for t in task_cfgs}
        if unknown:
            raise ValueError(f"unknown task(s) {sorted(unknown)}; available: {[t.name for t in task_cfgs]}")
        task_cfgs = [t for t in task_cfgs if t.name in tasks]
    if steps is not None:
        if steps < 1:
            raise ValueError(f"--steps must be positive; got {steps}")
        scale = steps / task_cfgs[0].steps
        task_cfgs = [
            replace(t, steps=max(1, round(t.steps * scale)), eval_every=max(1, round(t.eval_every * scale)))
            for t in task_cfgs
        ]
    n_seeds = seeds if seeds is not None else (1 if quick else 3)
    if n_seeds < 1:
        raise ValueError(f"--seeds must be positive; got {n_seeds}")
    if workers is None:
        workers = default_workers(device)
    repro = reproducible and device == "cpu"
    jobs = [
        dict(
            task=asdict(t),
            arm=arm,
            seed=s,
            device=device,
            threads=1 if workers > 1 or repro else max(1, torch.get_num_threads()),
            reproducible=repro,
        )
        for t in task_cfgs
        for s in range(n_seeds)
        for arm in t.arms
    ]
    # Longest jobs first keeps both workers busy to the end.
    order = {"copy": 0, "parity": 1, "digits": 2}
    jobs.sort(key=lambda j: (order.get(j["task"]["name"], 3), j["arm"] == "baseline"))
    bar = progress_bar(len(jobs), progress, "demo runs", "run")
    runs: list[dict] = []

    def done(r):
        runs.append(r)
        if bar is not None:
            bar.set_postfix_str(
                f"{r['task']}/{r['arm']}/seed{r['seed']}: test acc {100 * r['final']['test_acc']:.1f}%"
            )
            bar.update(1)
        elif progress:
            print(
                f"[{len(runs)}/{len(jobs)}] {r['task']} {r['arm']} seed {r['seed']}: "
                f"test acc {100 * r['final']['test_acc']:.1f}% ({r['seconds']:.0f} s)",
                file=sys.stderr,
                flush=True,
            )

    spawn = (workers > 1 and len(jobs) > 1) or repro
    env = run_jobs(
        run_job, jobs, done, workers=workers, spawn=spawn, env=REPRODUCIBLE_CPU_ENV if repro else None
    )
    settings: dict | bool = False
    if repro:
        settings = dict(env, deterministic_algorithms=True, mkldnn=False, threads_per_job=1)
    if bar is not None:
        bar.close()

    rows = summarize(runs, task_cfgs)
    os.makedirs(out, exist_ok=True)
    elapsed = time.perf_counter() - t_start
    result = dict(
        command=" ".join(["python -m fastguide demo"] + sys.argv[2:])
        if sys.argv[1:2] == ["demo"]
        else "run_demo()",
        machine=machine_line(device),
        fastguide=code_version(),
        workers=workers,
        reproducible=settings,
        seeds=n_seeds,
        elapsed_seconds=elapsed,
        loss="task cross-entropy + 1.0 * sum_pairs (1 - CKA), biased CKA per minibatch; Adam 1e-3; batch 64",
        tasks=[asdict(t) for t in task_cfgs],
        summary=rows,
        runs=sorted(runs, key=lambda r: (r["task"], r["arm"], r["seed"])),
    )
    json_path = os.path.join(out, "results.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1, default=_json_default)
    png_path = os.path.join(out, "curves.png")
    plot(runs, task_cfgs, png_path)
    if verbose:
        print(format_table(rows))
        print(f"\nmachine: {result['machine']}")
        print(
            f"{n_seeds} seed(s), {workers} worker process(es), {elapsed:.0f} s; "
            f"wrote {json_path} and {png_path}"
        )
    return result


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    return str(o)
