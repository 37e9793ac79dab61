"""The routed-lora suite under pytest-benchmark: ``pytest benchmarks/`` runs the same items as ``routed-lora
bench`` (routed_lora/bench/items.py builds them from the suite's own plans): layer cases in every mode and
provider, the no-grad decode cases, the isolation cost, the end-to-end training step; CPU items always, CUDA
items when a GPU is present (device time: CUDA-graph replay or CUDA events, see items.py), else skipped.

    pytest benchmarks/                                    # the quick set (CPU; + CUDA when present)
    pytest benchmarks/ --suite full --benchmark-json runs/bench.json
    pytest benchmarks/ --benchmark-save=base ... ; pytest benchmarks/ --benchmark-compare   # between commits
    pytest benchmarks/ --kinds decode --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

pytest-benchmark runs one item after the other (not interleaved); ``routed-lora bench`` interleaves providers and
reports paired ratios, which are steadier on a shared machine.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from routed_lora.bench.graphs import cuda_event_timer
from routed_lora.bench.items import benchmark_items

_CUDA_TIMER = cuda_event_timer()


def _items(config):
    suite = config.getoption("--suite")
    kinds = tuple(config.getoption("--kinds").split(","))
    provs = config.getoption("--providers")
    provs = tuple(provs.split(",")) if provs else None
    quick = suite == "quick"
    out = []
    for device in ("cpu", "cuda"):
        for item in benchmark_items(device, quick, kinds=kinds, providers=provs):
            marks = [pytest.mark.benchmark(group=item.group)]
            if device == "cuda":
                marks = [pytest.mark.benchmark(group=item.group, timer=_CUDA_TIMER)]
            out.append(pytest.param(item, id=f"{device}-{item.id}", marks=marks))
    return out


def pytest_generate_tests(metafunc):
    if "item" in metafunc.fixturenames:
        metafunc.parametrize("item", _items(metafunc.config))


@contextlib.contextmanager
def _threads(item):
    n = item.info.get("threads")
    old = torch.get_num_threads()
    if n and item.device == "cpu":
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def test_suite_item(benchmark, item):
    ok, why = item.available()
    if not ok:
        pytest.skip(why)
    with _threads(item):
        prepared = item.prepare()
        benchmark.extra_info.update(item.info, provider=item.provider, timing=prepared.timing)
        benchmark.pedantic(prepared.target, setup=prepared.setup, rounds=prepared.rounds,
                           warmup_rounds=prepared.warmup_rounds, iterations=1)
