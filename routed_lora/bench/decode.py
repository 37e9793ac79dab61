"""Decode and isolation cases: the no-grad forward at a few tokens, and what adapter isolation costs a backward.

Decode (``kind = "decode"``): rollouts are mostly no-grad layer calls at M = batch size. Providers, on the same
weights and routes, all under ``torch.no_grad()``:

- ``linear``: ``F.linear`` alone (the floor);
- ``routed_torch``: ``RoutedLoRALinear`` with routes set once by ``set_routes`` (as a model in ``generate`` has
  them), PyTorch path;
- ``routed_triton``: the same on the Triton kernels (CUDA only);
- ``peft``: PEFT's two adapters combined by per-token masks (:func:`.providers.peft_masked_forward`).

CPU decode cases run with one thread (the issue-11 setting: fp32, K = N = 1024, r = 16, E = 2) and without the
cache flush: a decoding layer's weights are read call after call, as here. Records carry the paired ratios to
``linear`` and to ``peft``.

Isolation (``kind = "isolation"``): the routed backward (forward untimed) in each isolation mode of
:func:`routed_lora.reference.set_isolation_mode`: ``none`` (the plain product, no isolation), ``recheck`` (what
CPU tensors get) and ``sanitize`` (what CUDA tensors get), paired ratio to ``none``.
"""

from __future__ import annotations

import contextlib

import torch

from .providers import Case, build, make_problem, provider_available, use_backend
from .timing import Timed, paired_ratio, time_interleaved

__all__ = ["DECODE_PROVIDERS", "decode_cases", "run_decode", "isolation_cases", "run_isolation", "isolation_step", "decode_forward"]

DECODE_PROVIDERS = ("linear", "routed_torch", "routed_triton", "peft")


def decode_cases(device: str = "cpu", quick: bool = False) -> list[Case]:
    """M in {1, 8} (quick) or {1, 8, 16, 64}, half the tokens on each adapter (M = 1: adapter 0)."""
    dev = torch.device(device).type
    dtype = "float32" if dev == "cpu" else "bfloat16"
    shape, (K, N) = ("small-1024", (1024, 1024)) if dev == "cpu" else ("qwen2.5-7b.hidden", (3584, 3584))
    tokens = (1, 8) if quick else (1, 8, 16, 64)
    return [Case(M=m, K=K, N=N, r=16, E=2, tool_frac=0.5, dtype=dtype, device=device, shape=shape) for m in tokens]


def isolation_cases(device: str = "cpu", quick: bool = False) -> list[Case]:
    """The issue-2 point (M = 4096, K = N = 1024) and smaller M; on GPU the 7B hidden shape at 4096 tokens."""
    dev = torch.device(device).type
    if dev != "cpu":
        return [Case(M=m, K=3584, N=3584, r=16, dtype="bfloat16", device=device, shape="qwen2.5-7b.hidden")
                for m in (16, 4096)]
    tokens = (16, 4096) if quick else (1, 16, 256, 4096)
    return [Case(M=m, K=1024, N=1024, r=16, device=device, shape="small-1024") for m in tokens]


def decode_forward(name: str, problem):
    """(forward for x under no_grad, module) of decode provider ``name`` on ``problem``."""
    import routed_lora as rl

    built = build(name, problem)
    if name.startswith("routed_"):
        layer = built.module
        rl.set_routes(layer, problem.routes)  # checked once, as a model's hooks do; every call reads them
        backend_name = name.split("_", 1)[1]

        def fwd(x):
            with use_backend(backend_name):
                return layer(x)

        return fwd, layer
    return built.forward, built.module


