"""veRL's vLLM rollout serving routed adapters (``rollout.name=routed_vllm``; registered by :mod:`.verl_rollout`).

How veRL 0.9.1 drives vLLM with LoRA, and what changes here:

1. Weight sync. The actor-rollout worker calls the engine's ``get_per_tensor_param`` and veRL's ``ServerAdapter``
   ships the stream to every vLLM worker, whose extension (``vLLMColocateWorkerExtension.update_weights_from_ipc``)
   collects it and calls ``_update_weights(weights, peft_config, base_sync_done)``; for LoRA veRL builds *one*
   ``TensorLoRARequest`` (id 123) from all tensors. :class:`RoutedLoRAWorkerExtension` (veRL's extension, one
   method overridden) recognises our routed stream (:mod:`.verl_sync`) and loads each adapter as its own
   ``TensorLoRARequest`` under a fixed id (:func:`adapter_id`), replacing the previous sync's, then registers the
   routed set with our vLLM plugin (:mod:`routed_lora.integrations.vllm.plugin`) under veRL's LoRA id. Base
   weights and every other stream go to veRL's code unchanged.
2. Requests. veRL's server attaches ``LoRARequest("123", 123, ...)`` to each generate call once id 123 is listed
   by the engine. :class:`RoutedEngineClient` (wrapping the server's ``AsyncLLM``) lists 123 once routed adapters
   are loaded and replaces that request by :func:`routed_lora_request`: our plugin then gives every scheduled
   position the slot of the adapter ``TagRouter`` picks from the tokens so far (docs/vllm.md).
3. Engine arguments. veRL forces ``max_loras=1``; a routed request occupies one slot per adapter, so
   :class:`RoutedvLLMHttpServer` raises ``max_loras`` to adapters + 1 and ``max_cpu_loras`` to twice that, turns
   async scheduling off and keeps vLLM's V1 model runner (``VLLM_USE_V2_MODEL_RUNNER=0``): the plugin's
   supported configuration (docs/vllm.md, "GPU").

4. Loading from tensors. veRL's own loader for ``TensorLoRARequest`` (``VLLMHijack``, installed on
   ``LRUCacheWorkerLoRAManager._load_adapter`` by veRL's extension) calls ``WeightsMapper.get_unstacked_mapper``,
   which vLLM 0.32 does not have (``AttributeError``: every LoRA load fails, veRL's own single LoRA included).
   :class:`RoutedLoRAWorkerExtension` therefore puts :func:`_load_adapter` there instead: a tensor request is
   built from its tensors in memory (no folder); other requests go to vLLM's loader directly.

Prefix caching stays exact: routes are a causal function of the tokens, and veRL resets the prefix cache after
every weight sync (``clear_kv_cache`` / ``wake_up``).
"""

from __future__ import annotations

import json
import os

from verl.utils.vllm import TensorLoRARequest
from verl.workers.rollout.vllm_rollout.utils import VLLM_LORA_INT_ID, vLLMColocateWorkerExtension
from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer, vLLMReplica
from vllm.lora.request import LoRARequest
from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager, WorkerLoRAManager

from .verl_sync import is_routed_config, split_payload
from .vllm.plugin import ROUTED_PREFIX, RoutedSpec, register as register_vllm_plugin
from .vllm.tensor_sync import build_lora_model

__all__ = ["RoutedLoRAWorkerExtension", "RoutedEngineClient", "RoutedvLLMHttpServer", "RoutedvLLMReplica",
           "routed_lora_request", "adapter_id", "routed_engine_args", "WORKER_EXTENSION"]

WORKER_EXTENSION = f"{__name__}.RoutedLoRAWorkerExtension"
ADAPTER_ID_BASE = 1_230_000  # adapter e of the routed set has LoRA id ADAPTER_ID_BASE + e (never veRL's 123)
_ADAPTER_ID_SPAN = 1000
_ROUTED_NAME = ROUTED_PREFIX + json.dumps({"source": "verl"}, sort_keys=True)
# never read while a sync has happened (the spec is registered in memory); if a routed request reaches a worker
# that has had no routed sync, the plugin reads this path and the error names it
_ROUTED_PATH = "/routed-lora-verl/no-routed-weight-sync-in-this-worker"


