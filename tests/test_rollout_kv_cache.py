"""Multi-turn rollouts keep one KV cache across turns: every transcript token is fed once, and the log-probs and
routes of generation equal the teacher-forced ones the GRPO trainer computes (DART routing, non-zero adapters)."""

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from routed_lora.env.data import make_prompt
from routed_lora.env.retriever import BM25Retriever
from routed_lora.env.rollout import collate, generate_rollouts
from routed_lora.env.tokenizer import build_tiny_model, build_tokenizer
from routed_lora.env.trajectories import vocab_texts
from routed_lora.env.world import build_world


class Nudge(LogitsProcessor):
    """Adds +12 to the logit of the scripted next token (after k information blocks, row b writes turns[b][k]),
    so sampled rollouts mostly follow the script (two searches, then an answer) but still sample."""

    def __init__(self, tok, prompts, turns, bonus=12.0):
        self.tok, self.prompts, self.turns, self.bonus = tok, prompts, turns, bonus
        self.close = tok.convert_tokens_to_ids("</information>")

    def __call__(self, input_ids, scores):
        out = scores.clone()
        for b, row in enumerate(input_ids.tolist()):
            real = [t for t in row if t != self.tok.pad_token_id]
            (k,) = [i for i, p in enumerate(self.prompts) if tuple(real[: len(p)]) == p]
            closes = [i for i, t in enumerate(real) if t == self.close]
            start = closes[-1] + 1 if closes else len(self.prompts[k])
            ids = self.turns[k][min(len(closes), len(self.turns[k]) - 1)]
            out[b, ids[min(len(real) - start, len(ids) - 1)]] += self.bonus
        return out


@pytest.fixture(scope="module")
def env():
    world = build_world(seed=1, n_first=6, n_last=6, n_people=30, n_cities=8, n_companies=6, n_countries=3)
    retriever = BM25Retriever(world.passages)
    tok = build_tokenizer(vocab_texts(world))
    return world, retriever, tok


def _dart(tok, seed=0):
    from routed_lora.grpo.trainer import GRPOConfig, build_policy, routed_layers

    torch.manual_seed(seed)
    model = build_tiny_model(tok, hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64, seed=seed).eval()
    cfg = GRPOConfig(mode="dart", r=4, lora_alpha=8.0, target_modules=("q_proj", "v_proj", "o_proj", "down_proj"))
    model, router = build_policy(model, tok, cfg)
    with torch.no_grad():
        for layer in routed_layers(model):  # adapters that differ, so a misroute changes the log-probs
            layer.lora_B.normal_(0.0, 0.3)
    return model, router


