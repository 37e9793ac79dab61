"""Where the time of a provider's forward + backward goes, op by op, relative to the frozen-linear floor.

Runs the floor and a provider alternately under ``torch.profiler`` (shapes recorded), many steps each, and
reports per (op, input shapes) the self time per step and its share of the floor's step time; that tells what
the routed layer pays on top of the two frozen GEMMs (forward and input gradient). Profiler times are inflated
alike for both, so the shares are what to read::

    python -m routed_lora.bench.breakdown --M 4096 --K 1024 --N 1024 --r 16 [--steps 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import warnings
from collections import defaultdict

import torch

from .providers import Case, build, make_problem

__all__ = ["breakdown", "format_breakdown"]


def breakdown(case: Case, provider: str = "routed_torch", steps: int = 10, warmup: int = 2) -> dict:
    """{"floor_ms": floor step ms, "provider_ms": provider step ms, "ops": [(name, shapes, calls/step, ms/step)]}
    (ops sorted by time, self CPU time; ms per step)."""
    problem = make_problem(case)
    x = torch.randn(case.M, case.K, dtype=case.torch_dtype, device=case.device, requires_grad=True)
    g = torch.randn(case.M, case.N, dtype=case.torch_dtype, device=case.device)
    built = {n: build(n, problem) for n in ("linear", provider)}

    def step(b):
        x.grad = None
        for p in b.params:
            p.grad = None
        b.forward(x).backward(g)

    for _ in range(warmup):
        for b in built.values():
            step(b)
    totals = {n: defaultdict(lambda: [0, 0.0]) for n in built}
    step_ms = {n: 0.0 for n in built}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(steps):
            for n in (list(built) if i % 2 == 0 else list(built)[::-1]):
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
                    step(built[n])
                for ev in prof.key_averages(group_by_input_shape=True):
                    key = (ev.key, str(ev.input_shapes))
                    totals[n][key][0] += ev.count
                    totals[n][key][1] += ev.self_cpu_time_total / 1e3
                step_ms[n] += sum(ev.self_cpu_time_total for ev in prof.key_averages()) / 1e3
    ops = sorted(
        ((k[0], k[1], c / steps, t / steps) for k, (c, t) in totals[provider].items()), key=lambda o: -o[3]
    )
    floor_ops = sorted(((k[0], k[1], c / steps, t / steps) for k, (c, t) in totals["linear"].items()),
                       key=lambda o: -o[3])
    return {
        "floor_ms": step_ms["linear"] / steps,
        "provider_ms": step_ms[provider] / steps,
        "ops": ops,
        "floor_ops": floor_ops,
    }


def format_breakdown(res: dict, top: int = 16) -> str:
    floor = res["floor_ms"]
    lines = [
        f"floor (frozen linear fwd + dx): {floor:.1f} ms/step; provider: {res['provider_ms']:.1f} ms/step "
        f"({res['provider_ms'] / floor:.3f}x, profiler self-CPU)",
        "",
        "| op | input shapes | calls/step | ms/step | % of floor |",
        "|---|---|---|---|---|",
    ]
    for name, shapes, calls, ms in res["ops"][:top]:
        lines.append(f"| {name} | {shapes[:90]} | {calls:g} | {ms:.2f} | {100 * ms / floor:.1f}% |")
    lines += ["", "floor ops:", "", "| op | input shapes | calls/step | ms/step |", "|---|---|---|---|"]
    for name, shapes, calls, ms in res["floor_ops"][:6]:
        lines.append(f"| {name} | {shapes[:90]} | {calls:g} | {ms:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--M", type=int, default=4096)
    ap.add_argument("--K", type=int, default=1024)
    ap.add_argument("--N", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--tool-frac", type=float, default=0.5)
    ap.add_argument("--provider", default="routed_torch")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    case = Case(M=a.M, K=a.K, N=a.N, r=a.r, tool_frac=a.tool_frac)
    print(format_breakdown(breakdown(case, a.provider, a.steps)))


if __name__ == "__main__":
    main()
