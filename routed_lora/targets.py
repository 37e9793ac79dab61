"""Which linear modules are routed by default, and PEFT's rule for matching ``target_modules`` to module names.

The one source of the default targets: :mod:`routed_lora.hf` (``apply_routed_lora``), the GRPO config and
the ``routed-lora train`` CLI all read them here. Plain data and pure functions of names: no torch, no model
patching.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

__all__ = ["DEFAULT_TARGET_MODULES", "FUSED_TARGET_MODULES", "target_matches", "is_default_targets",
           "default_targets_for"]

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# With the default targets, fused projections (Phi-3's qkv_proj and gate_up_proj) are routed too.
FUSED_TARGET_MODULES = ("qkv_proj", "gate_up_proj")


def target_matches(target_modules: str | Sequence[str], name: str) -> bool:
    """PEFT's rule: a string is a regex that must match the whole module name; a list matches a name equal to
    one entry or ending with ``"." + entry``."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def is_default_targets(target_modules) -> bool:
    """Whether ``target_modules`` is the default list (the object itself or an equal sequence)."""
    return target_modules is DEFAULT_TARGET_MODULES or (
        not isinstance(target_modules, str) and tuple(target_modules) == DEFAULT_TARGET_MODULES)


def default_targets_for(module_names: Iterable[str]) -> tuple[str, ...]:
    """The default targets for a model with these module names: :data:`DEFAULT_TARGET_MODULES` plus each of
    :data:`FUSED_TARGET_MODULES` the model has."""
    names = list(module_names)
    fused = [t for t in FUSED_TARGET_MODULES if any(target_matches([t], n) for n in names)]
    return DEFAULT_TARGET_MODULES + tuple(fused)
