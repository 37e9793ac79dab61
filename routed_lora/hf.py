"""Patching Hugging Face causal LMs (any ``nn.Module`` really) with :class:`RoutedLoRALinear`.

- :func:`apply_routed_lora` replaces the targeted ``nn.Linear`` modules in place (PEFT's matching rule),
  freezes every other parameter and installs three kinds of hooks (no HF class is patched):

  * a forward pre-hook on the model: pops a ``routes=`` keyword if given, else (with a router) computes the
    routes of the new tokens from ``input_ids`` (positional or keyword) and sets them on every layer. With a
    KV cache (keyword ``cache`` in transformers 5.x, ``past_key_values`` before) the router's per-sequence
    state is looked up by the cache object and its length (``cache.get_seq_length()``), so the prompt step and
    each decoding step of ``generate`` route exactly as the router does on the finished sequences;
  * a forward hook on the model: stores the router state reached, keyed by the returned cache and its length,
    and follows that cache's beam-search reorders;
  * the same two hooks on the inner base model (``model.model``), active only when it is called directly;
  * a forward pre-hook on each module that has a ``gradient_checkpointing`` flag (transformers'
    ``GradientCheckpointingLayer``) and holds routed layers: it wraps that module's
    ``_gradient_checkpointing_func`` so the routes of the original call are captured with the checkpointed
    call and put back in place during the recomputation (transformers 5.x checkpoints ``forward``, not
    ``__call__``; routes read from the layers at recompute time could have been replaced by then, e.g. by the
    reference pass of GRPO run between loss and backward).

- :func:`disable_adapters` (context manager): every routed layer runs as the frozen ``nn.Linear``.
- :func:`trainable_parameters`: the optimizer parameter group of the adapters; :func:`set_adapter_lr` gives
  each adapter its own learning rate (see its docstring for why it scales the update, not the gradient).
- :func:`remove_routed_lora`: back to plain ``nn.Linear`` modules sharing the same weight tensors.
- Hub kernels (transformers' kernelize) never replace the forward of a module holding routed layers: see
  :mod:`routed_lora.hub_kernels`.

This module holds the patching API and the state it keeps on the model (``_State``); the hooks themselves live in
:mod:`routed_lora.hf_hooks` (re-exported here for reading). Must not grow the hooks back: routing logic goes in
``hf_hooks``.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from typing import Mapping, Sequence

import torch
from torch import nn

from . import hf_hooks  # noqa: F401  (the pieces, as attributes)
from .hf_hooks import (  # noqa: F401  (re-exported: the old import path of the routing hooks)
    _assign,
    _ckpt_pre_hook,
    _get_arg,
    _install_call_hooks,
    _is_compiling,
    _kernels_mode_changed,
    _packed_starts,
    _parameters,
    _register_cache,
    _register_cache_eager,
    _route_call,
    _route_call_compiled,
    _route_call_eager,
    _track_cache,
    _wrap_checkpoint,
)
from .hub_kernels import kernels_mode, restore_kernelized_owners
from .layer import RoutedLoRALinear, _check_config
from .targets import DEFAULT_TARGET_MODULES, FUSED_TARGET_MODULES, default_targets_for, is_default_targets, \
    target_matches

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "FUSED_TARGET_MODULES",
    "apply_routed_lora",
    "remove_routed_lora",
    "disable_adapters",
    "trainable_parameters",
    "set_adapter_lr",
    "routed_layers",
    "get_router",
    "target_matches",
]

_STATE_ATTR = "_routed_lora_state"


class _State:
    """What :func:`apply_routed_lora` keeps on the model (attribute ``_routed_lora_state``)."""

    def __init__(self, model, layers, config, router, requires_grad):
        self.layers: list[tuple[str, RoutedLoRALinear]] = layers
        self.config = config
        self.router = router
        self.requires_grad = requires_grad  # name -> flag before freezing, restored by remove_routed_lora
        self.disabled = 0
        self.handles: list = []
        self.ckpt_modules: list[nn.Module] = []
        self.streams: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # cache -> (length, stream)
        self.pending = None  # (cache or None, stream) between the pre-hook and the forward hook
        self.depth = 0  # hooked calls in progress: only the outermost routes (module doc)
        self.model_ref = weakref.ref(model)
        self.kernels_mode = kernels_mode(model)  # transformers re-kernelizes when this changes (hub_kernels)

    @property
    def modules(self) -> list[RoutedLoRALinear]:
        return [m for _, m in self.layers]


def _state(model: nn.Module, *, required: bool = True) -> _State | None:
    st = model.__dict__.get(_STATE_ATTR)
    if st is None and required:
        raise ValueError(
            f"model: {type(model).__name__} has no routed LoRA; call routed_lora.apply_routed_lora(model) first"
        )
    return st


def routed_layers(model: nn.Module) -> list[tuple[str, RoutedLoRALinear]]:
    """``(name, layer)`` for every :class:`RoutedLoRALinear` in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, RoutedLoRALinear)]


