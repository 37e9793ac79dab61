"""Weight sync from tensors: new adapter weights reach vLLM's workers in memory, with no folder written.

vLLM 0.32 loads a LoRA adapter only from a folder (``WorkerLoRAManager._load_adapter`` reads
``adapter_config.json`` and ``adapter_model.safetensors`` at ``lora_path``) and caches it by LoRA id. Here each
worker keeps a registry ``{LoRA id: (PEFT config, tensors)}``; the plugin's ``_load_adapter`` builds an adapter
from the registry when its id is there (``LoRAModel.from_lora_tensors``, the same checks as the folder path) and
falls back to vLLM's loader otherwise. A sync (:meth:`RoutedLLM.update`) sends the tensors to every worker with
``LLM.collective_rpc`` under the adapters' *existing* ids: the worker validates them, stores them and drops the
old copy from its LoRA cache, so the next step loads the new weights into the slots. The registry also serves
every later reload (eviction from the CPU cache), so a stale folder can never come back.

Tensors use the names :func:`routed_lora.adapter_io.adapter_payload` gives them (what ``save_adapters`` writes):
``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r).
"""

from __future__ import annotations

import json
import threading

# the worker methods collective_rpc calls: added to vLLM's WorkerBase by the plugin (register())
METHOD = "routed_lora_load_lora_tensors"
FORGET_METHOD = "routed_lora_forget_lora_tensors"

_lock = threading.Lock()
_registry: dict[int, tuple[dict, dict]] = {}  # {LoRA id: (PEFT config, {name: tensor})}, per worker process


def registered(lora_int_id: int) -> bool:
    with _lock:
        return int(lora_int_id) in _registry


def _unexpected_modules(manager, tensors: dict, weights_mapper, skip_prefixes) -> list[str]:
    """Module names of ``tensors`` that the model's LoRA layers do not cover (what vLLM's folder loader refuses)."""
    from vllm.lora.utils import is_base_embedding_weights, parse_fine_tuned_lora_name

    am = manager._adapter_manager
    expected: set[str] = set()
    for module in am.supported_lora_modules:
        expected.update(am.packed_modules_mapping.get(module, [module]))
    bad = []
    for name in tensors:
        if is_base_embedding_weights(name) or "base_layer" in name:
            continue
        if skip_prefixes and manager._lora_model_cls._should_skip_module(name, skip_prefixes):
            continue
        module, _ = parse_fine_tuned_lora_name(name, weights_mapper)
        if module.rsplit(".", 1)[-1] not in expected:
            bad.append(module)
    return sorted(set(bad))


def build_lora_model(manager, lora_int_id: int, config: dict, tensors: dict):
    """A vLLM ``LoRAModel`` with id ``lora_int_id`` from a PEFT ``config`` dict and ``tensors`` (CPU), checked as
    vLLM checks a folder: rank and features against the engine's LoRA config, target modules against the
    model's LoRA layers."""
    from vllm.lora.peft_helper import PEFTHelper

    # vLLM's loader scales lora_B in place (LoRALayerWeights.optimize) and .to() keeps the same tensor when the
    # dtype matches: it gets copies, so the registry's tensors stay as synced for every later reload
    helper = PEFTHelper.from_dict({**config, "vllm_max_position_embeddings": manager.max_position_embeddings})
    helper.validate_legal(manager.lora_config)
    model = manager._adapter_manager.model
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    if mapper is not None:
        mapper = mapper.get_rename_mapper()
    skip = getattr(model, "lora_skip_prefixes", None)
    bad = _unexpected_modules(manager, tensors, mapper, skip)
    if bad:
        raise ValueError(f"tensors of LoRA id {lora_int_id}: modules {bad[:5]} are not LoRA targets of this "
                         f"model; expected names of modules ending in "
                         f"{sorted(manager._adapter_manager.supported_lora_modules)}")
    lora = manager._lora_model_cls.from_lora_tensors(
        lora_model_id=int(lora_int_id), tensors={k: v.clone() for k, v in tensors.items()}, peft_helper=helper,
        device="cpu", dtype=manager.lora_config.lora_dtype, model_vocab_size=manager.vocab_size,
        weights_mapper=mapper, skip_prefixes=skip)
    am = manager._adapter_manager
    for check in ("_validate_modules_to_save", "_validate_token_classification_lora"):
        if hasattr(am, check):
            getattr(am, check)(lora)
    return lora


def load_from_registry(manager, lora_request):
    """The plugin's ``WorkerLoRAManager._load_adapter`` for an id in the registry (None otherwise)."""
    with _lock:
        entry = _registry.get(int(lora_request.lora_int_id))
    if entry is None:
        return None
    config, tensors = entry
    lora = build_lora_model(manager, lora_request.lora_int_id, config, tensors)
    lora.is_3d_lora_weight = getattr(lora_request, "is_3d_lora_weight", False)
    return lora


def _worker_lora_manager(worker):
    runner = getattr(worker, "model_runner", None)
    return getattr(runner, "lora_manager", None) or getattr(worker, "lora_manager", None)


def pack(lora_int_id: int, config: dict, tensors: dict) -> tuple[int, str, bytes]:
    """One entry of a sync as it crosses processes: vLLM's RPC encoder turns an untyped tensor argument into a
    plain list, so the tensors travel as safetensors bytes and the config as JSON."""
    from safetensors.torch import save

    return int(lora_int_id), json.dumps(config), save({k: v.contiguous() for k, v in tensors.items()})


def _config(config) -> dict:
    return json.loads(config) if isinstance(config, (str, bytes)) else dict(config)


def _tensors(tensors) -> dict:
    if isinstance(tensors, (bytes, bytearray, memoryview)):
        from safetensors.torch import load

        return load(bytes(tensors))
    return dict(tensors)


def load_lora_tensors(worker, entries) -> list[int]:
    """Worker side of a sync (``collective_rpc(METHOD, args=(entries,))``): ``entries`` = [(LoRA id, PEFT config,
    tensors)], each as :func:`pack` makes it (or a config dict and a tensor dict in the same process). All are
    built first (so a bad one changes nothing), then stored, and each id is dropped from the worker's LoRA cache
    so that its next use loads the new weights. Returns the ids."""
    manager = _worker_lora_manager(worker)
    if manager is None or not hasattr(manager, "_adapter_manager"):
        raise RuntimeError("routed-lora: weight sync from tensors needs an engine with LoRA on (enable_lora=True)")
    entries = [(int(lid), _config(config), _tensors(tensors)) for lid, config, tensors in entries]
    for lid, config, tensors in entries:
        build_lora_model(manager, lid, config, tensors)  # validate every entry before anything changes
    for lid, config, tensors in entries:
        with _lock:
            _registry[lid] = (config, tensors)
        if lid in manager.list_adapters():
            manager.remove_adapter(lid)
    return [lid for lid, _, _ in entries]


def forget_lora_tensors(worker, ids) -> int:
    """Worker side: drop ``ids`` from this process's registry (the front end removed those adapters)."""
    with _lock:
        return sum(_registry.pop(int(i), None) is not None for i in ids)
