"""Find the first op whose result depends on the processor code path (docs/reproducibility.md).

Runs the demo's digits baseline arm (seed 0, default sizes, one thread; no CKA code) for a few steps
and records, in execution order, every leaf module's output (forward hooks), every module's output
gradient (backward hooks), every parameter gradient and every parameter after the optimiser step.
Run it once per setting of the libraries' dispatch controls, then compare bitwise::

    python tests/repro_probe.py dump /tmp/native.pt
    ATEN_CPU_CAPABILITY=avx2 python tests/repro_probe.py dump /tmp/avx2.pt
    python tests/repro_probe.py compare /tmp/native.pt /tmp/avx2.pt

Not a test module (no ``test_`` prefix): the settings must be in the environment before torch starts.
"""

from __future__ import annotations

import sys

import torch


def dump(path: str, steps: int = 3) -> None:
    from fastguide.experiments import demo

    torch.set_num_threads(1)
    task = demo.default_tasks()[0]
    b = demo._build(task, 0, torch.device("cpu"))
    torch.manual_seed(1)
    target = b["make_target"]()
    torch.manual_seed(5)
    opt = torch.optim.Adam(target.parameters(), lr=task.lr)
    it = b["batches"](task.batch_size, torch.Generator().manual_seed(50_000))
    rec: list = []
    step = 0
    for name, m in target.named_modules():
        if not list(m.children()):
            m.register_forward_hook(
                lambda mod, i, o, name=name: rec.append((step, "forward", name, o.detach().clone()))
            )
            m.register_full_backward_hook(
                lambda mod, gi, go, name=name: rec.append((step, "backward", name, go[0].detach().clone()))
            )
    target.train()
    for step in range(1, steps + 1):
        x, y = next(it)
        loss, _ = b["loss_correct"](target(x.requires_grad_()), y)
        rec.append((step, "loss", "loss", loss.detach().clone()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        rec += [(step, "grad", n, p.grad.detach().clone()) for n, p in target.named_parameters()]
        opt.step()
        rec += [(step, "param", n, p.detach().clone()) for n, p in target.named_parameters()]
    torch.save(rec, path)
    print(f"{len(rec)} records, ATen capability {torch.backends.cpu.get_cpu_capability()}")


def compare(path_a: str, path_b: str) -> str:
    a, b = torch.load(path_a), torch.load(path_b)
    first, differ = None, 0
    for (s, kind, name, t), (s2, kind2, name2, t2) in zip(a, b, strict=True):
        assert (s, kind, name) == (s2, kind2, name2), "the two runs recorded different ops"
        if not torch.equal(t, t2):
            differ += 1
            if first is None:
                first = f"step {s} {kind} {name}: max |diff| {float((t - t2).abs().max()):.3g}"
    return (
        "bit-identical" if first is None else f"first difference at {first}; {differ}/{len(a)} records differ"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["dump"]:
        dump(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 3)
    elif sys.argv[1:2] == ["compare"]:
        print(compare(sys.argv[2], sys.argv[3]))
    else:
        raise SystemExit(__doc__)