def adapter_id(e: int) -> int:
    """vLLM LoRA id of adapter ``e`` (its index among the model's adapters) of the synced routed set."""
    if not 0 <= e < _ADAPTER_ID_SPAN:
        raise ValueError(f"adapter index: expected 0..{_ADAPTER_ID_SPAN - 1}, got {e}")
    return ADAPTER_ID_BASE + e


def _is_adapter_id(i: int) -> bool:
    return ADAPTER_ID_BASE <= int(i) < ADAPTER_ID_BASE + _ADAPTER_ID_SPAN


def routed_lora_request() -> LoRARequest:
    """The request every routed generate call names: veRL's LoRA id (so the scheduler counts one LoRA, as for
    veRL's own), a name that marks it routed for our plugin."""
    return LoRARequest(lora_name=_ROUTED_NAME, lora_int_id=VLLM_LORA_INT_ID, lora_path=_ROUTED_PATH)


def _spec_key(lr) -> tuple:
    return (lr.lora_name, lr.lora_int_id, lr.lora_path)  # the plugin's RoutedSpec cache key


_vllm_load_adapter = WorkerLoRAManager._load_adapter  # vLLM's own loader (veRL replaces the LRU subclass's)


def _load_adapter(self, lora_request):
    """``LRUCacheWorkerLoRAManager._load_adapter`` in workers with our extension (module doc, 4): a
    ``TensorLoRARequest`` is built straight from its tensors and PEFT config with the checks vLLM applies to a
    folder (:func:`routed_lora.integrations.vllm.tensor_sync.build_lora_model`); other requests go to vLLM's
    loader."""
    tensors = getattr(lora_request, "lora_tensors", None)
    if tensors is None:
        return _vllm_load_adapter(self, lora_request)
    lora = build_lora_model(self, lora_request.lora_int_id, lora_request.peft_config,
                            {k: v.detach().cpu() for k, v in tensors.items()})  # copied there
    lora.is_3d_lora_weight = getattr(lora_request, "is_3d_lora_weight", False)
    return lora


class RoutedLoRAWorkerExtension(vLLMColocateWorkerExtension):
    """veRL's vLLM worker extension, with routed adapter sets loaded one adapter per LoRA slot (module doc)."""

    def __new__(cls, **kwargs):
        # the plugin patches this worker's input batch and LoRA ops; idempotent, and a no-op when vLLM already
        # loaded it from the entry point
        register_vllm_plugin()
        instance = super().__new__(cls, **kwargs)  # installs veRL's loader hijack ...
        LRUCacheWorkerLoRAManager._load_adapter = _load_adapter  # ... which fails on vLLM 0.32 (module doc, 4)
        return instance

    def _update_weights(self, weights, peft_config, base_sync_done):
        if peft_config and base_sync_done and is_routed_config(peft_config):
            return self._load_routed_adapters(weights, peft_config)
        return super()._update_weights(weights, peft_config=peft_config, base_sync_done=base_sync_done)

    def _load_routed_adapters(self, weights, peft_config) -> list[int]:
        """Load every adapter of the stream into its own LoRA id (the previous sync's removed first) and register
        the routed set under :func:`routed_lora_request`; returns the ids loaded."""
        from routed_lora.router import TagRouter

        per, plain, meta = split_payload(weights, peft_config)
        names = list(meta["model_adapters"])
        lora_config = getattr(self.vllm_config, "lora_config", None)
        slots = getattr(lora_config, "max_loras", None)
        if slots is None:
            raise RuntimeError("routed-lora: the vLLM engine was started without LoRA (enable_lora)")
        if slots < len(per):
            raise RuntimeError(
                f"routed-lora: max_loras={slots}, but a routed request occupies one LoRA slot per adapter "
                f"({len(per)}: {sorted(per)}): start vLLM with max_loras >= {len(per) + 1} (RoutedvLLMHttpServer "
                "sets it; veRL's own server forces 1)"
            )
        requests = {}
        for a, tensors in per.items():
            e = names.index(a)
            lr = TensorLoRARequest(lora_name=f"routed-lora/verl/{a}", lora_int_id=adapter_id(e),
                                   lora_path=f"routed-lora/verl/{a}", peft_config=plain, lora_tensors=tensors)
            self.remove_lora(lr.lora_int_id)  # the previous sync's tensors under the same id
            self.add_lora(lr)
            requests[a] = lr
        tok = RoutedSpec._tokenizer(self.vllm_config.model_config.tokenizer)
        router = TagRouter.from_dict(tok, meta["router"], adapters=names)
        id_of_route = {-1: 0, **{names.index(a): lr.lora_int_id for a, lr in requests.items()}}
        # the spec keeps the TensorLoRARequests: if vLLM's LRU cache ever evicts an adapter, the plugin's active
        # set reloads it from these tensors (veRL's _load_adapter hijack), never from a path
        spec = RoutedSpec.of(router, names, id_of_route, requests)
        RoutedSpec._cache[_spec_key(routed_lora_request())] = spec
        return sorted(lr.lora_int_id for lr in requests.values())

    def routed_lora_ids(self) -> list[int]:
        """LoRA ids of the routed adapters loaded in this worker (for tests and diagnostics)."""
        return sorted(i for i in self.list_loras() if _is_adapter_id(i))


