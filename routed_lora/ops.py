"""The routed-LoRA op registered with ``torch.library`` and its autograd glue.

Two custom ops, ``routed_lora::forward`` and ``routed_lora::backward``, each dispatching at run time to the
PyTorch path (:mod:`routed_lora.reference`) or to the Triton launchers (:mod:`routed_lora.kernels.launch`), as
:func:`routed_lora.backend.resolve` says. Registering them as custom ops with fake (meta) implementations lets
``torch.compile(fullgraph=True)`` trace through a model using the layer without graph breaks, and
``torch.library.opcheck`` validate the registration.

Eager calls (not under ``torch.compile``) skip the custom-op dispatcher: :func:`routed_lora_apply` runs the same
implementations through a plain ``torch.autograd.Function``. The dispatcher's Python layers cost more than a
small layer's whole forward (measured on this project's 2-core CPU: ~130 us of ~360 us per call at M = 16), and
a model calls the op 7 times per decoder layer, so on a GPU the custom-op path is launch-bound at small M.
Under ``torch.compile`` the custom op is used, so graphs stay free of breaks; both paths share every line of
maths, and the tests run both.

Saved for backward: x, the routes and the masked shrink h (M, E*r), plus references to the parameters
(W, A, B), which cost no memory. Never an (M, N) tensor.

First derivatives only: the backward reads the saved h, which is not differentiable in A, so a graph through it
would give wrong second derivatives. A second backward through the layer raises instead: the eager Function's
gradients under ``create_graph=True`` go through :class:`_FirstOrderOnly`, and ``routed_lora::backward`` has no
autograd formula.
"""

from __future__ import annotations

import torch

from . import backend as _backend
from .reference import inference_forward, reference_backward, reference_forward

__all__ = ["routed_lora_forward", "routed_lora_backward", "routed_lora_apply", "routed_lora_infer"]


def _impl(device: torch.device):
    if _backend.resolve(device) == "triton":
        from .kernels import launch

        return launch.forward, launch.backward
    return reference_forward, reference_backward


@torch.library.custom_op("routed_lora::forward", mutates_args=())
def routed_lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    routes: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x W^T + b + s * (h * mask) B_cat^T and h * mask, for x (M, K), routes (M,)."""
    fwd, _ = _impl(x.device)
    return fwd(x, weight, bias, lora_A, lora_B, routes, scaling)


@routed_lora_forward.register_fake
def _(x, weight, bias, lora_A, lora_B, routes, scaling):
    E, r, _ = lora_A.shape
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], E * r))


@torch.library.custom_op("routed_lora::backward", mutates_args=())
def routed_lora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    routes: torch.Tensor,
    h_masked: torch.Tensor,
    scaling: float,
    compute_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB); dx is an empty tensor when ``compute_dx`` is False."""
    _, bwd = _impl(x.device)
    dx, dA, dB = bwd(grad_y, x, weight, lora_A, lora_B, routes, h_masked, scaling, compute_dx)
    if dx is None:
        dx = x.new_empty((0,))
    return dx, dA, dB


@routed_lora_backward.register_fake
def _(grad_y, x, weight, lora_A, lora_B, routes, h_masked, scaling, compute_dx):
    dx = x.new_empty(x.shape) if compute_dx else x.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


def _save(ctx, x, weight, lora_A, lora_B, routes, h_masked, scaling):
    ctx.save_for_backward(x, weight, lora_A, lora_B, routes, h_masked)
    ctx.scaling = scaling
    ctx.set_materialize_grads(False)  # grad_h stays None: no (M, E*r) zero tensor every backward


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, routes, scaling = inputs
    _save(ctx, x, weight, lora_A, lora_B, routes, output[1], scaling)