def get_router(model: nn.Module):
    """The router given to :func:`apply_routed_lora` (None if none)."""
    st = _state(model, required=False)
    return None if st is None else st.router


# ---------------------------------------------------------------------------------------------------------
# patching
# ---------------------------------------------------------------------------------------------------------
def apply_routed_lora(
    model: nn.Module,
    *,
    target_modules: str | Sequence[str] = DEFAULT_TARGET_MODULES,
    r: int = 8,
    lora_alpha: float = 16,
    adapters: Sequence[str] = ("reasoning", "tool"),
    use_rslora: bool = False,
    router=None,
    adapter_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Replace the ``nn.Linear`` modules matching ``target_modules`` with :class:`RoutedLoRALinear` (in place).

    ``target_modules`` follows PEFT: a list of names matching a module's full name or its dotted suffix, a
    regex string matching the whole name, or ``"all-linear"`` (every ``nn.Linear`` but the output layer).
    The default (:data:`DEFAULT_TARGET_MODULES`) also routes fused projections (:data:`FUSED_TARGET_MODULES`,
    Phi-3) and warns naming every linear module it leaves out.
    transformers' ``Conv1D`` (GPT-2) is routed too, through a transposed view of its weight (no copy; PEFT's
    ``fan_in_fan_out``); :func:`remove_routed_lora` puts the original Conv1D back (do that before saving the
    whole model with ``save_pretrained``: while patched, its state dict holds the (out, in) view).
    Every other parameter is frozen. With ``router`` (e.g. a :class:`~routed_lora.TagRouter`) the model routes
    by itself in ``model(input_ids=...)`` and ``model.generate(...)``; without one, set routes with
    :func:`routed_lora.set_routes` or pass ``routes=`` to the model call. Returns ``model``.

    ``adapter_dtype``: the dtype of ``lora_A``/``lora_B``. ``None`` does what PEFT does by default: float32
    when the backbone weight is float16/bfloat16 (small updates do not vanish in rounding), else the weight's
    dtype. The layer casts the adapters to the activation dtype in each call; their gradients stay float32.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if adapter_dtype is not None and not (isinstance(adapter_dtype, torch.dtype) and adapter_dtype.is_floating_point):
        raise TypeError(f"adapter_dtype: expected a floating torch.dtype or None, got {adapter_dtype!r}")
    if _state(model, required=False) is not None or any(isinstance(m, RoutedLoRALinear) for m in model.modules()):
        raise ValueError("model: already has routed LoRA layers; call routed_lora.remove_routed_lora(model) first")
    from .fsdp import check_not_sharded

    check_not_sharded(model, "apply_routed_lora")
    names = _check_config(r, lora_alpha, adapters)
    if isinstance(target_modules, str):
        if target_modules != "all-linear":
            try:
                re.compile(target_modules)
            except re.error as exc:
                raise ValueError(f"target_modules: invalid regex {target_modules!r}: {exc}") from None
    else:
        target_modules = tuple(target_modules)
        if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
            raise ValueError(f"target_modules: expected non-empty module names, got {target_modules!r}")

    default = is_default_targets(target_modules)
    if default:
        target_modules = default_targets_for(n for n, _ in model.named_modules())
    matched = _match(model, target_modules)
    if not matched:
        linear = [n for n, m in model.named_modules() if _is_linear(m)]
        raise ValueError(
            f"target_modules={target_modules!r} matched no module of {type(model).__name__}; "
            f"its linear modules include {linear[:8]}{' ...' if len(linear) > 8 else ''}"
        )
    for name, module in matched:
        if not _is_linear(module):
            raise TypeError(
                f"target_modules: module {name!r} is a {type(module).__module__}.{type(module).__name__}, not an "
                "nn.Linear (or transformers' Conv1D); only linear layers can be routed"
            )
    if default:
        _warn_left_out(model, matched)
    if router is not None:
        if not callable(getattr(router, "stream", None)):
            raise TypeError(f"router: expected a TagRouter-like object with .stream(), got {type(router).__name__}")
        if hasattr(router, "bind"):
            router.bind(names)

    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    layers = []
    originals = {}
    for name, linear in matched:
        if _is_conv1d(linear):
            originals[name] = linear  # restored by remove_routed_lora
            linear = _conv1d_as_linear(linear)
        new = RoutedLoRALinear.from_linear(linear, r=r, lora_alpha=lora_alpha, adapters=names, use_rslora=use_rslora)
        dtype = adapter_dtype
        if dtype is None and linear.weight.dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        if dtype is not None and dtype != new.lora_A.dtype:
            with torch.no_grad():  # initialise in the wider dtype (same init as PEFT's upcast: B = 0 anyway)
                new.lora_A = nn.Parameter(new.lora_A.detach().to(dtype))
                new.lora_B = nn.Parameter(new.lora_B.detach().to(dtype))
        new.train(linear.training)
        _set_submodule(model, name, new)
        layers.append((name, new))

    config = dict(
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        r=int(r),
        lora_alpha=lora_alpha,
        adapters=list(names),
        use_rslora=bool(use_rslora),
        adapter_dtype=None if adapter_dtype is None else str(adapter_dtype).replace("torch.", ""),
    )
    st = _State(model, layers, config, router, requires_grad)
    st.originals = originals
    restore_kernelized_owners(model)
    _attach_state(model, st)
    return model


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): ``y = x W + b`` with W (in, out), i.e. a linear with W transposed."""
    return type(m).__name__ == "Conv1D" and isinstance(getattr(m, "weight", None), torch.Tensor) \
        and m.weight.dim() == 2 and hasattr(m, "nf")


def _is_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear or _is_conv1d(m)


def _conv1d_as_linear(conv: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` whose weight is the transposed view (out, in) of ``conv.weight`` (same storage, no
    copy), so ``F.linear(x, W.T) = x W``, the Conv1D. PEFT routes Conv1D the same way (``fan_in_fan_out``);
    its LoRA A (r, in) and B (out, r) have the nn.Linear layout, so the saved folders load in PEFT."""
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features = conv.weight.shape
    lin.weight = nn.Parameter(conv.weight.detach().t(), requires_grad=False)
    lin.register_parameter("bias", conv.bias)
    lin.train(conv.training)
    return lin


