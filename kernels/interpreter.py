"""Which kernel object a launch goes through, and the Triton interpreter's plumbing.

``_jit_or_interpreted(name, interpret)``: the ``@triton.jit`` kernel of :mod:`.fused_lora` on a GPU, or its
``InterpretedFunction`` under ``TRITON_INTERPRET=1`` (CPU tensors); ``_Interpreted``: the interpreter's stand-in
for a ``CompiledKernel`` (the same ``run`` signature, so a cached call launches both alike); ``_wall_clock_bench``:
the autotuner's timer without a GPU; ``_interpreting``: whether a tensor's call runs under the interpreter
(CUDA tensors never; other devices only with ``TRITON_INTERPRET=1``).

Must not plan, choose, count or cache calls: it only names the kernel objects.
"""

from __future__ import annotations

import functools
import os

import torch

from . import fused_lora

_KERNELS = {
    "linear": fused_lora.routed_linear_kernel,
    "linear_lora": fused_lora.routed_linear_kernel,
    "linear_tma": fused_lora.routed_linear_tma_kernel,
    "shrink": fused_lora.routed_shrink_kernel,
    "grad_ab": fused_lora.routed_grad_ab_kernel,
}


def _interpreting(t: torch.Tensor) -> bool:
    if t.device.type == "cuda":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError(
            f"routed_lora.kernels: {t.device.type} tensors need the Triton interpreter (TRITON_INTERPRET=1) or CUDA"
        )
    return True


def _wall_clock_bench(kernel_call, quantiles=(0.5, 0.2, 0.8)):
    """Autotuner timer for the interpreter (no GPU): the wall-clock time of one call, as three quantiles."""
    import time

    t0 = time.perf_counter()
    kernel_call()
    ms = (time.perf_counter() - t0) * 1e3
    return [ms for _ in quantiles]


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
