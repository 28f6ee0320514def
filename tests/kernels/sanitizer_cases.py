"""Small cases of every kernel launcher, for ``compute-sanitizer`` (benchmarks/gpu_check.sh).

Runs each launcher once on awkward small shapes (sizes that are not multiples of the blocks,
transposed and strided layers, a 16-bit layer, forced feature splits, two stacks, several chunks
per output, more C's than one pass combines) and checks the results against float64 references,
so a sanitizer run also fails on wrong numbers. Exit status 0 when every case passes.

    compute-sanitizer --tool memcheck python tests/kernels/sanitizer_cases.py --small
    TRITON_INTERPRET=1 python tests/kernels/sanitizer_cases.py --small   # CPU, no sanitizer
"""

from __future__ import annotations

import argparse
import sys

import torch


def _close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float, failures: list) -> None:
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    err = (got - want).abs().max().item() if got.numel() else 0.0
    scale = max(want.abs().max().item() if want.numel() else 0.0, 1e-30)
    ok = got.shape == want.shape and bool(torch.isfinite(got).all()) and err <= rtol * scale
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max |diff| {err:.3g} (scale {scale:.3g})")
    if not ok:
        failures.append(name)


def run(n: int, device: torch.device) -> list[str]:
    import fastguide.kernels as K

    from fastguide import _torch_backend as tb

    failures: list[str] = []
    torch.manual_seed(0)
    xs = [
        torch.randn(n, 70, device=device) + 3.0,
        torch.randn(33, n, device=device).T,
        torch.randn(n, 19, device=device)[:, ::2],
        torch.randn(n, 40, device=device).half(),
    ]
    ref = [x.float() for x in xs]
    for est in ("unbiased", "biased"):
        C, s, ok, h, _ = K.gram_fwd(xs, est, split=3)
        Ct, st, okt, ht, _ = tb.gram_fwd(ref, est)
        _close(f"gram_fwd {est} C", C, Ct, 2e-2, failures)
        _close(f"gram_fwd {est} h", h, ht, 2e-2, failures)
    C, s, ok, h, _ = K.gram_fwd(xs[:3], "unbiased")
    C2, _, ok2, h2, _ = K.gram_fwd([torch.randn(n, 25, device=device)], "unbiased")
    pairs = [(0, 3), (1, 3), (2, 2), (0, 1), (2, 0)]
    cka, hs = K.cka_pairs_fwd(C, h, ok, pairs, "unbiased", C2=C2, h2=h2, ok2=ok2)
    stack = torch.cat([C, C2]).double()
    N = n * (n - 3)
    want = torch.stack([(stack[i] * stack[j]).sum() for i, j in pairs]) / N
    _close("cka_pairs_fwd hsic", hs, want, 1e-5, failures)
    hh = torch.cat([h, h2]).double()
    _close(
        "cka_pairs_fwd cka",
        cka,
        want / torch.stack([hh[i].sqrt() * hh[j].sqrt() for i, j in pairs]),
        1e-5,
        failures,
    )
    m, mh = K.cka_matrix_fwd(C, C, h, h, ok, ok, "biased")
    _close(
        "cka_matrix_fwd hsic",
        mh,
        C.double().flatten(1) @ C.double().flatten(1).T / (n - 1) ** 2,
        1e-5,
        failures,
    )
    pi = torch.tensor([0, 2, 1], device=device)
    pj = torch.tensor([0, 0, 0], device=device)
    _close(
        "hsic_pairs",
        K.hsic_pairs(C, C2, pi, pj),
        (C.double()[pi] * C2.double()[pj]).sum((1, 2)),
        1e-5,
        failures,
    )
    _close(
        "hsic_matrix fp16",
        K.hsic_matrix(C.half(), C.half()),
        C.half().double().flatten(1) @ C.half().double().flatten(1).T,
        1e-3,
        failures,
    )

    g = torch.tensor([1.0, -0.5, 0.25, 2.0, 0.7], device=device)
    dxs = K.cka_pairs_bwd(g, cka, xs[:3], [0, 1, 2], C, s, h, ok, pairs, "unbiased", C2=C2, h2=h2, ok2=ok2)
    # Reference: DESIGN.md section 2's weights, G_a = sum_b W[a, b] C_b / N, dX_a = (2 / s_a) G_a X^_a.
    oka = torch.cat([ok, ok2]).cpu()
    L = stack.shape[0]
    Wp = torch.zeros(L, L, dtype=torch.float64)
    for p, (i, j) in enumerate(pairs):
        if not (oka[i] and oka[j]):
            continue
        gp, cp = g[p].double().cpu(), cka[p].double().cpu()
        alpha = gp / (hh[i].sqrt() * hh[j].sqrt()).cpu()
        Wp[i, j] += alpha
        Wp[j, i] += alpha
        Wp[i, i] -= gp * cp / hh[i].cpu()
        Wp[j, j] -= gp * cp / hh[j].cpu()
    for t, x in enumerate(xs[:3]):
        X = x.double().cpu()
        G = (Wp[t][:, None, None] * stack.cpu()).sum(0) / N
        want = (2.0 / s[t].double().cpu()) * G @ (X - X[:32].mean(0))
        _close(f"cka_pairs_bwd layer {t}", dxs[t], want, 1e-4, failures)
    W = torch.randn(5, device=device)
    Cs = [C[0], C[1].T, C[2], C2[0], C[0] * 0.5]
    out = K.grad_x(xs[0], Cs, W, torch.tensor(0.3, device=device))
    X = xs[0].double()
    G = sum(w.double() * c.double() for w, c in zip(W, Cs, strict=True))
    _close("grad_x k=5", out, 0.3 * G @ (X - X[:32].mean(0)), 1e-4, failures)
    return failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="n = 37 (default n = 100)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_float32_matmul_precision("highest")
    failures = run(37 if args.small else 100, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print("FAILED: " + ", ".join(failures) if failures else "all cases passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