def _warn_left_out(model: nn.Module, matched) -> None:
    """With the default targets, warn naming every linear module of the decoder that is left out (an
    architecture whose projections have other names would otherwise train only part of its layers)."""
    import warnings

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    chosen = {id(m) for _, m in matched}
    left = [n for n, m in model.named_modules() if _is_linear(m) and m is not out_emb and id(m) not in chosen
            and not any(n.startswith(t + ".") for t, _ in matched)]
    if left:
        warnings.warn(
            f"apply_routed_lora: the default target_modules leave out {len(left)} linear modules of "
            f"{type(model).__name__}: {left}; pass target_modules=... (e.g. 'all-linear') to route them",
            stacklevel=3,
        )


def _attach_state(model: nn.Module, st: _State, *, callers: Sequence[nn.Module] = ()) -> _State:
    """Keep ``st`` on ``model`` and install the routing hooks (module doc) on it, its inner base model and
    ``callers`` (wrappers such as a PEFT model whose call reaches ``model.forward`` without its hooks)."""
    model.__dict__[_STATE_ATTR] = st  # a plain attribute, not a submodule
    for wrapper in callers:
        _install_call_hooks(st, wrapper)
    _install_call_hooks(st, model)
    inner = getattr(model, "base_model", None)
    if isinstance(inner, nn.Module) and inner is not model and "input_ids" in _parameters(inner):
        # model.model(...) called directly (hidden states only) routes by itself too
        _install_call_hooks(st, inner)
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing") and module is not model:
            inner = [m for m in module.modules() if isinstance(m, RoutedLoRALinear)]
            if inner:
                module._routed_lora_inner = inner
                st.ckpt_modules.append(module)
                st.handles.append(module.register_forward_pre_hook(_ckpt_pre_hook))
    return st


