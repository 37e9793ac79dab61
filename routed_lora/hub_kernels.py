"""Hugging Face hub kernels ("kernelize") must never compute around a routed linear.

transformers (>= 5.25 by default on load, or ``model.kernelize()`` / ``set_use_kernels(True)``) and the
``kernels`` package replace the ``forward`` of decorated modules (RMSNorm, activations, MLPs, MoE experts) with a
hub kernel: ``module.forward`` becomes an instance attribute and ``module._kernel_repo`` names the repository.
Such a kernel reads its submodules' parameters (``self.gate_up_proj.weight``) instead of calling them, so if it
owns a :class:`~routed_lora.RoutedLoRALinear`, the routed delta ``s * B[rho] A[rho] x`` would silently vanish.

:func:`restore_kernelized_owners` finds every kernelized module that holds routed linears and puts its class's
own ``forward`` back (the one that calls its submodules); modules without routed linears keep their kernels.
transformers re-kernelizes a model when its kernels mode changes (``model.train()`` / ``eval()``), so the
routing hook checks that mode on each outermost call (one attribute read) and restores again when it moved.

This module only inspects and restores module attributes; it imports neither transformers nor ``kernels``.
"""

from __future__ import annotations

import warnings

from torch import nn

from .layer import RoutedLoRALinear

__all__ = ["kernelized_owners", "restore_kernelized_owners", "kernels_mode"]


def _is_kernelized(module: nn.Module) -> bool:
    """A hub kernel replaced this module's forward: ``kernels`` stores the kernel's forward as an instance
    attribute and records ``_kernel_repo``; a class with ``kernel_layer_name`` is kernelizable at all."""
    d = module.__dict__
    return "_kernel_repo" in d or ("forward" in d and hasattr(type(module), "kernel_layer_name"))


def kernelized_owners(model: nn.Module) -> list[str]:
    """Names of the kernelized modules of ``model`` that hold (are or contain) a :class:`RoutedLoRALinear`."""
    out = []
    for name, module in model.named_modules():
        if _is_kernelized(module) and any(isinstance(m, RoutedLoRALinear) for m in module.modules()):
            out.append(name or type(model).__name__)
    return out


def restore_kernelized_owners(model: nn.Module, *, warn: bool = True) -> list[str]:
    """Give every kernelized module that holds routed linears its class's ``forward`` back (what
    ``kernels`` itself does when it falls back); return their names and warn naming them."""
    names = kernelized_owners(model)
    if not names:
        return names
    lookup = dict(model.named_modules())
    for name in names:
        module = lookup.get(name, model)
        module.__dict__.pop("forward", None)
        module.__dict__.pop("_kernel_repo", None)
    if warn:
        warnings.warn(
            f"apply_routed_lora: hub kernels had replaced the forward of {names}, which hold routed LoRA layers; "
            "a kernel that reads their weights directly would drop the LoRA term, so these modules run their "
            "own forward again (the other kernels stay). Load with use_kernels=False to avoid this.",
            stacklevel=3,
        )
    return names


def kernels_mode(model: nn.Module):
    """transformers' record of the mode the model was kernelized in (None when it never was)."""
    return model.__dict__.get("_kernels_mode")
