"""The routing hooks that :func:`routed_lora.hf.apply_routed_lora` installs (described in :mod:`routed_lora.hf`).

Holds: the forward pre-hook and forward hook on the model (or its inner base model, or a wrapper calling it) that
set the routes of each call on every routed layer (explicit ``routes=``, or the router on ``input_ids``, packed
sequences included), the KV-cache bookkeeping (router state keyed by cache object and length, following beam
search reorders and crops), and the wrapping of a module's gradient-checkpoint function so the recomputation runs
with the routes of the original call.

Must not: patch or replace modules, freeze or create parameters, or keep state of its own; every piece of state
lives on the ``_State`` that :mod:`routed_lora.hf` creates and passes in. Must not import :mod:`routed_lora.hf`
at run time (``hf`` imports this module).
"""

from __future__ import annotations

import inspect
import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn

from .hub_kernels import kernels_mode, restore_kernelized_owners
from .layer import RoutedLoRALinear

if TYPE_CHECKING:  # annotations only: no import of hf at run time
    from .hf import _State

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
