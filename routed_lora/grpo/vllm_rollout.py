"""The vLLM rollout engine: the agent loop of :mod:`routed_lora.env.rollout` sampled by vLLM with per-token routed
adapters (:mod:`routed_lora.integrations.vllm`; docs/vllm.md).

:class:`VLLMRollout` is an :class:`~routed_lora.grpo.hf_rollout.HFRollout` whose sampler is vLLM: rewards, the
loss mask, the teacher-forced routes and the batch are built by the same code, so the records (tokens, routes,
info mask, rollout log-probs) are those of the HF engine. Per turn every live rollout is one vLLM request whose
prompt is its token ids so far (the transcript is never re-tokenised; prefix caching makes the resubmission
cheap); a turn stops at ``</search>`` or ``</answer>`` (stop token ids when the tags are single tokens, else stop
strings and the same cut as the HF loop), the query goes to the retriever and the ``<information>`` ids are
appended. The recorded log-probs are vLLM's ``processed_logprobs``: log_softmax(logits / temperature) of the
sampled token (no top-k/top-p, no penalties here).

At the start of every ``collect`` the engine's adapters are synchronised with the trained model
(:meth:`RoutedLLM.update`: new LoRA ids, prefix cache reset); ``mode="joint"`` samples with the one adapter for
every token, ``mode="base"`` without LoRA. Needs vLLM (``make setup-vllm``).
"""

from __future__ import annotations

from typing import Callable

from .config import GRPOConfig
from .hf_rollout import HFRollout

__all__ = ["VLLMRollout", "build_llm"]


def build_llm(model_dir, model, *, max_model_len: int | None = None, **overrides):
    """A ``vllm.LLM`` for rollouts of ``model`` (patched, its backbone saved in ``model_dir``): LoRA sized for its
    adapters (:func:`engine_kwargs`), prefix caching, processed log-probs (temperature applied)."""
    import os

    from vllm import LLM

    from routed_lora.integrations.vllm import engine_kwargs

    for k, v in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
                 "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}.items():
        os.environ.setdefault(k, v)
    kw = dict(enable_prefix_caching=True, logprobs_mode="processed_logprobs", enforce_eager=True)
    if max_model_len is not None:  # default: the model's max_position_embeddings
        kw["max_model_len"] = max_model_len
    kw.update(overrides)
    return LLM(model=str(model_dir), **engine_kwargs(model, **kw))


class VLLMRollout(HFRollout):
    """Rollouts sampled by ``llm`` (a ``vllm.LLM``, e.g. from :func:`build_llm`, with
    ``logprobs_mode="processed_logprobs"``) for the policy ``model`` (see the module doc). Other arguments as
    :class:`HFRollout`."""

    def __init__(self, cfg: GRPOConfig, model, tokenizer, router, retriever, *, llm, prompt_template: str,
                 pad_id: int, reward_fn: Callable[[str, list], float] | None = None):
        super().__init__(cfg, model, tokenizer, router, retriever, prompt_template=prompt_template, pad_id=pad_id,
                         reward_fn=reward_fn)
        mode = llm.llm_engine.vllm_config.model_config.logprobs_mode
        if mode != "processed_logprobs":
            raise ValueError(f"VLLMRollout: the LLM returns {mode!r}; build it with logprobs_mode="
                             "'processed_logprobs' so the recorded log-probs include the temperature")
        self.llm = llm
        self.routed = None
        from routed_lora.hf import routed_layers

        self.adapter_names = list(routed_layers(model)[0][1].adapter_names) if routed_layers(model) else []

    def sync(self) -> None:
        """Bring the engine's adapters up to date with the model (weight sync; prefix cache reset)."""
        if self.cfg.mode == "base" or not self.adapter_names:
            return
        from routed_lora.integrations.vllm import RoutedLLM

        if self.routed is None:
            self.routed = RoutedLLM(self.llm, self.model)
        else:
            self.routed.update(self.model)

    def _adapter(self):
        if self.cfg.mode == "base" or not self.adapter_names:
            return None
        if self.cfg.mode == "joint":
            return self.adapter_names[0]
        return "routed"

    def _sample(self, prompts: list[str], max_length: int, meters: dict) -> list:
        from vllm import SamplingParams

        from routed_lora.env.rollout import Rollout, _encode_prompts, _Tags, append_search_results, completion_text

        self.sync()
        tok, cfg = self.tok, self.cfg
        tags = _Tags(tok)
        adapter = self._adapter()
        rolls = [Rollout(p, [], [], logprobs=[]) for p in _encode_prompts(tok, prompts)]
        for ro in rolls:
            if len(ro.ids) >= max_length:
                ro.finish_reason = "length"
        live = [i for i, ro in enumerate(rolls) if not ro.finish_reason]
        stop = {}
        if tags.single:
            stop["stop_token_ids"] = [tags.search_close, tags.answer_close]
        else:
            stop.update(stop=["</search>", "</answer>"], include_stop_str_in_output=True)
        prefill = decode = 0
        for _turn in range(cfg.max_turns + 1):
            if not live:
                break
            params = [SamplingParams(max_tokens=min(cfg.max_new_tokens, max_length - len(rolls[i].ids)),
                                     temperature=cfg.temperature, logprobs=0, skip_special_tokens=False, **stop)
                      for i in live]
            outs = self._generate([rolls[i].ids for i in live], params, adapter)
            searches = []
            for i, o in zip(live, outs):
                ro = rolls[i]
                prefill += len(ro.ids) - (o.extra.get("num_cached_tokens") or 0)
                decode += len(o.token_ids)
                cut, why = tags.cut(o.token_ids)
                ro.completion_ids += o.token_ids[:cut]
                ro.info_mask += [0] * cut
                ro.logprobs += o.logprobs[:cut]
                if why == "search":
                    if ro.num_tool_calls >= cfg.max_turns:
                        ro.finish_reason = "max_turns"
                    else:
                        q = tags.query(ro.completion_ids)
                        ro.queries.append(q)
                        searches.append((i, q))
                elif why in ("answer", "eos"):
                    ro.finish_reason = why
                else:
                    ro.finish_reason = "length"
            added = append_search_results(rolls, searches, self.retriever, tok, topk=cfg.topk, max_length=max_length)
            live = []
            for (i, _q), n in zip(searches, added):
                rolls[i].logprobs += [0.0] * n
                if len(rolls[i].ids) >= max_length:
                    rolls[i].finish_reason = "length"
                else:
                    live.append(i)
        for ro in rolls:
            ro.finish_reason = ro.finish_reason or "max_turns"
            ro.text = completion_text(tok, ro.completion_ids)
        meters["prefill_tokens"] = meters.get("prefill_tokens", 0) + prefill
        meters["decode_tokens"] = meters.get("decode_tokens", 0) + decode
        return rolls

    def _generate(self, prompts, params, adapter):
        if self.routed is not None:
            return self.routed.generate(prompts, params, adapter=adapter)
        from routed_lora.integrations.vllm.engine import RoutedOutput
        from vllm.inputs import TokensPrompt

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        res = []
        for p, o in zip(prompts, outs):
            c = o.outputs[0]
            toks = list(c.token_ids)
            res.append(RoutedOutput(list(p), toks, [float(d[t].logprob) for t, d in zip(toks, c.logprobs)], None,
                                    c.finish_reason, c.stop_reason, None, {"num_cached_tokens": o.num_cached_tokens}))
        return res
