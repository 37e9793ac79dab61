"""The weight-sync payload between our veRL engine and a vLLM rollout (no veRL or vLLM import here).

veRL (0.9.1) syncs LoRA weights as one stream of ``(name, tensor)`` plus one PEFT config dict: the actor engine's
``get_per_tensor_param(base_sync_done=True)`` returns them, the rollout ships them in buckets (ZMQ + CUDA IPC or
shared memory) to each vLLM worker, and the worker turns the whole stream into *one* ``TensorLoRARequest``
(veRL's fixed LoRA id 123) that every generate call then names. A routed model has E adapters, so the stream
carries all of them, each under its own name prefix, and the config says so:

    names   base_model.model.<module>.lora_A.weight@routed_lora/<adapter>   (r, in)
            base_model.model.<module>.lora_B.weight@routed_lora/<adapter>   (out, r)
    config  the PEFT LoRA config of every adapter (they share r, lora_alpha, target_modules; as
            :func:`routed_lora.adapter_io.adapter_payload` / ``save_adapters`` write it) plus
            ``config["routed_lora"] = {"version", "adapters", "model_adapters", "router"}``

Before the ``@`` the names are exactly PEFT's (what ``save_adapters`` writes into each adapter folder); the
adapter tag is a *suffix* on purpose: vLLM parses every LoRA tensor name and accepts only names ending in
``.weight`` (or ``lora_embedding_A/B``), so veRL's plain ``rollout.name=vllm`` worker, which would load the whole
stream as one LoRA, fails with ``ValueError: ... is unsupported LoRA weight`` instead of serving a rollout without
(or with mixed) adapters. A prefix is not enough: vLLM accepts ``routed_lora/<adapter>/base_model...`` silently
as modules that match nothing (checked with vLLM 0.32). :func:`split_payload` is the receiving side
(:class:`routed_lora.integrations.verl_vllm.RoutedLoRAWorkerExtension`): it checks the stream and returns each
adapter's tensors and the plain PEFT config.

Base weights (``base_sync_done=False``, veRL's first sync when vLLM started from dummy weights): the backbone's
own Hugging Face names and tensors, the routed layers' ``lora_A`` / ``lora_B`` left out (:func:`base_tensors`).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn

__all__ = ["ROUTED_KEY", "NAME_SUFFIX", "lora_payload", "split_payload", "is_routed_config", "base_tensors",
           "SyncPayloadError"]

ROUTED_KEY = "routed_lora"
NAME_SUFFIX = "@routed_lora/"  # name = <PEFT name> + NAME_SUFFIX + <adapter>
PAYLOAD_VERSION = 1


class SyncPayloadError(ValueError):
    """A weight-sync stream that is not a complete routed adapter set."""


def is_routed_config(peft_config) -> bool:
    """True for a PEFT config dict that carries a routed adapter set (:func:`lora_payload`)."""
    return isinstance(peft_config, dict) and isinstance(peft_config.get(ROUTED_KEY), dict)


def lora_payload(model: nn.Module, router=None) -> tuple[list[tuple[str, torch.Tensor]], dict]:
    """``(named tensors, peft_config)`` of every adapter of ``model`` (the Hugging Face model with routed layers,
    not a ``PeftModel`` wrapper: names are relative to it, as in ``save_adapters``). ``router``: the model's
    router if ``None``; it must be a :class:`routed_lora.TagRouter` (the vLLM workers rebuild it from its
    ``to_dict()`` with their tokenizer). FSDP2: a collective, call it on every rank."""
    from ..adapter_io import adapter_payload
    from ..hf import get_router

    router = get_router(model) if router is None else router
    to_dict = getattr(router, "to_dict", None)
    if not callable(to_dict):
        raise ValueError(
            f"router: the vLLM rollout routes with TagRouter's rule in its workers and needs a "
            f"routed_lora.TagRouter (its to_dict()), got {type(router).__name__ if router is not None else None}"
        )
    manifest, config, tensors = adapter_payload(model)
    config = dict(config)
    config[ROUTED_KEY] = {"version": PAYLOAD_VERSION, "adapters": list(manifest["adapters"]),
                          "model_adapters": list(manifest["model_adapters"]), "router": to_dict()}
    named = [(f"{k}{NAME_SUFFIX}{a}", t) for a in manifest["adapters"] for k, t in tensors[a].items()]
    return named, config


def split_payload(weights: Iterable[tuple[str, torch.Tensor]], peft_config: dict
                  ) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    """The receiving side of :func:`lora_payload`: ``(tensors per adapter, plain PEFT config, routed meta)``.

    Refuses (:class:`SyncPayloadError`, naming what was expected and what came) a config without the routed
    entry, a name without ``@routed_lora/<adapter>``, an adapter the config does not list, a listed adapter with
    no tensors, and adapters whose key sets differ (a partial stream)."""
    if not is_routed_config(peft_config):
        raise SyncPayloadError(f"peft_config: expected a dict with a {ROUTED_KEY!r} entry (routed adapter set), "
                               f"got {type(peft_config).__name__} with keys {sorted(peft_config or {})[:8]}")
    meta = dict(peft_config[ROUTED_KEY])
    if meta.get("version") != PAYLOAD_VERSION:
        raise SyncPayloadError(f"peft_config[{ROUTED_KEY!r}]['version']: expected {PAYLOAD_VERSION}, "
                               f"got {meta.get('version')!r}")
    adapters = list(meta.get("adapters") or [])
    model_adapters = list(meta.get("model_adapters") or [])
    if not adapters or any(a not in model_adapters for a in adapters):
        raise SyncPayloadError(f"peft_config[{ROUTED_KEY!r}]: adapters {adapters} must be a non-empty subset of "
                               f"model_adapters {model_adapters}")
    per: dict[str, dict[str, torch.Tensor]] = {a: {} for a in adapters}
    for name, t in weights:
        if NAME_SUFFIX not in name:
            raise SyncPayloadError(f"weight {name!r}: expected a name base_model.model...{NAME_SUFFIX}<adapter>")
        key, adapter = name.rsplit(NAME_SUFFIX, 1)
        if adapter not in per:
            raise SyncPayloadError(f"weight {name!r}: adapter {adapter!r} is not among {adapters}")
        if not key.startswith("base_model.model.") or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise SyncPayloadError(f"weight {name!r}: expected base_model.model.<module>.lora_A/B.weight before "
                                   f"{NAME_SUFFIX}")
        per[adapter][key] = t
    keys = {a: set(t) for a, t in per.items()}
    ref = keys[adapters[0]]
    for a in adapters:
        if not keys[a]:
            raise SyncPayloadError(f"adapter {a!r}: no tensors in the stream (expected {len(ref) or 'some'})")
        if keys[a] != ref:
            missing = sorted(ref - keys[a])[:3] or sorted(keys[a] - ref)[:3]
            raise SyncPayloadError(f"adapter {a!r}: {len(keys[a])} tensors, {adapters[0]!r} has {len(ref)}; "
                                   f"first differing keys {missing}")
    plain = {k: v for k, v in peft_config.items() if k != ROUTED_KEY}
    return per, plain, meta


def base_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The backbone's weights under their Hugging Face names (``model.state_dict()`` of the model with routed
    layers, without the layers' ``lora_A`` / ``lora_B``): what vLLM loads as the base model. DTensors are
    gathered (a collective under FSDP2: iterate on every rank)."""
    from ..fsdp import full_tensor
    from ..hf import routed_layers

    skip = {f"{n}.{p}" for n, _ in routed_layers(model) for p in ("lora_A", "lora_B")}
    for name, t in model.state_dict().items():
        if name in skip:
            continue
        yield name, full_tensor(t.detach())
