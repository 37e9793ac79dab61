"""``peft_to_routed``: turn a model built with ``peft.get_peft_model`` into a routed one, in place.

RL frameworks build their LoRA actor with PEFT (veRL's FSDP engine in ``_build_lora_module``, OpenRLHF's
``Actor``, TRL): ``get_peft_model(model, LoraConfig(r, lora_alpha, target_modules))``. This replaces every PEFT
LoRA ``Linear`` of such a model by a :class:`~routed_lora.RoutedLoRALinear` over the same frozen
``base_layer`` (weight and bias tensors shared, not copied) with E adapters, and copies the PEFT adapter(s)
into them:

- ``adapters=("reasoning", "tool")`` names the routed adapters. When every name is an adapter of the PEFT
  model, each takes the weights of its namesake; when the PEFT model has one adapter (``"default"``), every
  routed adapter starts as a copy of it (B = 0 at PEFT's initialisation, so the model is unchanged).
- With every token routed to adapter e the logits equal PEFT's with adapter e active (same
  ``W x + b + s B_e A_e x``); ``lora_A`` / ``lora_B`` require gradients, everything else stays frozen.
- PEFT's ``disable_adapter()`` context (veRL's and TRL's reference pass), ``disable_adapter_layers()`` and
  ``enable_adapter_layers()`` keep working: they switch every routed layer to the backbone.
- ``routes=`` in the call, :func:`routed_lora.set_routes` and a ``router`` work as on a model patched by
  :func:`routed_lora.apply_routed_lora`. The routed state lives on the inner transformers model
  (``peft_model.get_base_model()``): save with ``routed_lora.save_adapters(peft_model.get_base_model(), path)``
  (PEFT folders, one per adapter). PEFT's own ``save_pretrained`` and ``merge_and_unload`` would write or merge
  the routed tensors wrongly, so they raise an error pointing here.

Everything is checked before anything changes: LoRA only (no DoRA, LoRA bias, ``modules_to_save``, adapter
merged, dropout > 0), plain ``nn.Linear`` base layers, and all source adapters with one rank, one scaling and
one set of target modules. A model that fails gets a clear error and is left exactly as it was.
"""

from __future__ import annotations

import contextlib
import math
import types
from typing import Sequence

import torch
from torch import nn

__all__ = ["peft_to_routed"]


def _peft():
    try:
        import peft
        from peft.tuners.lora import LoraLayer
    except ImportError as exc:  # pragma: no cover
        raise ImportError("peft_to_routed needs peft (pip install 'routed-lora[hf]')") from exc
    return peft, LoraLayer


