"""The public side of the vLLM integration: load a routed model's adapters into an ``LLM``, generate with
per-token routing, update the adapters after a training step.

    from vllm import LLM, SamplingParams
    from routed_lora.integrations.vllm import RoutedLLM, engine_kwargs

    llm = LLM(model=MODEL_DIR, **engine_kwargs(ADAPTERS_DIR))   # enable_lora, ranks, max_loras, fp32 on CPU
    rl = RoutedLLM(llm, ADAPTERS_DIR)                          # a save_adapters folder, or a routed model
    outs = rl.generate([prompt_ids, ...], SamplingParams(max_tokens=64, logprobs=0))
    outs[0].token_ids, outs[0].logprobs, outs[0].routes
    ...train...
    rl.update(model)                                           # weight sync, prefix cache reset

Routing runs in vLLM's workers (:mod:`.plugin`); a routed request carries one ``LoRARequest`` whose name starts
with ``routed-lora:`` and whose path is the adapter folder. ``RoutedOutput.routes`` are the routes of every
position (prompt and completion), computed here with the same ``TagRouter`` rule as the workers use
(tests/test_vllm.py checks the two against each other through the workers' trace).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .guard import check_supported
from .routing import ROUTED_PREFIX

__all__ = ["RoutedLLM", "RoutedOutput", "engine_kwargs"]

_ids = itertools.count(1)
# the path of adapters loaded from a live model's tensors: a name only (the workers build them from the registry)
IN_MEMORY_PATH = "/routed-lora-in-memory"


@dataclass
class RoutedOutput:
    prompt_ids: list[int]
    token_ids: list[int]  # sampled tokens
    logprobs: list[float] | None  # log-prob of each sampled token (vLLM's logprobs_mode decides which)
    routes: list[int] | None  # route of every position of prompt_ids + token_ids (-1: backbone), or None
    finish_reason: str | None = None
    stop_reason: object = None
    prompt_logprobs: list[float | None] | None = None
    extra: dict = field(default_factory=dict)


def _manifest(folder: Path) -> dict:
    p = Path(folder) / "routed_lora.json"
    if not p.is_file():
        raise FileNotFoundError(f"{folder}: no routed_lora.json; expected a folder written by routed_lora.save_adapters")
    return json.loads(p.read_text())


def engine_kwargs(source, *, extra_loras: int = 0, **overrides) -> dict:
    """Keyword arguments for ``vllm.LLM`` that serve routed requests of ``source`` (a ``save_adapters`` folder or
    a model with routed layers): LoRA on, ``max_lora_rank`` = the adapters' rank, ``max_loras`` = adapters + 1
    (the scheduler counts the routed request's own id but not its adapters: upstream defect 4) plus
    ``extra_loras``, synchronous scheduling, and on the CPU ``dtype="float32"``."""
    if isinstance(source, (str, os.PathLike)):
        m = _manifest(Path(source))
        r, n = int(m["r"]), len(m["adapters"])
    else:
        from routed_lora.hf import routed_layers

        layer = routed_layers(source)[0][1]
        r, n = int(layer.r), len(layer.adapter_names)
    rank = next(x for x in (8, 16, 32, 64, 128, 256, 320, 512) if x >= r)
    kw = dict(enable_lora=True, max_lora_rank=rank, max_loras=n + 1 + extra_loras,
              max_cpu_loras=2 * (n + 1 + extra_loras), async_scheduling=False)
    try:
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            kw["dtype"] = "float32"
    except Exception:  # noqa: BLE001 - platform detection is best effort
        pass
    kw.update(overrides)
    return kw


class RoutedLLM:
    """Routed generation on ``llm`` (a ``vllm.LLM`` built with :func:`engine_kwargs`) with the adapters of
    ``source``: a :func:`routed_lora.save_adapters` folder (used in place) or a model with routed layers, whose
    adapters go to the workers in memory (:mod:`.tensor_sync`; nothing is written) or, with ``workdir``, are
    written to a fresh folder under it.

    ``router``: a ``TagRouter`` description (``TagRouter.to_dict()``) to use instead of the folder's."""

    def __init__(self, llm, source, *, router: dict | None = None, workdir: str | os.PathLike | None = None):
        self.llm = llm
        self.engine = llm.llm_engine
        check_supported(self.engine.vllm_config)
        self.tokenizer_path = self.engine.vllm_config.model_config.tokenizer
        self._router_override = router
        self._workdir = Path(workdir) if workdir is not None else None
        self._owned: list[Path] = []
        self.version = 0
        self.last_sync: str | None = None  # "tensors" (in memory) or "folder" after an update
        self._tensor_ids: set[int] = set()
        self.requests: dict[str, object] = {}
        self.routed = None
        self._load(source)

    # -- adapters ------------------------------------------------------------------------------------------
    def _folder_for(self, source) -> Path:
        if isinstance(source, (str, os.PathLike)):
            return Path(source)
        from routed_lora.adapter_io import save_adapters

        folder = self._workdir / f"v{self.version}"
        save_adapters(source, folder)
        self._owned.append(folder)
        return folder

    def _send_tensors(self, ids: dict, config: dict, tensors: dict) -> None:
        """Every adapter's tensors to the workers' registry (:mod:`.tensor_sync`) under ``ids[adapter]``."""
        from .tensor_sync import METHOD, pack

        self.llm.collective_rpc(METHOD, args=([pack(ids[a], config, tensors[a]) for a in self.adapters],))
        self._tensor_ids.update(ids[a] for a in self.adapters)

    def _drop(self, ids: list[int], *, quiet: bool = False) -> None:
        """Remove LoRA ``ids`` from the engine and from the workers' registry. ``quiet``: an engine already shut
        down is not an error (close())."""
        for i in ids:
            try:
                self.engine.remove_lora(i)
            except Exception:  # noqa: BLE001 - never loaded (no request used it), or the engine is shut down
                pass
        forget = [i for i in ids if i in self._tensor_ids]
        if forget:
            from .tensor_sync import FORGET_METHOD

            try:
                self.llm.collective_rpc(FORGET_METHOD, args=(forget,))
            except Exception:  # noqa: BLE001
                if not quiet:
                    raise
            self._tensor_ids.difference_update(forget)

    def _load(self, source, payload: tuple | None = None) -> None:
        """Adapters of a folder (read by vLLM's loader), or of a live model: in memory (sent to the workers'
        registry, :mod:`.tensor_sync`; the requests' paths are names that nothing reads) unless ``workdir`` was
        given, then written there. New LoRA ids either way. ``payload``: the model's ``adapter_payload`` when
        the caller has it already."""
        from vllm.lora.request import LoRARequest

        from routed_lora.router import TagRouter

        if isinstance(source, (str, os.PathLike)) or self._workdir is not None:
            folder = self._folder_for(source).resolve()
            m = _manifest(folder)
            payload = None
        else:
            if payload is None:
                from routed_lora.adapter_io import adapter_payload

                payload = adapter_payload(source)
            m = payload[0]
            folder = Path(IN_MEMORY_PATH) / f"{os.getpid()}-{next(_ids)}"
        self.folder, self.manifest = folder, m
        self.adapters = list(m["adapters"])
        self.model_adapters = list(m["model_adapters"])
        router_d = self._router_override or m.get("router")
        self._router_d = router_d
        self.router = None
        if router_d:
            self.router = TagRouter.from_dict(self.llm.get_tokenizer(), router_d, adapters=self.model_adapters)
        tag = f"v{self.version}-{next(_ids)}"
        ids = {a: 1_000_000 + 1000 * next(_ids) for a in self.adapters}
        names = {a: f"routed-lora/{tag}/{a}" for a in self.adapters}
        if payload is not None:
            self._send_tensors(ids, payload[1], payload[2])
        self.requests = {a: LoRARequest(lora_name=names[a], lora_int_id=ids[a], lora_path=str(folder / a))
                         for a in self.adapters}
        if self.router is not None:
            # everything the workers need (RoutedSpec): they read the folder's routed_lora.json only without it
            meta = {"tokenizer": self.tokenizer_path, "ids": ids, "names": names, "router": router_d,
                    "model_adapters": self.model_adapters}
            self.routed = LoRARequest(lora_name=ROUTED_PREFIX + json.dumps(meta, sort_keys=True),
                                      lora_int_id=1_000_000 + 1000 * next(_ids), lora_path=str(folder))
        else:
            self.routed = None

    def lora_request(self, adapter: str | None = "routed"):
        """The ``LoRARequest`` for ``adapter``: "routed" (per-token routing), an adapter name (that adapter for
        every token, sharing the routed set's slot), or None (backbone only)."""
        if adapter is None:
            return None
        if adapter == "routed":
            if self.routed is None:
                raise ValueError("routed generation needs a router: the adapter folder has none; pass router=")
            return self.routed
        if adapter not in self.requests:
            raise ValueError(f"adapter: expected 'routed', None or one of {self.adapters}, got {adapter!r}")
        return self.requests[adapter]

    def update(self, source, *, in_memory: bool | None = None) -> None:
        """Weight sync after a training step; no restart, and requests in flight must have finished.

        A live routed model with the adapters and router already loaded is synced **in memory** (the default,
        ``in_memory=None`` or True): its tensors (:func:`routed_lora.adapter_io.adapter_payload`) go to every
        worker with ``LLM.collective_rpc`` under the same LoRA ids (:mod:`.tensor_sync`); nothing is written.
        A folder, a model with other adapter names or another router, or ``in_memory=False`` loads the adapters
        under new LoRA ids (vLLM caches adapters by id) and removes the old ones. Either way the prefix cache is
        reset: cached blocks were computed with the old adapters."""
        if in_memory is not False and not isinstance(source, (str, os.PathLike)):
            from routed_lora.adapter_io import adapter_payload

            payload = adapter_payload(source)
            manifest, config, tensors = payload
            same = (list(manifest["adapters"]) == self.adapters
                    and list(manifest["model_adapters"]) == self.model_adapters
                    and (self._router_override or manifest.get("router")) == self._router_d)
            if same:
                self._send_tensors({a: r.lora_int_id for a, r in self.requests.items()}, config, tensors)
                self.llm.reset_prefix_cache()
                self.version += 1
                self.last_sync = "tensors"
                return
            if in_memory:
                raise ValueError(f"source: an in-memory sync needs the loaded adapters {self.adapters} and router; "
                                 f"the model has adapters {manifest['adapters']} and router "
                                 f"{manifest.get('router')!r}; pass in_memory=None to load it under new ids")
        else:
            if in_memory:
                raise ValueError(f"source: in_memory=True needs a model with routed layers, got the folder {source!r}")
            payload = None
        old = [r.lora_int_id for r in self.requests.values()]
        old_owned = list(self._owned)
        self.version += 1
        self._load(source, payload)
        self._drop(old)
        self.llm.reset_prefix_cache()
        self.last_sync = "folder"
        for f in old_owned:
            if f != self.folder:
                shutil.rmtree(f, ignore_errors=True)
                self._owned.remove(f)

    def close(self) -> None:
        """Drop this object's adapters from the engine and the workers' tensor registry, and its folders; its
        requests must not be used afterwards. The engine itself stays up (it is the caller's)."""
        self._drop([r.lora_int_id for r in self.requests.values()], quiet=True)
        for f in self._owned:
            shutil.rmtree(f, ignore_errors=True)
        self._owned.clear()

    # -- generation ----------------------------------------------------------------------------------------
    def routes_of(self, ids: Sequence[int]) -> list[int]:
        """The route of every position of ``ids`` (TagRouter, the rule the workers apply)."""
        import torch

        if self.router is None:
            raise ValueError("no router")
        return self.router(torch.tensor([list(ids)], dtype=torch.long))[0].tolist()

    def routes_of_many(self, seqs: Sequence[Sequence[int]]) -> list[list[int]]:
        """:meth:`routes_of` for many sequences in one router call: they are right-padded into one batch, which
        leaves every real position's route unchanged because routes are causal (a position's route depends on
        the tokens up to it only)."""
        import torch

        if self.router is None:
            raise ValueError("no router")
        if not seqs:
            return []
        lens = [len(s) for s in seqs]
        ids = torch.zeros(len(seqs), max(lens), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : lens[i]] = torch.as_tensor(list(s), dtype=torch.long)
        routes = self.router(ids).tolist()
        return [r[:n] for r, n in zip(routes, lens)]

    def generate(self, prompts: Sequence[Sequence[int]], sampling_params, *, adapter="routed",
                 use_tqdm: bool = False) -> list[RoutedOutput]:
        """Generate from token-id prompts. ``adapter``: "routed", an adapter name, None, or a list of those (one
        per prompt, for mixed batches). ``sampling_params``: one or a list; ask for ``logprobs=0`` to get the
        sampled tokens' log-probs."""
        from vllm.inputs import TokensPrompt

        n = len(prompts)
        adapters = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * n
        if len(adapters) != n:
            raise ValueError(f"adapter: expected {n} entries, got {len(adapters)}")
        lora = [self.lora_request(a) for a in adapters]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sampling_params,
                                 lora_request=lora, use_tqdm=use_tqdm)
        routed = [i for i, a in enumerate(adapters) if a == "routed"]
        routed_routes = dict(zip(routed, self.routes_of_many(
            [list(prompts[i]) + list(outs[i].outputs[0].token_ids) for i in routed])))
        res = []
        for i, (p, a, o) in enumerate(zip(prompts, adapters, outs)):
            c = o.outputs[0]
            toks = list(c.token_ids)
            lps = None
            if c.logprobs is not None:
                lps = [float(d[t].logprob) for t, d in zip(toks, c.logprobs)]
            plp = None
            if o.prompt_logprobs is not None:
                plp = [None if d is None else float(d[t].logprob) for t, d in zip(p, o.prompt_logprobs)]
            routes = None
            if a == "routed":
                routes = routed_routes[i]
            elif a is not None:
                routes = [self.model_adapters.index(a)] * (len(p) + len(toks))
            else:
                routes = [-1] * (len(p) + len(toks))
            res.append(RoutedOutput(list(p), toks, lps, routes, c.finish_reason, c.stop_reason, plp,
                                    {"request_id": o.request_id, "num_cached_tokens": o.num_cached_tokens}))
        return res