def _grads(ctx, grad_y, backward_for, saved=None):
    """The 7 input gradients, with ``backward_for(device)`` giving the backward to run,
    ``(grad_y, x, W, A, B, routes, h, s, compute_dx) -> (dx, dA, dB)``.

    The gradient of h is ignored: h is an internal output, kept for the backward only. ``ctx.saved_tensors`` is
    read exactly once (here, or by the caller, which passes them as ``saved``): under activation checkpointing a
    second read raises."""
    if grad_y is None:  # y did not reach the loss
        return (None,) * 7
    x, weight, lora_A, lora_B, routes, h_masked = ctx.saved_tensors if saved is None else saved
    compute_dx = ctx.needs_input_grad[0]
    backward_fn = backward_for(x.device)
    dx, dA, dB = backward_fn(grad_y.contiguous(), x, weight, lora_A, lora_B, routes, h_masked, ctx.scaling, compute_dx)
    return (
        dx if compute_dx else None,
        None,  # weight: frozen
        None,  # bias: frozen
        dA if ctx.needs_input_grad[3] else None,
        dB if ctx.needs_input_grad[4] else None,
        None,
        None,
    )


def _backward(ctx, grad_y, grad_h):
    return _grads(ctx, grad_y, lambda device: routed_lora_backward)


routed_lora_forward.register_autograd(_backward, setup_context=_setup_context)


class _RoutedLoRAFunction(torch.autograd.Function):
    """The eager path: the same forward / backward implementations as the custom ops, without the dispatcher."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, routes, scaling):
        fwd, _ = _impl(x.device)
        y, h_masked = fwd(x, weight, bias, lora_A, lora_B, routes, scaling)
        ctx.mark_non_differentiable(h_masked)
        _save(ctx, x, weight, lora_A, lora_B, routes, h_masked, scaling)
        return y, h_masked

    @staticmethod
    def backward(ctx, grad_y, grad_h):
        if not torch.is_grad_enabled():  # the usual backward (create_graph=False)
            return _grads(ctx, grad_y, lambda device: _impl(device)[1])
        saved = ctx.saved_tensors
        with torch.no_grad():
            grads = _grads(ctx, grad_y, lambda device: _impl(device)[1], saved)
        # create_graph=True: right values, but any gradient taken through them raises (module doc)
        x, _, lora_A, lora_B, _, _ = saved
        return tuple(None if g is None else _FirstOrderOnly.apply(g, x, lora_A, lora_B) for g in grads)


class _FirstOrderOnly(torch.autograd.Function):
    """The identity on a gradient the layer's backward returned under ``create_graph=True``, whose own backward
    raises: the layer has no second derivatives, and a loss built from its gradients (a gradient penalty, a
    meta-gradient) must fail rather than silently treat them as constants. The layer's inputs (x, lora_A,
    lora_B) are inputs of this node too, so a gradient taken towards them reaches it (and raises) even when the
    incoming gradient was not part of any graph."""

    @staticmethod
    def forward(ctx, grad, *inputs):
        return grad.clone()

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            "routed_lora: second derivatives through a RoutedLoRALinear layer are not supported (its backward is "
            "first-order: it reads the shrink h saved by the forward, not differentiable in lora_A); a loss built "
            "from its gradients cannot be differentiated"
        )


def _tracing() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # very old torch
        return False


def routed_lora_apply(x, weight, bias, lora_A, lora_B, routes, scaling, *, use_custom_op: bool | None = None):
    """(y, h_masked): the custom op under ``torch.compile`` (or when ``use_custom_op``), else the eager Function."""
    if use_custom_op or (use_custom_op is None and _tracing()):
        return routed_lora_forward(x, weight, bias, lora_A, lora_B, routes, scaling)
    return _RoutedLoRAFunction.apply(x, weight, bias, lora_A, lora_B, routes, scaling)


def routed_lora_infer(x, weight, bias, lora_A, lora_B, routes, scaling):
    """y alone, outside autograd (no_grad / inference_mode decoding): no autograd Function, no h kept.

    The PyTorch path uses :func:`routed_lora.reference.inference_forward` (bit-identical to the training
    forward's y); the Triton path runs its forward and drops h."""
    if _backend.resolve(x.device) == "triton":
        from .kernels import launch

        if routes.dtype != torch.int32:
            routes = routes.to(torch.int32)
        return launch.forward(x, weight, bias, lora_A, lora_B, routes, scaling)[0]
    return inference_forward(x, weight, bias, lora_A, lora_B, routes, scaling)