def peft_to_routed(
    peft_model: nn.Module,
    adapters: Sequence[str] = ("reasoning", "tool"),
    *,
    router=None,
) -> nn.Module:
    """Convert ``peft_model`` (a ``peft.PeftModel`` with LoRA adapters) to routed LoRA in place (module doc);
    returns ``peft_model``. ``router``: as in :func:`routed_lora.apply_routed_lora` (the model then routes by
    itself in ``peft_model(input_ids=...)`` and ``generate``)."""
    from .fsdp import check_not_sharded
    from .hf import _State, _attach_state, _check_config, _set_submodule, _state
    from .layer import RoutedLoRALinear

    peft, LoraLayer = _peft()
    if not isinstance(peft_model, peft.PeftModel):
        raise TypeError(f"peft_model: expected a peft.PeftModel (from peft.get_peft_model), got "
                        f"{type(peft_model).__name__}")
    names = _check_config(1, 1, adapters)
    check_not_sharded(peft_model, "peft_to_routed")
    base = peft_model.get_base_model()
    if _state(base, required=False) is not None:
        raise ValueError("peft_model: already converted to routed LoRA")
    configs = dict(peft_model.peft_config)
    if all(n in configs for n in names):
        source = {n: n for n in names}
    elif len(configs) == 1:
        only = next(iter(configs))
        source = {n: only for n in names}
    else:
        raise ValueError(
            f"adapters={tuple(names)}: the PEFT model has adapters {sorted(configs)}; name the routed adapters "
            "after them, or give a PEFT model with a single adapter (every routed adapter then copies it)"
        )
    for name in sorted(set(source.values())):
        cfg = configs[name]
        ptype = str(getattr(cfg, "peft_type", "")).split(".")[-1].upper()
        if ptype != "LORA":
            raise ValueError(f"peft_model: adapter {name!r} is {ptype}, only LoRA adapters can be converted")
        for key, bad in (("use_dora", True), ("lora_bias", True), ("fan_in_fan_out", True)):
            if getattr(cfg, key, False) is bad:
                raise ValueError(f"peft_model: adapter {name!r} has {key}=True, which routed LoRA does not support")
        if getattr(cfg, "modules_to_save", None):
            raise ValueError(f"peft_model: adapter {name!r} has modules_to_save={cfg.modules_to_save!r}; routed "
                             "LoRA trains LoRA matrices only")
        if getattr(cfg, "bias", "none") != "none":
            raise ValueError(f"peft_model: adapter {name!r} has bias={cfg.bias!r}; only bias='none' is supported")

    # plan every layer before touching anything
    plan = []  # (module name, peft layer, r, scaling, {routed name: (A, B)})
    ranks, scales, targets = {}, {}, {}
    for mod_name, module in base.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        present = [n for n in set(source.values()) if n in module.lora_A]
        if not present:
            continue
        if type(module).__name__ != "Linear" or not isinstance(module.get_base_layer(), nn.Linear):
            raise TypeError(
                f"peft_model: layer {mod_name!r} is a PEFT {type(module).__module__}.{type(module).__name__} over "
                f"{type(module.get_base_layer()).__name__}; only LoRA on nn.Linear layers can be routed"
            )
        if any(getattr(module, "merged_adapters", [])):
            raise ValueError(f"peft_model: layer {mod_name!r} has merged adapters {module.merged_adapters}; "
                             "unmerge them first (peft_model.unmerge_adapter())")
        for n in present:
            ranks.setdefault(n, set()).add(int(module.r[n]))
            scales.setdefault(n, set()).add(float(module.scaling[n]))
            targets.setdefault(n, set()).add(mod_name)
            drop = module.lora_dropout[n]
            if isinstance(drop, nn.Dropout) and drop.p > 0:
                raise ValueError(f"peft_model: adapter {n!r} has lora_dropout={drop.p} (layer {mod_name!r}); the "
                                 "routed layer has no dropout: build the PEFT model with lora_dropout=0")
            if getattr(module, "use_dora", {}).get(n, False):
                raise ValueError(f"peft_model: adapter {n!r} uses DoRA at {mod_name!r}; not supported")
        plan.append((mod_name, module))
    if not plan:
        raise ValueError("peft_model: has no LoRA layers of the adapters "
                         f"{sorted(set(source.values()))}; nothing to convert")
    used = sorted(set(source.values()))
    for n in used:
        if n not in ranks:
            raise ValueError(f"peft_model: adapter {n!r} has no LoRA layer")
    all_ranks = {r for n in used for r in ranks[n]}
    if len(all_ranks) != 1:
        per = {n: sorted(ranks[n]) for n in used}
        raise ValueError(f"peft_model: the adapters have different ranks {per} (rank_pattern or several configs); "
                         "routed LoRA needs one rank for every adapter and layer")
    all_scales = {s for n in used for s in scales[n]}
    if len(all_scales) != 1:
        per = {n: sorted(scales[n]) for n in used}
        raise ValueError(f"peft_model: the adapters have different scalings lora_alpha / r {per} (alpha_pattern or "
                         "several configs); routed LoRA needs one scaling")
    target_sets = {n: frozenset(targets[n]) for n in used}
    if len(set(target_sets.values())) != 1:
        a, b = used[0], next(n for n in used if target_sets[n] != target_sets[used[0]])
        diff = sorted(target_sets[a] ^ target_sets[b])
        raise ValueError(f"peft_model: adapters {a!r} and {b!r} target different modules (e.g. {diff[:4]}); routed "
                         "LoRA needs the same target modules for every adapter")
    r = all_ranks.pop()
    scaling = all_scales.pop()
    cfg0 = configs[used[0]]
    use_rslora = bool(getattr(cfg0, "use_rslora", False))
    lora_alpha = scaling * (math.sqrt(r) if use_rslora else r)

    # convert (nothing above changed the model)
    requires_grad = {n: p.requires_grad for n, p in base.named_parameters()}
    layers = []
    for mod_name, module in plan:
        linear = module.get_base_layer()
        new = RoutedLoRALinear.from_linear(linear, r=r, lora_alpha=lora_alpha, adapters=names, use_rslora=use_rslora)
        A0 = module.lora_A[source[names[0]]].weight
        dtype = A0.dtype
        with torch.no_grad():
            new.lora_A = nn.Parameter(torch.stack([module.lora_A[source[n]].weight.detach() for n in names]).to(dtype))
            new.lora_B = nn.Parameter(torch.stack([module.lora_B[source[n]].weight.detach() for n in names]).to(dtype))
        new.scaling = scaling  # exactly PEFT's float (alpha recomputed from it may round differently)
        new.train(module.training)
        _set_submodule(base, mod_name, new)
        layers.append((mod_name, new))
    config = dict(target_modules=sorted({n.rsplit(".", 1)[-1] for n, _ in layers}), r=r, lora_alpha=lora_alpha,
                  adapters=list(names), use_rslora=use_rslora, adapter_dtype=None, source="peft")
    st = _State(base, layers, config, router, requires_grad)
    if router is not None and hasattr(router, "bind"):
        router.bind(names)
    _attach_state(base, st, callers=[peft_model])
    _patch_peft_methods(peft_model, base)
    return peft_model


def _patch_peft_methods(peft_model, base) -> None:
    """PEFT's adapter switches drive the routed layers; its writers refuse (module doc)."""
    from .hf import disable_adapters

    lora_model = peft_model.base_model
    stack: list = []

    def disable_adapter_layers(self=None):
        cm = disable_adapters(base)
        cm.__enter__()
        stack.append(cm)

    def enable_adapter_layers(self=None):
        while stack:
            stack.pop().__exit__(None, None, None)

    @contextlib.contextmanager
    def disable_adapter(self=None):
        with disable_adapters(base):
            yield

    def refuse(what):
        def f(*args, **kwargs):
            raise RuntimeError(
                f"{what}: this PEFT model was converted with routed_lora.peft_to_routed, whose layers hold every "
                "adapter in one tensor; save with routed_lora.save_adapters(peft_model.get_base_model(), path) "
                "(one PEFT folder per adapter) or merge per adapter with RoutedLoRALinear.delta_weight"
            )
        return f

    lora_model.disable_adapter_layers = disable_adapter_layers
    lora_model.enable_adapter_layers = enable_adapter_layers
    peft_model.disable_adapter = types.MethodType(lambda self: disable_adapter(), peft_model)
    for name in ("save_pretrained", "merge_and_unload", "merge_adapter", "unload"):
        setattr(peft_model, name, refuse(f"peft_model.{name}"))
    for name in ("merge_and_unload", "merge_adapter", "unload"):
        setattr(lora_model, name, refuse(f"peft_model.base_model.{name}"))
