"""Triton kernels for routed LoRA (installed as ``routed_lora.kernels``).

Kernels and plain launchers only: the autograd glue lives in :mod:`routed_lora.ops`.

- :mod:`.fused_lora`: the three ``@triton.jit`` kernels (shrink / G + dB, GEMM with low-rank epilogue, dA).
- :mod:`.launch`: ``forward`` / ``backward`` (the contract with ``routed_lora.ops``), variants, determinism,
  autotuning and the ``CALLS`` counter.
- :mod:`.aot`: ahead-of-time compilation of every shipped config for sm_80 / sm_90 and ``compile_report()``.
"""
