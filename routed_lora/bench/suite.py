"""The layer suite: sweeps over shapes, tokens, ranks and tool fractions, written as JSONL records.

Shapes (K = in_features, N = out_features) come from real models (Qwen2.5-3B: hidden 2048, intermediate 11008;
Qwen2.5-7B: hidden 3584, intermediate 18944) plus a small CPU set. Sweeps:

- ``tokens``: every shape, tokens in {1, 16, 256, 1024, 4096, 16384}, r = 16, tool fraction 0.5, modes forward,
  backward and full;
- ``rank``: r in {8, 16, 64} at one shape, full mode;
- ``tool_frac``: tool-token fraction in {0, 0.1, 0.5, 1} at one shape, full mode.

fp32 on CPU, bf16 on GPU. On CPU the full suite skips cases whose frozen-linear forward + backward exceeds
``CPU_MAX_FLOPS`` (they would take minutes each); ``quick=True`` is a CPU set finishing in about two minutes,
centred on the issue-2 point (M = 4096, K = N = 1024, r = 16, two adapters, random routes).

Each (case, mode) times all providers interleaved; each case also gets one memory record per provider
(bytes saved for backward, extra peak memory of forward + backward). After the layer cases: the no-grad decode
cases and the isolation cost (:mod:`.decode`), then one end-to-end training step (:mod:`.e2e`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import flops as F
from .memory import extra_peak_bytes, saved_for_backward
from .providers import FLOOR, PROVIDERS, Case, build, make_problem, provider_available
from .timing import Timed, paired_ratio, time_interleaved

__all__ = [
    "SHAPES",
    "TOKENS",
    "Entry",
    "plan",
    "machine_info",
    "run_entry",
    "run_suite",
    "issue2_case",
    "SCHEMA",
]

SCHEMA = 1

# name -> (in_features K, out_features N)
SHAPES = {
    "small-1024": (1024, 1024),
    "small-1024x2816": (1024, 2816),
    "qwen2.5-3b.hidden": (2048, 2048),
    "qwen2.5-3b.up": (2048, 11008),
    "qwen2.5-3b.down": (11008, 2048),
    "qwen2.5-7b.hidden": (3584, 3584),
    "qwen2.5-7b.up": (3584, 18944),
    "qwen2.5-7b.down": (18944, 3584),
}
CPU_SHAPES = ("small-1024", "small-1024x2816", "qwen2.5-3b.hidden", "qwen2.5-3b.up", "qwen2.5-3b.down")
GPU_SHAPES = tuple(s for s in SHAPES if s != "small-1024x2816")
TOKENS = (1, 16, 256, 1024, 4096, 16384)
RANKS = (8, 16, 64)
TOOL_FRACS = (0.0, 0.1, 0.5, 1.0)
MODES = F.MODES
CPU_MAX_FLOPS = 1.2e11  # frozen linear forward + backward; ~1 s on a 2-core CPU


@dataclass
class Entry:
    case: Case
    modes: tuple = ("full",)
    sweep: str = "tokens"
    min_repeats: int = 5
    budget_s: float = 2.0


def issue2_case(device: str = "cpu", dtype: str = "float32") -> Case:
    """The issue-2 performance point: M = 4096, K = N = 1024, r = 16, two adapters, random routes."""
    return Case(M=4096, K=1024, N=1024, r=16, E=2, tool_frac=0.5, dtype=dtype, device=device, shape="small-1024")


def _case(shape, M, device, dtype, r=16, tool_frac=0.5):
    K, N = SHAPES[shape]
    return Case(M=M, K=K, N=N, r=r, tool_frac=tool_frac, dtype=dtype, device=device, shape=shape)


def plan(device: str = "cpu", quick: bool = False) -> list[Entry]:
    """The list of (case, modes) the suite runs on ``device``."""
    dev = torch.device(device).type
    dtype = "float32" if dev == "cpu" else "bfloat16"
    if quick:
        if dev != "cpu":
            shapes, tokens = ("qwen2.5-3b.hidden", "qwen2.5-7b.up"), (16, 4096)
            out = [Entry(_case(s, m, device, dtype), MODES, "tokens", 10, 1.0) for s in shapes for m in tokens]
            base = ("qwen2.5-3b.hidden", 4096)
        else:
            out = [Entry(issue2_case(device, dtype), MODES, "tokens", 7, 1.0)]
            out += [Entry(_case("small-1024", m, device, dtype), ("full",), "tokens", 7, 0.5) for m in (1, 256)]
            out.append(Entry(_case("qwen2.5-3b.hidden", 256, device, dtype), ("full",), "tokens", 7, 0.5))
            base = ("small-1024", 1024)
        s, m = base
        out += [Entry(_case(s, m, device, dtype, r=r), ("full",), "rank", 7, 0.5) for r in (8, 16, 64)]
        out += [
            Entry(_case(s, m, device, dtype, tool_frac=f), ("full",), "tool_frac", 7, 0.5) for f in (0.0, 0.1, 1.0)
        ]
        return out
    shapes = CPU_SHAPES if dev == "cpu" else GPU_SHAPES
    out = []
    for s in shapes:
        K, N = SHAPES[s]
        for m in TOKENS:
            if dev == "cpu" and F.floor_flops(m, K, N, "full") > CPU_MAX_FLOPS:
                continue
            out.append(Entry(_case(s, m, device, dtype), MODES, "tokens", 10, 3.0))
    s, m = ("small-1024", 4096) if dev == "cpu" else ("qwen2.5-3b.up", 4096)
    out += [Entry(_case(s, m, device, dtype, r=r), ("full",), "rank", 10, 3.0) for r in RANKS]
    out += [Entry(_case(s, m, device, dtype, tool_frac=f), ("full",), "tool_frac", 10, 3.0) for f in TOOL_FRACS]
    return out


def _git_sha() -> tuple[str, bool]:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return sha or "unknown", bool(dirty)
    except Exception:
        return "unknown", False


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception:
        return None


def machine_info(device: str = "cpu") -> dict:
    """Device name, library versions, git sha: the fields every record carries."""
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = f"{_cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    sha, dirty = _git_sha()
    import routed_lora

    return {
        "schema": SCHEMA,
        "device": dev.type,
        "device_name": name,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "routed_lora": routed_lora.__version__,
        "python": platform.python_version(),
        "git_sha": sha,
        "git_dirty": dirty,
        "hostname": platform.node(),
        "threads": torch.get_num_threads(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _reset(x, params):
    x.grad = None
    for p in params:
        p.grad = None


def _timed_for(name, built, x, g, mode) -> Timed:
    fwd, params = built.forward, built.params
    if mode == "forward":
        return Timed(name, run=lambda _: fwd(x), prepare=lambda: _reset(x, params))
    if mode == "backward":

        def prepare():
            _reset(x, params)
            return fwd(x)

        return Timed(name, run=lambda y: y.backward(g), prepare=prepare)
    if mode == "full":
        return Timed(name, run=lambda _: fwd(x).backward(g), prepare=lambda: _reset(x, params))
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


def _providers_for(device: str, providers=None) -> tuple[list[str], dict]:
    names, skipped = [], {}
    for p in providers or PROVIDERS:
        ok, why = provider_available(p, device)
        if ok:
            names.append(p)
        else:
            skipped[p] = why
    if FLOOR not in names:
        names.insert(0, FLOOR)
    return names, skipped


def saved_budget_bytes(case: Case, floor_saved: int) -> int:
    """Issue 2's budget: what the frozen linear saves + x + the routes (int64) + M*E*r elements."""
    elt = torch.empty((), dtype=case.torch_dtype).element_size()
    return floor_saved + case.M * case.K * elt + case.M * 8 + case.M * case.E * case.r * elt


