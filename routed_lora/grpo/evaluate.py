"""Held-out exact match of the search agent, greedy and sampled, 1-hop and 2-hop apart.

- greedy: one rollout per question with ``do_sample=False``; EM of its last ``<answer>``;
- sampled: ``samples`` rollouts per question at the training temperature; the mean EM over all of them (the
  expected reward of the policy GRPO optimises).

Rows with a ``hops`` field are also scored per number of hops (``em_greedy/1hop``, ``em_sampled/2hop``, ...).
The random state of the caller is left untouched (``torch.random.fork_rng``), so evaluating in the middle of a
run does not change what the run does next (resume stays bit-for-bit).
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

__all__ = ["evaluate_em", "format_eval"]


@torch.no_grad()
def evaluate_em(
    model,
    tokenizer,
    rows: Sequence[dict],
    retriever,
    *,
    samples: int = 8,
    temperature: float = 1.0,
    greedy: bool = True,
    batch_size: int = 128,
    max_turns: int = 4,
    max_new_tokens: int = 64,
    max_length: int = 1024,
    topk: int = 3,
    prompt_template: str | None = None,
    seed: int = 1234,
    records: list | None = None,
) -> dict:
    """EM on ``rows`` (``question``, ``golden_answers``, optional ``hops``). Returns a flat dict:
    ``em_greedy/all``, ``em_greedy/<h>hop``, ``em_sampled/all``, ``em_sampled/<h>hop``, ``n/all``, ``n/<h>hop``,
    ``tool_calls_greedy``, ``tool_calls_sampled``, ``answered_greedy``, ``eval_seconds``.

    ``records``: a list that receives one dict per question, in the order of ``rows`` (``id``, ``question``,
    ``hops``, ``greedy`` 0/1, ``greedy_answer``, ``sampled`` mean EM over the samples), the input of paired tests
    (:mod:`routed_lora.study.stats`)."""
    from routed_lora.env.data import TINY_PROMPT, make_prompt
    from routed_lora.env.reward import exact_match, extract_answer
    from routed_lora.env.rollout import generate_rollouts

    template = prompt_template or TINY_PROMPT
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    hops = [f"{int(r['hops'])}hop" if r.get("hops") is not None else None for r in rows]
    out: dict = {"n/all": len(rows)}
    for h in sorted({h for h in hops if h}):
        out[f"n/{h}"] = hops.count(h)

    per: dict = {}
    answers = [None] * len(rows)

    def run(kind: str, reps: int, do_sample: bool):
        scores = [0.0] * len(rows)
        per[kind] = scores
        calls = answered = 0.0
        expanded = [i for i in range(len(rows)) for _ in range(reps)]
        for s in range(0, len(expanded), batch_size):
            idx = expanded[s: s + batch_size]
            prompts = [make_prompt(rows[i]["question"], template) for i in idx]
            # a retriever that answers per question (retrieval held constant) is told each batch's rows
            rt = retriever.bind([rows[i] for i in idx]) if hasattr(retriever, "bind") else retriever
            rolls = generate_rollouts(model, tokenizer, prompts, rt, max_turns=max_turns,
                                      max_new_tokens=max_new_tokens, max_length=max_length, topk=topk,
                                      do_sample=do_sample, temperature=temperature)
            for i, ro in zip(idx, rolls):
                pred = extract_answer(ro.text)
                scores[i] += exact_match(pred, rows[i]["golden_answers"]) / reps
                if kind == "greedy":
                    answers[i] = pred
                calls += ro.num_tool_calls / (reps * len(rows))
                answered += float(pred is not None) / (reps * len(rows))
        out[f"em_{kind}/all"] = sum(scores) / max(1, len(scores))
        for h in sorted({h for h in hops if h}):
            sel = [sc for sc, hh in zip(scores, hops) if hh == h]
            out[f"em_{kind}/{h}"] = sum(sel) / len(sel)
        out[f"tool_calls_{kind}"] = calls
        out[f"answered_{kind}"] = answered

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if greedy:
            run("greedy", 1, False)
        if samples > 0:
            run("sampled", samples, True)
    model.train(was_training)
    out["eval_seconds"] = time.perf_counter() - t0
    if records is not None:
        for i, r in enumerate(rows):
            rec = {"id": r.get("id", i), "question": r["question"], "hops": r.get("hops")}
            if "greedy" in per:
                rec.update(greedy=int(per["greedy"][i]), greedy_answer=answers[i])
            if "sampled" in per:
                rec["sampled"] = per["sampled"][i]
            records.append(rec)
    return out


def format_eval(ev: dict) -> str:
    """One line: greedy and sampled EM, overall and per hop count."""
    parts = []
    for kind in ("greedy", "sampled"):
        if f"em_{kind}/all" not in ev:
            continue
        hops = sorted(k.split("/", 1)[1] for k in ev if k.startswith(f"em_{kind}/") and not k.endswith("/all"))
        detail = ", ".join(f"{h} {ev[f'em_{kind}/{h}']:.3f}" for h in hops)
        parts.append(f"{kind} EM {ev[f'em_{kind}/all']:.3f}" + (f" ({detail})" if detail else ""))
    return "; ".join(parts)
