"""The comparison table (plain text or GitHub markdown) and a bar chart of the paired ratios."""

from __future__ import annotations

__all__ = ["format_table", "plot_results"]

MB = 1024.0 * 1024.0

_COLS = [
    "provider",
    "median ms",
    "IQR ms",
    "x fastguide",
    "peak extra MB",
    "tensor MB",
    "GB/s",
    "TFLOP/s",
    "floor x",
    "check",
]
_STEP_COLS = [
    "provider",
    "median ms",
    "IQR ms",
    "x fastguide",
    "peak extra MB",
    "/ (step+guide)",
    "/ (step+guide+Grams)",
    "check",
]
# The parts of a guided step (denominators of its ratios): not plotted against fastguide.
_STEP_PARTS = ("unguided", "guide-fwd", "gram-gemms")


def _fmt(v, spec="{:.2f}", none="-"):
    return none if v is None else spec.format(v)


def _row(r: dict, step: bool) -> list[str]:
    chk = r.get("check", {})
    err = next((v for k, v in chk.items() if k.endswith("err")), None)
    ms = "{:.1f}" if r["median_ms"] >= 10 else "{:.2f}"
    cells = [
        r["provider"],
        _fmt(r["median_ms"], ms),
        _fmt(r["p75_ms"] - r["p25_ms"], ms),
        _fmt(r.get("ratio_to_baseline"), "{:.2f}"),
        _fmt(None if r.get("peak_extra_bytes") is None else r["peak_extra_bytes"] / MB, "{:.1f}"),
    ]
    if step:
        cells += [_fmt(r.get("step_ratio"), "{:.3f}"), _fmt(r.get("step_ratio_with_grams"), "{:.3f}")]
    else:
        tb = r.get("peak_tensor_bytes")
        cells += [
            _fmt(None if tb is None else tb / MB, "{:.2f}"),
            _fmt(r.get("achieved_GBps"), "{:.1f}"),
            _fmt(r.get("achieved_TFLOPs"), "{:.3f}"),
            _fmt(r.get("floor_ratio"), "{:.2f}"),
        ]
    cells.append("ok" if not chk else (f"ok {err:.1e}" if err is not None else "ok"))
    return cells


def _markdown_block(title: str, head: list[str], rows: list[list[str]]) -> list[str]:
    lines = [f"**{title}**\n", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _text_block(title: str, head: list[str], rows: list[list[str]]) -> list[str]:
    padded = [rw + [""] * (len(head) - len(rw)) for rw in rows]
    w = [max(len(str(x)) for x in col) for col in zip(head, *padded, strict=False)]

    def line(cells):
        return "  " + "  ".join(
            x.rjust(wi) if i else x.ljust(wi) for i, (x, wi) in enumerate(zip(cells, w, strict=False))
        )

    lines = [title, line(head)]
    for row in rows:
        lines.append("  " + row[0].ljust(w[0]) + "  " + row[1] if row[1].startswith("skipped") else line(row))
    return lines + [""]


def _goal_lines(goals: list[dict], markdown: bool) -> list[str]:
    if markdown:
        lines = ["| goal | measured | target | met |", "|---|---|---|---|"]
        for g in goals:
            met = "-" if g["met"] is None else ("yes" if g["met"] else "NO")
            lines.append(f"| {g['goal']} | {_fmt(g['measured'], '{:.2f}')} | {g['target']} | {met} |")
        return lines
    lines = ["Goals (medians of paired ratios):"]
    for g in goals:
        met = "n/a" if g["met"] is None else ("met" if g["met"] else "MISSED")
        lines.append(
            f"  [{met:>6}] {g['goal']}: measured {_fmt(g['measured'], '{:.2f}')} "
            f"(target {g['target']}) {g['detail']}"
        )
    return lines


def format_table(records: list[dict], goals: list[dict] | None = None, markdown: bool = False) -> str:
    """The comparison table (plain text, or GitHub markdown): one block per case, then the goals."""
    lines = []
    for c in dict.fromkeys(r["case"] for r in records):
        rs = [r for r in records if r["case"] == c]
        step = rs[0]["op"] == "step"
        head = _STEP_COLS if step else _COLS
        rows = [
            _row(r, step)
            if "median_ms" in r
            else [r["provider"], "skipped: " + r.get("skipped", "?")] + [""] * (len(head) - 2)
            for r in rs
        ]
        lines += (_markdown_block if markdown else _text_block)(rs[0]["title"], head, rows)
    if goals:
        lines += _goal_lines(goals, markdown)
    return "\n".join(lines)


def plot_results(records: list[dict], path: str) -> None:
    """Bar chart of the paired ratio to fastguide per case and provider (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    cases = list(dict.fromkeys(r["case"] for r in records))
    provs = [p for p in dict.fromkeys(r["provider"] for r in records) if p not in _STEP_PARTS]
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(cases)), 4.5))
    width = 0.8 / max(1, len(provs))
    for k, p in enumerate(provs):
        xs, vs = [], []
        for i, c in enumerate(cases):
            r = next((r for r in records if r["case"] == c and r["provider"] == p), None)
            if r is not None and r.get("ratio_to_baseline"):
                xs.append(i + k * width - 0.4 + width / 2)
                vs.append(r["ratio_to_baseline"])
        if vs:
            ax.bar(xs, vs, width=width, label=p)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("time / fastguide time (median of paired ratios)")
    dev = records[0]["device"] if records else ""
    ax.set_title(f"fastguide benchmark ({dev}): higher = slower than fastguide")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
