"""Bytes and flops of the Triton path per workload, from the launchers' own tiling, and the time
they predict on H100 / H200 (kernels/README.md, "Traffic and flops"). A model, not a measurement.

    python tests/kernels/traffic_model.py          # prints the markdown tables of the README

What the compiled kernels move (each term follows a program table of the launchers):

* ``_gram_fwd_kernel``: DRAM reads x once per (layer, split) (the split's tile programs are adjacent
  in the table, so its rows are shared through L2); from L2 every tile program reads its row blocks
  again: an off-diagonal tile its two blocks, a diagonal tile one (its second operand is its first),
  each program the SHIFT_ROWS shift rows too. It writes the upper tiles of every split's partial K.
* ``_gram_center_kernel``: reads the upper tiles of every split partial, writes the full C.
* ``_cka_pairs_fwd_kernel``: two C's per pair from L2, every distinct C once from DRAM.
* ``_cka_matrix_fwd_kernel``: every C once per output tile program block.
* ``_cka_pairs_bwd_kernel``: per target, every slot's C once from DRAM (its row-block programs are
  adjacent), x once from DRAM and once per row block from L2, dX written once; flops 2 n^2 d per
  pass of NUM_C matrices.
Time per kernel = max(DRAM bytes / HBM bandwidth, L2 bytes / L2 bandwidth, flops / peak); launch
latency is not counted (a captured CUDA graph hides it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEVICES = {"H100 SXM": 3.35e12, "H200": 4.8e12}
# GH100's L2 (both devices): assumed read bandwidth to the SMs. Public microbenchmarks give
# 5.5-7 TB/s for the whole L2; this model uses 7 TB/s.
L2_BW = 7e12
PEAK = {"tf32": 495e12, "bf16": 990e12, "ieee": 67e12}
SHIFT_ROWS = 32
SM_COUNT = 132
GRANULE = 64
MIN_CHUNK = 2048


@dataclass
class Cost:
    dram: float = 0.0
    l2: float = 0.0
    flops: float = 0.0

    def time(self, bw: float, peak: float) -> float:
        return max(self.dram / bw, self.l2 / L2_BW, self.flops / peak)


def _splits(ds, n, tiles, esize):
    target = 2 * SM_COUNT
    if len(ds) * tiles >= target:
        return [1] * len(ds)
    per = math.ceil(target / (len(ds) * tiles))
    out = []
    for d in ds:
        s = max(1, min(per, d // MIN_CHUNK, d * esize // (64 * n)))
        chunk = math.ceil(math.ceil(d / s) / GRANULE) * GRANULE
        out.append(math.ceil(d / chunk))
    return out


def gram(n: int, ds: list[int], esize: int, fma: bool = False) -> dict[str, Cost]:
    bm = 64 if (n <= 64 or fma) else 128  # kernels/_configs.py gram_block_m
    T = math.ceil(n / bm)
    rows = [min(bm, n - t * bm) for t in range(T)]
    S = _splits(ds, n, T * (T + 1) // 2, esize)
    fwd, center = Cost(), Cost()
    for d, s in zip(ds, S, strict=True):
        fwd.dram += n * d * esize
        diag = sum(r + SHIFT_ROWS for r in rows)
        off = sum(rows[i] + rows[j] + SHIFT_ROWS for i in range(T) for j in range(i + 1, T))
        fwd.l2 += (diag + off) * d * esize
        upper = sum(rows[i] * rows[j] for i in range(T) for j in range(i, T))
        fwd.dram += s * upper * 4  # partial K tiles written
        fwd.flops += 2 * upper * d
        center.dram += s * upper * 4 + n * n * 4  # read every split's upper tiles, write full C
    center.l2 = center.dram
    return {"gram (fwd + centre)": Cost(fwd.dram + center.dram, fwd.l2 + center.l2, fwd.flops)}


def pairs(n: int, P: int, distinct: int) -> Cost:
    return Cost(distinct * n * n * 4, 2 * P * n * n * 4, 2 * P * n * n)


def matrix(n: int, La: int, Lb: int) -> Cost:
    blk = lambda L: max(16, min(64, 1 << (L - 1).bit_length()))  # noqa: E731
    ta, tb = math.ceil(La / blk(La)), math.ceil(Lb / blk(Lb))
    return Cost((La + Lb) * n * n * 4, (La * tb + Lb * ta) * n * n * 4, 2 * La * Lb * n * n)


def backward(n: int, ds: list[int], slots: int, esize: int, fma: bool = False) -> Cost:
    bm, bn = (64, 64) if fma else ((64 if n <= 64 else 128), 128)  # _configs.grad_blocks
    tm = math.ceil(n / bm)
    c = Cost()
    for d in ds:
        tn = math.ceil(d / bn)
        c.dram += slots * n * n * 4 + 2 * n * d * esize
        c.l2 += tm * tn * (slots * bm * n * 4 + n * bn * esize) + n * d * esize
        c.flops += 2 * n * n * d * math.ceil(slots / 4)
    return c


W1_GUIDE = [200704] * 3 + [100352] * 2 + [50176] * 2 + [25088] * 2


def workloads(esize: int, fma: bool = False) -> dict[str, dict[str, Cost]]:
    """Per workload and kernel; ``fma``: IEEE fp32 (FMA-unit tiles)."""
    w1 = gram(256, [4096] * 8 + W1_GUIDE, esize, fma)
    w1["cka pairs (8)"] = pairs(256, 8, 16)
    w1["backward (8 targets, 2 C's)"] = backward(256, [4096] * 8, 2, esize, fma)
    w2 = gram(4096, [1024] * 12 + [768] * 12, esize, fma)
    w2["cka matrix 12 x 12"] = matrix(4096, 12, 12)
    w2["backward (12 targets, 2 C's)"] = backward(4096, [1024] * 12, 2, esize, fma)
    w3 = gram(512, [2048] * 48, esize, fma)
    w3["cka matrix 24 x 24"] = matrix(512, 24, 24)
    w3["cka pairs (24)"] = pairs(512, 24, 48)
    w3["backward (24 targets, 2 C's)"] = backward(512, [2048] * 24, 2, esize, fma)
    return {"W1": w1, "W2": w2, "W3": w3}


def table() -> str:
    out = [
        "| workload | kernel | DRAM MB (fp32 / bf16) | L2 MB (fp32 / bf16; IEEE tiles) | GFLOP |",
        "| --- | --- | --- | --- | --- |",
    ]
    f32, b16, ieee = workloads(4), workloads(2), workloads(4, fma=True)
    for w in f32:
        for k in f32[w]:
            a, b, c = f32[w][k], b16[w][k], ieee[w][k]
            out.append(
                f"| {w} | {k} | {a.dram / 1e6:.0f} / {b.dram / 1e6:.0f} "
                f"| {a.l2 / 1e6:.0f} / {b.l2 / 1e6:.0f}; {c.l2 / 1e6:.0f} | {a.flops / 1e9:.1f} |"
            )
    out += ["", "| workload | precision | " + " | ".join(f"{d} (ms)" for d in DEVICES) + " | bound by |"]
    out.append("| --- | --- | " + " | ".join("---" for _ in DEVICES) + " | --- |")
    for w in f32:
        for prec, costs in (("TF32", f32), ("bf16 inputs", b16), ("IEEE fp32", ieee)):
            peak = PEAK[{"TF32": "tf32", "bf16 inputs": "bf16", "IEEE fp32": "ieee"}[prec]]
            times = []
            for bw in DEVICES.values():
                times.append(sum(c.time(bw, peak) for c in costs[w].values()))
            c = Cost(*(sum(getattr(v, f) for v in costs[w].values()) for f in ("dram", "l2", "flops")))
            bw = list(DEVICES.values())[0]
            bound = max(
                ("DRAM", c.dram / bw), ("L2", c.l2 / L2_BW), ("flops", c.flops / peak), key=lambda e: e[1]
            )
            out.append(
                f"| {w} | {prec} | " + " | ".join(f"{t * 1e3:.3f}" for t in times) + f" | {bound[0]} |"
            )
    return "\n".join(out)


if __name__ == "__main__":
    print(table())
