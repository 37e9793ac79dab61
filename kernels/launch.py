"""Plain launchers of the routed-LoRA kernels: ``forward`` and ``backward`` (no autograd here).

The contract with :mod:`routed_lora.ops` (same semantics as :mod:`routed_lora.reference`):

    forward(x, weight, bias, lora_A, lora_B, routes, scaling) -> (y, h_masked)
    backward(grad_y, x, weight, lora_A, lora_B, routes, h_masked, scaling, compute_dx) -> (dx | None, dA, dB)

``h_masked`` (M, E*r) in x.dtype has exactly the reference's format, so a backward on one backend accepts the
h of the other.

Launch floor. The fused forward is 2 kernel launches (shrink; GEMM with the LoRA epilogue) and the fused
backward 3 (G; dx GEMM with the LoRA epilogue; dA and dB together), and nothing else runs on the device: split
reductions are summed inside the kernels in a fixed order (see :mod:`.fused_lora`), results are cast when
stored. Allocations per call are the outputs only (y, h; dx, dA, dB); G and the split partials live in one
scratch arena per device, sized by the plan and reused (``scratch_bytes``).

Determinism: always. The reductions over tokens (dA, dB) and split reductions are summed in a fixed order, so
repeated calls give bit-identical results and adapter 0's gradient is bit-for-bit unchanged when only adapter
1's tokens change. ``set_deterministic`` is kept for compatibility: since the fixed order costs no extra launch,
there is no atomic mode any more.

The call of each exact key (shapes, strides, dtypes, pointer alignment, switches) is built once and kept
(``MAX_CACHED_CALLS`` per direction). The rest lives in the modules this one was split into; it re-exports
their names, so the old import paths stay for reading (to patch a name, patch the module that reads it):

- :mod:`.configs`: shipped tile configurations and the plan's constants;
- :mod:`.switches`: ``set_variant``, ``pin_configs``, the interpreter's plan, and the ``CALLS`` counter;
- :mod:`.plan`: the launch plan (``make_plan``, ``scratch_bytes``) and the scratch arena;
- :mod:`.interpreter`: the kernel objects (JIT or interpreted) and the interpreter's plumbing;
- :mod:`.tuning`: the variant choice by device time (``device_time_ms``, ``VARIANT_CACHE``) and GEMM autotuning;
- :mod:`.compiled`: per-key calls launching the compiled kernels directly, and TMA support.

Must not grow launch machinery of its own (it belongs in those modules) or extra call layers on the hot path:
``forward`` / ``backward`` go from the key lookup straight to the cached call.
"""

from __future__ import annotations

import torch


from . import compiled, configs, interpreter, plan, switches, tuning  # noqa: F401  (the pieces, as attributes)

# Re-exported: the public names, and the private ones tests and benchmarks read or patch through this module.
from .compiled import _Call, _device_tma, _Launch, _sm_count, tma_supported  # noqa: F401
from .configs import (  # noqa: F401
    GRAD_AB_TILES,
    INTERPRETER_AUTOTUNE_CONFIGS,
    INTERPRETER_CONFIGS,
    INTERPRETER_TILES,
    LINEAR_CONFIGS,
    LINEAR_LORA_CONFIGS,
    MAX_BLOCK_R,
    MAX_SPLITS,
    PARTIAL_BUDGET,
    SHRINK_TILES,
    SHRINK_TILES_SMALL_M,
    SPLIT_MULTIPLE,
    SPLIT_MULTIPLE_INTERPRETER,
    TARGET_WAVES,
    TMA_CONFIGS,
    shipped_configs,
)
from .interpreter import _interpreting, _jit_or_interpreted  # noqa: F401
from .plan import GradABPlan, Plan, ShrinkPlan, _block_r, make_plan, scratch_bytes  # noqa: F401
from .switches import (  # noqa: F401
    CALLS,
    _state,
    autotune_in_interpreter,
    get_deterministic,
    get_variant,
    pin_configs,
    set_deterministic,
    set_interpreter_plan,
    set_variant,
)
from .tuning import (  # noqa: F401
    _AUTOTUNERS,
    _TIMER,
    VARIANT_CACHE,
    VARIANT_ERRORS,
    _autotuner,
    _choose,
    _shape_key,
    device_time_ms,
)

__all__ = [
    "CALLS",
    "forward",
    "backward",
    "make_plan",
    "Plan",
    "scratch_bytes",
    "set_variant",
    "get_variant",
    "set_deterministic",
    "get_deterministic",
    "pin_configs",
    "shipped_configs",
    "set_interpreter_plan",
    "device_time_ms",
    "VARIANT_CACHE",
    "VARIANT_ERRORS",
]

