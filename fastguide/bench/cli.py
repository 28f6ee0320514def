"""``python -m fastguide bench``: run the suite, print the table, write the JSON (and markdown / PNG)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .cases import SCALES
from .report import format_table, plot_results
from .run import run_suite

__all__ = ["main"]


def _default_out(device: str, scale: str) -> Path:
    here = Path.cwd() / "benchmarks" / "results"
    name = f"bench_{torch.device(device).type}_{scale}.json"
    return here / name if here.is_dir() else Path.cwd() / f"fastguide-{name}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastguide bench",
        description="fastguide benchmark table: W1-W4 workloads and guided training steps against careful "
        "torch, torch.compile, naive per-pair code and peer libraries (DESIGN.md section 6).",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes, few rounds, no torch.compile (about a minute on an idle 2-core machine)",
    )
    p.add_argument(
        "--scale",
        choices=sorted(SCALES),
        default=None,
        help="workload sizes (default: full on CUDA, cpu on CPU, quick with --quick)",
    )
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds per case (at most)")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="wall-clock seconds shared by the timed rounds of all cases (default: 65 at cpu scale, "
        "45 with --quick, none on CUDA); set-up, checks and compilation come on top",
    )
    p.add_argument("--only", nargs="+", default=None, help="run cases whose name contains any of these words")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    p.add_argument(
        "--slow-peers",
        action="store_true",
        help="also run ckatorch on the W3 matrix and torch-careful on the token case at cpu scale",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument(
        "--tf32",
        action="store_true",
        help="torch.set_float32_matmul_precision('high') (TF32 on GPU; floors use that GEMM rate)",
    )
    p.add_argument(
        "--out", default=None, help="results JSON path (default: benchmarks/results/bench_<dev>_<scale>.json)"
    )
    p.add_argument("--markdown", default=None, help="also write the table as markdown to this path")
    p.add_argument("--plot", default=None, help="also write a PNG bar chart of the ratios to this path")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.tf32:
        torch.set_float32_matmul_precision("high")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    scale = a.scale or ("quick" if a.quick else ("full" if torch.device(device).type == "cuda" else "cpu"))
    res = run_suite(
        device,
        quick=a.quick,
        scale=scale,
        rounds=a.rounds,
        compile_=False if a.no_compile else None,
        only=a.only,
        memory=not a.no_memory,
        log=lambda s: print(s, file=sys.stderr, flush=True),
        slow_peers=True if a.slow_peers else None,
        time_budget_s=a.budget if a.budget is not None else {"cpu": 65.0, "quick": 45.0}.get(scale),
    )
    env = res["env"]
    wall = res["config"]["wall_s"]
    print(
        f"\nfastguide {env['fastguide']} | {env['device_name']} | torch {env['torch']} | "
        f"triton {env['triton']} | syrk: {env['cpu_syrk']} | layers: {env.get('cpu_layer_parallel')} | "
        f"scale {scale} | {wall:.0f} s\n"
    )
    print(format_table(res["records"], res["goals"]))
    out = Path(a.out) if a.out else _default_out(device, scale)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print(f"\nresults: {out}")
    if a.markdown:
        Path(a.markdown).write_text(format_table(res["records"], res["goals"], markdown=True) + "\n")
        print(f"markdown: {a.markdown}")
    if a.plot:
        try:
            plot_results(res["records"], a.plot)
            print(f"plot: {a.plot}")
        except Exception as e:  # matplotlib is optional
            print(f"plot skipped: {e}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
