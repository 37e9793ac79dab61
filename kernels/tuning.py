"""Choosing what runs: the variant of each shape, by device time, and the config of each GEMM, by autotuning.

Variants (``set_variant``):
  * ``"fused"``: the backbone GEMM runs in Triton with the LoRA expand as its epilogue: y (and dx) written once.
    On sm_90 with Triton >= 3.4 it is the TMA kernel (``tma_supported``), when the operands are TMA-describable.
  * ``"cublas"``: the backbone GEMM stays in cuBLAS: one Triton kernel writes b + s * h_masked B_cat^T (resp.
    s * G A_cat) and ``out.addmm_(x, W^T)`` (resp. ``dx.addmm_(g, W)``) accumulates the GEMM into it with
    beta = 1 (one launch more per GEMM).
  * ``"auto"`` (default): on CUDA, the first call of each shape bucket times ``fused``, ``cublas`` and the
    PyTorch path by device time (CUDA-graph replay of many calls, :func:`device_time_ms`) and caches the
    fastest per (device, dtype, bucketed M, K, N, r, E, bias, dx). A variant that raises while being measured is
    ruled out for that shape (``VARIANT_ERRORS``). Under the Triton interpreter ``auto`` means ``fused``. Inside
    CUDA-graph capture an unmeasured shape uses ``fused``.

Autotuning: only the GEMMs (``linear``, ``linear_lora``, ``linear_tma``) are autotuned, on (bucketed M, N, K,
E); the memory-bound shrink and grad_ab kernels take the plan's tiles. ``pin_configs(True)`` (env
``ROUTED_LORA_PIN_CONFIGS=1``) turns autotuning off (first shipped config; 16-wide tiles under the interpreter);
``pin_configs({"linear": {...}})`` pins given ones.

Must not launch kernels itself (it times the candidates it is handed, and builds the autotuners that
:mod:`.compiled` runs) or keep per-call state (the cached calls live in :mod:`.launch`).
"""

from __future__ import annotations

import functools
import statistics

import torch
import triton

from .configs import _CONFIG_LISTS, _LINEAR_KEY, INTERPRETER_AUTOTUNE_CONFIGS, INTERPRETER_CONFIGS
from .interpreter import _jit_or_interpreted, _wall_clock_bench
from .plan import _m_bucket
from .switches import CALLS, _state

VARIANT_CACHE: dict = {}
VARIANT_ERRORS: dict = {}  # (shape key..., variant) -> the error that ruled the variant out while measuring


def device_time_ms(fn, calls: int = 10, replays: int = 3) -> float:
    """Device time of one ``fn()`` call in ms: ``calls`` calls captured in one CUDA graph, replayed ``replays``
    times between two events (the median replay / calls). No host time is included, however slow the host.
    Falls back to events around ``calls`` queued eager calls if capture fails."""
    fn()  # warm-up: compiles, autotunes, grows the scratch arena outside the capture
    torch.cuda.synchronize()
    times = []
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / calls)
        CALLS["timed_by_graph"] += 1
    except Exception:  # e.g. a path that cannot be captured: queued eager calls instead
        torch.cuda.synchronize()
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / calls)
        CALLS["timed_by_events"] += 1
    return statistics.median(times)


_TIMER = {"fn": device_time_ms}


def _choose(kind: str, key: tuple, candidates: dict) -> str:
    """The variant for this call: forced, interpreter ("fused"), cached, or measured now and cached."""
    variant = _state["variant"]
    if variant != "auto":
        return variant
    if key[0] == "cpu":
        return "fused"
    if key in VARIANT_CACHE:
        return VARIANT_CACHE[key]
    if torch.cuda.is_current_stream_capturing():
        return "fused"
    timings = {}
    for name, fn in candidates.items():
        try:
            timings[name] = _TIMER["fn"](fn)
        except Exception as exc:  # e.g. a kernel that does not fit this GPU: never chosen, reported
            VARIANT_ERRORS[key + (name,)] = f"{type(exc).__name__}: {exc}"
    best = min(timings, key=timings.get)
    VARIANT_CACHE[key] = best
    CALLS[f"measured_{kind}"] += 1
    return best


@functools.lru_cache(maxsize=None)
def _device_name(index) -> str:
    return torch.cuda.get_device_name(index)


def _shape_key(kind, x, weight, lora_A, *extra):
    E, R, _ = lora_A.shape
    dev = "cpu" if x.device.type != "cuda" else f"cuda:{x.device.index}:{_device_name(x.device.index)}"
    return (dev, kind, x.dtype, _m_bucket(x.shape[0]), weight.shape[1], weight.shape[0], R, E, *extra)


# --------------------------------------------------------------------------------------------------------------
# GEMM configs: pinned (``pin_configs``, the interpreter's tiles) or autotuned at the first launch of a key.


def _gemm_meta(name: str, interpret: bool) -> dict | None:
    if interpret and _state["pinned"] is None and _state["interpreter_autotune"]:
        return None
    if interpret and not _state["interpreter_gpu_tiles"]:
        base = dict(INTERPRETER_CONFIGS[name])
        base.update((_state["pinned"] or {}).get(name, {}))
        return base
    if _state["pinned"] is None and not interpret:
        return None
    cfg = _CONFIG_LISTS[name][0]
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
            **(_state["pinned"] or {}).get(name, {})}


def _prune_linear(configs, named_args, **kwargs):
    m = named_args.get("M_BUCKET", kwargs.get("M_BUCKET", 1 << 16))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, m)]
    return kept or configs[-1:]


_AUTOTUNERS: dict = {}


def _autotuner(name: str, interpret: bool):
    key = (name, interpret)
    if key not in _AUTOTUNERS:
        fn = _jit_or_interpreted(name, interpret)
        extra = {"do_bench": _wall_clock_bench} if interpret else {}
        _AUTOTUNERS[key] = triton.autotune(
            configs=INTERPRETER_AUTOTUNE_CONFIGS[name] if interpret else _CONFIG_LISTS[name],
            key=_LINEAR_KEY,
            prune_configs_by={"early_config_prune": _prune_linear},
            **extra,
        )(fn)
    return _AUTOTUNERS[key]
