"""The process-wide switches of the routed-LoRA launchers, and the ``CALLS`` counter.

Switches: the variant (``set_variant``; env ``ROUTED_LORA_VARIANT``), pinned GEMM configs (``pin_configs``;
env ``ROUTED_LORA_PIN_CONFIGS=1``), the interpreter's plan and autotuning (tests), and ``set_deterministic``
(compatibility only). Each switch bumps ``_state["gen"]``, part of every cached call's key, and runs the
``_ON_SWITCH`` callbacks (:mod:`.plan` clears its plan cache there). ``CALLS`` counts launcher calls, kernel
launches and rare events (autotuning, measurements, arena growth, fallbacks).

This module owns that state: the ``_state`` dict and the ``CALLS`` Counter are created here only and changed in
place; every other module reads them through these same objects, never a copy. Must not plan, choose or launch.
"""

from __future__ import annotations

import collections
import os

from .configs import _CONFIG_LISTS

CALLS: collections.Counter = collections.Counter()

_VARIANTS = ("auto", "fused", "cublas", "torch")
_state = {
    "variant": os.environ.get("ROUTED_LORA_VARIANT", "auto"),
    "pinned": None,
    "interpreter_autotune": False,
    "interpreter_sms": 8,
    "interpreter_gpu_tiles": False,
    "interpreter_tma": False,
    "gen": 0,  # bumped by every switch: part of each call's cache key
}
_ON_SWITCH: list = []  # callbacks every switch runs (plan.py: clear the plan cache)


def _bump():
    _state["gen"] += 1
    for clear in _ON_SWITCH:  # module constants (tile widths) may have changed too
        clear()


# --------------------------------------------------------------------------------------------------------------
# Switches.


def set_variant(name: str) -> None:
    """``"auto"`` (default), ``"fused"``, ``"cublas"`` or ``"torch"`` (the PyTorch path, for comparisons)."""
    if name not in _VARIANTS:
        raise ValueError(f"set_variant: expected one of {_VARIANTS}, got {name!r}")
    _state["variant"] = name
    _bump()


def get_variant() -> str:
    return _state["variant"]


def set_deterministic(flag: bool) -> None:
    """Compatibility only: the reductions are always in a fixed order (no extra cost, no atomic mode)."""
    if not flag:
        CALLS["set_deterministic_false_ignored"] += 1


def get_deterministic() -> bool:
    return True


def pin_configs(pinned=True) -> None:
    """Turn GEMM autotuning off. ``True``: one default config per GEMM kernel; a dict ``{kernel: {meta...}}``
    pins those (kernels: linear, linear_lora; keys as in the configs plus num_warps / num_stages);
    ``False`` / ``None``: autotune again."""
    if pinned is True:
        _state["pinned"] = {}
    elif not pinned:
        _state["pinned"] = None
    else:
        unknown = set(pinned) - set(_CONFIG_LISTS)
        if unknown:
            raise ValueError(
                f"pin_configs: unknown kernels {sorted(unknown)}; expected some of {sorted(_CONFIG_LISTS)}"
            )
        _state["pinned"] = dict(pinned)
    _bump()


def autotune_in_interpreter(flag: bool) -> None:
    """Tests only: under the interpreter, autotune the GEMM among ``INTERPRETER_AUTOTUNE_CONFIGS``."""
    _state["interpreter_autotune"] = bool(flag)
    _bump()


def set_interpreter_plan(sm_count: int = 8, gpu_tiles: bool = False, tma: bool = False) -> None:
    """Tests only: plan interpreter calls as for a GPU with ``sm_count`` SMs, with its tiles if ``gpu_tiles``,
    and with the sm_90 TMA GEMM if ``tma`` (Triton's interpreter runs descriptor kernels)."""
    _state["interpreter_sms"] = int(sm_count)
    _state["interpreter_gpu_tiles"] = bool(gpu_tiles)
    _state["interpreter_tma"] = bool(tma)
    _bump()


if os.environ.get("ROUTED_LORA_PIN_CONFIGS", "0") not in ("0", ""):
    pin_configs(True)
