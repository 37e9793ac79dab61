"""veRL integration: an FSDP training engine whose LoRA is routed per token (install ``routed-lora[verl]``).

veRL (0.9.x) builds its actor in ``verl.workers.engine.fsdp.transformer_impl.FSDPEngine``: LoRA with
``peft.get_peft_model`` in ``_build_lora_module``; each micro-batch packed into one row in
``prepare_model_inputs`` (remove-padding: nested-tensor ``input_ids`` whose ``offsets()`` are the cu_seqlens,
position ids restarting per sequence); the reference policy as the actor under ``disable_adapter()``; weights
sent to the rollout engine by ``get_per_tensor_param``. Importing this module registers
:class:`RoutedLoRAFSDPEngine` in ``verl.workers.engine.base.EngineRegistry`` under its own backends
``routed_lora_fsdp`` and ``routed_lora_fsdp2`` (``actor.strategy=routed_lora_fsdp2`` with the engine config
:class:`RoutedLoRAFSDPEngineConfig`, since veRL's own ``FSDPEngineConfig`` refuses other strategy names; the
engine runs veRL's ``fsdp`` / ``fsdp2`` code paths). It

- builds PEFT LoRA as veRL does, then converts it with :func:`routed_lora.peft_to_routed` into the adapters
  :attr:`RoutedLoRAFSDPEngine.routed_adapters` (each starts from veRL's LoRA initialisation);
- routes every sequence on its own before packing (:func:`routed_lora.route_packed` with the micro-batch's
  offsets as cu_seqlens), or takes the routes recorded at rollout time from the micro-batch key ``"routes"``
  (nested like ``input_ids``); the packed routes get the same static and sequence-parallel padding and
  slicing as the packed ids, and go to the model call as ``routes=``;
- keeps ``disable_adapter()`` (PEFT's context, driven by the routed layers): the reference pass is the
  backbone;
- syncs its weights to veRL's vLLM rollout (``get_per_tensor_param``, module
  :mod:`routed_lora.integrations.verl_sync`): with ``base_sync_done=True`` every adapter's LoRA tensors under
  PEFT names + ``@routed_lora/<adapter>`` and one PEFT config that lists the adapters and the router; with
  ``base_sync_done=False`` the backbone's weights. vLLM serves one LoRA per request, so the rollout must be
  ``rollout.name=routed_vllm`` (:mod:`routed_lora.integrations.verl_rollout`: veRL's vLLM server with our worker
  extension, which loads each adapter into its own LoRA slot, and our vLLM plugin, which picks the slot per
  token). :func:`check_rollout` refuses the other rollout names up front.

Routing: :attr:`routed_router` (a callable ``router(input_ids, attention_mask)``, e.g. a
:class:`routed_lora.TagRouter`), else a ``TagRouter`` over the engine's tokenizer with :attr:`routed_spans` and
:attr:`routed_default`. Override them in a subclass, or put ``routed_adapters`` / ``routed_spans`` /
``routed_default`` in the model config's ``lora`` mapping.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

import dataclasses

from verl.workers.config.engine import FSDPEngineConfig
from verl.workers.engine.base import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

from ..peft_convert import peft_to_routed
from ..router import TagRouter, route_packed

__all__ = ["RoutedLoRAFSDPEngine", "RoutedLoRAFSDPEngineConfig", "BACKENDS", "ROUTED_ROLLOUT", "check_rollout",
           "packed_routes"]

BACKENDS = {"routed_lora_fsdp": "fsdp", "routed_lora_fsdp2": "fsdp2"}
ROUTED_ROLLOUT = "routed_vllm"  # registered by routed_lora.integrations.verl_rollout
_SINGLE_LORA_ROLLOUTS = ("vllm", "sglang", "trtllm")


@dataclasses.dataclass
class RoutedLoRAFSDPEngineConfig(FSDPEngineConfig):
    """veRL's ``FSDPEngineConfig`` accepting the backends of this engine as ``strategy`` (veRL's own config
    only accepts fsdp / fsdp2 / fsdp_turbo, and veRL looks the engine up by ``strategy``). In a veRL config:
    ``actor_rollout_ref.actor.fsdp_config._target_=routed_lora.integrations.verl.RoutedLoRAFSDPEngineConfig``
    and ``actor_rollout_ref.actor.fsdp_config.strategy=routed_lora_fsdp2`` (or ``actor.strategy``)."""

    strategy: str = "routed_lora_fsdp2"

    def __post_init__(self):
        if self.strategy not in (*BACKENDS, *BACKENDS.values()):
            raise ValueError(f"strategy: expected one of {sorted(BACKENDS)}, got {self.strategy!r}")
        super(FSDPEngineConfig, self).__post_init__()  # veRL's EngineConfig checks, not the fsdp-only assert


def plain_strategy_config(engine_config):
    """``engine_config`` with ``strategy`` mapped to veRL's ``fsdp`` / ``fsdp2`` (the FSDP engine's code paths
    branch on those names); other configs are returned as they are."""
    strategy = getattr(engine_config, "strategy", None)
    if strategy not in BACKENDS:
        return engine_config
    return dataclasses.replace(engine_config, strategy=BACKENDS[strategy])


def check_rollout(name: str) -> None:
    """Raise ``ValueError`` for a ``rollout.name`` that cannot roll out per-token routed adapters.

    Accepted: :data:`ROUTED_ROLLOUT` (``routed_vllm``). Refused: ``vllm`` / ``sglang`` / ``trtllm`` (one LoRA per
    request, or a merged model: another policy than the one trained) and ``hf`` (veRL 0.9.1 has no usable HF
    rollout: ``get_rollout_class('hf', 'async')`` is not registered); anything else is unknown."""
    key = str(name).lower()
    if key == ROUTED_ROLLOUT:
        return
    if key in _SINGLE_LORA_ROLLOUTS:
        raise ValueError(
            f"rollout.name={name!r}: expected {ROUTED_ROLLOUT!r}. {name} serves one LoRA adapter (or a merged model) "
            "per request, but routed LoRA picks the adapter per token, so it would sample from another policy than "
            f"the one trained. rollout.name={ROUTED_ROLLOUT} is veRL's vLLM rollout with both adapters loaded and "
            "routed per token (routed_lora.integrations.verl_rollout, docs/backends.md)."
        )
    if key == "hf":
        raise ValueError(
            f"rollout.name='hf': expected {ROUTED_ROLLOUT!r}. veRL 0.9.1 registers no HF rollout "
            "(get_rollout_class('hf', 'async') fails; HFRollout is incomplete), so it cannot be used."
        )
    raise ValueError(f"rollout.name={name!r}: expected {ROUTED_ROLLOUT!r} (the rollout that routes per token)")


def packed_routes(router, input_ids_nested: torch.Tensor) -> torch.Tensor:
    """(1, total_nnz) routes of a nested-tensor micro-batch packed as veRL packs it (``values()``): each
    sequence routed on its own (the offsets are its cu_seqlens), so no span carries across sequences."""
    values = input_ids_nested.values().unsqueeze(0)
    cu = input_ids_nested.offsets()
    return route_packed(router, values, cu_seqlens=cu)


@EngineRegistry.register(model_type="language_model", backend=list(BACKENDS), device=["cuda", "npu", "cpu"])
class RoutedLoRAFSDPEngine(FSDPEngineWithLMHead):
    """veRL's FSDP language-model engine with per-token routed LoRA adapters (module doc)."""

    routed_adapters: tuple = ("reasoning", "tool")
    routed_router = None
    routed_spans: Mapping = {"tool": ("<search>", "</search>")}
    routed_default = "reasoning"

    def __init__(self, model_config, engine_config, optimizer_config, checkpoint_config):
        # veRL's FSDP code branches on "fsdp" / "fsdp2"; its configs are frozen: a copy with the plain name
        super().__init__(model_config, plain_strategy_config(engine_config), optimizer_config, checkpoint_config)

    # -- configuration ---------------------------------------------------------------------------------------
    def _lora_option(self, key, default):
        lora = getattr(getattr(self, "model_config", None), "lora", None) or {}
        try:
            value = lora.get(key, None)
        except AttributeError:
            value = None
        return default if value is None else value

    def _routed_names(self) -> tuple:
        return tuple(self._lora_option("routed_adapters", self.routed_adapters))

    def _router(self):
        if self.routed_router is not None:
            return self.routed_router
        router = getattr(self, "_routed_router_built", None)
        if router is None:
            tok = getattr(self.model_config, "tokenizer", None)
            if tok is None:
                raise ValueError("RoutedLoRAFSDPEngine: no router and no tokenizer on the model config; set "
                                 "routed_router on the engine class")
            spans = dict(self._lora_option("routed_spans", self.routed_spans))
            router = TagRouter(tok, {k: tuple(v) for k, v in spans.items()},
                               self._lora_option("routed_default", self.routed_default), adapters=self._routed_names())
            self._routed_router_built = router
        return router

    # -- veRL hooks ------------------------------------------------------------------------------------------
    def _build_lora_module(self, module):
        module = super()._build_lora_module(module)
        return peft_to_routed(module, adapters=self._routed_names(), router=self._router())

    def prepare_model_inputs(self, micro_batch):
        model_inputs, output_args = super().prepare_model_inputs(micro_batch)
        model_inputs["routes"] = self.routes_for_micro_batch(micro_batch, model_inputs)
        return model_inputs, output_args

    def routes_for_micro_batch(self, micro_batch, model_inputs) -> torch.Tensor:
        """Routes shaped like ``model_inputs["input_ids"]``: per sequence before packing, then padded and
        sliced exactly as veRL pads and slices the packed ids."""
        from verl.utils import tensordict_utils as tu

        use_remove_padding = tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True)
        ids = micro_batch["input_ids"]
        given = micro_batch.get("routes", None) if hasattr(micro_batch, "get") else None
        target = model_inputs["input_ids"]
        if use_remove_padding:
            if given is not None:
                routes = given.values().unsqueeze(0).long()
            else:
                routes = packed_routes(self._router(), ids)
            pad = self._get_packed_pad_size(routes.size(-1)) if hasattr(self, "_get_packed_pad_size") else 0
            if pad:
                routes = F.pad(routes, (0, pad), value=-1)
            if getattr(self, "use_ulysses_sp", False):
                from verl.utils.ulysses import ulysses_pad_and_slice_inputs

                routes, _, _ = ulysses_pad_and_slice_inputs(routes, position_ids_rmpad=None,
                                                            sp_size=self.ulysses_sequence_parallel_size, pad_value=-1)
        else:
            B, L = target.shape[:2]
            lens = ids.offsets().diff().tolist()
            routes = torch.full((B, L), -1, dtype=torch.long, device=target.device)
            src = given if given is not None else None
            for b, seq in enumerate(ids.unbind()):
                n = lens[b]
                r = src.unbind()[b].long() if src is not None else self._router()(seq.unsqueeze(0)).reshape(-1)
                routes[b, :n] = r[:n].to(routes.device)
        if tuple(routes.shape) != tuple(target.shape):
            raise RuntimeError(f"routes {tuple(routes.shape)} do not match the packed input_ids {tuple(target.shape)}")
        return routes.to(target.device)

    # -- weight sync to the rollout -----------------------------------------------------------------------
    def _routed_base_model(self):
        """The Hugging Face model with the routed layers (inside veRL's FSDP wrapper and the PEFT model)."""
        peft_model = getattr(self.module, "_fsdp_wrapped_module", self.module)
        get_base = getattr(peft_model, "get_base_model", None)
        return get_base() if callable(get_base) else peft_model

    def get_per_tensor_param(self, layered_summon=False, base_sync_done=None, **kwargs):
        """veRL's weight sync (``update_weights`` in the actor-rollout worker): ``(iterator of (name, tensor),
        peft_config dict)``.

        ``base_sync_done=True``: every adapter's LoRA tensors and the routed PEFT config
        (:func:`routed_lora.integrations.verl_sync.lora_payload`); ``False``: the backbone's weights
        (:func:`~routed_lora.integrations.verl_sync.base_tensors`) with the same config. Tensors are gathered on
        every rank (FSDP2 DTensors: ``full_tensor``; FSDP1: inside ``summon_full_params``), as veRL's own engine
        does; ``layered_summon`` changes nothing (the adapters are gathered layer by layer anyway).

        Refused (``RuntimeError``): ``model.lora.merge=True`` (a merged model is one policy, not an adapter per
        token), and a call without ``base_sync_done``, which is veRL's checkpoint-engine path for disaggregated
        rollouts (``checkpoint_engine.backend`` other than ``naive``): it sends full weights and drops the LoRA
        config, so the rollout would sample without the adapters."""
        if base_sync_done is None:
            raise RuntimeError(
                "RoutedLoRAFSDPEngine.get_per_tensor_param: called without base_sync_done, i.e. by veRL's checkpoint "
                "engine (actor_rollout_ref.rollout.checkpoint_engine.backend != 'naive'), which sends merged/full "
                "weights and drops the LoRA config; routed adapters need the colocated sync: set "
                "actor_rollout_ref.rollout.checkpoint_engine.backend=naive"
            )
        lora_cfg = getattr(self.model_config, "lora", None) or {}
        if bool(getattr(lora_cfg, "get", lambda *_: False)("merge", False)):
            raise RuntimeError("RoutedLoRAFSDPEngine: model.lora.merge=True merges one LoRA into the base weights; "
                               "routed adapters are chosen per token and cannot be merged: set model.lora.merge=False")
        from .verl_sync import base_tensors, lora_payload

        router = self._router()
        if base_sync_done:
            with self._gathered():
                named, config = lora_payload(self._routed_base_model(), router=router)
            return [(_unwrapped_name(n), t) for n, t in named], config
        # the config only: building it gathers the adapters too (small next to the base weights)
        with self._gathered():
            _, config = lora_payload(self._routed_base_model(), router=router)

        def stream():
            with self._gathered():
                for n, t in base_tensors(self._routed_base_model()):
                    yield _unwrapped_name(n), t

        return stream(), config

    def _gathered(self):
        """Full parameters for the sync: FSDP1 needs ``summon_full_params``; FSDP2 / plain modules gather per
        tensor (``full_tensor``), so nothing to do; offloaded parameters are brought back for it (as veRL does)."""
        import contextlib

        @contextlib.contextmanager
        def ctx():
            from verl.utils import fsdp_utils

            offload = bool(getattr(self, "_is_offload_param", False))
            if offload:
                fsdp_utils.load_fsdp_model_to_gpu(self.module)
            try:
                if fsdp_utils.fsdp_version(self.module) == 1:
                    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

                    with FSDP.summon_full_params(self.module, writeback=False):
                        yield
                else:
                    yield
            finally:
                if offload:
                    fsdp_utils.offload_fsdp_model_to_cpu(self.module)

        return ctx()


def _unwrapped_name(name: str) -> str:
    """A parameter name without FSDP1 / activation-checkpoint wrapper segments (veRL strips them the same way)."""
    for seg in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(seg, "")
    return name
