"""veRL's vLLM rollout for routed adapters: registers ``rollout.name=routed_vllm`` in veRL (0.9.1).

Importing this module registers the name in veRL's two rollout registries; it imports neither vLLM nor veRL's
vLLM code (that happens when veRL asks for the classes), so it is cheap in every veRL process. veRL imports it
by itself through the ``verl.plugins`` entry point ``routed_lora`` (pyproject.toml; veRL loads that group on
``import verl`` unless ``VERL_USE_EXTERNAL_PLUGINS=none``), or name it in ``VERL_USE_EXTERNAL_MODULES``.

- trainer side (``get_rollout_class("routed_vllm", "async")``): veRL's own vLLM ``ServerAdapter``, unchanged; it
  ships our engine's weight-sync stream (:mod:`.verl_sync`) to the server's workers;
- server side (``RolloutReplicaRegistry``): :class:`routed_lora.integrations.verl_vllm.RoutedvLLMReplica`, whose
  server is veRL's vLLM HTTP server with our worker extension, enough LoRA slots and synchronous scheduling, and
  whose generate calls name the routed request instead of veRL's single LoRA (module
  :mod:`routed_lora.integrations.verl_vllm`).
"""

from __future__ import annotations

__all__ = ["ROUTED_ROLLOUT", "register"]

ROUTED_ROLLOUT = "routed_vllm"
_SERVER_ADAPTER = "verl.workers.rollout.vllm_rollout.ServerAdapter"


def _load_replica():
    from .verl_vllm import RoutedvLLMReplica

    return RoutedvLLMReplica


def register() -> None:
    """Register ``routed_vllm`` in veRL's rollout registries (idempotent)."""
    from verl.workers.rollout import base, replica

    base._ROLLOUT_REGISTRY[(ROUTED_ROLLOUT, "async")] = _SERVER_ADAPTER
    replica.RolloutReplicaRegistry.register(ROUTED_ROLLOUT, _load_replica)


register()
