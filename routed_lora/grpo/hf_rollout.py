"""The HF rollout engine: the agent loop of :mod:`routed_lora.env.rollout` on the trained model itself.

:class:`HFRollout` implements :class:`routed_lora.grpo.rollout.RolloutEngine` (the loop's default engine): it
samples with ``generate`` on the patched model (adapters routed per token by its router), rewards each rollout
(exact match on the last ``<answer>``, optional format reward, or ``reward_fn``), collates the batch with the
loss mask (optionally one role's tokens only: :func:`role_mask`) and the teacher-forced routes.

Must not train or write anything: it only samples and scores.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from .config import GRPOConfig
from .logprobs import routes_for
from .rollout import RolloutBatch

__all__ = ["HFRollout", "role_mask"]


class HFRollout:
    """Rollouts from ``model`` itself (see the module doc); ``router`` is the model's router (used for the
    teacher-forced routes), ``pad_id`` the padding id of the collated batch."""

    def __init__(self, cfg: GRPOConfig, model, tokenizer, router, retriever, *, prompt_template: str, pad_id: int,
                 reward_fn: Callable[[str, list], float] | None = None):
        self.cfg, self.model, self.tok, self.router, self.retriever = cfg, model, tokenizer, router, retriever
        self.template, self.pad_id = prompt_template, pad_id
        self.reward_fn = reward_fn  # (completion text, golden answers) -> reward; default EM (+ format reward)

    # -- one batch of rollouts -----------------------------------------------------------------------------------
    def collect(self, rows: Sequence[dict], group_offset: int = 0) -> tuple[RolloutBatch, torch.Tensor, dict]:
        from routed_lora.env.data import make_prompt
        from routed_lora.env.reward import compute_score, exact_match, extract_answer
        from routed_lora.env.rollout import collate

        G = self.cfg.group_size
        prompts = [make_prompt(r["question"], self.template) for r in rows for _ in range(G)]
        plen = max(len(self.tok(p)["input_ids"]) for p in prompts)
        t0 = time.perf_counter()
        meters: dict = {}
        rolls = self._sample(prompts, plen + self.cfg.max_total_tokens, meters)
        t_roll = time.perf_counter() - t0
        golds = [r["golden_answers"] for r in rows for _ in range(G)]
        score = self.reward_fn or (lambda text, g: compute_score(text, g, format_score=self.cfg.format_reward))
        rewards = torch.tensor([float(score(ro.text, g)) for ro, g in zip(rolls, golds)], dtype=torch.float32)
        em = torch.tensor([exact_match(extract_answer(ro.text), g) for ro, g in zip(rolls, golds)])
        c = collate(rolls, self.pad_id)
        ids, att = c["input_ids"], c["attention_mask"]
        loss_mask = c["loss_mask"][:, 1:].bool()
        if self.cfg.loss_on != "all":
            loss_mask = loss_mask & role_mask(self.tok, ids, att, self.cfg.loss_on)
        batch = RolloutBatch(
            input_ids=ids, attention_mask=att, loss_mask=loss_mask, rewards=rewards,
            group_ids=torch.arange(len(rows)).repeat_interleave(G) + group_offset, em=em.float(),
            tool_calls=torch.tensor([float(ro.num_tool_calls) for ro in rolls]),
            response_len=torch.tensor([float(len(ro.completion_ids)) for ro in rolls]),
            texts=[ro.text for ro in rolls],
            rollout_logprobs=c["old_logprobs"][:, 1:] if "old_logprobs" in c else None,
        )
        routes = routes_for(ids, att, joint_adapter=0) if self.cfg.mode == "joint" else \
            routes_for(ids, att, router=self.router)
        info = {"rollout_seconds": t_roll, "finish_answer": sum(ro.finish_reason == "answer" for ro in rolls) / len(rolls),
                "prefill_tokens": meters.get("prefill_tokens", 0), "decode_tokens": meters.get("decode_tokens", 0)}
        return batch, routes, info

    def _sample(self, prompts: list[str], max_length: int, meters: dict) -> list:
        """The rollouts (:class:`routed_lora.env.rollout.Rollout`, with log-probs) of ``prompts``: the part an
        engine on another sampler (:class:`routed_lora.grpo.vllm_rollout.VLLMRollout`) replaces."""
        from routed_lora.env.rollout import generate_rollouts
        from routed_lora.fsdp import full_params

        self.model.eval()
        with full_params(self.model):  # FSDP2: ranks generate different numbers of steps, so no collectives
            return generate_rollouts(self.model, self.tok, prompts, self.retriever, max_turns=self.cfg.max_turns,
                                     max_new_tokens=self.cfg.max_new_tokens, max_length=max_length,
                                     topk=self.cfg.topk, do_sample=True, temperature=self.cfg.temperature,
                                     return_logprobs=True, meters=meters)


def role_mask(tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, role: str) -> torch.Tensor:
    """(B, L-1) bool, aligned with the targets: True where the target token belongs to ``role`` ("tool": written
    by a position inside ``<search>`` ... ``</search>``, i.e. the query and the closing tag, DESIGN.md §2;
    "reasoning": every other token). The roles come from the DART tag router whatever the adapter layout, so a
    joint adapter can be trained with the loss on one role only (``--loss-on``, LEAS's M_Reas / M_Tool)."""
    import routed_lora as rl

    router = rl.TagRouter(tokenizer, spans={"tool": ("<search>", "</search>")}, default="reasoning",
                          adapters=("reasoning", "tool"))
    roles = router(input_ids, attention_mask)[:, :-1]
    return roles == (1 if role == "tool" else 0)