def _match(model: nn.Module, target_modules) -> list[tuple[str, nn.Module]]:
    if target_modules == "all-linear":
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return [(n, m) for n, m in model.named_modules() if _is_linear(m) and m is not out_emb]
    out = []

    def walk(module: nn.Module, prefix: str):
        for child_name, child in module.named_children():
            full = f"{prefix}.{child_name}" if prefix else child_name
            if target_matches(target_modules, full):
                out.append((full, child))
                continue  # do not look inside a matched module
            walk(child, full)

    walk(model, "")
    return out


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def remove_routed_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_routed_lora`: plain ``nn.Linear`` modules sharing the same weight and bias tensors,
    hooks removed, ``requires_grad`` flags as they were before. The adapters are dropped (save them first)."""
    from .fsdp import check_not_sharded

    st = _state(model)
    check_not_sharded(model, "remove_routed_lora")
    for h in st.handles:
        h.remove()
    for module in st.ckpt_modules:
        f = module.__dict__.get("_gradient_checkpointing_func")
        if f is not None and getattr(f, "_routed_lora", False):
            module._gradient_checkpointing_func = f.__wrapped__
        module.__dict__.pop("_routed_lora_inner", None)
    originals = getattr(st, "originals", {})
    for name, layer in st.layers:
        if name in originals:  # a Conv1D: put the original module (its own weight Parameter) back
            _set_submodule(model, name, originals[name])
            continue
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = layer.in_features, layer.out_features
        linear.weight = layer.weight
        linear.register_parameter("bias", layer.bias)
        linear.train(layer.training)
        _set_submodule(model, name, linear)
    for n, p in model.named_parameters():
        if n in st.requires_grad:
            p.requires_grad_(st.requires_grad[n])
    del model.__dict__[_STATE_ATTR]
    return model


# ---------------------------------------------------------------------------------------------------------
# adapters off, parameters, learning rates
# ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run ``model`` as the frozen backbone inside the block (every routed layer is a plain ``F.linear``).

    Routes set before are restored on exit. With a router the model keeps routing (so KV-cache state stays
    consistent) but uses the backbone. The GRPO reference policy is ``with disable_adapters(model): model(...)``.
    """
    st = _state(model, required=False)
    layers = st.modules if st is not None else [m for m in model.modules() if isinstance(m, RoutedLoRALinear)]
    if not layers:
        raise ValueError(f"model: {type(model).__name__} has no RoutedLoRALinear layers")
    saved = [layer._routes for layer in layers]
    if st is not None:
        st.disabled += 1
    for layer in layers:
        layer._routes = -1
    try:
        yield model
    finally:
        if st is not None:
            st.disabled -= 1
        for layer, routes in zip(layers, saved):
            layer._routes = routes


def trainable_parameters(model: nn.Module) -> list[dict]:
    """Optimizer parameter groups for the adapters: ``[{"params": [...], "name": "routed_lora",
    "adapters": (names...)}]``.

    Every ``lora_A`` (E, r, in) and ``lora_B`` (E, out, r) tensor holds all E adapters along dim 0, so one
    tensor cannot sit in two optimizer groups. To give each adapter its own learning rate use
    :func:`set_adapter_lr` on the optimizer built from these groups. Parameters outside the routed layers that
    require gradients (unfrozen by the caller after :func:`apply_routed_lora`) come as a second group
    ``{"name": "other"}``.
    """
    layers = routed_layers(model)
    if not layers:
        raise ValueError(f"model: {type(model).__name__} has no RoutedLoRALinear layers")
    names = layers[0][1].adapter_names
    for n, layer in layers:
        if layer.adapter_names != names:
            raise ValueError(f"layer {n!r} has adapters {layer.adapter_names}, others have {names}")
    lora = []
    seen = set()
    for _, layer in layers:
        for p in (layer.lora_A, layer.lora_B):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                lora.append(p)
    groups = [{"params": lora, "name": "routed_lora", "adapters": tuple(names)}]
    other = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    if other:
        groups.append({"params": other, "name": "other"})
    return groups


def set_adapter_lr(optimizer: torch.optim.Optimizer, lr: Mapping[str, float]):
    """Give each adapter its own learning rate in ``optimizer`` (built from :func:`trainable_parameters`).

    ``lr``: ``{adapter: learning rate}``; adapters not named keep the group's ``lr``. The rates are stored as
    ratios to the group's ``lr`` when this is called, so a scheduler scaling ``lr`` scales every adapter.

    How: each step's update of every adapter slice (dim 0 of ``lora_A``/``lora_B``) is multiplied by
    ``lr[adapter] / group["lr"]`` (optimizer step pre/post hooks keep a copy of the adapter tensors). For
    SGD (with momentum), Adam, AdamW, RMSprop and Adagrad the update is proportional to ``lr``, so this equals
    a per-adapter learning rate. Scaling gradients instead would be wrong for Adam (invariant to gradient
    scale). Returns the hook handles.
    """
    groups = [g for g in optimizer.param_groups if "adapters" in g]
    if not groups:
        raise ValueError("optimizer: no parameter group from routed_lora.trainable_parameters (key 'adapters')")
    for g in groups:
        names = tuple(g["adapters"])
        unknown = sorted(set(lr) - set(names))
        if unknown:
            raise ValueError(f"lr: unknown adapters {unknown}; the adapters are {names}")
        base = float(g["lr"])
        if base <= 0:
            raise ValueError(f"optimizer group lr must be > 0 to set per-adapter ratios, got {base}")
        for k, v in lr.items():
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"lr[{k!r}]: expected a number >= 0, got {v!r}")
        g["adapter_lr_scale"] = [float(lr.get(n, base)) / base for n in names]
        for p in g["params"]:
            if p.dim() < 1 or p.shape[0] != len(names):
                raise ValueError(f"group parameter of shape {tuple(p.shape)} has no adapter dimension of {len(names)}")

    if getattr(optimizer, "_routed_lora_lr_hooks", None):
        return optimizer._routed_lora_lr_hooks
    snapshots: dict[int, list[torch.Tensor]] = {}

    from .fsdp import local_part

    # Under FSDP2 the parameters are DTensor shards along dim 0, the adapter dimension: each rank scales the
    # adapter rows it holds (local_part gives the rows and their global offset), with no communication.
    @torch.no_grad()
    def pre(opt, args, kwargs):
        snapshots.clear()
        for i, g in enumerate(opt.param_groups):
            scale = g.get("adapter_lr_scale")
            if scale is not None and any(s != 1.0 for s in scale):
                snapshots[i] = [local_part(p)[0].clone() for p in g["params"]]

    @torch.no_grad()
    def post(opt, args, kwargs):
        for i, old in snapshots.items():
            g = opt.param_groups[i]
            for p, p0 in zip(g["params"], old):
                local, offset = local_part(p)
                if local.numel() == 0:
                    continue
                rows = g["adapter_lr_scale"][offset[0]:offset[0] + local.shape[0]]
                s = torch.tensor(rows, dtype=local.dtype, device=local.device)
                s = s.view(-1, *([1] * (local.dim() - 1)))
                local.copy_(p0 + (local - p0) * s)
        snapshots.clear()

    handles = (optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post))
    optimizer._routed_lora_lr_hooks = handles
    return handles

