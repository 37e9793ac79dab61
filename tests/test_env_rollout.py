import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from routed_lora.env.data import make_prompt
from routed_lora.env.retriever import BM25Retriever
from routed_lora.env.rollout import collate, generate_rollouts, information_ids
from routed_lora.env.tokenizer import build_tiny_model, build_tokenizer, tag_ids
from routed_lora.env.trajectories import build_trajectories, vocab_texts
from routed_lora.env.world import build_world


@pytest.fixture(scope="module")
def env():
    torch.set_num_threads(1)
    world = build_world(seed=1, n_first=6, n_last=6, n_people=30, n_cities=8, n_companies=6, n_countries=3)
    retriever = BM25Retriever(world.passages)
    tok = build_tokenizer(vocab_texts(world))
    model = build_tiny_model(tok, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64).eval()
    return world, retriever, tok, model


class Script(LogitsProcessor):
    """Forces each row to write a scripted turn: the k-th turn (k = information blocks so far) is script[k]."""

    def __init__(self, tok, scripts):
        self.tok, self.scripts, self.info_close = tok, scripts, tok.convert_tokens_to_ids("</information>")

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, -1e9)
        for b, row in enumerate(input_ids.tolist()):
            # rows are left-padded; find the script of this row by its prompt (its first real tokens)
            real = [t for t in row if t != self.tok.pad_token_id]
            (key,) = [k for k in self.scripts if tuple(real[: len(k)]) == k]
            script = self.scripts[key]
            closes = [i for i, t in enumerate(real) if t == self.info_close]
            turn = len(closes)
            start = closes[-1] + 1 if closes else len(key)
            pos = len(real) - start
            ids = script[min(turn, len(script) - 1)]
            out[b, ids[min(pos, len(ids) - 1)]] = 0.0
        return out


def test_splicing_masks_and_stops(env):
    world, retriever, tok, model = env
    qs = [q for q in world.train if q["hops"] == 2][:3]
    prompts = [make_prompt(q["question"]) for q in qs]
    enc = [tok(p)["input_ids"] for p in prompts]
    scripts = {}
    for q, e in zip(qs, enc):
        p0, p1 = q["plan"]
        turns = [f"<think> i need to search </think> <search> {p0['query']} </search> junk junk",
                 f"<think> {p0['fact']} </think> <search> {p1['query']} </search>",
                 f"<answer> {q['golden_answers'][0]} </answer> after the answer"]
        scripts[tuple(e)] = [tok.encode(t, add_special_tokens=False) for t in turns]
    proc = Script(tok, scripts)
    rolls = generate_rollouts(model, tok, prompts, retriever, max_turns=4, max_new_tokens=40, do_sample=False,
                              return_logprobs=True, generation_kwargs={"logits_processor": LogitsProcessorList([proc])},
                              route_fn=lambda ids: [i % 2 for i in range(len(ids))])
    tags = tag_ids(tok)
    for q, ro in zip(qs, rolls):
        assert ro.finish_reason == "answer" and ro.num_tool_calls == 2
        assert ro.queries == [q["plan"][0]["query"], q["plan"][1]["query"]]
        assert ro.completion_ids[-1] == tags["</answer>"]  # cut at the first stop token
        assert len(ro.info_mask) == len(ro.completion_ids) == len(ro.logprobs)
        # the info blocks are exactly the retriever's passages as ids, masked; nothing else is masked
        expect_blocks = [information_ids(tok, retriever.search([s["query"]], 3)[0]) for s in q["plan"]]
        blocks, cur = [], []
        for t, m in zip(ro.completion_ids, ro.info_mask):
            if m:
                cur.append(t)
            elif cur:
                blocks.append(cur)
                cur = []
        assert blocks == expect_blocks
        assert all(b[0] == tags["<information>"] and b[-1] == tags["</information>"] for b in blocks)
        # sampled tokens are kept as they are: the scripted turns, each cut right after its stop tag
        sampled = [t for t, m in zip(ro.completion_ids, ro.info_mask) if not m]
        want = tok.encode(f"<think> i need to search </think> <search> {q['plan'][0]['query']} </search> "
                          f"<think> {q['plan'][0]['fact']} </think> <search> {q['plan'][1]['query']} </search> "
                          f"<answer> {q['golden_answers'][0]} </answer>", add_special_tokens=False)
        assert sampled == want
        assert all(lp == 0.0 for lp, m in zip(ro.logprobs, ro.info_mask) if m)
        assert ro.routes == [i % 2 for i in range(len(ro.ids))]
        assert q["golden_answers"][0] in ro.text.split("<answer>")[-1]
    # the expert trajectory built offline splices the same information blocks
    traj = build_trajectories(tok, qs, retriever)
    for ro, tr in zip(rolls, traj):
        assert tr["input_ids"][: tr["prompt_len"]] == ro.prompt_ids
        info = [t for t, m in zip(tr["input_ids"], tr["info_mask"]) if m]
        assert info == [t for t, m in zip(ro.completion_ids, ro.info_mask) if m]
        assert all(lm == 1 - im for lm, im in zip(tr["loss_mask"][tr["prompt_len"]:], tr["info_mask"][tr["prompt_len"]:]))