QUEUED_CUDA_CALLS = 20


def queued_calls(device: str, mode: str) -> int:
    """Calls per timed sample: on a GPU, forward and full are timed over QUEUED_CUDA_CALLS queued calls (device
    time, host launch overhead hidden behind the GPU); a backward needs its own forward each time, so it is
    timed per call (CUDA events around it)."""
    return QUEUED_CUDA_CALLS if torch.device(device).type == "cuda" and mode != "backward" else 1


def timing_method(device: str, queued: int) -> str:
    if torch.device(device).type != "cuda":
        return "cpu_perf_counter"
    return f"cuda_events_queued_{queued}" if queued > 1 else "cuda_events_per_call"


def run_entry(entry: Entry, providers=None, *, memory: bool = True, flush: bool = True) -> list[dict]:
    """Time one entry (all its modes, all providers interleaved) and account for memory; returns records
    (without the machine fields)."""
    case = entry.case
    names, skipped = _providers_for(case.device, providers)
    problem = make_problem(case)
    gen = torch.Generator().manual_seed(case.seed + 7)
    x = torch.randn(case.M, case.K, generator=gen).to(case.device, case.torch_dtype).requires_grad_(True)
    g = torch.randn(case.M, case.N, generator=gen).to(case.device, case.torch_dtype)
    built = {}
    for n in names:  # a provider that fails to build or run on this case is recorded as skipped, not fatal
        try:
            b = build(n, problem)
            _reset(x, b.params)
            b.forward(x).backward(g)
            _reset(x, b.params)
            built[n] = b
        except Exception as exc:
            if n == FLOOR:
                raise
            skipped[n] = f"failed on this case: {type(exc).__name__}: {str(exc)[:300]}"
    names = [n for n in names if n in built]
    m_lora = int((problem.routes >= 0).sum())
    base = {"kind": "layer", "sweep": entry.sweep, **case.as_dict(), "m_lora": m_lora}
    rows = []
    for mode in entry.modes:
        timed = [_timed_for(n, built[n], x, g, mode) for n in names]
        queued = queued_calls(case.device, mode)
        stats, rounds = time_interleaved(
            timed,
            device=case.device,
            min_repeats=entry.min_repeats,
            budget_s=entry.budget_s,
            flush=flush,
            queued=queued,
        )
        useful = F.useful_flops(case.M, case.K, case.N, case.r, m_lora, mode)
        for n in names:
            st = stats[n]
            ratio = paired_ratio(rounds, n, FLOOR)
            row = {
                **base,
                "mode": mode,
                "provider": n,
                **st.as_dict(),
                "ratio_to_floor": ratio.median,
                "ratio_to_floor_p20": ratio.p20,
                "ratio_to_floor_p80": ratio.p80,
                "flops_useful": useful,
                "flops_masked": F.masked_flops(case.M, case.K, case.N, case.r, case.E, mode),
                "tflops": useful / st.median / 1e12 if st.median > 0 else None,
                "timing": timing_method(case.device, queued),
            }
            if "naive" in stats and n != "naive":
                row["ratio_to_naive"] = paired_ratio(rounds, n, "naive").median
            rows.append(row)
    if memory:
        rows += memory_records(case, problem, built, x, g, base)
    for n, why in skipped.items():
        rows.append({**base, "kind": "skipped", "provider": n, "reason": why})
    return rows


