"""Launching compiled kernels: the per-key call that runs a forward or a backward, and its launch objects.

Host cost. The first call of each exact key (shapes, strides, dtypes, pointer alignment, switches) validates,
plans, chooses the variant and the GEMM config (autotuning) and launches through ``triton.jit``; the compiled
kernels are kept, and later calls with the key launch them directly (``CompiledKernel.run`` with the argument
tuple the JIT would build), without the JIT's binder or the autotuner. The key covers everything the JIT
specialises on (integer values, 16-byte alignment of pointers, dtypes), so a direct launch runs exactly the
binary the JIT would have picked.

fp32 inputs: ``tl.dot`` runs as tf32 when ``torch.backends.cuda.matmul.allow_tf32`` is True (PyTorch's own
switch for its fp32 matmuls) and as exact ``ieee`` fp32 otherwise (PyTorch's default). fp16 / bf16 always
accumulate in fp32.

TMA: on sm_90 with Triton >= 3.4 (``tma_supported``) the fused GEMM is the TMA kernel when the operands are
TMA-describable; its device-side descriptors use one cached global-scratch buffer per size (``_tma_alloc``).

Must not choose (the variant and GEMM configs: :mod:`.tuning`) or plan (:mod:`.plan`): a call launches what
they decided, allocating only its outputs.
"""

from __future__ import annotations

import functools
import re

import torch
import triton
from triton.runtime import _allocation
from triton.runtime.errors import OutOfResources

from .configs import _CONFIG_LISTS, _LINEAR_TUNED
from .interpreter import _Interpreted, _jit_or_interpreted
from .plan import GradABPlan, ShrinkPlan, _arena, _block_r, _cdiv, _m_bucket, make_plan
from .switches import CALLS, _state
from .tuning import _autotuner, _gemm_meta


# --------------------------------------------------------------------------------------------------------------
# TMA support (sm_90) and the device's SM count.


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


@functools.lru_cache(maxsize=None)
def _sm_count(index) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# --------------------------------------------------------------------------------------------------------------
# Launch objects: the first call goes through triton.jit (compiling, autotuning), later ones straight to the
# compiled kernel's launcher with the argument tuple the JIT would build.


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