def test_max_turns_and_collate(env):
    world, retriever, tok, model = env
    q = world.train[0]
    prompt = make_prompt(q["question"])
    enc = tok(prompt)["input_ids"]
    loop = tok.encode(f"<search> {q['plan'][0]['query']} </search>", add_special_tokens=False)
    proc = Script(tok, {tuple(enc): [loop]})
    rolls = generate_rollouts(model, tok, [prompt], retriever, max_turns=2, max_new_tokens=20, do_sample=False,
                              generation_kwargs={"logits_processor": LogitsProcessorList([proc])})
    ro = rolls[0]
    assert ro.num_tool_calls == 2 and ro.finish_reason == "max_turns"
    assert ro.completion_ids.count(tok.convert_tokens_to_ids("</search>")) == 3
    assert ro.logprobs is None
    b = collate(rolls, tok.pad_token_id)
    assert b["loss_mask"].sum().item() == len(ro.completion_ids) - sum(ro.info_mask)
    assert b["loss_mask"][0, : len(ro.prompt_ids)].sum() == 0
    assert "old_logprobs" not in b

    # a length cap ends the rollout with "length"
    short = generate_rollouts(model, tok, [prompt], retriever, max_turns=2, max_new_tokens=20, do_sample=False,
                              max_length=len(enc) + 10,
                              generation_kwargs={"logits_processor": LogitsProcessorList([proc])})[0]
    assert short.finish_reason == "length" and len(short.ids) <= len(enc) + 10


def test_sampled_logprobs_match_teacher_forcing(env):
    world, retriever, tok, model = env
    torch.manual_seed(0)
    prompts = [make_prompt(q["question"]) for q in world.train[:6]] * 2
    rolls = generate_rollouts(model, tok, prompts, retriever, max_turns=2, max_new_tokens=12, do_sample=True,
                              temperature=0.7, return_logprobs=True)
    assert any(len(r.completion_ids) > 3 for r in rolls)
    b = collate(rolls, tok.pad_token_id)
    assert b["loss_mask"].shape == b["input_ids"].shape == b["old_logprobs"].shape
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float() / 0.7
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)
    mask = b["loss_mask"][:, 1:]
    err = ((lp - b["old_logprobs"][:, 1:]).abs() * mask).max().item()
    assert err < 1e-4, f"generation log-probs differ from teacher forcing by {err}"
    assert (b["info_mask"] * b["loss_mask"]).sum() == 0
    assert (b["loss_mask"] * (1 - b["attention_mask"])).sum() == 0