def memory_records(case, problem, built, x, g, base) -> list[dict]:
    """One record per provider: bytes saved for backward (parameters excluded), extra peak of fwd + bwd."""
    frozen = [problem.linear.weight] + ([problem.linear.bias] if problem.linear.bias is not None else [])
    reps = {}
    for n, b in built.items():
        _reset(x, b.params)
        y, rep = saved_for_backward(lambda: b.forward(x), params=frozen + list(b.params), inputs=[x])
        del y
        reps[n] = rep
    budget = saved_budget_bytes(case, reps[FLOOR].bytes)
    out = []
    for n, b in built.items():
        _reset(x, b.params)

        def step():
            b.forward(x).backward(g)

        peak = extra_peak_bytes(step, case.device)
        _reset(x, b.params)
        rep = reps[n]
        out.append(
            {
                **base,
                "kind": "memory",
                "provider": n,
                **rep.as_dict(),
                "saved_budget_bytes": budget,
                "saved_within_budget": rep.bytes <= budget,
                # an activation-sized tensor other than the input x itself
                "saved_has_MN": case.M * case.N > 0 and rep.largest_numel(inputs=False) >= case.M * case.N,
                "extra_peak_bytes": peak,
            }
        )
    return out


def run_suite(
    device: str = "cpu",
    quick: bool = False,
    out_dir: str | os.PathLike = "runs/bench",
    *,
    providers=None,
    entries: list[Entry] | None = None,
    e2e: bool = True,
    decode: bool = True,
    report: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Run the suite, appending records to ``out_dir/results.jsonl``; then write ``report.md`` and the plot.
    Returns the JSONL path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    info = machine_info(device)
    run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    entries = plan(device, quick) if entries is None else entries
    t_start = time.perf_counter()
    log(f"bench: {len(entries)} layer cases on {info['device_name']} -> {path}")
    with open(path, "a") as fh:

        def write(rows):
            for row in rows:
                fh.write(json.dumps({**info, "run_id": run_id, "quick": quick, **row}) + "\n")
            fh.flush()

        for i, entry in enumerate(entries):
            t0 = time.perf_counter()
            try:
                rows = run_entry(entry, providers)
            except Exception as exc:  # keep going: one bad case must not lose the rest of a long run
                write([{"kind": "error", "sweep": entry.sweep, **entry.case.as_dict(),
                        "error": f"{type(exc).__name__}: {str(exc)[:500]}"}])
                log(f"  [{i + 1}/{len(entries)}] {entry.case}: FAILED {type(exc).__name__}: {exc}")
                continue
            write(rows)
            c = entry.case
            summary = ", ".join(
                f"{r['provider']} {r['ratio_to_floor']:.2f}x"
                for r in rows
                if r["kind"] == "layer" and r["mode"] == entry.modes[-1]
            )
            log(
                f"  [{i + 1}/{len(entries)}] {entry.sweep} {c.shape} M={c.M} r={c.r} tool={c.tool_frac} "
                f"{entry.modes[-1]}: {summary} ({time.perf_counter() - t0:.1f}s)"
            )
        if decode:
            from .decode import run_decode, run_isolation

            t0 = time.perf_counter()
            rows = run_decode(device=device, quick=quick)
            write(rows)
            summary = ", ".join(f"M={r['M']} {r['provider']} {r['median_us']:.0f} us ({r['ratio_to_floor']:.2f}x)"
                                for r in rows)
            log(f"  decode (no grad): {summary} ({time.perf_counter() - t0:.1f}s)")
            if torch.device(device).type == "cpu" or not providers or "routed_torch" in providers:
                t0 = time.perf_counter()
                rows = run_isolation(device=device, quick=quick)
                write(rows)
                summary = ", ".join(f"M={r['M']} {r['isolation']} {r['ratio_to_none']:.3f}x" for r in rows)
                log(f"  isolation (backward): {summary} ({time.perf_counter() - t0:.1f}s)")
        if e2e:
            from .e2e import run_e2e

            t0 = time.perf_counter()
            rows = run_e2e(device=device, quick=quick)
            write(rows)
            summary = ", ".join(f"{r['provider']} {r['tokens_per_s']:.0f} tok/s" for r in rows if r["kind"] == "e2e")
            log(f"  e2e: {summary} ({time.perf_counter() - t0:.1f}s)")
    log(f"bench: done in {time.perf_counter() - t_start:.0f}s")
    if report:
        from .report import write_report

        md, png = write_report(path, out, run_id=run_id)
        log(f"bench: report {md}" + (f", plot {png}" if png else ""))
    return path
