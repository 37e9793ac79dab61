"""Options of ``pytest benchmarks/``: which suite (quick or full), which kinds, which providers."""

from __future__ import annotations


def pytest_addoption(parser):
    group = parser.getgroup("routed-lora benchmarks")
    group.addoption("--suite", choices=("quick", "full"), default="quick",
                    help="the routed-lora bench set to run: quick (default, about as long as `routed-lora bench "
                         "--quick`) or full")
    group.addoption("--kinds", default="layer,decode,isolation,e2e",
                    help="comma-separated subset of layer,decode,isolation,e2e")
    group.addoption("--providers", default=None,
                    help="comma-separated subset of linear,routed_torch,routed_triton,naive,peft (default: all)")
