"""Command line: ``python -m fastguide {demo,heatmap,bench}`` (also the ``fastguide`` console script)."""

from __future__ import annotations

import argparse
import sys


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: reproduce the paper's claims at CPU size (table, results.json, curves.png)",
        description=(
            "Train targets with and without representational guidance (untrained / trained guide, guidance "
            "for the first steps only, noise pre-alignment, distillation from an untrained teacher) on "
            "scikit-learn's digits and a copy-paste sequence task, over several seeds. Prints a table and "
            "writes results.json and curves.png to --out."
        ),
    )
    p.add_argument("--out", default="./fastguide-demo", help="output folder (default: ./fastguide-demo)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, every arm, one seed (under a minute)")
    p.add_argument(
        "--full", action="store_true", help="every arm on every task, twice the steps, plus parity"
    )
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; 1 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="training steps of the first task (others scale)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    p.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: 2 on CPU, 1 on CUDA)"
    )
    p.add_argument("--tasks", nargs="+", default=None, help="subset of tasks: digits copy parity")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from .experiments.demo import run_demo

    run_demo(
        args.out,
        quick=args.quick,
        full=args.full,
        seeds=args.seeds,
        steps=args.steps,
        device=args.device,
        workers=args.workers,
        tasks=args.tasks,
        progress=not args.no_progress,
    )
    return 0


def _add_heatmap(sub) -> None:
    p = sub.add_parser(
        "heatmap",
        help="CKA matrix between two models' layers on a dataset (PNG + JSON)",
        description=(
            "Layer-by-layer CKA between two of fastguide.experiments' models on scikit-learn's digits "
            "(images) or a generated copy-paste batch (sequences). Models are untrained unless --train-steps "
            "is given. Hooks the modules layers='auto' would select (the logits layer dropped)."
        ),
    )
    p.add_argument("--a", default="fcn", choices=["fcn", "resnet", "rnn", "transformer"], help="first model")
    p.add_argument(
        "--b", default="resnet", choices=["fcn", "resnet", "rnn", "transformer"], help="second model"
    )
    p.add_argument("--n", type=int, default=256, help="number of examples (default 256)")
    p.add_argument("--estimator", default="unbiased", choices=["unbiased", "biased"])
    p.add_argument("--kernel", default="linear", choices=["linear", "rbf"])
    p.add_argument("--train-steps", type=int, default=0, help="train both models on the task first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--out", default="./fastguide-heatmap", help="output folder (default: ./fastguide-heatmap)"
    )
    p.set_defaults(func=_run_heatmap)


def _run_heatmap(args) -> int:
    from .experiments.heatmap import run_heatmap

    run_heatmap(
        args.a,
        args.b,
        n=args.n,
        estimator=args.estimator,
        kernel=args.kernel,
        train_steps=args.train_steps,
        seed=args.seed,
        device=args.device,
        out=args.out,
    )
    return 0


def _add_bench(sub) -> None:
    # Parsed by fastguide.bench.cli itself: everything after `bench` is passed through.
    p = sub.add_parser("bench", help="benchmark table (fastguide.bench)", add_help=False)
    p.set_defaults(func=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastguide", description="fastguide command line")
    sub = parser.add_subparsers(dest="command", metavar="{demo,heatmap,bench}")
    _add_demo(sub)
    _add_heatmap(sub)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        # Imported lazily: the benchmark harness (the package fastguide/bench/) is heavier.
        from . import bench

        return int(bench.main(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
