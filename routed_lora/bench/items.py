"""The suite as a flat list of benchmark items: the one definition ``pytest benchmarks/`` (pytest-benchmark)
draws from, built from the same plans ``routed-lora bench`` runs.

An item is one provider on one case and mode: layer entries of :func:`.suite.plan` (every mode, every provider),
the decode and isolation cases of :mod:`.decode`, and the end-to-end training step of :mod:`.e2e`. Its
``prepare()`` builds what it times (once per item) and returns a :class:`Prepared`: the timed ``target``, an
untimed ``setup`` before each call, and how the time is taken:

- CPU: the wall clock (perf_counter), the cache flushed in ``setup`` where ``routed-lora bench`` flushes;
- CUDA: device time. Forward, full (forward + backward) and decode calls are captured once in a CUDA graph and
  replayed (no host work left in the timed region), read with CUDA events (:class:`.graphs.cuda_event_timer`);
  a call that cannot be captured, a backward alone (it needs a fresh forward each time) and the end-to-end
  step run eagerly between CUDA events. ``timing`` in the item's extra info says which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["BenchItem", "Prepared", "benchmark_items"]


@dataclass
class Prepared:
    target: Callable[..., Any]
    setup: Callable[[], Any] | None
    timing: str
    rounds: int
    warmup_rounds: int = 1


@dataclass
class BenchItem:
    id: str
    group: str
    kind: str
    device: str
    provider: str
    info: dict = field(default_factory=dict)
    prepare: Callable[[], Prepared] | None = None

    def available(self) -> tuple[bool, str]:
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            return False, "no CUDA device"
        if self.kind in ("layer", "decode"):
            from .providers import provider_available

            return provider_available(self.provider, self.device)
        if self.kind == "e2e":
            from .providers import provider_available

            return provider_available("peft", self.device) if self.provider == "peft" else (True, "")
        return True, ""


_problems: dict = {}


def _problem(case):
    from .providers import make_problem

    if case not in _problems:
        _problems.clear()  # one case's weights at a time: items of a case run one after the other
        _problems[case] = make_problem(case)
    return _problems[case]


def _case_id(c) -> str:
    return f"{c.shape}-M{c.M}-K{c.K}-N{c.N}-r{c.r}-tool{c.tool_frac:g}-{c.dtype}"


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def _graph_or_eager(fn, device, rounds, setup=None, eager_timing="cuda_events_eager"):
    """On CUDA: a graph replay of ``fn`` when it can be captured, else ``fn`` eagerly; on CPU: ``fn``."""
    if not _is_cuda(device):
        return Prepared(fn, setup, "cpu_perf_counter", rounds)
    from .graphs import _capture

    try:
        graph = _capture(fn, warmup=2)
        return Prepared(graph.replay, None, "cuda_graph_replay", rounds)
    except Exception as exc:  # not capturable (a host sync, an unsupported op): time it eagerly
        torch.cuda.synchronize()
        return Prepared(fn, setup, f"{eager_timing} (capture failed: {type(exc).__name__})", rounds)


def _layer_item(entry, mode, provider):
    from .providers import build
    from .suite import _reset, _timed_for
    from .timing import CacheFlusher

    c = entry.case

    def prepare():
        problem = _problem(c)
        gen = torch.Generator().manual_seed(c.seed + 7)
        x = torch.randn(c.M, c.K, generator=gen).to(c.device, c.torch_dtype).requires_grad_(True)
        g = torch.randn(c.M, c.N, generator=gen).to(c.device, c.torch_dtype)
        built = build(provider, problem)
        timed = _timed_for(provider, built, x, g, mode)
        rounds = max(entry.min_repeats, 5)
        if _is_cuda(c.device) and mode != "backward":
            _reset(x, built.params)
            return _graph_or_eager(lambda: timed.run(timed.prepare()), c.device, rounds)
        flush = CacheFlusher(c.device)

        def setup():
            state = timed.prepare()
            flush()
            return (state,), {}

        timing = "cuda_events_eager" if _is_cuda(c.device) else "cpu_perf_counter"
        return Prepared(timed.run, setup, timing, rounds)

    cid = _case_id(c)
    return BenchItem(
        id=f"layer-{entry.sweep}-{cid}-{mode}-{provider}",
        group=f"layer {entry.sweep} {cid} {mode} ({c.device})",
        kind="layer", device=c.device, provider=provider,
        info={"kind": "layer", "sweep": entry.sweep, "mode": mode, **c.as_dict()},
        prepare=prepare,
    )


def _decode_item(case, provider, threads=1, repeats=200):
    from .decode import decode_forward

    def prepare():
        problem = _problem(case)
        fwd = decode_forward(provider, problem)[0]
        x = torch.randn(case.M, case.K, generator=torch.Generator().manual_seed(case.seed + 11)).to(
            case.device, case.torch_dtype)

        def call():
            with torch.no_grad():
                return fwd(x)

        return _graph_or_eager(call, case.device, repeats)

    cid = _case_id(case)
    return BenchItem(
        id=f"decode-{cid}-{provider}", group=f"decode no-grad {cid} ({case.device})", kind="decode",
        device=case.device, provider=provider,
        info={"kind": "decode", "mode": "forward_nograd", "threads": threads, **case.as_dict()},
        prepare=prepare,
    )


def _isolation_item(case, mode):
    from .decode import isolation_step

    def prepare():
        forward, backward = isolation_step(case, _problem(case))

        def setup():  # no cache flush, as run_isolation
            return (forward(),), {}

        def target(y):
            backward(y, mode)

        timing = "cuda_events_eager" if _is_cuda(case.device) else "cpu_perf_counter"
        return Prepared(target, setup, timing, 15)

    cid = _case_id(case)
    return BenchItem(
        id=f"isolation-{cid}-{mode}", group=f"isolation backward {cid} ({case.device})", kind="isolation",
        device=case.device, provider="routed_torch",
        info={"kind": "isolation", "mode": "backward", "isolation": mode, **case.as_dict()},
        prepare=prepare,
    )


_e2e_built: dict = {}


def _e2e_item(device, quick, provider):
    from .e2e import e2e_config, e2e_steps

    cfg = e2e_config(device, quick)

    def prepare():
        key = (device, quick)
        if key not in _e2e_built:
            _e2e_built.clear()
            _e2e_built[key] = e2e_steps(device, quick, cfg)
        step = _e2e_built[key]["steps"][provider]
        step()  # optimizer state made outside the timing
        timing = "cuda_events_eager" if _is_cuda(device) else "cpu_perf_counter"
        return Prepared(step, None, timing, 5 if quick else 10)

    return BenchItem(
        id=f"e2e-{'quick' if quick else 'full'}-{torch.device(device).type}-{provider}",
        group=f"e2e training step ({device})", kind="e2e", device=device, provider=provider,
        info={"kind": "e2e", "tokens": cfg.batch * cfg.seq, **{f"e2e_{k}": v for k, v in cfg.as_dict().items()}},
        prepare=prepare,
    )


def benchmark_items(device: str = "cpu", quick: bool = True, *, kinds=("layer", "decode", "isolation", "e2e"),
                    providers=None) -> list[BenchItem]:
    """Every item of the suite on ``device`` (``quick``: the ``routed-lora bench --quick`` set)."""
    from .decode import DECODE_PROVIDERS, decode_cases, isolation_cases
    from .providers import PROVIDERS
    from .suite import plan

    items: list[BenchItem] = []
    provs = tuple(providers or PROVIDERS)
    if "layer" in kinds:
        for entry in plan(device, quick):
            for mode in entry.modes:
                items += [_layer_item(entry, mode, p) for p in provs]
    if "decode" in kinds:
        for case in decode_cases(device, quick):
            items += [_decode_item(case, p) for p in DECODE_PROVIDERS if p in provs]
    if "isolation" in kinds and "routed_torch" in provs:
        for case in isolation_cases(device, quick):
            items += [_isolation_item(case, m) for m in ("none", "recheck", "sanitize")]
    if "e2e" in kinds:
        items += [_e2e_item(device, quick, p) for p in ("routed_lora", "peft")]
    return items
