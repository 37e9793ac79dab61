"""Tags added to the vocabulary as special tokens (as the public DART code does) must reach the reward."""

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from routed_lora.env import TAGS
from routed_lora.env.data import make_prompt
from routed_lora.env.retriever import BM25Retriever
from routed_lora.env.reward import compute_score
from routed_lora.env.rollout import completion_text, generate_rollouts
from routed_lora.env.tokenizer import build_tiny_model, build_tokenizer
from routed_lora.env.trajectories import vocab_texts
from routed_lora.env.world import build_world


class Turns(LogitsProcessor):
    """Row b writes turns[b][k] after its k-th information block (greedy, forced)."""

    def __init__(self, tok, prompts, turns):
        self.tok, self.prompts, self.turns = tok, prompts, turns
        self.info_close = tok.convert_tokens_to_ids("</information>")

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, -1e9)
        for b, row in enumerate(input_ids.tolist()):
            real = [t for t in row if t != self.tok.pad_token_id]
            (k,) = [i for i, p in enumerate(self.prompts) if tuple(real[: len(p)]) == p]
            closes = [i for i, t in enumerate(real) if t == self.info_close]
            start = closes[-1] + 1 if closes else len(self.prompts[k])
            ids = self.turns[k][min(len(closes), len(self.turns[k]) - 1)]
            out[b, ids[min(len(real) - start, len(ids) - 1)]] = 0.0
        return out


def test_reward_sees_tags_added_as_special_tokens(one_thread):
    world = build_world(seed=1, n_first=6, n_last=6, n_people=30, n_cities=8, n_companies=6, n_countries=3)
    retriever = BM25Retriever(world.passages)
    tok = build_tokenizer(vocab_texts(world))
    tok.add_special_tokens({"additional_special_tokens": list(TAGS)})
    assert set(TAGS) <= set(tok.all_special_tokens)
    ids = tok.encode("<answer> x </answer>", add_special_tokens=False)
    assert "<answer>" not in tok.decode(ids, skip_special_tokens=True)  # the bug's cause, on this tokenizer
    model = build_tiny_model(tok, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64).eval()
    qs = world.train[:3]
    prompts = [make_prompt(q["question"]) for q in qs]
    enc = [tuple(tok(p)["input_ids"]) for p in prompts]
    turns = [[tok.encode(f"<search> {q['plan'][0]['query']} </search>", add_special_tokens=False),
              tok.encode(f"<think> ok </think> <answer> {q['golden_answers'][0]} </answer>", add_special_tokens=False)]
             for q in qs]
    rolls = generate_rollouts(model, tok, prompts, retriever, max_turns=2, max_new_tokens=24, do_sample=False,
                              generation_kwargs={"logits_processor": LogitsProcessorList([Turns(tok, enc, turns)])})
    for q, ro in zip(qs, rolls):
        assert ro.finish_reason == "answer" and ro.num_tool_calls == 1
        assert ro.queries == [q["plan"][0]["query"]]
        assert "<answer>" in ro.text and "<information>" in ro.text
        assert compute_score(ro.text, q["golden_answers"]) == 1.0
        assert compute_score(ro.text, q["golden_answers"], format_score=0.1) == 1.0


def test_completion_text_drops_only_non_tag_special_tokens():
    tok = build_tokenizer(["alice went home"])
    tok.add_special_tokens({"additional_special_tokens": list(TAGS)})
    ids = tok.encode("<answer> alice </answer>", add_special_tokens=False) + [tok.eos_token_id, tok.pad_token_id]
    assert completion_text(tok, ids) == "<answer> alice </answer>"
