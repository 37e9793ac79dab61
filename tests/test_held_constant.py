"""Retrieval held constant (issue 21): every search gets the gold documents of its hop, whatever the query."""

from __future__ import annotations

import pytest

pytest.importorskip("bm25s")

from routed_lora.env.held_constant import HeldConstantRetriever  # noqa: E402
from routed_lora.env.retriever import BM25Retriever  # noqa: E402


class Spy:
    """A retriever that records the queries it is asked."""

    def __init__(self, base):
        self.base, self.asked = base, []

    def search(self, queries, topk=3):
        self.asked += list(queries)
        return self.base.search(queries, topk=topk)


@pytest.fixture(scope="module")
def world():
    from routed_lora.env.conflict_world import build_conflict_world

    return build_conflict_world(seed=0, n_first=6, n_last=6, n_people=30, n_countries=3, n_cities=6, n_companies=5)


def test_gold_documents_whatever_the_query(world):
    spy = Spy(BM25Retriever(world.passages))
    rows = [next(r for r in world.test if r["hops"] == 2), next(r for r in world.test if r["hops"] == 1)]
    bound = HeldConstantRetriever(spy).bind(rows)
    # rollout 0 searches twice (hops 0 and 1), rollout 1 three times (past its one-hop plan: its last hop again)
    got = bound.search_rollouts([0, 1, 0, 1, 1], ["nonsense", "", "zzz zzz", "x", "y"], [0, 0, 1, 1, 2], topk=3)
    assert [d[0]["contents"] for d in got] == [rows[0]["plan"][0]["passage"], rows[1]["plan"][0]["passage"],
                                               rows[0]["plan"][1]["passage"], rows[1]["plan"][0]["passage"],
                                               rows[1]["plan"][0]["passage"]]
    assert all(len(d) == 3 for d in got)
    # only the scripted queries reach the base retriever (each once: cached), never the model's
    assert sorted(set(spy.asked)) == sorted({rows[0]["plan"][0]["query"], rows[0]["plan"][1]["query"],
                                             rows[1]["plan"][0]["query"]})
    assert len(spy.asked) == 3
    # the documents are the retriever's own top-k for the scripted query (the expert trajectories' documents)
    assert got[2] == spy.base.search([rows[0]["plan"][1]["query"]], topk=3)[0]


def test_bad_use_is_refused(world):
    h = HeldConstantRetriever(BM25Retriever(world.passages))
    with pytest.raises(ValueError, match=r"row 1 .* no scripted search plan"):
        h.bind([world.test[0], {"question": "who?", "golden_answers": ["x"]}])
    with pytest.raises(TypeError, match="answers per question"):
        h.search(["q"])
    b = h.bind(world.test[:2])
    with pytest.raises(IndexError, match="rollout index 2: this batch has 2 rows"):
        b.search_rollouts([2], ["q"], [0])
    with pytest.raises(ValueError, match="one of each per search"):
        b.search_rollouts([0, 1], ["q"], [0, 0])


def test_evaluate_em_binds_each_batch(world, tmp_path):
    """Through the real rollout loop: an untrained model writes arbitrary queries, yet every information block it
    reads holds the gold passage of its hop, and the base retriever sees only scripted queries."""
    import torch

    from routed_lora.env.tokenizer import build_tiny_model, build_tokenizer
    from routed_lora.env.trajectories import vocab_texts
    from routed_lora.grpo.evaluate import evaluate_em

    tok = build_tokenizer(vocab_texts(world))
    model = build_tiny_model(tok, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, seed=0)
    # make the model search: +30 on the logit of the token that should follow the last input token, so each
    # rollout writes "<search> <a word> </search>", reads the block, and searches again until max_turns
    s_open, s_close = tok.convert_tokens_to_ids("<search>"), tok.convert_tokens_to_ids("</search>")
    word = tok.convert_tokens_to_ids("born")
    last = {}

    def pre(mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        last["ids"] = ids[:, -1]

    def post(mod, args, out):
        nxt = torch.full_like(last["ids"], s_open)
        nxt[last["ids"] == s_open] = word
        nxt[last["ids"] == word] = s_close
        out[:, -1].scatter_add_(1, nxt[:, None], torch.full((len(nxt), 1), 30.0))
        return out

    model.register_forward_pre_hook(pre, with_kwargs=True)
    model.lm_head.register_forward_hook(post)
    spy = Spy(BM25Retriever(world.passages))
    h = HeldConstantRetriever(spy)
    rows = world.test[:6]
    plain_spy = Spy(BM25Retriever(world.passages))
    ev_plain = evaluate_em(model, tok, rows, plain_spy, samples=2, greedy=True, max_turns=2, max_new_tokens=12,
                           batch_size=4)
    ev = evaluate_em(model, tok, rows, h, samples=2, greedy=True, max_turns=2, max_new_tokens=12, batch_size=4)
    scripted = {s["query"] for r in rows for s in r["plan"]}
    assert set(spy.asked) <= scripted and spy.asked
    assert set(plain_spy.asked) == {"born"}  # what the model wrote, which the held-constant run never searched
    assert ev["tool_calls_greedy"] == pytest.approx(2) and h.calls > 0
    assert h.calls == round(ev["tool_calls_greedy"] * len(rows) + ev["tool_calls_sampled"] * len(rows) * 2)
    assert ev["n/all"] == ev_plain["n/all"] == 6
