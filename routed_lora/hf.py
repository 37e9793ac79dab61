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
"""

from __future__ import annotations

import contextlib
import inspect
import re
import weakref
from typing import Mapping, Sequence

import torch
from torch import nn

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
# routing hooks
# ---------------------------------------------------------------------------------------------------------
def _assign(st: _State, routes) -> None:
    """Set routes on every layer without re-checking values (the router's are valid by construction)."""
    if st.disabled:
        routes = -1
    if isinstance(routes, torch.Tensor):
        routes = routes.to(torch.int32)
        per_device = {}
        for layer in st.modules:
            dev = layer.weight.device
            if dev not in per_device:
                per_device[dev] = routes.to(dev)
            layer._routes = per_device[dev]
    else:
        for layer in st.modules:
            layer._routes = routes


def _get_arg(bound, kwargs, args, name, position):
    if name in kwargs:
        return kwargs[name]
    if bound is not None:
        return bound.get(name)
    return args[position] if len(args) > position else None


def _parameters(module: nn.Module) -> dict:
    try:
        return dict(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return {}


def _install_call_hooks(st: _State, module: nn.Module) -> None:
    """Routing hooks on ``module`` (the model, its inner base model, or a wrapper calling the model). Only the
    outermost hooked call routes: a hooked module called from within another hooked call (the inner base
    model from the model, the model from a PEFT wrapper) leaves the routes alone."""
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):  # pragma: no cover
        signature = None

    # Traceable by torch.compile: the depth count, and explicit routes= (set on the layers without reading
    # their values); the router and the KV-cache bookkeeping run eagerly (compiler-disabled helpers), so a
    # whole patched model called with routes= compiles with fullgraph=True.
    def pre_hook(mod, args, kwargs):
        st.depth += 1
        if st.depth > 1:
            return None
        owner = st.model_ref()
        if owner is not None and kernels_mode(owner) != st.kernels_mode:
            _kernels_mode_changed(st, owner)
        # Wrap the checkpoint functions before any layer runs: transformers < 5.2x checkpoints the layer's
        # whole __call__, so the layer's own pre-hook would run inside the first checkpointed call, too late.
        for module in st.ckpt_modules:
            _ckpt_pre_hook(module, ())
        if _is_compiling() and ("routes" in kwargs or st.router is None):
            return _route_call_compiled(st, args, kwargs)
        return _route_call_eager(st, signature, args, kwargs)  # the router: a graph break under compile

    def post_hook(mod, args, kwargs, output):
        st.depth = max(0, st.depth - 1)
        if st.depth > 0 or (_is_compiling() and st.pending is None):
            return None
        _register_cache_eager(st, output)
        return None

    st.handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
    st.handles.append(module.register_forward_hook(post_hook, with_kwargs=True, always_call=True))


@torch.compiler.disable
def _kernels_mode_changed(st: _State, model: nn.Module) -> None:
    """transformers re-kernelized the model (``train()`` / ``eval()`` switch its kernels mode): restore the
    modules that hold routed layers again before this call runs."""
    st.kernels_mode = kernels_mode(model)
    restore_kernelized_owners(model)


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover
        return False


def _route_call_compiled(st: _State, args, kwargs):
    """The pre-hook under torch.compile with explicit routes (checked for dtype, not values: reading values is
    a graph break; the layer's op asserts them on a GPU), or without router and routes (nothing to do). A model
    with a router called without routes= routes eagerly: a graph break, so fullgraph=True needs routes=."""
    st.pending = None
    explicit = kwargs.pop("routes", None)
    if explicit is None:
        return args, kwargs
    if isinstance(explicit, torch.Tensor):
        if explicit.dtype.is_floating_point or explicit.dtype == torch.bool:
            raise TypeError(f"routes: expected an integer tensor, got {explicit.dtype}")
    _assign(st, explicit)
    return args, kwargs


@torch.compiler.disable
def _register_cache_eager(st: _State, output) -> None:
    _register_cache(st, output)


@torch.compiler.disable
def _route_call_eager(st: _State, signature, args, kwargs):
    return _route_call(st, signature, args, kwargs)


def _route_call(st: _State, signature, args, kwargs):
    st.pending = None
    explicit = kwargs.pop("routes", None)
    if explicit is not None:
        from .layer import validate_routes

        E = min(m.num_adapters for m in st.modules)
        if isinstance(explicit, int) and not isinstance(explicit, bool):
            if not -1 <= explicit < E:
                raise ValueError(f"routes: values must be -1 (backbone only) or an adapter index in [0, {E}), "
                                 f"found {explicit}")
        else:
            validate_routes(explicit, E)
        _assign(st, explicit)
        return args, kwargs
    if st.router is None:
        return args, kwargs

    bound = None
    if args and signature is not None:
        try:
            bound = signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = None
    input_ids = _get_arg(bound, kwargs, args, "input_ids", 0)
    if input_ids is None:
        raise ValueError(
            "routed_lora: the model has a router but was called without input_ids (e.g. inputs_embeds only); "
            "the router needs token ids. Pass routes=... to the call instead."
        )
    attention_mask = _get_arg(bound, kwargs, args, "attention_mask", 1)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None and bound is not None:
        cache = bound.get("cache", bound.get("past_key_values"))
    ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    B, T = ids.shape
    past = 0
    if cache is not None and hasattr(cache, "get_seq_length"):
        past = int(cache.get_seq_length())
    if past > 0:
        entry = st.streams.get(cache)
        if entry is None or entry[0] != past:
            raise RuntimeError(
                f"routed_lora: the model was called with a KV cache of length {past} but the router has no state "
                "for it (the cache was not filled by this model's routed calls, or it was cropped, e.g. by "
                "assisted generation). Pass routes=... explicitly for such calls."
            )
        stream = entry[1].clone()
        if stream.batch_size != B:
            raise RuntimeError(
                f"routed_lora: the cache holds {stream.batch_size} sequences but the call has {B} "
                "(the cache was expanded or reordered in a way the router could not follow)"
            )
    else:
        stream = st.router.stream(B, device=ids.device)
    mask = None
    if attention_mask is not None and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        mask = attention_mask[:, -T:] if attention_mask.shape[1] >= T else None
    starts = _packed_starts(bound, kwargs, args, ids, mask)
    if starts is not None:
        if past > 0:
            raise RuntimeError(
                "routed_lora: a call with a KV cache has position_ids that restart inside a row (packed "
                "sequences); the router cannot continue cached state across them. Pass routes=... explicitly."
            )
        from .router import route_packed

        routes = route_packed(lambda i, m: st.router(i, m), ids, mask, starts=starts)
        if input_ids.dim() == 1:
            routes = routes[0]
        _assign(st, routes)
        return args, kwargs  # no router state is kept for a packed call (a later cached call is an error)
    routes = stream.step(ids, mask)
    if input_ids.dim() == 1:
        routes = routes[0]
    _assign(st, routes)
    st.pending = (cache, stream)
    return args, kwargs


def _packed_starts(bound, kwargs, args, ids, mask):
    """Sequence starts (B, T) if the call packs several sequences in a row (position_ids that restart after a
    real token of the same row, or flash-attention's ``cu_seq_lens_q``), else None. Restarts at padding, or at
    the first real token after left padding (``generate`` gives left padding position 1), change nothing."""
    from .router import sequence_starts

    B, T = ids.shape
    if T < 2:
        return None
    cu = kwargs.get("cu_seq_lens_q")
    pos = _get_arg(bound, kwargs, (), "position_ids", 10**9)
    if cu is not None:
        starts = sequence_starts((B, T), cu_seqlens=cu, device=ids.device)
    elif isinstance(pos, torch.Tensor) and pos.shape[-1] == T and pos.numel() == B * T:
        starts = sequence_starts((B, T), position_ids=pos.reshape(B, T), device=ids.device)
    else:
        return None
    if mask is None:
        effective = starts[:, 1:]
    else:
        real = mask.to(ids.device).bool()
        before = (real.long().cumsum(1) - real.long()) > 0
        effective = (starts & real & before)[:, 1:]
    return starts if bool(effective.any()) else None


def _register_cache(st: _State, output) -> None:
    if st.pending is None:
        return
    cache, stream = st.pending
    st.pending = None
    if cache is None and output is not None:
        cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        if cache is None and isinstance(output, dict):
            cache = output.get("cache", output.get("past_key_values"))
    if cache is not None and hasattr(cache, "get_seq_length"):
        try:
            st.streams[cache] = (int(cache.get_seq_length()), stream)
        except TypeError:  # not weak-referenceable
            return
        _track_cache(st, cache)


def _track_cache(st: _State, cache) -> None:
    """Follow in-place batch edits of ``cache`` with the router state: beam search reorders
    (``reorder_cache``, ``batch_select_indices``, ``batch_repeat_interleave``) move the state along; ``crop``
    (assisted generation) drops it, so a later call with that cache is an error rather than a misroute."""
    if cache.__dict__.get("_routed_lora_tracked"):
        return
    st_ref, cache_ref = weakref.ref(st), weakref.ref(cache)

    def follow(name, transform):
        original = getattr(cache, name, None)
        if original is None:
            return

        def wrapped(*args, **kwargs):
            out = original(*args, **kwargs)
            s, c = st_ref(), cache_ref()
            entry = None if s is None or c is None else s.streams.get(c)
            if entry is not None:
                new = transform(entry[1], *args, **kwargs)
                if new is None:
                    del s.streams[c]
                else:
                    s.streams[c] = (int(c.get_seq_length()), new)
            return out

        setattr(cache, name, wrapped)  # on this cache object only

    def select(stream, index, *a, **k):
        return stream.select(index) if hasattr(stream, "select") else None

    def repeat(stream, repeats, *a, **k):
        return stream.repeat_interleave(repeats) if hasattr(stream, "repeat_interleave") else None

    follow("reorder_cache", select)
    follow("batch_select_indices", select)
    follow("batch_repeat_interleave", repeat)
    follow("crop", lambda stream, n, *a, **k: stream if n == 0 else None)
    cache._routed_lora_tracked = True


def _ckpt_pre_hook(module, args):
    f = module.__dict__.get("_gradient_checkpointing_func")
    if f is not None and not getattr(f, "_routed_lora", False):
        module._gradient_checkpointing_func = _wrap_checkpoint(f, module._routed_lora_inner)
    return None


def _wrap_checkpoint(checkpoint_fn, layers: list[RoutedLoRALinear]):
    """Wrap a checkpoint function so ``function`` runs with the routes the layers had at the original call,
    in the forward and again in the recomputation."""

    def checkpoint_with_routes(function, *args, **kwargs):
        captured = [layer._routes for layer in layers]

        def run(*a, **k):
            current = [layer._routes for layer in layers]
            for layer, routes in zip(layers, captured):
                layer._routes = routes
            try:
                return function(*a, **k)
            finally:
                for layer, routes in zip(layers, current):
                    layer._routes = routes

        return checkpoint_fn(run, *args, **kwargs)

    checkpoint_with_routes._routed_lora = True
    checkpoint_with_routes.__wrapped__ = checkpoint_fn
    return checkpoint_with_routes


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

