"""Triton kernels for routed LoRA (installed as ``routed_lora.kernels``).

Kernels and plain launchers only: the autograd glue lives in :mod:`routed_lora.ops`.

- :mod:`.fused_lora`: the ``@triton.jit`` kernels (shrink for h and G; GEMM with low-rank epilogue, plain and
  sm_90 TMA; dA + dB in one launch).
- :mod:`.launch`: ``forward`` / ``backward`` (the contract with ``routed_lora.ops``), the launch plan, the scratch
  arena, direct launches of compiled kernels, variants, autotuning and the ``CALLS`` counter.
- :mod:`.aot`: ahead-of-time compilation of every shipped config for sm_80 / sm_90 and ``compile_report()``.
"""