def test_multi_turn_logprobs_and_routes_equal_teacher_forcing(env, one_thread):
    from routed_lora.grpo.logprobs import routes_for, token_logprobs
    from routed_lora.grpo.trainer import routed_layers

    world, retriever, tok = env
    model, router = _dart(tok)
    qs = [q for q in world.train if q["hops"] == 2][:4]
    prompts = [make_prompt(q["question"]) for q in qs] * 2  # 8 rows, prompts of different lengths
    enc = [tuple(tok(p)["input_ids"]) for p in prompts[:4]]
    turns = [[tok.encode(f"<think> look </think> <search> {q['plan'][0]['query']} </search>", add_special_tokens=False),
              tok.encode(f"<search> {q['plan'][1]['query']} </search>", add_special_tokens=False),
              tok.encode(f"<answer> {q['golden_answers'][0]} </answer>", add_special_tokens=False)] for q in qs]
    # generation-time routes, read from a routed layer at every forward call, with the call's mask
    seen = []
    layer = routed_layers(model)[0]
    calls = []
    h1 = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["attention_mask"]), with_kwargs=True)
    h2 = layer.register_forward_pre_hook(lambda m, a: seen.append(m._routes.clone()))
    meters = {}
    torch.manual_seed(5)
    try:
        rolls = generate_rollouts(model, tok, prompts, retriever, max_turns=3, max_new_tokens=14, do_sample=True,
                                  temperature=0.7, return_logprobs=True, meters=meters,
                                  generation_kwargs={"logits_processor": LogitsProcessorList([Nudge(tok, enc, turns)])})
    finally:
        h1.remove()
        h2.remove()
    tools = [r.num_tool_calls for r in rolls]
    assert sum(t >= 2 for t in tools) >= 4, tools  # multi-turn for most rows
    assert any(r.finish_reason == "answer" for r in rolls)

    b = collate(rolls, tok.pad_token_id)
    routes = routes_for(b["input_ids"], b["attention_mask"], router=router)
    with torch.no_grad():
        lp, _ = token_logprobs(model, b["input_ids"], b["attention_mask"], routes=routes, temperature=0.7)
    mask = b["loss_mask"][:, 1:].bool()
    err = (lp - b["old_logprobs"][:, 1:])[mask].abs().max().item()
    assert err <= 1e-5, f"generation vs teacher-forced log-probs differ by {err}"
    assert (routes[:, :-1][mask] == 1).any() and (routes[:, :-1][mask] == 0).any()  # both adapters wrote tokens

    # every fed token once (all but each transcript's last token: the stop tag or the budget's last sample), and
    # the routes used at generation equal the teacher-forced ones. Finished rows leave the cache in order, so the
    # rows still there after a turn are those whose transcript has tokens not yet fed.
    fed_per_row = {i: [] for i in range(len(rolls))}
    alive = list(range(len(rolls)))
    for mask_full, r in zip(calls, seen):
        B = mask_full.shape[0]
        if B < len(alive):
            alive = [i for i in alive if len(fed_per_row[i]) < len(rolls[i].ids) - 1]
        assert len(alive) == B
        rr = r.reshape(B, -1)
        m = mask_full[:, -rr.shape[1]:].bool()
        for row, i in enumerate(alive):
            fed_per_row[i] += rr[row][m[row]].tolist()
    for i, ro in enumerate(rolls):
        assert len(fed_per_row[i]) == len(ro.ids) - 1, f"row {i}: {len(fed_per_row[i])} tokens fed"
        want = routes[i, : len(ro.ids) - 1].tolist()
        assert fed_per_row[i] == want, f"row {i}: generation routes differ from the teacher-forced ones"
    assert meters["fed_tokens"] == sum(len(r.ids) - 1 for r in rolls)  # no row was cut by max_length here


def test_greedy_rollouts_do_not_depend_on_batch_company(env, one_thread):
    """The same prompt decoded alone or in a batch with rows that stop earlier or later (holes in the shared
    cache) gives the same greedy transcript and the same log-probs (to float rounding)."""
    world, retriever, tok = env
    model, _ = _dart(tok, seed=1)
    qs = world.train[:5]
    prompts = [make_prompt(q["question"]) for q in qs]
    enc = [tuple(tok(p)["input_ids"]) for p in prompts]
    turns = [[tok.encode(f"<search> {q['plan'][0]['query']} </search>", add_special_tokens=False),
              tok.encode(f"<answer> {q['golden_answers'][0]} </answer>", add_special_tokens=False)] for q in qs]
    turns[1] = turns[1][1:]  # row 1 answers at once: it leaves the batch after the first turn
    kw = dict(max_turns=2, max_new_tokens=12, do_sample=False, return_logprobs=True)
    proc = LogitsProcessorList([Nudge(tok, enc, turns, bonus=3.0)])
    batch = generate_rollouts(model, tok, prompts, retriever, generation_kwargs={"logits_processor": proc}, **kw)
    for i in range(len(prompts)):
        alone = generate_rollouts(model, tok, [prompts[i]], retriever, generation_kwargs={"logits_processor": proc},
                                  **kw)[0]
        assert alone.completion_ids == batch[i].completion_ids
        assert max(abs(a - c) for a, c in zip(alone.logprobs, batch[i].logprobs)) <= 1e-5


def test_unsupported_generation_kwargs_are_refused(env):
    world, retriever, tok = env
    model = build_tiny_model(tok, hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32)
    with pytest.raises(ValueError, match="generation_kwargs"):
        generate_rollouts(model, tok, ["hi"], retriever, generation_kwargs={"top_k": 5})
