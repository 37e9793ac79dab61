"""Interleaved timing: warm-up, many repeats, cache flushing, CUDA events, median and p20/p80.

Each provider is a :class:`Timed`: an untimed ``prepare()`` (fresh state: gradients reset, the forward of a
backward-only measurement) returning a state, and a timed ``run(state)``. :func:`time_interleaved` runs one
repeat of every provider per round, rotating the order each round, so that drift (other jobs on the machine,
clock changes) hits all providers alike; ratios are taken round by round (paired) as well as from medians.

Before every timed call a buffer larger than the last-level cache is overwritten (as Triton's ``do_bench``
does), so no provider is flattered by inputs or weights left in cache by the previous call; on a GPU the
timed region is bracketed by CUDA events and synchronised, around one call or many queued ones (``queued``),
so the figure is the device's time. :mod:`.graphs` times CUDA-graph replays, where no host work is left at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["Timed", "Stats", "time_interleaved", "time_once", "paired_ratio", "summarize", "CacheFlusher"]


@dataclass
class Timed:
    name: str
    run: Callable[[Any], Any]
    prepare: Callable[[], Any] = lambda: None
    cleanup: Callable[[Any, Any], None] = lambda state, out: None


@dataclass
class Stats:
    n: int
    median: float
    p20: float
    p80: float
    min: float
    mean: float
    times: list = field(default_factory=list, repr=False)

    def as_dict(self, unit: float = 1e3, suffix: str = "_ms") -> dict:
        return {
            "n": self.n,
            "median" + suffix: self.median * unit,
            "p20" + suffix: self.p20 * unit,
            "p80" + suffix: self.p80 * unit,
            "min" + suffix: self.min * unit,
            "mean" + suffix: self.mean * unit,
        }


def _quantile(sorted_vals, q):
    """Linear-interpolation quantile (numpy's default) of an already sorted list."""
    if not sorted_vals:
        return float("nan")
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def summarize(times) -> Stats:
    s = sorted(float(t) for t in times)
    n = len(s)
    return Stats(
        n=n,
        median=_quantile(s, 0.5),
        p20=_quantile(s, 0.2),
        p80=_quantile(s, 0.8),
        min=s[0] if s else float("nan"),
        mean=sum(s) / n if n else float("nan"),
        times=list(times),
    )


def _llc_bytes() -> int:
    """Size of the CPU's largest cache (from sysfs), 32 MiB when unknown."""
    best = 0
    try:
        import glob

        for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
            txt = open(path).read().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1], 1)
            best = max(best, int(txt.rstrip("KMG")) * mult)
    except Exception:  # pragma: no cover - exotic systems
        pass
    return best or (32 << 20)


class CacheFlusher:
    """Overwrites a buffer twice the size of the last-level cache (CPU) or 256 MiB (GPU, above any L2)."""

    def __init__(self, device: torch.device | str, nbytes: int | None = None):
        device = torch.device(device)
        if nbytes is None:
            nbytes = (256 << 20) if device.type == "cuda" else 2 * _llc_bytes()
        self.buf = torch.empty(nbytes // 4, dtype=torch.int32, device=device) if nbytes > 0 else None

    def __call__(self):
        if self.buf is not None:
            self.buf.fill_(1)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(t: Timed, device: torch.device, flush: CacheFlusher | None, queued: int = 1) -> float:
    """Seconds of one timed ``run`` (state prepared and cache flushed first, both untimed).

    On a GPU the time is the device's, from CUDA events. ``queued`` > 1 (GPU only) queues that many ``run``
    calls on the same prepared state between the two events and returns the time per call: the host enqueues
    ahead of the GPU, so launch overhead is hidden whenever the GPU is the bottleneck, as in a model where
    layers follow each other (``run`` must then be repeatable on one state: forward, or forward + backward
    with gradients accumulating)."""
    state = t.prepare()
    if flush is not None:
        flush()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(max(1, queued)):
            out = t.run(state)
        end.record()
        end.synchronize()
        dt = start.elapsed_time(end) / 1e3 / max(1, queued)
    else:
        t0 = time.perf_counter()
        out = t.run(state)
        dt = time.perf_counter() - t0
    t.cleanup(state, out)
    return dt


def time_interleaved(
    timed: list[Timed],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 2,
    min_repeats: int = 5,
    max_repeats: int = 100,
    budget_s: float = 2.0,
    flush: bool = True,
    queued: int = 1,
) -> tuple[dict[str, Stats], list[dict[str, float]]]:
    """Time every provider in ``timed``, interleaved; returns (stats by name, the rounds: one dict of seconds per
    round). Repeats: as many rounds as fit in ``budget_s`` (estimated after warm-up), within
    [min_repeats, max_repeats]. ``queued``: calls per timed sample on a GPU (see :func:`time_once`)."""
    device = torch.device(device)
    flusher = CacheFlusher(device) if flush else None
    t0 = time.perf_counter()
    for _ in range(warmup):
        for t in timed:
            time_once(t, device, flusher, queued)
    per_round = (time.perf_counter() - t0) / max(warmup, 1)
    repeats = int(budget_s / per_round) if per_round > 0 else max_repeats
    repeats = max(min_repeats, min(max_repeats, repeats))
    rounds: list[dict[str, float]] = []
    n = len(timed)
    for i in range(repeats):
        row = {}
        for j in range(n):
            t = timed[(i + j) % n]  # rotate the order so no provider always runs first
            row[t.name] = time_once(t, device, flusher, queued)
        rounds.append(row)
    stats = {t.name: summarize([r[t.name] for r in rounds]) for t in timed}
    return stats, rounds


def paired_ratio(rounds: list[dict[str, float]], name: str, base: str) -> Stats:
    """Round-by-round ratio time[name] / time[base] (both measured in the same round), summarised."""
    return summarize([r[name] / r[base] for r in rounds if name in r and base in r and r[base] > 0])