@contextlib.contextmanager
def _threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_decode(device: str = "cpu", quick: bool = False, *, cases=None, providers=DECODE_PROVIDERS,
               threads: int | None = 1, repeats: int = 200, budget_s: float | None = None) -> list[dict]:
    """Time the no-grad forward of every provider, interleaved, ``repeats`` rounds (fewer if ``budget_s`` runs
    out); returns records (without the machine fields)."""
    rows = []
    dev = torch.device(device)
    with _threads(threads if dev.type == "cpu" else None), torch.no_grad():
        for case in cases or decode_cases(device, quick):
            problem = make_problem(case)
            names = [p for p in providers if provider_available(p, device)[0]]
            gen = torch.Generator().manual_seed(case.seed + 11)
            x = torch.randn(case.M, case.K, generator=gen).to(dev, case.torch_dtype)
            fwds = {n: decode_forward(n, problem)[0] for n in names}
            timed = [Timed(n, run=lambda _, f=fwds[n]: f(x)) for n in names]
            stats, rounds = time_interleaved(timed, device=dev, warmup=max(5, repeats // 20), min_repeats=repeats,
                                             max_repeats=repeats, budget_s=budget_s or 1e9, flush=False)
            base = {"kind": "decode", "sweep": "decode", **case.as_dict(), "mode": "forward_nograd",
                    "threads": torch.get_num_threads(), "m_lora": int((problem.routes >= 0).sum())}
            for n in names:
                row = {**base, "provider": n, **stats[n].as_dict(), **stats[n].as_dict(1e6, "_us")}
                row["ratio_to_floor"] = paired_ratio(rounds, n, "linear").median if "linear" in stats else None
                row["ratio_to_peft"] = paired_ratio(rounds, n, "peft").median if "peft" in stats else None
                rows.append(row)
    return rows


def isolation_step(case: Case, problem):
    """``(prepare, backward)`` for the isolation cases (``run_isolation`` and the pytest-benchmark items):
    ``prepare()`` clears the gradients and returns the routed layer's forward output (PyTorch path, x requiring
    a gradient); ``backward(y, mode)`` runs its backward under isolation ``mode``
    (:func:`routed_lora.reference.set_isolation_mode`), restoring the previous mode after."""
    from routed_lora import reference

    built = build("routed_torch", problem)
    gen = torch.Generator().manual_seed(case.seed + 13)
    dev = torch.device(case.device)
    x = torch.randn(case.M, case.K, generator=gen).to(dev, case.torch_dtype).requires_grad_(True)
    g = torch.randn(case.M, case.N, generator=gen).to(dev, case.torch_dtype)

    def prepare():
        x.grad = None
        for p in built.params:
            p.grad = None
        return built.forward(x)

    def backward(y, mode):
        old = reference.set_isolation_mode(mode)
        try:
            y.backward(g)
        finally:
            reference.set_isolation_mode(old)

    return prepare, backward


def run_isolation(device: str = "cpu", quick: bool = False, *, cases=None, budget_s: float = 3.0,
                  min_repeats: int = 15, flush: bool = False) -> list[dict]:
    """Time the routed backward (PyTorch path) in each isolation mode, interleaved; returns records. No cache
    flush by default: the flush's 2x-LLC fill made small-M backwards bimodal (p20-p80 of 1.9-5.6 ms at M = 16),
    and in cache the added work is the larger share, so the ratio is the conservative one."""
    modes = ("none", "recheck", "sanitize")
    rows = []
    dev = torch.device(device)
    for case in cases or isolation_cases(device, quick):
        prepare, backward = isolation_step(case, make_problem(case))
        timed = [Timed(m, run=lambda y, m=m: backward(y, m), prepare=prepare) for m in modes]
        stats, rounds = time_interleaved(timed, device=dev, min_repeats=min_repeats,
                                         budget_s=budget_s, flush=flush)
        base = {"kind": "isolation", "sweep": "isolation", **case.as_dict(), "mode": "backward",
                "provider": "routed_torch", "threads": torch.get_num_threads()}
        for m in modes:
            rows.append({**base, "isolation": m, **stats[m].as_dict(),
                         "ratio_to_none": paired_ratio(rounds, m, "none").median,
                         "ratio_to_none_p20": paired_ratio(rounds, m, "none").p20,
                         "ratio_to_none_p80": paired_ratio(rounds, m, "none").p80})
    return rows
