"""Command line: ``python -m fastguide {demo,heatmap,guidability,bench}`` (also the ``fastguide`` script)."""

from __future__ import annotations

import argparse
import sys

from . import bench
from .experiments.demo import run_demo
from .experiments.guidability import run_guidability
from .experiments.heatmap import SpecError, run_heatmap


def _add_device_workers(p) -> None:
    """--device and --workers of the commands that run training jobs (demo, guidability)."""
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    p.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: 2 on CPU, 1 on CUDA)"
    )


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
    _add_device_workers(p)
    p.add_argument("--tasks", nargs="+", default=None, help="subset of tasks: digits copy parity")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--native",
        action="store_true",
        help="the libraries' native CPU code paths instead of the reproducible settings "
        "(docs/reproducibility.md): faster, but the numbers depend on the processor",
    )
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
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
        reproducible=not args.native,
    )
    return 0


def _add_heatmap(sub) -> None:
    p = sub.add_parser(
        "heatmap",
        help="CKA matrix between two models' layers on a dataset (PNG + JSON); built-in or your own models",
        description=(
            "Layer-by-layer minibatch CKA (fastguide.compare) between two models over a dataset, written as "
            "heatmap.png and heatmap.json (fastguide.CompareResult.load reads it). Models: the built-in fcn, "
            "resnet, rnn, transformer (untrained unless --train-steps), or your own as module:attr (an "
            "nn.Module or a zero-argument factory, importable from the current directory). With "
            "--layers auto, every Linear/Conv2d/RNN/LayerNorm/... module that runs is a layer, the logits "
            "included."
        ),
        epilog=(
            "examples:\n  python -m fastguide heatmap --a resnet --b fcn\n"
            "  python -m fastguide heatmap --a mymodels:Net --b mymodels:make_other --data random:3x32x32\n"
            "  python -m fastguide heatmap --a mymodels:Net --b resnet --data mydata:loader \\\n"
            "      --layers-a fc1,fc2"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--a", default="fcn", help="first model: fcn, resnet, rnn, transformer or module:attr")
    p.add_argument("--b", default="resnet", help="second model (same forms as --a)")
    p.add_argument(
        "--data",
        default=None,
        help="digits, copy, random:SHAPE (e.g. random:3x32x32), tokens:VOCAB:LENGTH, or module:attr (a "
        "DataLoader, iterable, Dataset or tensor, or a function returning one); default: the built-in "
        "models' task (digits for fcn/resnet, copy for rnn/transformer)",
    )
    p.add_argument("--n", type=int, default=256, help="examples of generated data (default 256)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--max-batches", type=int, default=None, help="stop after this many batches")
    p.add_argument("--layers-a", default="auto", help="'auto' or comma-separated module names of --a")
    p.add_argument("--layers-b", default="auto", help="'auto' or comma-separated module names of --b")
    p.add_argument("--estimator", default="unbiased", choices=["unbiased", "biased"])
    p.add_argument("--kernel", default="linear", choices=["linear", "rbf"])
    p.add_argument(
        "--tokens", default="flatten", choices=["flatten", "mean", "samples"], help="(B, T, D) outputs"
    )
    p.add_argument("--train-steps", type=int, default=0, help="train built-in models on their task first")
    p.add_argument(
        "--mode",
        default="eval",
        choices=["eval", "train"],
        help="the models' mode during the pass (train: BatchNorm uses batch statistics; restored after)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--out", default="./fastguide-heatmap", help="output folder (default: ./fastguide-heatmap)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_heatmap, parser=p)


def _run_heatmap(args) -> int:
    try:
        run_heatmap(
            args.a,
            args.b,
            data=args.data,
            n=args.n,
            batch_size=args.batch_size,
            layers_a=args.layers_a,
            layers_b=args.layers_b,
            estimator=args.estimator,
            kernel=args.kernel,
            tokens=args.tokens,
            train_steps=args.train_steps,
            max_batches=args.max_batches,
            mode=args.mode,
            seed=args.seed,
            device=args.device,
            out=args.out,
            progress=not args.no_progress,
        )
    except SpecError as e:
        args.parser.error(str(e))
    except (RuntimeError, ValueError, TypeError) as e:
        print(
            f"fastguide heatmap: error: {type(e).__name__}: {e}\n(check that --data fits both models' "
            "inputs and that the --layers names exist)",
            file=sys.stderr,
        )
        return 1
    return 0


def _add_guidability(sub) -> None:
    p = sub.add_parser(
        "guidability",
        help="how easily one network guides another: short guided runs over the demo zoo (table, PNG, JSON)",
        description=(
            "For target/guide architectures of the demo zoo (targets: deep FCN on digits, tanh RNN and "
            "causal transformer on copy-paste; guides, untrained: small ResNet and FCN for images, RNN and "
            "transformer for sequences), train each target briefly with and without guidance and report the "
            "final alignment (mean CKA over the guided layer pairs, on held-out data) and the task loss and "
            "accuracy, with the unguided baseline of each target. Writes guidability.json, guidability.md "
            "and guidability.png to --out."
        ),
    )
    p.add_argument("--out", default="./fastguide-guidability", help="output folder")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one seed (under a minute)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; 1 with --quick)")
    p.add_argument("--targets", nargs="+", default=None, help="subset of targets: fcn rnn transformer")
    _add_device_workers(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_guidability, parser=p)


def _run_guidability(args) -> int:
    try:
        run_guidability(
            args.out,
            quick=args.quick,
            steps=args.steps,
            seeds=args.seeds,
            targets=args.targets,
            device=args.device,
            workers=args.workers,
            progress=not args.no_progress,
        )
    except ValueError as e:
        args.parser.error(str(e))
    return 0


def _add_bench(sub) -> None:
    # Parsed by fastguide.bench.cli itself: everything after `bench` is passed through.
    p = sub.add_parser("bench", help="benchmark table (fastguide.bench)", add_help=False)
    p.set_defaults(func=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastguide", description="fastguide command line")
    sub = parser.add_subparsers(dest="command", metavar="{demo,heatmap,guidability,bench}")
    _add_demo(sub)
    _add_heatmap(sub)
    _add_guidability(sub)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return int(bench.main(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
