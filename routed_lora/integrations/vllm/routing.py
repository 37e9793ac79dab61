"""Worker-side routing of the vLLM plugin (:mod:`.plugin` item 1; DESIGN.md §2): which adapters a routed
request stands for (:class:`RoutedSpec`), each request's router state kept incrementally (:class:`RouteState`),
and the routed replacement of ``InputBatch.make_lora_inputs`` (:func:`route_lora_inputs`): every scheduled
position's vLLM LoRA id from the tokens up to it. Plain Python and numpy; vLLM is imported only to build the
adapters' ``LoRARequest``s."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .guard import UnsupportedVLLMConfig

ROUTED_PREFIX = "routed-lora:"

__all__ = ["ROUTED_PREFIX", "RoutedSpec", "RouteState", "RewindableGenerator", "state", "routed_specs",
           "route_lora_inputs"]


class RoutedSpec:
    """Parsed from a routed ``LoRARequest``: the router and each adapter's vLLM ``LoRARequest``."""

    _cache: dict = {}
    _tokenizers: dict = {}

    def __init__(self, lora_request) -> None:
        from vllm.lora.request import LoRARequest

        from routed_lora.router import TagRouter

        meta = json.loads(lora_request.lora_name[len(ROUTED_PREFIX):])
        folder = Path(lora_request.lora_path)
        manifest = {}  # adapters loaded from tensors have no folder: their request names everything
        if not (meta.get("model_adapters") and meta.get("router")):
            manifest = json.loads((folder / "routed_lora.json").read_text())
        names = list(meta.get("model_adapters") or manifest["model_adapters"])
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
    is saved at the start of every step (:func:`route_lora_inputs`) and restored by ``set_offset``."""

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


state = _WorkerState()


def routed_specs(batch) -> dict:
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


def _decode_routes_text_(spec: "RoutedSpec", sts: list, tok):
    """:func:`_decode_routes_` for text-mode routers (tags of several tokens): the requests' streaming states,
    one per request, are stepped together as one batch of the router's own stream (one call instead of one per
    request; the rule is the router's). Returns the routes (D,)."""
    import numpy as np
    import torch

    stream = spec.router.stream(0)
    stream.batch_size = len(sts)
    stream.state = [st.stream.state[0] for st in sts]
    routes = stream.step(torch.from_numpy(np.ascontiguousarray(tok, dtype=np.int64))).numpy()
    for st, state, r in zip(sts, stream.state, routes.tolist()):
        st.stream.state[0] = state
        st.routes.append(r)
    return routes


def route_lora_inputs(batch, num_scheduled_tokens, num_sampled_tokens, by_id: dict):
    """The routed version of ``make_lora_inputs`` (see the module doc, item 1): (prompt mapping, token mapping,
    active LoRA requests), the ids of routed requests' positions given by their routes.

    Decoding steps (one scheduled position) are done for all of a spec's requests at once
    (:func:`_decode_routes_` for single-token tags, :func:`_decode_routes_text_` for multi-token tags); prefill
    chunks and requests seen for the first time go through :meth:`RouteState.upto`."""
    import numpy as np

    n = batch.num_reqs
    lids = batch.request_lora_mapping[:n]
    sched = np.asarray(num_scheduled_tokens[:n])
    sampled = np.asarray(num_sampled_tokens[:n])
    token_map = lids.repeat(sched).astype(np.int64)  # upstream's mapping (each request's own id), then routed
    prompt_map = lids.repeat(sampled).astype(np.int64)
    if state.unsupported:
        raise UnsupportedVLLMConfig(state.unsupported)
    state.routed_batch = True
    cu = np.cumsum(sched)
    cu_s = np.cumsum(sampled)
    computed = batch.num_computed_tokens_cpu
    req_ids = batch.req_ids
    states = state.requests
    trace = state.trace
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
        have = np.fromiter((len(st.routes) for st in sts), dtype=np.int64, count=len(sts))
        dec = (k == 1) & (have == start) & (sampled[rows] == 1)
        if dec.any():
            d = np.flatnonzero(dec)
            r = rows[d]
            tok = batch.token_ids_cpu[r, start[d]].astype(np.int64)
            step = _decode_routes_ if spec.fast is not None else _decode_routes_text_
            routes = step(spec, [sts[j] for j in d.tolist()], tok)
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
    # the routed request's own id takes no slot: its adapters do (ordinary LoRA requests: from the synced tensors
    # of tensor_sync, else from its folder)
    active = {lr for lid, lr in batch.lora_id_to_lora_request.items() if lid not in by_id}
    for spec in {id(s): s for s in by_id.values()}.values():
        active.update(spec.adapter_requests.values())
    if trace_rows:
        with open(trace, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "rows": trace_rows}) + "\n")
    return tuple(prompt_map.tolist()), tuple(token_map.tolist()), active
