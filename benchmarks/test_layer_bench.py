"""Quick CPU layer benchmarks with pytest-benchmark: ``pytest benchmarks/`` (about a minute on 2 cores).

One benchmark group per case, one test per provider (frozen nn.Linear floor, routed-lora PyTorch path, naive
every-adapter-then-select, PEFT with two masked adapters): forward + backward on the same weights and routes.
pytest-benchmark runs providers one after the other, not interleaved; for interleaved timing, paired ratios and
memory records use ``routed-lora bench --quick`` (routed_lora/bench/suite.py).

    pytest benchmarks/ --benchmark-group-by=group --benchmark-columns=median,iqr,rounds
"""

from __future__ import annotations

import pytest
import torch

from routed_lora.bench.providers import Case, build, make_problem, provider_available

CASES = {
    # the issue-2 point: M = 4096, K = N = 1024, r = 16, two adapters, random routes (half tool tokens)
    "M4096-K1024-N1024-r16": Case(M=4096, K=1024, N=1024, r=16, tool_frac=0.5, shape="small-1024"),
    "M256-K1024-N1024-r16": Case(M=256, K=1024, N=1024, r=16, tool_frac=0.5, shape="small-1024"),
    "M1-K1024-N1024-r16": Case(M=1, K=1024, N=1024, r=16, tool_frac=0.0, shape="small-1024"),
}
PROVIDERS = ("linear", "routed_torch", "naive", "peft")
_problems: dict = {}


def _problem(name):
    if name not in _problems:
        _problems[name] = make_problem(CASES[name])
    return _problems[name]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_layer_forward_backward(benchmark, case, provider):
    ok, why = provider_available(provider, "cpu")
    if not ok:
        pytest.skip(why)
    problem = _problem(case)
    c = problem.case
    built = build(provider, problem)
    x = torch.randn(c.M, c.K, requires_grad=True)
    g = torch.randn(c.M, c.N)

    def setup():
        x.grad = None
        for p in built.params:
            p.grad = None

    def step():
        built.forward(x).backward(g)

    benchmark.group = f"layer fwd+bwd {case}"
    benchmark.extra_info.update(M=c.M, K=c.K, N=c.N, r=c.r, E=c.E, tool_frac=c.tool_frac, dtype=c.dtype)
    rounds = 5 if c.M >= 4096 else 20
    benchmark.pedantic(step, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)
    assert x.grad is not None and x.grad.shape == x.shape
