"""Integrations with RL frameworks (optional: each module imports its framework when imported).

- :mod:`routed_lora.integrations.verl`: a veRL training engine with routed LoRA adapters.
- :mod:`routed_lora.integrations.vllm`: a vLLM plugin that picks the adapter per token (docs/vllm.md).
"""
