"""Classify the greedy held-out failures of a model on a conflict world by the step that went wrong (docs/study.md).

Usage: python scripts/conflict_failure_modes.py WORLD_DIR MODEL_DIR
"""
import sys, torch
from routed_lora.grpo.trainer import load_model_and_tokenizer
from routed_lora.env.retriever import BM25Retriever
from routed_lora.env.data import load_qa, make_prompt, TINY_PROMPT
from routed_lora.env.rollout import generate_rollouts
from routed_lora.env.reward import extract_answer, exact_match
from routed_lora.demo import balanced_rows
torch.set_num_threads(1)
w, m = sys.argv[1], sys.argv[2]
model, tok = load_model_and_tokenizer(m); model.eval()
ret = BM25Retriever(f"{w}/corpus.jsonl")
rows = balanced_rows(load_qa(f"{w}/test.jsonl"), 494)
with torch.no_grad():
    ro = generate_rollouts(model, tok, [make_prompt(r["question"], TINY_PROMPT) for r in rows], ret, do_sample=False, max_new_tokens=48, max_turns=4)
from collections import Counter
c = {1: Counter(), 2: Counter()}
for r, x in zip(rows, ro):
    ok = exact_match(extract_answer(x.text), r["golden_answers"])
    h = r["hops"]
    q = [q.strip() for q in x.queries]
    plan = [p["query"] for p in r["plan"]]
    if ok: c[h]["correct"] += 1; continue
    if not q or q[0] != plan[0]: c[h]["wrong first query (cipher)"] += 1
    elif h == 2 and len(q) < 2: c[h]["answered after one search"] += 1
    elif h == 2 and q[1] != plan[1]:
        obj = r["plan"][0]["object"]
        c[h]["second query: natural name copied" if q[1].split()[0] == obj else "second query: wrong code"] += 1
    else: c[h]["queries right, answer wrong (reasoning)"] += 1
for h in c: print(h, dict(c[h]), sum(c[h].values()))