# --------------------------------------------------------------------------------------------------------------
# The contract: forward / backward, cached per exact key.

_FORWARD_CALLS: dict = {}
_BACKWARD_CALLS: dict = {}
MAX_CACHED_CALLS = 4096  # cached exact keys per direction; a new key costs one JIT-path launch per kernel


def _torch_forward(x, weight, bias, lora_A, lora_B, routes, scaling):
    from routed_lora.reference import reference_forward

    return reference_forward(x, weight, bias, lora_A, lora_B, routes, scaling)


def _torch_backward(grad_y, x, weight, lora_A, lora_B, routes, h, scaling, compute_dx):
    from routed_lora.reference import reference_backward

    return reference_backward(grad_y, x, weight, lora_A, lora_B, routes, h, scaling, compute_dx)


def _prepare(x, lora_A, lora_B, routes):
    if lora_A.dtype != x.dtype:
        lora_A = lora_A.to(x.dtype)
    if lora_B.dtype != x.dtype:
        lora_B = lora_B.to(x.dtype)
    if routes.dtype != torch.int32 or routes.dim() != 1 or not routes.is_contiguous():
        routes = routes.reshape(-1).to(torch.int32).contiguous()
    return lora_A, lora_B, routes


def forward(x, weight, bias, lora_A, lora_B, routes, scaling):
    """(y, h_masked) for x (M, K); see the module docstring."""
    if lora_A.dtype is not x.dtype or lora_B.dtype is not x.dtype or routes.dtype is not torch.int32:
        lora_A, lora_B, routes = _prepare(x, lora_A, lora_B, routes)
    key = (x.device, x.dtype, x.shape, x.stride(), weight.shape, weight.stride(), bias is None,
           lora_A.shape, lora_A.stride(), lora_B.stride(), routes.shape, routes.stride(), _state["gen"],
           x.data_ptr() % 16, weight.data_ptr() % 16, lora_A.data_ptr() % 16, lora_B.data_ptr() % 16,
           routes.data_ptr() % 16, 0 if bias is None else bias.data_ptr() % 16,
           x.dtype is torch.float32 and torch.backends.cuda.matmul.allow_tf32)  # fmt: skip
    call = _FORWARD_CALLS.get(key)
    if call is None:
        if len(_FORWARD_CALLS) >= MAX_CACHED_CALLS:  # e.g. many token counts in RL: start over (cheap to rebuild)
            _FORWARD_CALLS.clear()
        call = _FORWARD_CALLS[key] = _new_forward(x, weight, bias, lora_A, lora_B, routes, scaling)
    CALLS["forward"] += 1
    return call.forward(x, weight, bias, lora_A, lora_B, routes, scaling)


def backward(grad_y, x, weight, lora_A, lora_B, routes, h_masked, scaling, compute_dx):
    """(dx or None, dA (E, r, K), dB (E, N, r)); see the module docstring."""
    if lora_A.dtype is not x.dtype or lora_B.dtype is not x.dtype or routes.dtype is not torch.int32:
        lora_A, lora_B, routes = _prepare(x, lora_A, lora_B, routes)
    if h_masked.dtype is not x.dtype:
        h_masked = h_masked.to(x.dtype)
    key = (x.device, x.dtype, x.shape, x.stride(), grad_y.stride(), weight.shape, weight.stride(), compute_dx,
           lora_A.shape, lora_A.stride(), lora_B.stride(), routes.shape, routes.stride(), h_masked.stride(),
           _state["gen"], x.data_ptr() % 16, grad_y.data_ptr() % 16, weight.data_ptr() % 16,
           lora_A.data_ptr() % 16, lora_B.data_ptr() % 16, routes.data_ptr() % 16, h_masked.data_ptr() % 16,
           x.dtype is torch.float32 and torch.backends.cuda.matmul.allow_tf32)  # fmt: skip
    call = _BACKWARD_CALLS.get(key)
    if call is None:
        if len(_BACKWARD_CALLS) >= MAX_CACHED_CALLS:
            _BACKWARD_CALLS.clear()
        call = _BACKWARD_CALLS[key] = _new_backward(grad_y, x, weight, lora_A, lora_B, routes, h_masked, scaling,
                                                    compute_dx)
    CALLS["backward"] += 1
    return call.backward(grad_y, x, weight, lora_A, lora_B, routes, h_masked, scaling, compute_dx)


