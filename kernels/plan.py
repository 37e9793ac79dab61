"""The launch plan of the routed-LoRA kernels and the scratch arena it sizes.

The plan (:func:`make_plan`) is a pure function of (M, K, N, r, E, dtype size, SM count, tile family): tiles,
split counts and scratch sizes. Under the interpreter the plan uses 16-wide tiles and a pretend 8-SM device
(so tiny test shapes exercise split reductions) unless ``set_interpreter_plan(sm_count=132, gpu_tiles=True)``
asks for a GPU's plan.

Scratch: G (between the dx GEMM and grad_ab) and the split partials live in one arena per device, sized by the
plan, grown when a plan needs more and never shrunk (``scratch_bytes`` gives a shape's need).

Must not launch, choose a variant or read the switches' values (the caller passes the SM count and the tile
family; this module only registers its plan cache to be cleared by every switch and counts arena growth in
``CALLS``); the constants it reads are those of :mod:`.configs`.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton

from .configs import (
    GRAD_AB_TILES,
    INTERPRETER_TILES,
    MAX_BLOCK_R,
    MAX_SPLITS,
    PARTIAL_BUDGET,
    SHRINK_TILES,
    SHRINK_TILES_SMALL_M,
    SPLIT_MULTIPLE,
    SPLIT_MULTIPLE_INTERPRETER,
    TARGET_WAVES,
)
from .switches import _ON_SWITCH, CALLS


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


_ON_SWITCH.append(make_plan.cache_clear)


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
