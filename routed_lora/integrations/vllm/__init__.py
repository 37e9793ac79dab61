"""Routed rollouts in vLLM: a general plugin that makes vLLM pick the LoRA adapter per token (docs/vllm.md).

- :mod:`.plugin`: the ``vllm.general_plugins`` entry point (:func:`register`), the worker-side routing and the
  workarounds for upstream defects; inert unless a request asks for routing.
- :mod:`.engine`: :class:`RoutedLLM` (load adapters, generate with routes and log-probs, weight sync) and
  :func:`engine_kwargs`.

Importing this package does not import vLLM; :mod:`.engine` needs it when used.
"""

from .guard import UnsupportedVLLMConfig, check_supported
from .plugin import register
from .routing import ROUTED_PREFIX

__all__ = ["register", "check_supported", "UnsupportedVLLMConfig", "ROUTED_PREFIX", "RoutedLLM", "RoutedOutput",
           "engine_kwargs"]


def __getattr__(name):
    if name in ("RoutedLLM", "RoutedOutput", "engine_kwargs"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(name)
