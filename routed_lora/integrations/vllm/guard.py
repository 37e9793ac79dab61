"""The vLLM configuration guard of the routed-lora plugin: refuse modes in which per-token routes cannot be
built correctly on the host (docs/vllm.md, "GPU"). Pure Python; imports vLLM only to read its version."""

from __future__ import annotations

import os

__all__ = ["UnsupportedVLLMConfig", "check_supported", "TESTED_VERSIONS"]


class UnsupportedVLLMConfig(RuntimeError):
    """vLLM runs in a mode where per-token routes cannot be built correctly on the host."""


TESTED_VERSIONS = ("0.32.",)  # vLLM releases whose V1 internals the plugin patches (make_lora_inputs, punica CPU)


def check_supported(vllm_config, version: str | None = None) -> None:
    """Refuse vLLM configurations under which host-side routes would be wrong (docs/vllm.md, "GPU").

    - Model Runner V2 (``VLLM_USE_V2_MODEL_RUNNER``; vLLM 0.32 picks it by default when Triton is present)
      builds the LoRA mapping on the device (v1/worker/gpu/lora_utils.py) and never calls the V1 hook;
    - async scheduling (the GPU default) writes a placeholder for the newest sampled token into the host token
      buffer, so a route computed there lags one position exactly at the tags;
    - a vLLM release other than :data:`TESTED_VERSIONS` (the patched internals may differ)."""
    problems = []
    if version is None:
        try:
            import vllm

            version = getattr(vllm, "__version__", None)
        except ImportError:
            version = None
    if version is not None and not version.startswith(TESTED_VERSIONS) and \
            os.environ.get("ROUTED_LORA_VLLM_ALLOW_UNTESTED") != "1":
        problems.append(f"vLLM {version} is not a tested release ({', '.join(v + 'x' for v in TESTED_VERSIONS)}); "
                        "install one, or set ROUTED_LORA_VLLM_ALLOW_UNTESTED=1 and run tests/test_vllm.py first")
    if bool(getattr(vllm_config, "use_v2_model_runner", False)):
        problems.append("the V2 model runner is active: set VLLM_USE_V2_MODEL_RUNNER=0")
    sched = getattr(vllm_config, "scheduler_config", None)
    if bool(getattr(sched, "async_scheduling", False)):
        problems.append("async scheduling is on: pass async_scheduling=False to LLM(...) "
                        "(--no-async-scheduling)")
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is not None:
        problems.append("speculative decoding is on: routed requests do not support draft tokens")
    if problems:
        raise UnsupportedVLLMConfig(
            "routed-lora: per-token routing needs vLLM's V1 model runner with synchronous scheduling; "
            + "; ".join(problems) + " (docs/vllm.md)"
        )