class RoutedEngineClient:
    """The server's ``AsyncLLM`` with veRL's single LoRA request replaced by the routed one: ``generate`` swaps a
    ``lora_request`` with veRL's id for :func:`routed_lora_request`; ``list_loras`` lists veRL's id once routed
    adapters are loaded (veRL attaches its LoRA request only then). Everything else passes through."""

    def __init__(self, engine) -> None:
        object.__setattr__(self, "_engine", engine)

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def __setattr__(self, name, value):
        setattr(self._engine, name, value)

    @staticmethod
    def routed(lora_request):
        """``lora_request`` as the routed request if it is veRL's single LoRA, else unchanged."""
        if lora_request is not None and int(getattr(lora_request, "lora_int_id", -1)) == VLLM_LORA_INT_ID:
            return routed_lora_request()
        return lora_request

    def generate(self, *args, **kwargs):
        if len(args) > 3:  # AsyncLLM.generate(prompt, sampling_params, request_id, *, lora_request=...)
            raise TypeError(f"generate: lora_request must be passed by keyword, got {len(args)} positional arguments")
        if "lora_request" in kwargs:
            kwargs["lora_request"] = self.routed(kwargs["lora_request"])
        return self._engine.generate(*args, **kwargs)

    async def list_loras(self):
        ids = set(await self._engine.list_loras())
        if any(_is_adapter_id(i) for i in ids):
            ids.add(VLLM_LORA_INT_ID)
        return ids


def routed_engine_args(args, n_adapters: int):
    """Adjust the parsed ``vllm serve`` arguments of veRL's server in place for routed requests (module doc, 3);
    returns ``args``. ``max_loras`` and ``max_cpu_loras`` are only ever raised."""
    if n_adapters < 1:
        raise ValueError(f"n_adapters: expected >= 1, got {n_adapters}")
    need = n_adapters + 1
    args.max_loras = max(int(getattr(args, "max_loras", None) or 1), need)
    args.max_cpu_loras = max(int(getattr(args, "max_cpu_loras", None) or 0), 2 * need)
    args.async_scheduling = False
    return args


class RoutedvLLMHttpServer(vLLMHttpServer):
    """veRL's vLLM server for routed adapters: our worker extension, :func:`routed_engine_args`, the V1 model
    runner, and :class:`RoutedEngineClient` around the engine."""

    def _n_adapters(self) -> int:
        lora = getattr(self.model_config, "lora", None) or {}
        names = lora.get("routed_adapters", None) if hasattr(lora, "get") else None
        return len(list(names)) if names else 2  # the engine's default: reasoning, tool

    def _get_worker_extension_cls(self) -> str:
        return WORKER_EXTENSION

    def _prepare(self, args):
        # vLLM 0.32 picks Model Runner V2 when Triton is present; V2 builds the LoRA mapping on the device and never
        # calls the plugin's hook (docs/vllm.md, "GPU"). The engine-core processes inherit this.
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        return routed_engine_args(args, self._n_adapters())

    async def run_server(self, args):
        await super().run_server(self._prepare(args))
        self.engine = RoutedEngineClient(self.engine)

    async def run_headless(self, args):
        await super().run_headless(self._prepare(args))


class RoutedvLLMReplica(vLLMReplica):
    """veRL's vLLM replica whose servers are :class:`RoutedvLLMHttpServer`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import ray

        self.server_class = ray.remote(RoutedvLLMHttpServer)
