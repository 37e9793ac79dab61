"""Plain launchers of the routed-LoRA kernels: ``forward`` and ``backward`` (no autograd here).

The contract with :mod:`routed_lora.ops` (same semantics as :mod:`routed_lora.reference`):

    forward(x, weight, bias, lora_A, lora_B, routes, scaling) -> (y, h_masked)
    backward(grad_y, x, weight, lora_A, lora_B, routes, h_masked, scaling, compute_dx) -> (dx | None, dA, dB)

``h_masked`` (M, E*r) in x.dtype has exactly the reference's format, so a backward on one backend accepts the
h of the other.

Launch floor. The fused forward is 2 kernel launches (shrink; GEMM with the LoRA epilogue) and the fused
backward 3 (G; dx GEMM with the LoRA epilogue; dA and dB together), and nothing else runs on the device: split
reductions are summed inside the kernels in a fixed order (see :mod:`.fused_lora`), results are cast when
stored. Allocations per call are the outputs only (y, h; dx, dA, dB); G and the split partials live in one
scratch arena per device, sized by the plan and reused (``scratch_bytes``).

The plan (:func:`make_plan`) is a pure function of (M, K, N, r, E, dtype size, SM count, tile family): tiles,
split counts and scratch sizes. Under the interpreter the plan uses 16-wide tiles and a pretend 8-SM device
(so tiny test shapes exercise split reductions) unless ``set_interpreter_plan(sm_count=132, gpu_tiles=True)``
asks for a GPU's plan.

Host cost. The first call of each exact key (shapes, strides, dtypes, pointer alignment, switches) validates,
plans, chooses the variant and the GEMM config (autotuning) and launches through ``triton.jit``; the compiled
kernels are kept, and later calls with the key launch them directly (``CompiledKernel.run`` with the argument
tuple the JIT would build), without the JIT's binder or the autotuner. The key covers everything the JIT
specialises on (integer values, 16-byte alignment of pointers, dtypes), so a direct launch runs exactly the
binary the JIT would have picked.

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

Determinism: always. The reductions over tokens (dA, dB) and split reductions are summed in a fixed order, so
repeated calls give bit-identical results and adapter 0's gradient is bit-for-bit unchanged when only adapter
1's tokens change. ``set_deterministic`` is kept for compatibility: since the fixed order costs no extra launch,
there is no atomic mode any more.

fp32 inputs: ``tl.dot`` runs as tf32 when ``torch.backends.cuda.matmul.allow_tf32`` is True (PyTorch's own
switch for its fp32 matmuls) and as exact ``ieee`` fp32 otherwise (PyTorch's default). fp16 / bf16 always
accumulate in fp32.

Autotuning: only the GEMMs (``linear``, ``linear_lora``, ``linear_tma``) are autotuned, on (bucketed M, N, K,
E); the memory-bound shrink and grad_ab kernels take the plan's tiles. ``pin_configs(True)`` (env
``ROUTED_LORA_PIN_CONFIGS=1``) turns autotuning off (first shipped config; 16-wide tiles under the interpreter);
``pin_configs({"linear": {...}})`` pins given ones. ``CALLS`` counts launcher calls and kernel launches.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import re
import statistics

import torch
import triton
from triton.runtime import _allocation
from triton.runtime.errors import OutOfResources

from . import fused_lora

__all__ = [
    "CALLS",
    "forward",
    "backward",
    "make_plan",
    "Plan",
    "scratch_bytes",
    "set_variant",
    "get_variant",
    "set_deterministic",
    "get_deterministic",
    "pin_configs",
    "shipped_configs",
    "set_interpreter_plan",
    "device_time_ms",
    "VARIANT_CACHE",
    "VARIANT_ERRORS",
]

CALLS: collections.Counter = collections.Counter()

_VARIANTS = ("auto", "fused", "cublas", "torch")
_state = {
    "variant": os.environ.get("ROUTED_LORA_VARIANT", "auto"),
    "pinned": None,
    "interpreter_autotune": False,
    "interpreter_sms": 8,
    "interpreter_gpu_tiles": False,
    "interpreter_tma": False,
    "gen": 0,  # bumped by every switch: part of each call's cache key
}


def _bump():
    _state["gen"] += 1
    if "make_plan" in globals():  # module constants (tile widths) may have changed too
        make_plan.cache_clear()


# --------------------------------------------------------------------------------------------------------------
# Shipped configurations (every one is compiled for sm_80 and sm_90 by the compile test: no spills, tensor cores).

LINEAR_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
# sm_90 (Hopper): the same GEMM with TMA descriptors and a persistent tile loop (routed_linear_tma_kernel).
TMA_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
]
# The cuBLAS variant's LoRA term b + s L U (BACKBONE=False): no K loop, so fewer configs.
LINEAR_LORA_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=2),
]
# The memory-bound kernels take their tiles from the plan; these are the GPU families (the compile test covers
# each with and without a split reduction).
SHRINK_TILES = {"BLOCK_M": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
SHRINK_TILES_SMALL_M = {"BLOCK_M": 16, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}  # M <= 16 (decode)
GRAD_AB_TILES = {"BLOCK_M": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
INTERPRETER_TILES = {"BLOCK_M": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}

# Largest adapter-column tile: E*r above it is looped (linear) or split over the grid (shrink, grad_ab).
MAX_BLOCK_R = 128
# Split reductions: chunks of a multiple of this many reduction columns (shrink) / token rows (grad_ab), at most
# MAX_SPLITS splits, aiming at TARGET_WAVES programs per SM, and partials within PARTIAL_BUDGET bytes.
SPLIT_MULTIPLE = 256
SPLIT_MULTIPLE_INTERPRETER = 32
MAX_SPLITS = 8
TARGET_WAVES = 2
PARTIAL_BUDGET = 3 << 20

# Pinned GEMM configs under the interpreter: 16-wide tiles, so tiny test shapes cover several tiles and tails.
INTERPRETER_CONFIGS = {
    "linear": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 1},
    "linear_lora": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 1},
    "linear_tma": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 1},
}
# Tests only (``autotune_in_interpreter(True)``): autotuning among these under the interpreter, timed by the
# wall clock, exercises the autotuning path (keys, pruning) without a GPU.
INTERPRETER_AUTOTUNE_CONFIGS = {
    "linear": [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 1}, num_warps=4, num_stages=1),
    ],
    "linear_lora": [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 1}, num_warps=4, num_stages=1),
    ],
    "linear_tma": [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 1}, num_warps=4, num_stages=1),
    ],
}

_CONFIG_LISTS = {"linear": LINEAR_CONFIGS, "linear_lora": LINEAR_LORA_CONFIGS, "linear_tma": TMA_CONFIGS}
_KERNELS = {
    "linear": fused_lora.routed_linear_kernel,
    "linear_lora": fused_lora.routed_linear_kernel,
    "linear_tma": fused_lora.routed_linear_tma_kernel,
    "shrink": fused_lora.routed_shrink_kernel,
    "grad_ab": fused_lora.routed_grad_ab_kernel,
}
_LINEAR_KEY = ["M_BUCKET", "N", "K", "E"]  # R, TRANS_W, ... are constexprs: part of the JIT's key anyway
_LINEAR_TUNED = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")


def shipped_configs() -> dict[str, list]:
    """Every shipped GEMM autotuning config per kernel name (what the compile test and report cover)."""
    return {name: list(cfgs) for name, cfgs in _CONFIG_LISTS.items()}


# --------------------------------------------------------------------------------------------------------------
# Switches.


def set_variant(name: str) -> None:
    """``"auto"`` (default), ``"fused"``, ``"cublas"`` or ``"torch"`` (the PyTorch path, for comparisons)."""
    if name not in _VARIANTS:
        raise ValueError(f"set_variant: expected one of {_VARIANTS}, got {name!r}")
    _state["variant"] = name
    _bump()


def get_variant() -> str:
    return _state["variant"]


def set_deterministic(flag: bool) -> None:
    """Compatibility only: the reductions are always in a fixed order (no extra cost, no atomic mode)."""
    if not flag:
        CALLS["set_deterministic_false_ignored"] += 1


def get_deterministic() -> bool:
    return True


def pin_configs(pinned=True) -> None:
    """Turn GEMM autotuning off. ``True``: one default config per GEMM kernel; a dict ``{kernel: {meta...}}``
    pins those (kernels: linear, linear_lora; keys as in the configs plus num_warps / num_stages);
    ``False`` / ``None``: autotune again."""
    if pinned is True:
        _state["pinned"] = {}
    elif not pinned:
        _state["pinned"] = None
    else:
        unknown = set(pinned) - set(_CONFIG_LISTS)
        if unknown:
            raise ValueError(
                f"pin_configs: unknown kernels {sorted(unknown)}; expected some of {sorted(_CONFIG_LISTS)}"
            )
        _state["pinned"] = dict(pinned)
    _bump()


def autotune_in_interpreter(flag: bool) -> None:
    """Tests only: under the interpreter, autotune the GEMM among ``INTERPRETER_AUTOTUNE_CONFIGS``."""
    _state["interpreter_autotune"] = bool(flag)
    _bump()


def set_interpreter_plan(sm_count: int = 8, gpu_tiles: bool = False, tma: bool = False) -> None:
    """Tests only: plan interpreter calls as for a GPU with ``sm_count`` SMs, with its tiles if ``gpu_tiles``,
    and with the sm_90 TMA GEMM if ``tma`` (Triton's interpreter runs descriptor kernels)."""
    _state["interpreter_sms"] = int(sm_count)
    _state["interpreter_gpu_tiles"] = bool(gpu_tiles)
    _state["interpreter_tma"] = bool(tma)
    _bump()


def tma_supported(triton_version: str, capability: tuple, has_descriptors: bool = True) -> bool:
    """Whether the TMA GEMM is used: an sm_90 device (Hopper; other archs keep the cp.async kernel) and a
    Triton >= 3.4 with ``tl.make_tensor_descriptor`` (the GPU image's 3.6 qualifies; older ones do not)."""
    nums = [int(n) for n in re.findall(r"\d+", triton_version)[:2]] + [0, 0]
    return bool(has_descriptors) and tuple(capability)[0] == 9 and (nums[0], nums[1]) >= (3, 4)


@functools.lru_cache(maxsize=None)
def _device_tma(index: int) -> bool:
    import triton.language as tl

    cap = torch.cuda.get_device_capability(index)
    return tma_supported(triton.__version__, cap, hasattr(tl, "make_tensor_descriptor"))


def _tma_operands_ok(a: torch.Tensor, w: torch.Tensor, out_cols: int) -> bool:
    """TMA descriptors need a unit inner stride, 16-byte aligned bases and 16-byte multiple row strides."""
    es = a.element_size()
    return (a.stride(1) == 1 and w.stride(1) == 1 and (a.stride(0) * es) % 16 == 0 and (w.stride(0) * es) % 16 == 0
            and a.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0 and (out_cols * es) % 16 == 0)


def _tma_alloc(size: int, alignment: int, stream):
    """Triton's global-scratch allocator for device-side TMA descriptors: one cached buffer per size, so a launch
    allocates nothing (each launch rewrites its descriptors before using them, in stream order; like the scratch
    arena this assumes the layer's calls are not run concurrently on several streams). Keyed by size only, so a
    buffer made by a warm-up call is reused inside a CUDA-graph capture (whose stream differs)."""
    key = (torch.cuda.current_device(), size)
    buf = _TMA_SCRATCH.get(key)
    if buf is None:
        buf = _TMA_SCRATCH[key] = torch.empty(max(size, 1), dtype=torch.int8, device="cuda")
    return buf


_TMA_SCRATCH: dict = {}


if os.environ.get("ROUTED_LORA_PIN_CONFIGS", "0") not in ("0", ""):
    pin_configs(True)


def _interpreting(t: torch.Tensor) -> bool:
    if t.device.type == "cuda":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError(
            f"routed_lora.kernels: {t.device.type} tensors need the Triton interpreter (TRITON_INTERPRET=1) or CUDA"
        )
    return True


@functools.lru_cache(maxsize=None)
def _sm_count(index) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _device_name(index) -> str:
    return torch.cuda.get_device_name(index)


def _m_bucket(M: int) -> int:
    return min(max(16, triton.next_power_of_2(max(M, 1))), 1 << 16)


def _block_r(ER: int) -> int:
    return min(max(16, triton.next_power_of_2(ER)), MAX_BLOCK_R)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------------------------
# The plan: a pure function of the shape, the dtype size and the device's SM count.


@dataclasses.dataclass(frozen=True)
class ShrinkPlan:
    """Tiles and split of one shrink launch (h in the forward, G in the backward)."""

    block_m: int
    block_k: int
    block_r: int
    num_warps: int
    num_stages: int
    row_blocks: int
    r_blocks: int
    splits: int
    per_split: int

    @property
    def tiles(self) -> int:
        return self.row_blocks * self.r_blocks

    @property
    def part_bytes(self) -> int:
        return 0 if self.splits == 1 else self.tiles * self.splits * self.block_m * self.block_r * 4


@dataclasses.dataclass(frozen=True)
class GradABPlan:
    """Tiles and split of the dA + dB launch."""

    block_m: int
    block_k: int
    rp: int
    apt: int
    num_warps: int
    num_stages: int
    tiles_a: int
    tiles_b: int
    r_tiles: int
    splits: int
    rows_per_split: int

    @property
    def tiles(self) -> int:
        return (self.tiles_a + self.tiles_b) * self.r_tiles

    @property
    def part_bytes(self) -> int:
        return 0 if self.splits == 1 else self.tiles * self.splits * self.block_k * self.apt * self.rp * 4


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a forward + backward launches, and the scratch it needs (bytes)."""

    shrink_x: ShrinkPlan
    shrink_g: ShrinkPlan
    grad_ab: GradABPlan
    g_bytes: int  # G (M, E*r) in the input dtype, between the dx GEMM and grad_ab
    part_bytes: int  # the largest partials buffer of any launch (launches run one after the other)
    locks: int  # tile counters (int32), reset to 0 by the kernels themselves

    @property
    def scratch_bytes(self) -> int:
        return _align(self.part_bytes) + _align(self.g_bytes) + 4 * self.locks


def _align(n: int, to: int = 256) -> int:
    return _cdiv(n, to) * to


def _splits(programs: int, reduction: int, multiple: int, sms: int, part_bytes_per_split: int, step: int):
    """(per_split, splits): split a reduction of ``reduction`` so ``programs * splits`` approaches
    TARGET_WAVES * sms, in chunks of a multiple of ``multiple`` (itself a multiple of the loop step), at most
    MAX_SPLITS, with the partials within PARTIAL_BUDGET."""
    want = _cdiv(TARGET_WAVES * sms, max(programs, 1))
    want = max(1, min(want, MAX_SPLITS, _cdiv(reduction, multiple), PARTIAL_BUDGET // max(part_bytes_per_split, 1)))
    if want == 1:
        return max(reduction, 1), 1
    per = _cdiv(_cdiv(reduction, want), multiple) * multiple
    per = _cdiv(per, step) * step
    return per, _cdiv(reduction, per)


def _shrink_plan(M: int, Kred: int, ER: int, sms: int, small: bool) -> ShrinkPlan:
    tiles = INTERPRETER_TILES if small else (SHRINK_TILES_SMALL_M if M <= 16 else SHRINK_TILES)
    bm, bk = tiles["BLOCK_M"], tiles["BLOCK_K"]
    br = _block_r(ER)
    rows, rb = _cdiv(M, bm), _cdiv(ER, br)
    multiple = SPLIT_MULTIPLE_INTERPRETER if small else SPLIT_MULTIPLE
    per, splits = _splits(rows * rb, Kred, max(multiple, bk), sms, rows * rb * bm * br * 4, bk)
    return ShrinkPlan(bm, bk, br, tiles["num_warps"], tiles["num_stages"], rows, rb, splits, per)


def _grad_ab_plan(M: int, K: int, N: int, R: int, E: int, sms: int, small: bool) -> GradABPlan:
    tiles = INTERPRETER_TILES if small else GRAD_AB_TILES
    bm, bk = tiles["BLOCK_M"], tiles["BLOCK_K"]
    rp = max(16, triton.next_power_of_2(R))
    apt = 2 if (E >= 2 and 2 * rp <= MAX_BLOCK_R) else 1
    ta, tb, rt = _cdiv(K, bk), _cdiv(N, bk), _cdiv(E, apt)
    programs = (ta + tb) * rt
    multiple = SPLIT_MULTIPLE_INTERPRETER if small else SPLIT_MULTIPLE
    per, splits = _splits(programs, M, max(multiple, bm), sms, programs * bk * apt * rp * 4, bm)
    return GradABPlan(bm, bk, rp, apt, tiles["num_warps"], tiles["num_stages"], ta, tb, rt, splits, per)


@functools.lru_cache(maxsize=4096)
def make_plan(M: int, K: int, N: int, R: int, E: int, itemsize: int, sm_count: int, small_tiles: bool = False) -> Plan:
    """The launch plan for x (M, K), W (N, K), r = R, E adapters, a dtype of ``itemsize`` bytes, on a device
    with ``sm_count`` SMs (``small_tiles``: the interpreter's 16-wide tiles). Pure: the same arguments give the
    same plan on any machine, so a CPU test can run a 132-SM plan."""
    ER = E * R
    sx = _shrink_plan(M, K, ER, sm_count, small_tiles)
    sg = _shrink_plan(M, N, ER, sm_count, small_tiles)
    ab = _grad_ab_plan(M, K, N, R, E, sm_count, small_tiles)
    part = max(sx.part_bytes, sg.part_bytes, ab.part_bytes)
    locks = max(p.tiles for p in (sx, sg, ab))
    return Plan(sx, sg, ab, M * ER * itemsize, part, locks)


def scratch_bytes(M: int, K: int, N: int, R: int, E: int, dtype=torch.bfloat16, sm_count: int = 132) -> int:
    """Bytes of scratch a forward + backward at this shape uses on a GPU with ``sm_count`` SMs."""
    return make_plan(M, K, N, R, E, torch.empty((), dtype=dtype).element_size(), sm_count).scratch_bytes


# --------------------------------------------------------------------------------------------------------------
# The scratch arena: one per device, grown when a plan needs more, never shrunk. Old arenas are kept alive, so
# a CUDA graph captured with one never sees its memory freed.

_ARENAS: dict = {}
_OLD_ARENAS: list = []


class _Arena:
    def __init__(self, device, part_bytes: int, g_bytes: int, locks: int):
        self.part_bytes, self.g_bytes, self.n_locks = _align(part_bytes), _align(g_bytes), max(locks, 1)
        self.buf = torch.empty(self.part_bytes + self.g_bytes + 256, dtype=torch.uint8, device=device)
        self.locks = torch.zeros(self.n_locks, dtype=torch.int32, device=device)
        self.part = self.buf[: self.part_bytes].view(torch.float32) if self.part_bytes else self.buf.view(torch.float32)[:1]
        self.nbytes = self.buf.numel() + 4 * self.n_locks

    def fits(self, part_bytes, g_bytes, locks) -> bool:
        return part_bytes <= self.part_bytes and g_bytes <= self.g_bytes and locks <= self.n_locks

    def g_view(self, M: int, ER: int, dtype) -> torch.Tensor:
        start = self.part_bytes
        return self.buf[start : start + M * ER * torch.empty((), dtype=dtype).element_size()].view(dtype).view(M, ER)


def _arena(device, plan: Plan) -> _Arena:
    key = str(device)
    a = _ARENAS.get(key)
    if a is None or not a.fits(plan.part_bytes, plan.g_bytes, plan.locks):
        part = max(plan.part_bytes, a.part_bytes if a else 0)
        g = max(plan.g_bytes, a.g_bytes if a else 0)
        locks = max(plan.locks, a.n_locks if a else 0)
        if a is not None:
            _OLD_ARENAS.append(a)
        with torch.inference_mode(False), torch.no_grad():
            a = _ARENAS[key] = _Arena(device, part, g, locks)
        CALLS["arena_allocations"] += 1
    return a


# --------------------------------------------------------------------------------------------------------------
# Launch objects: the first call goes through triton.jit (compiling, autotuning), later ones straight to the
# compiled kernel's launcher with the argument tuple the JIT would build.


def _wall_clock_bench(kernel_call, quantiles=(0.5, 0.2, 0.8)):
    """Autotuner timer for the interpreter (no GPU): the wall-clock time of one call, as three quantiles."""
    import time

    t0 = time.perf_counter()
    kernel_call()
    ms = (time.perf_counter() - t0) * 1e3
    return [ms for _ in quantiles]


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


@functools.lru_cache(maxsize=None)
def _jit_or_interpreted(name: str, interpret: bool):
    fn = _KERNELS[name]
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(getattr(fn, "fn", fn))
    return fn


class _Interpreted:
    """The interpreter's stand-in for a CompiledKernel: the same ``run`` signature."""

    function = None
    packed_metadata = None

    def __init__(self, fn, num_warps, num_stages):
        self.fn, self.num_warps, self.num_stages = fn, num_warps, num_stages

    def run(self, g0, g1, g2, stream, function, packed, launch_metadata, enter_hook, exit_hook, *args):
        self.fn[(g0, g1, g2)](*args, num_warps=self.num_warps, num_stages=self.num_stages)


class _Launch:
    """One kernel launch of a cached call: ``L.run(L.g0, L.g1, L.g2, stream, L.function, L.packed, None, None,
    None, *head, *L.tail)`` launches it; before the first call ``run`` is :meth:`_first_run`."""

    __slots__ = ("name", "interpret", "grid_fn", "tail", "tail_names", "meta", "g0", "g1", "g2", "run",
                 "function", "packed")

    def __init__(self, name: str, interpret: bool, tail: dict, meta: dict | None, grid_fn):
        # tail: the constexpr arguments (in kernel order) known now; meta: tiles / warps / stages, or None to
        # autotune (GEMM only); grid_fn(meta) -> grid.
        self.name, self.interpret, self.grid_fn, self.meta = name, interpret, grid_fn, meta
        self.tail_names = tuple(tail)
        self.tail = tuple(tail.values())
        self.g0 = self.g1 = self.g2 = 1
        self.function = self.packed = None
        self.run = self._first_run

    def _first_run(self, g0, g1, g2, stream, function, packed, lm, eh, xh, *args):
        head = args[: len(args) - len(self.tail_names)]
        if self.meta is None:  # autotune the GEMM now, then keep the chosen config
            tuner = _autotuner(self.name, self.interpret)
            fixed = {k: v for k, v in zip(self.tail_names, self.tail) if k not in _LINEAR_TUNED}
            try:
                compiled = tuner[self.grid_fn](*head, **fixed)
            except OutOfResources:  # no shipped config fits (e.g. fp32 TMA tiles): fewer stages, below
                cfg = _CONFIG_LISTS[self.name][0]
                self._set_meta({**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            else:
                cfg = tuner.best_config
                CALLS[f"autotuned_{self.name}"] += 1
                self._set_meta({**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
                self._finish(compiled)
                return
        try:
            self._launch_jit(head)
        except OutOfResources as exc:  # e.g. fp32 at BLOCK_R = 128 on a GPU with less shared memory
            first = self.meta
            for alt in _fallback_metas(self.name, first):
                try:
                    self._set_meta(alt)
                    self._launch_jit(head)
                except OutOfResources:
                    continue
                CALLS["shared_memory_fallback"] += 1
                return
            self._set_meta(first)
            raise exc

    def _set_meta(self, meta: dict):
        self.meta = dict(meta)
        tail = dict(zip(self.tail_names, self.tail))
        for k, v in meta.items():
            if k in tail:
                tail[k] = v
        self.tail = tuple(tail.values())
        grid = tuple(self.grid_fn(meta)) + (1, 1)
        self.g0, self.g1, self.g2 = grid[0], grid[1], grid[2]

    def _launch_jit(self, head):
        fn = _jit_or_interpreted(self.name, self.interpret)
        grid = (self.g0, self.g1, self.g2)
        kw = {"num_warps": self.meta["num_warps"], "num_stages": self.meta["num_stages"]}
        compiled = fn[grid](*head, *self.tail, **kw)
        self._finish(compiled)

    def _finish(self, compiled):
        if self.interpret or compiled is None:
            fn = _jit_or_interpreted(self.name, True) if self.interpret else None
            if fn is None:
                return  # keep launching through the JIT (should not happen)
            k = _Interpreted(fn, self.meta["num_warps"], self.meta["num_stages"])
            self.run, self.function, self.packed = k.run, None, None
            return
        if hasattr(compiled, "result"):  # triton 3.6 may hand back a future
            compiled = compiled.result()
        self.run, self.function, self.packed = compiled.run, compiled.function, compiled.packed_metadata


def _fallback_metas(name: str, first: dict) -> list[dict]:
    """Configs to try in order when ``first`` needs more shared memory than the GPU has: the same tiles with
    fewer pipeline stages, then (GEMM) the other shipped configs likewise."""
    out = []
    cands = [first] + ([{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
                        for c in _CONFIG_LISTS.get(name, [])])
    for cfg in cands:
        for stages in range(cfg["num_stages"], 0, -1):
            meta = {**cfg, "num_stages": stages}
            if meta not in out and meta != first:
                out.append(meta)
    return out


# --------------------------------------------------------------------------------------------------------------
# Cached calls.


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


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


def _linear_launch(name, interpret, M, N, R, E, backbone, has_bias, prec, trans_w=True, sms=1) -> _Launch:
    meta = _gemm_meta(name, interpret)
    if name == "linear_tma":
        tail = {"R": R, "BLOCK_M": 0, "BLOCK_N": 0, "BLOCK_K": 0, "BLOCK_R": _block_r(E * R), "GROUP_M": 0,
                "TRANS_W": trans_w, "HAS_BIAS": has_bias, "DOT_PRECISION": prec}
        grid = lambda m: (min(sms, _cdiv(M, m["BLOCK_M"]) * _cdiv(N, m["BLOCK_N"])),)  # noqa: E731  persistent
    else:
        tail = {"R": R, "BLOCK_M": 0, "BLOCK_N": 0, "BLOCK_K": 0, "BLOCK_R": _block_r(E * R), "GROUP_M": 0,
                "BACKBONE": backbone, "HAS_BIAS": has_bias, "DOT_PRECISION": prec}
        grid = lambda m: (_cdiv(M, m["BLOCK_M"]) * _cdiv(N, m["BLOCK_N"]),)  # noqa: E731
    L = _Launch(name, interpret, tail, meta, grid)
    if meta is not None:
        L._set_meta(meta)
    return L


def _shrink_launch(interpret, p: ShrinkPlan, R, prec) -> _Launch:
    meta = {"BLOCK_M": p.block_m, "BLOCK_K": p.block_k, "num_warps": p.num_warps, "num_stages": p.num_stages}
    tail = {"R": R, "BLOCK_M": p.block_m, "BLOCK_K": p.block_k, "BLOCK_R": p.block_r, "SPLITS": p.splits,
            "DOT_PRECISION": prec}
    L = _Launch("shrink", interpret, tail, meta, lambda m: (p.row_blocks, p.r_blocks, p.splits))
    L._set_meta(meta)
    return L


def _grad_ab_launch(interpret, p: GradABPlan, R, prec) -> _Launch:
    meta = {"BLOCK_M": p.block_m, "BLOCK_K": p.block_k, "num_warps": p.num_warps, "num_stages": p.num_stages}
    tail = {"R": R, "BLOCK_M": p.block_m, "BLOCK_K": p.block_k, "RP": p.rp, "APT": p.apt, "SPLITS": p.splits,
            "DOT_PRECISION": prec}
    L = _Launch("grad_ab", interpret, tail, meta, lambda m: (p.tiles_a + p.tiles_b, p.r_tiles, p.splits))
    L._set_meta(meta)
    return L


class _Call:
    """Everything one exact key needs: plan, variant, launches, scratch views; ``forward`` / ``backward``."""

    def __init__(self, kind, variant, x, weight, lora_A, interpret, bias=None, compute_dx=False, grad_y=None):
        M, K = x.shape
        N = weight.shape[0]
        E, R, _ = lora_A.shape
        self.M, self.K, self.N, self.R, self.E, self.ER = M, K, N, R, E, E * R
        self.variant, self.interpret = variant, interpret
        self.dev = x.device
        self.dev_index = x.device.index if x.device.type == "cuda" else None
        if interpret:
            sms, small = _state["interpreter_sms"], not _state["interpreter_gpu_tiles"]
        else:
            sms, small = _sm_count(x.device.index), False
        self.plan = plan = make_plan(M, K, N, R, E, x.element_size(), sms, small)
        prec = _dot_precision(x.dtype)
        arena = _arena(x.device, plan)
        self.part, self.locks = arena.part, arena.locks
        tma_device = _state["interpreter_tma"] if interpret else _device_tma(x.device.index)
        self.tma = False
        if kind == "forward":
            self.shrink = _shrink_launch(interpret, plan.shrink_x, R, prec)
            self.tma = variant == "fused" and tma_device and _tma_operands_ok(x, weight, N)
            name = "linear_tma" if self.tma else ("linear" if variant == "fused" else "linear_lora")
            self.linear = _linear_launch(name, interpret, M, N, R, E, variant == "fused", bias is not None, prec,
                                         True, sms)
        else:
            self.G = arena.g_view(M, E * R, x.dtype)
            self.shrink = _shrink_launch(interpret, plan.shrink_g, R, prec)
            self.grad_ab = _grad_ab_launch(interpret, plan.grad_ab, R, prec)
            if compute_dx:
                self.tma = variant == "fused" and tma_device and _tma_operands_ok(grad_y, weight, K)
                name = "linear_tma" if self.tma else ("linear" if variant == "fused" else "linear_lora")
                self.linear = _linear_launch(name, interpret, M, K, R, E, variant == "fused", False, prec, False,
                                             sms)
        self.set_allocator = self.tma and not interpret

    def forward(self, x, weight, bias, lora_A, lora_B, routes, scaling):
        M, K, N, ER, E = self.M, self.K, self.N, self.ER, self.E
        stream = None if self.dev_index is None else torch._C._cuda_getCurrentRawStream(self.dev_index)
        y = torch.empty((M, N), device=self.dev, dtype=x.dtype)
        h = torch.empty((M, ER), device=self.dev, dtype=x.dtype)
        S = self.shrink
        S.run(S.g0, S.g1, S.g2, stream, S.function, S.packed, None, None, None,
              x, lora_A, routes, h, self.part, self.locks, M, K, E, self.plan.shrink_x.per_split,
              x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), lora_A.stride(2), h.stride(0), 1,
              *S.tail)  # fmt: skip
        L = self.linear
        if self.tma:
            if self.set_allocator and _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
                _allocation._allocator.set(_tma_alloc)  # per thread: autograd runs the backward in its own
            L.run(L.g0, L.g1, L.g2, stream, L.function, L.packed, None, None, None,
                  x, weight, y if bias is None else bias, h, lora_B, y, M, N, K, E, _m_bucket_fast(M),
                  x.stride(0), weight.stride(0), h.stride(0), 1,
                  lora_B.stride(0), lora_B.stride(2), lora_B.stride(1), y.stride(0), scaling,
                  *L.tail)  # fmt: skip
        else:
            L.run(L.g0, L.g1, L.g2, stream, L.function, L.packed, None, None, None,
                  x, weight, y if bias is None else bias, h, lora_B, y, M, N, K, E, _m_bucket_fast(M),
                  x.stride(0), x.stride(1), weight.stride(1), weight.stride(0), h.stride(0), 1,
                  lora_B.stride(0), lora_B.stride(2), lora_B.stride(1), y.stride(0), 1, scaling,
                  *L.tail)  # fmt: skip
        CALLS["shrink"] += 1
        CALLS[L.name] += 1
        if self.variant != "fused":
            y.addmm_(x, weight.t())  # cuBLAS, beta = 1: the LoRA term is read in the GEMM's epilogue
        return y, h

    def backward(self, grad_y, x, weight, lora_A, lora_B, routes, h, scaling, compute_dx):
        M, K, N, ER, E = self.M, self.K, self.N, self.ER, self.E
        stream = None if self.dev_index is None else torch._C._cuda_getCurrentRawStream(self.dev_index)
        G = self.G
        S = self.shrink
        S.run(S.g0, S.g1, S.g2, stream, S.function, S.packed, None, None, None,
              grad_y, lora_B, routes, G, self.part, self.locks, M, N, E, self.plan.shrink_g.per_split,
              grad_y.stride(0), grad_y.stride(1), lora_B.stride(0), lora_B.stride(2), lora_B.stride(1), ER, 1,
              *S.tail)  # fmt: skip
        dx = None
        if compute_dx:
            dx = torch.empty((M, K), device=self.dev, dtype=x.dtype)
            L = self.linear
            if self.tma:
                if self.set_allocator and _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
                    _allocation._allocator.set(_tma_alloc)
                L.run(L.g0, L.g1, L.g2, stream, L.function, L.packed, None, None, None,
                      grad_y, weight, dx, G, lora_A, dx, M, K, N, E, _m_bucket_fast(M),
                      grad_y.stride(0), weight.stride(0), ER, 1,
                      lora_A.stride(0), lora_A.stride(1), lora_A.stride(2), dx.stride(0), scaling,
                      *L.tail)  # fmt: skip
            else:
                L.run(L.g0, L.g1, L.g2, stream, L.function, L.packed, None, None, None,
                      grad_y, weight, dx, G, lora_A, dx, M, K, N, E, _m_bucket_fast(M),
                      grad_y.stride(0), grad_y.stride(1), weight.stride(0), weight.stride(1), ER, 1,
                      lora_A.stride(0), lora_A.stride(1), lora_A.stride(2), dx.stride(0), 1, scaling,
                      *L.tail)  # fmt: skip
        dA = torch.empty((E, self.R, K), device=self.dev, dtype=x.dtype)
        dB = torch.empty((E, N, self.R), device=self.dev, dtype=x.dtype)
        A_ = self.grad_ab
        A_.run(A_.g0, A_.g1, A_.g2, stream, A_.function, A_.packed, None, None, None,
               x, grad_y, G, h, routes, dA, dB, self.part, self.locks,
               M, K, N, E, self.plan.grad_ab.rows_per_split, self.plan.grad_ab.tiles_a,
               x.stride(0), x.stride(1), grad_y.stride(0), grad_y.stride(1), ER, 1, h.stride(0), h.stride(1),
               dA.stride(0), dA.stride(1), 1, dB.stride(0), dB.stride(1), 1, scaling,
               *A_.tail)  # fmt: skip
        CALLS["shrink"] += 1
        CALLS["grad_ab"] += 1
        if compute_dx:
            CALLS[self.linear.name] += 1
            if self.variant != "fused":
                dx.addmm_(grad_y, weight)
        return dx, dA, dB


_M_BUCKETS = {}


def _m_bucket_fast(M: int) -> int:
    b = _M_BUCKETS.get(M)
    if b is None:
        b = _M_BUCKETS[M] = _m_bucket(M)
    return b


# --------------------------------------------------------------------------------------------------------------
# The contract: forward / backward, cached per exact key.

VARIANT_CACHE: dict = {}
VARIANT_ERRORS: dict = {}  # (shape key..., variant) -> the error that ruled the variant out while measuring
_FORWARD_CALLS: dict = {}
_BACKWARD_CALLS: dict = {}
MAX_CACHED_CALLS = 4096  # cached exact keys per direction; a new key costs one JIT-path launch per kernel


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


def _shape_key(kind, x, weight, lora_A, *extra):
    E, R, _ = lora_A.shape
    dev = "cpu" if x.device.type != "cuda" else f"cuda:{x.device.index}:{_device_name(x.device.index)}"
    return (dev, kind, x.dtype, _m_bucket(x.shape[0]), weight.shape[1], weight.shape[0], R, E, *extra)


def _aligned(*ts) -> tuple:
    return tuple(t is None or t.data_ptr() % 16 == 0 for t in ts)


def _torch_forward(x, weight, bias, lora_A, lora_B, routes, scaling):
    from routed_lora.reference import reference_forward

    return reference_forward(x, weight, bias, lora_A, lora_B, routes, scaling)


def _torch_backward(grad_y, x, weight, lora_A, lora_B, routes, h, scaling, compute_dx):
    from routed_lora.reference import reference_backward

    return reference_backward(grad_y, x, weight, lora_A, lora_B, routes, h, scaling, compute_dx)


def _prepare(x, lora_A, lora_B, routes):
    if lora_A.dtype != x.dtype:
        lora_A = lora_A.to(x.dtype)
    if lora_B.dtype != x.dtype:
        lora_B = lora_B.to(x.dtype)
    if routes.dtype != torch.int32 or routes.dim() != 1 or not routes.is_contiguous():
        routes = routes.reshape(-1).to(torch.int32).contiguous()
    return lora_A, lora_B, routes


def forward(x, weight, bias, lora_A, lora_B, routes, scaling):
    """(y, h_masked) for x (M, K); see the module docstring."""
    if lora_A.dtype is not x.dtype or lora_B.dtype is not x.dtype or routes.dtype is not torch.int32:
        lora_A, lora_B, routes = _prepare(x, lora_A, lora_B, routes)
    key = (x.device, x.dtype, x.shape, x.stride(), weight.shape, weight.stride(), bias is None,
           lora_A.shape, lora_A.stride(), lora_B.stride(), routes.shape, routes.stride(), _state["gen"],
           x.data_ptr() % 16, weight.data_ptr() % 16, lora_A.data_ptr() % 16, lora_B.data_ptr() % 16,
           routes.data_ptr() % 16, 0 if bias is None else bias.data_ptr() % 16,
           x.dtype is torch.float32 and torch.backends.cuda.matmul.allow_tf32)  # fmt: skip
    call = _FORWARD_CALLS.get(key)
    if call is None:
        if len(_FORWARD_CALLS) >= MAX_CACHED_CALLS:  # e.g. many token counts in RL: start over (cheap to rebuild)
            _FORWARD_CALLS.clear()
        call = _FORWARD_CALLS[key] = _new_forward(x, weight, bias, lora_A, lora_B, routes, scaling)
    CALLS["forward"] += 1
    return call.forward(x, weight, bias, lora_A, lora_B, routes, scaling)


def backward(grad_y, x, weight, lora_A, lora_B, routes, h_masked, scaling, compute_dx):
    """(dx or None, dA (E, r, K), dB (E, N, r)); see the module docstring."""
    if lora_A.dtype is not x.dtype or lora_B.dtype is not x.dtype or routes.dtype is not torch.int32:
        lora_A, lora_B, routes = _prepare(x, lora_A, lora_B, routes)
    if h_masked.dtype is not x.dtype:
        h_masked = h_masked.to(x.dtype)
    key = (x.device, x.dtype, x.shape, x.stride(), grad_y.stride(), weight.shape, weight.stride(), compute_dx,
           lora_A.shape, lora_A.stride(), lora_B.stride(), routes.shape, routes.stride(), h_masked.stride(),
           _state["gen"], x.data_ptr() % 16, grad_y.data_ptr() % 16, weight.data_ptr() % 16,
           lora_A.data_ptr() % 16, lora_B.data_ptr() % 16, routes.data_ptr() % 16, h_masked.data_ptr() % 16,
           x.dtype is torch.float32 and torch.backends.cuda.matmul.allow_tf32)  # fmt: skip
    call = _BACKWARD_CALLS.get(key)
    if call is None:
        if len(_BACKWARD_CALLS) >= MAX_CACHED_CALLS:
            _BACKWARD_CALLS.clear()
        call = _BACKWARD_CALLS[key] = _new_backward(grad_y, x, weight, lora_A, lora_B, routes, h_masked, scaling,
                                                    compute_dx)
    CALLS["backward"] += 1
    return call.backward(grad_y, x, weight, lora_A, lora_B, routes, h_masked, scaling, compute_dx)


class _Empty:
    """M = 0 (or an empty weight): no kernel."""

    def __init__(self, E, R):
        self.ER = E * R

    def forward(self, x, weight, bias, lora_A, lora_B, routes, scaling):
        CALLS["forward_empty"] += 1
        return torch.nn.functional.linear(x, weight, bias), x.new_zeros((x.shape[0], self.ER))

    def backward(self, grad_y, x, weight, lora_A, lora_B, routes, h, scaling, compute_dx):
        CALLS["backward_empty"] += 1
        dx = torch.zeros_like(x) if compute_dx else None  # g W = 0 when M, N or K is 0
        return dx, torch.zeros_like(lora_A), torch.zeros_like(lora_B)


class _Torch:
    def forward(self, *args):
        CALLS["forward_torch"] += 1
        return _torch_forward(*args)

    def backward(self, *args):
        CALLS["backward_torch"] += 1
        return _torch_backward(*args)


class _Counted:
    """Wraps a call so ``CALLS["forward_<variant>"]`` counts which variant ran."""

    def __init__(self, call, fwd_name, bwd_name):
        self.call, self.fwd_name, self.bwd_name = call, fwd_name, bwd_name

    def forward(self, *args):
        CALLS[self.fwd_name] += 1
        return self.call.forward(*args)

    def backward(self, *args):
        CALLS[self.bwd_name] += 1
        return self.call.backward(*args)


def _check_shapes(x, weight, lora_A, lora_B, bias=None):
    M, K = x.shape
    N = weight.shape[0]
    E, R, Ka = lora_A.shape
    if weight.shape[1] != K or Ka != K or tuple(lora_B.shape) != (E, N, R):
        raise ValueError(
            f"routed_lora.kernels: inconsistent shapes x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
            f"lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"routed_lora.kernels: bias shape {tuple(bias.shape)}, expected ({N},)")


def _new_forward(x, weight, bias, lora_A, lora_B, routes, scaling):
    _check_shapes(x, weight, lora_A, lora_B, bias)
    interpret = _interpreting(x)
    E, R, _ = lora_A.shape
    if x.shape[0] == 0 or weight.shape[0] == 0 or x.shape[1] == 0:
        return _Empty(E, R)
    key = _shape_key("forward", x, weight, lora_A, bias is not None)
    args = (x, weight, bias, lora_A, lora_B, routes, scaling)
    built = {}

    def candidate(v):
        def run():
            if v not in built:
                built[v] = _Torch() if v == "torch" else _Call("forward", v, x, weight, lora_A, interpret, bias)
            return built[v].forward(*args)

        return run

    variant = _choose("forward", key, {v: candidate(v) for v in ("fused", "cublas", "torch")})
    call = built.get(variant) or (_Torch() if variant == "torch" else
                                  _Call("forward", variant, x, weight, lora_A, interpret, bias))
    return _Counted(call, f"forward_{variant}", f"backward_{variant}")


def _new_backward(grad_y, x, weight, lora_A, lora_B, routes, h, scaling, compute_dx):
    _check_shapes(x, weight, lora_A, lora_B)
    if tuple(grad_y.shape) != (x.shape[0], weight.shape[0]):
        raise ValueError(f"routed_lora.kernels: grad_y shape {tuple(grad_y.shape)}, expected "
                         f"{(x.shape[0], weight.shape[0])}")
    interpret = _interpreting(x)
    E, R, _ = lora_A.shape
    if x.shape[0] == 0 or weight.shape[0] == 0 or x.shape[1] == 0:
        return _Empty(E, R)
    key = _shape_key("backward", x, weight, lora_A, bool(compute_dx))
    args = (grad_y, x, weight, lora_A, lora_B, routes, h, scaling, bool(compute_dx))
    built = {}

    def candidate(v):
        def run():
            if v not in built:
                built[v] = _Torch() if v == "torch" else _Call("backward", v, x, weight, lora_A, interpret,
                                                               compute_dx=bool(compute_dx), grad_y=grad_y)
            return built[v].backward(*args)

        return run

    variant = _choose("backward", key, {v: candidate(v) for v in ("fused", "cublas", "torch")})
    call = built.get(variant) or (_Torch() if variant == "torch" else
                                  _Call("backward", variant, x, weight, lora_A, interpret,
                                        compute_dx=bool(compute_dx), grad_y=grad_y))
    return _Counted(call, f"forward_{variant}", f"backward_{variant}")
