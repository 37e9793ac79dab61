"""Which implementation runs the routed-LoRA op: the PyTorch path or the Triton kernels.

``set_backend("auto")`` (the default) uses the Triton kernels for CUDA tensors when they are importable and
the PyTorch path otherwise. ``"torch"`` always uses the PyTorch path. ``"triton"`` always uses the kernels: on
CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` is set (the Triton interpreter, used by tests).
"""

from __future__ import annotations

import functools
import os

import torch

_BACKENDS = ("auto", "torch", "triton")
_backend = "auto"


def set_backend(name: str) -> None:
    """Select the implementation of the routed-LoRA op: ``"auto"``, ``"torch"`` or ``"triton"``."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"set_backend: name must be one of {_BACKENDS}, got {name!r}")
    if name == "triton" and not triton_available():
        raise RuntimeError(
            "set_backend('triton'): the Triton kernels cannot be imported here "
            f"({_triton_import_error()}); install triton or use 'torch'"
        )
    _backend = name


def get_backend() -> str:
    """The backend chosen with :func:`set_backend`."""
    return _backend


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401

        from routed_lora.kernels import launch  # noqa: F401
    except Exception as exc:  # ImportError, or a kernels package not built yet
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_available() -> bool:
    return _triton_import_error() is None


def resolve(device: torch.device) -> str:
    """The implementation ("torch" or "triton") the op uses for tensors on ``device`` now."""
    if _backend == "torch":
        return "torch"
    if _backend == "triton":
        if device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()):
            return "triton"
        raise RuntimeError(
            f"backend 'triton' needs CUDA tensors or TRITON_INTERPRET=1 for CPU tensors; got a {device.type} tensor"
        )
    if device.type == "cuda" and triton_available():
        return "triton"
    return "torch"
