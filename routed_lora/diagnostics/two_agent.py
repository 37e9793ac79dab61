"""The 2-Agent baseline's decoding loop (:func:`two_agent_rollouts`; the baseline is described in
:mod:`routed_lora.diagnostics.evaluate`): the reasoning agent writes until ``<search>``, the tool agent writes the
query up to ``</search>``, the passages are spliced in as ids and the turn returns to the reasoning agent.

Must not load models, score answers or aggregate costs (that is :mod:`.evaluate`'s ``compare_two_agent``); it
counts only what the loop itself sees (hand-overs, foreign tokens) and calls the meters it is given.
"""

from __future__ import annotations

import torch

def _single(tokenizer, tag):
    ids = tokenizer.encode(tag, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"two-agent: the tag {tag} must be a single token for this tokenizer (it is {len(ids)}); "
                         "the hand-over at tag boundaries is implemented for single-token tags")
    return ids[0]


@torch.no_grad()
def two_agent_rollouts(reasoner, tool_agent, tokenizer, prompts, retriever, *, max_turns: int = 4,
                       max_new_tokens: int = 64, max_length: int = 1024, topk: int = 3, do_sample: bool = True,
                       temperature: float = 1.0, meters: dict | None = None,
                       generation_kwargs: dict | None = None):
    """The 2-Agent loop (module doc): ``reasoner`` writes until ``<search>``, ``tool_agent`` writes the query up to
    ``</search>``, passages are spliced in as ids, and the turn returns. Returns (rollouts, stats) with the
    :class:`routed_lora.env.rollout.Rollout` fields the scorer needs and ``handovers`` / ``foreign_tokens``."""
    from routed_lora.env.rollout import Rollout, _encode_prompts, _Tags, append_search_results, completion_text

    s_open, s_close = _single(tokenizer, "<search>"), _single(tokenizer, "</search>")
    tags = _Tags(tokenizer)  # the query between the last <search> and </search>, as in the one-model rollout
    a_close = _single(tokenizer, "</answer>")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    stops = {"R": [s_open, a_close] + ([eos] if eos is not None else []),
             "T": [s_close, a_close] + ([eos] if eos is not None else [])}
    agents = {"R": reasoner, "T": tool_agent}
    meters = meters or {}
    device = next(reasoner.parameters()).device
    rolls = [Rollout(p, [], []) for p in _encode_prompts(tokenizer, prompts)]
    owner = ["R"] * len(rolls)
    seen = {"R": [len(r.prompt_ids) for r in rolls], "T": [len(r.prompt_ids) for r in rolls]}
    wrote = [[] for _ in rolls]  # per token of ids: who wrote it ("P" prompt / info, "R", "T")
    for k, r in enumerate(rolls):
        wrote[k] = ["P"] * len(r.prompt_ids)
    done = [False] * len(rolls)
    stats = {"handovers": 0, "foreign_tokens": 0}
    gen_kw = dict(do_sample=do_sample, pad_token_id=pad, return_dict_in_generate=True, use_cache=True)
    if do_sample:
        gen_kw.update(temperature=float(temperature), top_k=0, top_p=1.0)
    gen_kw.update(generation_kwargs or {})

    for _ in range(4 * (max_turns + 2)):
        for i in range(len(rolls)):
            if not done[i] and len(rolls[i].ids) >= max_length:
                done[i], rolls[i].finish_reason = True, "length"
        if all(done):
            break
        for who in ("R", "T"):
            active = [i for i in range(len(rolls)) if not done[i] and owner[i] == who]
            if not active:
                continue
            for i in active:  # tokens this agent has not encoded yet that the other agent wrote
                other = "T" if who == "R" else "R"
                stats["foreign_tokens"] += sum(1 for w in wrote[i][seen[who][i]:] if w == other)
            seqs = [rolls[i].ids for i in active]
            longest = max(len(s) for s in seqs)
            budget = max(1, min(max_new_tokens, max_length - longest))
            ids = torch.full((len(seqs), longest), pad, dtype=torch.long)
            attn = torch.zeros((len(seqs), longest), dtype=torch.long)
            for r_, s in enumerate(seqs):
                ids[r_, longest - len(s):] = torch.tensor(s)
                attn[r_, longest - len(s):] = 1
            model = agents[who]
            gen = meters[who].wrap(model) if who in meters else model.generate
            out = gen(input_ids=ids.to(device), attention_mask=attn.to(device), max_new_tokens=budget,
                      eos_token_id=stops[who], **gen_kw)
            new = out.sequences[:, longest:].tolist()
            searches = []
            for r_, i in enumerate(active):
                ro, toks = rolls[i], new[r_]
                cut, why = len(toks), "length"
                for k, t in enumerate(toks):
                    if t in stops[who]:
                        cut = k + 1
                        why = {s_open: "search_open", s_close: "search", a_close: "answer"}.get(t, "eos")
                        break
                keep = min(cut, max_length - len(ro.ids))
                if keep < cut:
                    why = "length"
                ro.completion_ids += toks[:keep]
                ro.info_mask += [0] * keep
                wrote[i] += [who] * keep
                seen[who][i] = len(ro.ids)
                if why == "search_open":
                    if ro.num_tool_calls >= max_turns:
                        done[i], ro.finish_reason = True, "max_turns"
                    else:
                        owner[i] = "T"
                        stats["handovers"] += 1
                elif why == "search":
                    q = tags.query(ro.completion_ids)
                    ro.queries.append(q)
                    searches.append((i, q))
                elif why in ("answer", "eos"):
                    done[i], ro.finish_reason = True, why
                else:
                    done[i], ro.finish_reason = True, "length"
            added = append_search_results(rolls, searches, retriever, tokenizer, topk=topk, max_length=max_length)
            for (i, _q), n in zip(searches, added):
                wrote[i] += ["P"] * n
                owner[i] = "R"
                stats["handovers"] += 1
    for ro in rolls:
        ro.finish_reason = ro.finish_reason or "max_turns"
        ro.text = completion_text(tokenizer, ro.completion_ids)  # tags kept, even as special tokens
    return rolls, stats
