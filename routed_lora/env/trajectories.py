"""Scripted expert trajectories for the built-in world, built as token ids exactly as a rollout would be.

A 2-hop trajectory (1-hop stops after the first fact)::

    question : in which country was zalgros gakdru born ?
    <think> i need to search </think> <search> zalgros gakdru born </search>
    <information>Doc 1(Title: zalgros gakdru was born in funmar .) \nDoc 2(Title: ...) \n</information>
    <think> zalgros gakdru was born in funmar . </think> <search> funmar country </search>
    <information>Doc 1(Title: funmar is a city in the country teldia .) \n...</information>
    <think> funmar is a city in the country teldia . </think> <answer> teldia </answer>

The thought after each information block restates the fact that answers the query, so the answer or the next
query is copied from the thought (an induction-style copy a 2-layer model learns quickly). The passages are the
retriever's real top-k for the scripted query, spliced with :func:`routed_lora.env.rollout.information_ids`; the
text segments between them are tokenised one at a time, as the model's own turns are in a rollout.
"""

from __future__ import annotations

from collections.abc import Sequence

from .data import TINY_PROMPT, make_prompt
from .retriever import format_passages
from .rollout import INFO_TEMPLATE, information_ids

FIRST_THOUGHT = "<think> i need to search </think>"


def _segments(row: dict, docs_per_hop: Sequence[Sequence[dict]]) -> list[str | list[dict]]:
    """Text segments (str) and information blocks (list of docs) of the expert completion."""
    plan = row["plan"]
    segs: list[str | list[dict]] = [f"{FIRST_THOUGHT} <search> {plan[0]['query']} </search>"]
    for h, step in enumerate(plan):
        segs.append(list(docs_per_hop[h]))
        if h + 1 < len(plan):
            segs.append(f"<think> {step['fact']} </think> <search> {plan[h + 1]['query']} </search>")
        else:
            segs.append(f"<think> {step['fact']} </think> <answer> {row['golden_answers'][0]} </answer>")
    return segs


def build_trajectories(tokenizer, rows: Sequence[dict], retriever, *, topk: int = 3,
                       prompt_template: str = TINY_PROMPT, info_template: str = INFO_TEMPLATE) -> list[dict]:
    """Expert trajectories for world question rows (with a ``plan``).

    Each result has ``input_ids`` (prompt + completion), ``loss_mask`` (1 on completion tokens the model writes,
    0 on the prompt and on information blocks), ``info_mask`` (1 on information blocks), ``prompt_len``,
    ``text`` and ``hops``. Searches are batched per hop."""
    max_hops = max(len(r["plan"]) for r in rows)
    docs: list[list[list[dict]]] = [[] for _ in rows]
    for h in range(max_hops):
        idx = [i for i, r in enumerate(rows) if len(r["plan"]) > h]
        res = retriever.search([rows[i]["plan"][h]["query"] for i in idx], topk=topk)
        for i, d in zip(idx, res):
            docs[i].append(d)
    out = []
    for row, dps in zip(rows, docs):
        prompt = list(tokenizer(make_prompt(row["question"], prompt_template))["input_ids"])
        ids, loss, info = list(prompt), [0] * len(prompt), [0] * len(prompt)
        text = []
        for seg in _segments(row, dps):
            if isinstance(seg, str):
                t = tokenizer.encode(seg, add_special_tokens=False)
                ids += t
                loss += [1] * len(t)
                info += [0] * len(t)
                text.append(seg)
            else:
                t = information_ids(tokenizer, seg, info_template)
                ids += t
                loss += [0] * len(t)
                info += [1] * len(t)
                text.append(info_template.format(format_passages(seg)))
        out.append({"input_ids": ids, "loss_mask": loss, "info_mask": info, "prompt_len": len(prompt),
                    "text": " ".join(text), "hops": row["hops"]})
    return out


def vocab_texts(world, prompt_template: str = TINY_PROMPT) -> list[str]:
    """Every text the tiny model's vocabulary must cover: passages, questions, the prompt, the thoughts and the
    passage formatting."""
    texts = world.texts()
    texts.append(make_prompt("?", prompt_template))
    texts.append(FIRST_THOUGHT)
    texts.append(format_passages([{"contents": "x"}] * 10))
    texts.append(format_passages([{"contents": "title\ntext"}]))
    texts.append(format_passages([{"contents": "a passage ."}]))  # a one-line passage ends in ".)" (one word)
    return texts