def test_rollout_through_the_http_server_matches_in_process(env):
    """The HTTP path end to end: the same rollouts with the BM25 index behind `retriever serve`'s server."""
    from routed_lora.env.retriever import HTTPRetriever, RetrievalServer

    world, retriever, tok, model = env
    prompts = [make_prompt(q["question"]) for q in world.train[:4]]
    scripts = {}
    for q, p in zip(world.train[:4], prompts):
        turns = [f"<search> {q['plan'][0]['query']} </search>", f"<answer> {q['plan'][0]['object']} </answer>"]
        scripts[tuple(tok(p)["input_ids"])] = [tok.encode(t, add_special_tokens=False) for t in turns]
    kw = dict(max_turns=2, max_new_tokens=16, do_sample=False,
              generation_kwargs={"logits_processor": LogitsProcessorList([Script(tok, scripts)])})
    server = RetrievalServer(retriever, "127.0.0.1", 0)
    server.start()
    try:
        via_http = generate_rollouts(model, tok, prompts, HTTPRetriever(server.url, timeout=10), **kw)
    finally:
        server.stop()
    local = generate_rollouts(model, tok, prompts, retriever, **kw)
    assert [r.completion_ids for r in via_http] == [r.completion_ids for r in local]
    assert [r.info_mask for r in via_http] == [r.info_mask for r in local]
    assert all(r.num_tool_calls == 1 and r.finish_reason == "answer" for r in via_http)


class TextScript(LogitsProcessor):
    """Like Script, for a tokenizer whose tags are several tokens: the turn is found in the decoded text."""

    def __init__(self, tok, scripts):
        self.tok, self.scripts = tok, scripts

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, -1e9)
        for b, row in enumerate(input_ids.tolist()):
            real = [t for t in row if t != self.tok.pad_token_id]
            (key,) = [k for k in self.scripts if tuple(real[: len(k)]) == k]
            comp = real[len(key):]
            turn, start = 0, 0
            for i in range(len(comp)):
                if self.tok.decode(comp[: i + 1]).count("</information>") > turn:
                    turn, start = turn + 1, i + 1
            ids = self.scripts[key][min(turn, len(self.scripts[key]) - 1)]
            out[b, ids[min(len(comp) - start, len(ids) - 1)]] = 0.0
        return out


def test_multi_token_tags_use_stop_strings(env):
    """A byte-level BPE tokenizer (tags are several tokens, as for real models): stop strings, text cuts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    world, retriever, _, _ = env
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(vocab_texts(world), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="</s>", padding_side="left")
    assert len(tok.encode("</search>", add_special_tokens=False)) > 1
    model = build_tiny_model(tok, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64).eval()
    qs = [q for q in world.train if q["hops"] == 2][:2]
    prompts = [make_prompt(q["question"]) for q in qs]
    scripts = {}
    for q, p in zip(qs, prompts):
        turns = [f"<think>go</think><search> {q['plan'][0]['query']} </search> junk",
                 f"<search> {q['plan'][1]['query']} </search>", f"<answer> {q['golden_answers'][0]} </answer> after"]
        scripts[tuple(tok(p)["input_ids"])] = [tok.encode(x, add_special_tokens=False) for x in turns]
    rolls = generate_rollouts(model, tok, prompts, retriever, max_turns=3, max_new_tokens=120, do_sample=False,
                              return_logprobs=True,
                              generation_kwargs={"logits_processor": LogitsProcessorList([TextScript(tok, scripts)])})
    for q, ro in zip(qs, rolls):
        assert ro.finish_reason == "answer" and ro.num_tool_calls == 2
        assert ro.queries == [q["plan"][0]["query"], q["plan"][1]["query"]]
        assert ro.text.endswith(f"<answer> {q['golden_answers'][0]} </answer>")  # cut at the stop string
        assert "junk" not in ro.text
        assert len(ro.logprobs) == len(ro.info_mask) == len(ro.completion_ids)
        blocks, cur = [], []
        for tid, m in zip(ro.completion_ids + [None], ro.info_mask + [0]):
            if m:
                cur.append(tid)
            elif cur:
                blocks.append(cur)
                cur = []
        assert blocks == [information_ids(tok, retriever.search([s["query"]], 3)[0]) for s in q["plan"]]
