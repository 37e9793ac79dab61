"""Triton kernels for routed LoRA (installed as ``routed_lora.kernels``).

Kernels and plain launchers only: the autograd glue lives in :mod:`routed_lora.ops`.
"""
