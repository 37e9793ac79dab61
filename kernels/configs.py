"""Shipped tile configurations of the routed-LoRA kernels and the constants the launch plan reads.

Data only: the GEMM autotuning configs (``shipped_configs``: every one is compiled for sm_80 and sm_90 by the
compile test), the tiles of the memory-bound shrink and grad_ab kernels, the split-reduction limits of
:mod:`.plan`, and the interpreter's 16-wide tiles and configs. Must not hold mutable state (the switches and
``CALLS`` live in :mod:`.switches`), import torch, or launch anything.
"""

from __future__ import annotations

import triton

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
_LINEAR_KEY = ["M_BUCKET", "N", "K", "E"]  # R, TRANS_W, ... are constexprs: part of the JIT's key anyway
_LINEAR_TUNED = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")


def shipped_configs() -> dict[str, list]:
    """Every shipped GEMM autotuning config per kernel name (what the compile test and report cover)."""
    return {name: list(cfgs) for name, cfgs in _CONFIG_LISTS.items()}