class _Empty:
    """M = 0 (or an empty weight): no kernel."""

    def __init__(self, E, R):
        self.ER = E * R

    def forward(self, x, weight, bias, lora_A, lora_B, routes, scaling):
        CALLS["forward_empty"] += 1
        return torch.nn.functional.linear(x, weight, bias), x.new_zeros((x.shape[0], self.ER))

    def backward(self, grad_y, x, weight, lora_A, lora_B, routes, h, scaling, compute_dx):
        CALLS["backward_empty"] += 1
        dx = torch.zeros_like(x) if compute_dx else None  # g W = 0 when M, N or K is 0
        return dx, torch.zeros_like(lora_A), torch.zeros_like(lora_B)


class _Torch:
    def forward(self, *args):
        CALLS["forward_torch"] += 1
        return _torch_forward(*args)

    def backward(self, *args):
        CALLS["backward_torch"] += 1
        return _torch_backward(*args)


class _Counted:
    """Wraps a call so ``CALLS["forward_<variant>"]`` counts which variant ran."""

    def __init__(self, call, fwd_name, bwd_name):
        self.call, self.fwd_name, self.bwd_name = call, fwd_name, bwd_name

    def forward(self, *args):
        CALLS[self.fwd_name] += 1
        return self.call.forward(*args)

    def backward(self, *args):
        CALLS[self.bwd_name] += 1
        return self.call.backward(*args)


def _check_shapes(x, weight, lora_A, lora_B, bias=None):
    M, K = x.shape
    N = weight.shape[0]
    E, R, Ka = lora_A.shape
    if weight.shape[1] != K or Ka != K or tuple(lora_B.shape) != (E, N, R):
        raise ValueError(
            f"routed_lora.kernels: inconsistent shapes x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
            f"lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"routed_lora.kernels: bias shape {tuple(bias.shape)}, expected ({N},)")


def _new_forward(x, weight, bias, lora_A, lora_B, routes, scaling):
    _check_shapes(x, weight, lora_A, lora_B, bias)
    interpret = _interpreting(x)
    E, R, _ = lora_A.shape
    if x.shape[0] == 0 or weight.shape[0] == 0 or x.shape[1] == 0:
        return _Empty(E, R)
    key = _shape_key("forward", x, weight, lora_A, bias is not None)
    args = (x, weight, bias, lora_A, lora_B, routes, scaling)
    built = {}

    def candidate(v):
        def run():
            if v not in built:
                built[v] = _Torch() if v == "torch" else _Call("forward", v, x, weight, lora_A, interpret, bias)
            return built[v].forward(*args)

        return run

    variant = _choose("forward", key, {v: candidate(v) for v in ("fused", "cublas", "torch")})
    call = built.get(variant) or (_Torch() if variant == "torch" else
                                  _Call("forward", variant, x, weight, lora_A, interpret, bias))
    return _Counted(call, f"forward_{variant}", f"backward_{variant}")


def _new_backward(grad_y, x, weight, lora_A, lora_B, routes, h, scaling, compute_dx):
    _check_shapes(x, weight, lora_A, lora_B)
    if tuple(grad_y.shape) != (x.shape[0], weight.shape[0]):
        raise ValueError(f"routed_lora.kernels: grad_y shape {tuple(grad_y.shape)}, expected "
                         f"{(x.shape[0], weight.shape[0])}")
    interpret = _interpreting(x)
    E, R, _ = lora_A.shape
    if x.shape[0] == 0 or weight.shape[0] == 0 or x.shape[1] == 0:
        return _Empty(E, R)
    key = _shape_key("backward", x, weight, lora_A, bool(compute_dx))
    args = (grad_y, x, weight, lora_A, lora_B, routes, h, scaling, bool(compute_dx))
    built = {}

    def candidate(v):
        def run():
            if v not in built:
                built[v] = _Torch() if v == "torch" else _Call("backward", v, x, weight, lora_A, interpret,
                                                               compute_dx=bool(compute_dx), grad_y=grad_y)
            return built[v].backward(*args)

        return run

    variant = _choose("backward", key, {v: candidate(v) for v in ("fused", "cublas", "torch")})
    call = built.get(variant) or (_Torch() if variant == "torch" else
                                  _Call("backward", variant, x, weight, lora_A, interpret,
                                        compute_dx=bool(compute_dx), grad_y=grad_y))
    return _Counted(call, f"forward_{variant}", f"backward_{variant}")

