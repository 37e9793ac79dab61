"""Routing on a real byte-level BPE vocabulary (SmolLM2-135M-Instruct, 49152 tokens), as regression guards.

On this tokenizer every Search-R1 tag is several ordinary tokens (``<search>`` is ``<``, ``search``, ``>``) and the
pieces merge with their neighbours: ``?<``, ``)<``, ``><`` (the end of one tag and the start of the next),
``>"``, ``>.``, ``">``, ``>>``. The tag router (text mode) must still give every position the route DESIGN.md §2
defines, here checked against routes computed independently from the tokenizer's character offsets, through
the chat template; a full forward and the same tokens fed one at a time through the KV cache must route
identically (and give the same logits, to the plain model's own cached-vs-full difference); all-tool routes must
equal PEFT with the saved tool adapter. Tags added as special tokens are covered too (the router switches to
token mode; the reward still sees the tags).

All tests here need the real model (marker ``smollm2``; skipped with the install commands as the reason).
Figures measured on this machine are printed (``pytest -s``).
"""

from __future__ import annotations

import copy
import inspect
import re

import pytest
import torch

from _smollm2 import smollm2, smollm2_dir  # noqa: F401  (fixtures)

import routed_lora as rl
from routed_lora.env.data import SEARCH_R1_PROMPT, make_prompt
from routed_lora.hf import routed_layers

pytestmark = pytest.mark.smollm2

OPEN, CLOSE = "<search>", "</search>"
QUESTION = "Where was Ada Ito born?"
# An assistant turn with the tags merged into their neighbours, after newlines and back to back.
ANSWER = (
    "<think>I need her birthplace.</think>\n"
    "<search>Ada Ito birthplace</search>\n\n"
    "<information>Doc 1(Title: \"Ada Ito\") Ada Ito was born in Paris.\n</information>\n"
    "<think>Sure?</think>?<search>\"Ada Ito\" born?</search><search>Paris (city)</search>."
    "<information>Doc 1(Title: Paris) <a href=\"p\">Paris</a> is a city.\n</information>"
    "(<search>x > y</search>)<search>>a</search>>"
    "<answer>Paris</answer>"
)
MERGED_PIECES = ("?<", ")<", "><", '>"', ">.", '">', ">>")
# The same cases in 73 tokens, for the tests that run the model (a decoding step costs ~0.1-1 s on 2 busy cores).
SHORT_ANSWER = (
    "<think>ok</think>\n<search>Ada Ito</search>?<search>\"Ada\"</search><search>x</search>."
    "<information>Doc 1(Title: P) <a href=\"p\">Paris</a>\n</information>(<search>>a</search>>)<answer>Paris</answer>"
)
SHORT_MERGED = ("?<", ")<", "><", '>"', ".<", '">', ">>")


def _messages(question=QUESTION, answer=ANSWER, *, search_r1=True):
    """The chat: the user turn (Search-R1's instruction prompt, which itself holds the tags, or the bare question)
    and the assistant turn ``answer`` (none: ``None``)."""
    msgs = [{"role": "user", "content": make_prompt(question, SEARCH_R1_PROMPT) if search_r1 else question}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def chat_text_ids_offsets(tok, msgs, *, add_generation_prompt=False):
    """The chat-templated text, its ids (as ``apply_chat_template`` gives them) and each token's character span."""
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=add_generation_prompt,
                                       return_dict=True)["input_ids"])
    assert enc["input_ids"] == ids  # the template's own tokenisation is the text's
    return text, ids, [tuple(o) for o in enc["offset_mapping"]]


def offset_routes(text, offsets, *, tool=1, default=0):
    """The routes of DESIGN.md §2 computed from characters, independently of the router: a tag counts at the token
    holding its last character; a position is ``tool`` when the last tag completed at or before its token's end
    is ``<search>``."""
    events = sorted([(m.end(), True) for m in re.finditer(re.escape(OPEN), text)]
                    + [(m.end(), False) for m in re.finditer(re.escape(CLOSE), text)])
    out = []
    for _, end in offsets:
        state = False
        for e, is_open in events:
            if e <= end:
                state = is_open
        out.append(tool if state else default)
    return out


def _router(tok):
    return rl.TagRouter(tok, adapters=("reasoning", "tool"))


def _routed_copy(model, tok, *, seed=0, scale=0.02):
    """A deep copy patched with two adapters and random LoRA B (so the adapters change the logits)."""
    m = rl.apply_routed_lora(copy.deepcopy(model), r=8, lora_alpha=16, router=_router(tok))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in routed_layers(m):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * (1.0 / layer.lora_A.shape[-1] ** 0.5))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)
    return m.eval()


class _Recorder:
    """The routes every call of one routed layer used."""

    def __init__(self, layer):
        self.calls = []
        self.handle = layer.register_forward_pre_hook(lambda m, args: self.calls.append(m._routes))

    def routes(self):
        self.handle.remove()
        return torch.cat([r if r.dim() == 2 else r.view(-1, 1) for r in self.calls], dim=1).long()


def _cache_key(model):
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


CHUNKS = (1, 1, 2, 1, 3, 1, 1, 5, 1, 2)  # new tokens per cached call, cycled (pieces of a tag cross call borders)


@torch.no_grad()
def full_and_cached(model, ids, prefix):
    """(full-forward logits, the same tokens through the KV cache: ``prefix`` tokens in one call, as a prompt, then
    the rest in calls of :data:`CHUNKS` tokens), both (1, T, V) float32."""
    full = model(ids).logits
    key = _cache_key(model)
    out = model(ids[:, :prefix], use_cache=True)
    steps, cache = [out.logits], getattr(out, key)
    t, k = prefix, 0
    while t < ids.shape[1]:
        n = CHUNKS[k % len(CHUNKS)]
        out = model(input_ids=ids[:, t:t + n], use_cache=True, **{key: cache})
        steps.append(out.logits)
        cache = getattr(out, key)
        t, k = t + n, k + 1
    return full, torch.cat(steps, 1)


# ------------------------------------------------------------------------------------------------ routes ---
def test_the_tokenizer_splits_and_merges_tags(smollm2):
    _, tok = smollm2
    assert [tok.decode([i]) for i in tok.encode(OPEN, add_special_tokens=False)] == ["<", "search", ">"]
    assert [tok.decode([i]) for i in tok.encode(CLOSE, add_special_tokens=False)] == ["</", "search", ">"]
    _, ids, _ = chat_text_ids_offsets(tok, _messages())
    pieces = {tok.decode([i]) for i in ids}
    missing = [p for p in MERGED_PIECES if p not in pieces]
    assert not missing, f"the test text no longer exercises merged pieces {missing}"
    short = {tok.decode([i]) for i in tok.encode(SHORT_ANSWER, add_special_tokens=False)}
    assert not [p for p in SHORT_MERGED if p not in short]
    assert _router(tok).mode == "text"


@pytest.mark.parametrize("case", ["answer", "generation-prompt", "no-tags", "open-at-end", "system"])
def test_routes_equal_character_offsets_through_the_chat_template(smollm2, case):
    _, tok = smollm2
    msgs = {"answer": _messages(), "generation-prompt": _messages(answer=None),
            "no-tags": [{"role": "user", "content": "What is the capital of France?"}],
            "open-at-end": _messages(answer="<think>hm</think>\n<search>Ada Ito"),
            "system": [{"role": "system", "content": "Use <search>tools</search>."}, *_messages()]}[case]
    text, ids, offsets = chat_text_ids_offsets(tok, msgs, add_generation_prompt=case == "generation-prompt")
    want = offset_routes(text, offsets)
    got = _router(tok)(torch.tensor(ids)).tolist()
    bad = [(i, tok.decode([ids[i]]), got[i], want[i]) for i in range(len(ids)) if got[i] != want[i]]
    print(f"\n[smollm2 routes {case}] {len(ids)} tokens, {sum(want)} tool, {len(bad)} mismatches")
    assert not bad, f"router vs character offsets differ at (position, piece, router, offsets): {bad[:10]}"
    if case == "answer":
        assert sum(want) > 20  # several tool spans, in the prompt and in the answer
    # streaming one token at a time (generation) == the whole sequence at once (training)
    stream = _router(tok).stream(1)
    assert [int(stream.step(torch.tensor([t]))[0]) for t in ids] == got


def test_routes_in_a_left_padded_batch_equal_each_row_alone(smollm2):
    _, tok = smollm2
    rows = [chat_text_ids_offsets(tok, _messages())[1],
            chat_text_ids_offsets(tok, _messages(answer="<search>q</search><answer>x</answer>"))[1]]
    T = max(map(len, rows))
    ids = torch.full((2, T), tok.pad_token_id)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.tensor(r)
        mask[b, T - len(r):] = 1
    routes = _router(tok)(ids, mask)
    for b, r in enumerate(rows):
        assert routes[b, T - len(r):].tolist() == _router(tok)(torch.tensor(r)).tolist()
        assert (routes[b, :T - len(r)] == 0).all()


# ------------------------------------------------------------------------------------ the model, routed ---
@pytest.mark.slow
def test_full_forward_and_kv_cache_route_identically(smollm2):
    model, tok = smollm2
    _, ids_l, _ = chat_text_ids_offsets(tok, _messages(answer=SHORT_ANSWER, search_r1=False))
    _, prompt_l, _ = chat_text_ids_offsets(tok, _messages(answer=None, search_r1=False), add_generation_prompt=True)
    assert ids_l[:len(prompt_l)] == prompt_l
    ids = torch.tensor([ids_l])
    routed = _routed_copy(model, tok)
    want = _router(tok)(ids)
    assert 0 < int(want.sum()) < ids.numel()
    layer = routed_layers(routed)[0][1]
    rec = _Recorder(layer)
    full, cached = full_and_cached(routed, ids, len(prompt_l))
    used = rec.routes()  # routes of: the full pass (T), then the prompt, then each cached call
    T = ids.shape[1]
    assert torch.equal(used[:, :T], want), "full forward: routes differ from the router's"
    assert torch.equal(used[:, T:], want), "KV-cache steps: routes differ from the router's"
    plain_full, plain_cached = full_and_cached(model, ids, len(prompt_l))
    d_routed = (full - cached).abs().max().item()
    d_plain = (plain_full - plain_cached).abs().max().item()
    with torch.no_grad():
        d_adapters = (routed(ids, routes=torch.ones_like(ids)).logits - full).abs().max().item()
    print(f"\n[smollm2 kv-cache] T={T} (prompt {len(prompt_l)} in one call, then calls of {CHUNKS} tokens): "
          f"routed full vs cached max|dlogit| {d_routed:.2e}; plain model {d_plain:.2e}; "
          f"max|logit| {full.abs().max().item():.1f}; all-tool vs routed {d_adapters:.2e}")
    assert d_adapters > 100 * max(d_plain, 1e-6), "the adapters must matter for the check to mean anything"
    # Rounding only: the LoRA terms add their own (measured 1-3x the plain model's difference); a route off by one
    # position changes logits by about d_adapters (~8 here), four orders of magnitude above this bound.
    assert d_routed <= 8 * d_plain + 1e-5, (d_routed, d_plain)


@pytest.mark.slow
def test_all_tool_routes_equal_peft_with_the_tool_adapter(smollm2, tmp_path):
    peft = pytest.importorskip("peft")
    model, tok = smollm2
    _, ids_l, _ = chat_text_ids_offsets(tok, _messages(answer=SHORT_ANSWER, search_r1=False))
    ids = torch.tensor([ids_l])
    routed = _routed_copy(model, tok, seed=3)
    out = rl.save_adapters(routed, tmp_path / "adapters")
    diffs = {}
    for e, name in enumerate(("reasoning", "tool")):
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), out / name).eval()
        with torch.no_grad():
            ref = pm(ids).logits
            got = routed(ids, routes=torch.full_like(ids, e)).logits
        diffs[name] = (got - ref).abs().max().item()
        del pm
    with torch.no_grad():
        base = model(ids).logits
        tagged = routed(ids).logits  # the router's own routes: both adapters used
    d_base = (got - base).abs().max().item()  # got: all-tool routes
    print(f"\n[smollm2 peft] max|routed - PEFT|: reasoning {diffs['reasoning']:.2e}, tool {diffs['tool']:.2e}; "
          f"tool adapter vs backbone {d_base:.2e}")
    assert d_base > 0.1
    assert max(diffs.values()) <= 1e-4, diffs
    assert (tagged - base).abs().max() > 0.1


# -------------------------------------------------------------------------------- tags as special tokens ---
def test_tags_added_as_special_tokens_route_by_id_and_reach_the_reward(smollm2):
    """The other choice (DESIGN.md §5; the public DART code): tags added to the vocabulary. The router picks token
    mode, its routes still equal the character-offset routes, and the reward's text keeps the tags although
    ``decode(skip_special_tokens=True)`` deletes them."""
    from routed_lora.env import TAGS
    from routed_lora.env.reward import compute_score
    from routed_lora.env.rollout import completion_text

    _, tok0 = smollm2
    tok = copy.deepcopy(tok0)
    n0 = len(tok)
    tok.add_special_tokens({"additional_special_tokens": list(TAGS)})
    assert len(tok) == n0 + len(TAGS)
    router = _router(tok)
    assert router.mode == "tokens"
    text, ids, offsets = chat_text_ids_offsets(tok, _messages())
    assert tok.convert_tokens_to_ids(OPEN) in ids
    assert router(torch.tensor(ids)).tolist() == offset_routes(text, offsets)
    answer_ids = tok.encode(ANSWER, add_special_tokens=False) + [tok.eos_token_id]
    assert "<answer>" not in tok.decode(answer_ids, skip_special_tokens=True)
    assert compute_score(completion_text(tok, answer_ids), ["Paris"]) == 1.0
    assert compute_score(completion_text(tok0, tok0.encode(ANSWER, add_special_tokens=False)), ["Paris"]) == 1.0


# ------------------------------------------------------------------- exactness: generate vs teacher forcing ---
class _Script:
    """Forces row b to write ``ids[b]`` (cycled); the raw logits that ``output_logits`` records are untouched."""

    def __init__(self, ids, start):
        self.ids, self.start = ids, start

    def __call__(self, input_ids, scores):
        t = input_ids.shape[1] - self.start
        forced = torch.full_like(scores, float("-inf"))
        for b, ids in enumerate(self.ids):
            forced[b, ids[t % len(ids)]] = 0.0
        return forced


@torch.no_grad()
def generate_vs_teacher_forcing(model, tok, prompts, scripts, *, recorder_layer=None):
    """Greedy ``generate`` of a left-padded batch of chat prompts forced to write ``scripts``; returns (sequences,
    mask, max |log-prob difference| and max |logit difference| between the decoding steps' raw logits and one
    teacher-forced pass, the routes a layer used while generating (or None), max |logit|)."""
    B, L = len(prompts), max(map(len, prompts))
    new = max(map(len, scripts))
    ids = torch.full((B, L), tok.pad_token_id)
    mask = torch.zeros(B, L, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.tensor(p)
        mask[b, L - len(p):] = 1
    rec = _Recorder(recorder_layer) if recorder_layer is not None else None
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                         min_new_tokens=new, return_dict_in_generate=True, output_logits=True,
                         pad_token_id=tok.pad_token_id, logits_processor=[_Script(scripts, L)])
    used = rec.routes() if rec is not None else None
    seq = out.sequences
    assert seq.shape == (B, L + new)
    assert all(seq[b, L:L + len(s)].tolist() == s for b, s in enumerate(scripts))
    full_mask = torch.cat([mask, torch.ones(B, new, dtype=mask.dtype)], 1)
    step_logits = torch.stack([x.float() for x in out.logits], 1)  # (B, new, V)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    tf_logits = model(seq, attention_mask=full_mask, position_ids=pos, use_cache=False).logits[:, L - 1:-1].float()
    lp = lambda x: torch.log_softmax(x, -1).gather(-1, seq[:, L:, None]).squeeze(-1)  # noqa: E731
    d_lp = (lp(step_logits) - lp(tf_logits)).abs().max().item()
    d_logit = (step_logits - tf_logits).abs().max().item()
    return seq, full_mask, d_lp, d_logit, used, tf_logits.abs().max().item()


@pytest.mark.slow
def test_routed_generate_equals_teacher_forcing_through_the_chat_template(smollm2):
    """fp32, a left-padded batch of two chat prompts, each forced to write a tagged answer: the routes used while
    generating equal the router's on the finished sequences, and the decoding steps' log-probs equal one
    teacher-forced pass to within the plain model's own generate-vs-teacher-forcing difference."""
    model, tok = smollm2
    questions = [QUESTION, "What is the capital of France?"]
    answers = [SHORT_ANSWER, "<think>easy</think>\n<search>capital of France</search><answer>Paris</answer>"]
    prompts = [chat_text_ids_offsets(tok, _messages(q, None, search_r1=False), add_generation_prompt=True)[1]
               for q in questions]
    scripts = [tok.encode(a, add_special_tokens=False) for a in answers]
    assert tok.eos_token_id not in sum(scripts, [])
    routed = _routed_copy(model, tok, seed=5)
    seq, mask, d_lp, d_logit, used, max_logit = generate_vs_teacher_forcing(
        routed, tok, prompts, scripts, recorder_layer=routed_layers(routed)[0][1])
    want = _router(tok)(seq, mask)[:, :-1]  # the last token is never fed
    assert torch.equal(used, want), "routes used while generating differ from the router's on the sequences"
    assert int((want[:, max(map(len, prompts)):] == 1).sum()) > 15
    _, _, p_lp, p_logit, _, _ = generate_vs_teacher_forcing(model, tok, prompts, scripts)
    print(f"\n[smollm2 generate] B=2, {seq.shape[1]} tokens: routed max|dlogprob| {d_lp:.2e}, max|dlogit| "
          f"{d_logit:.2e}; plain model {p_lp:.2e}, {p_logit:.2e}; max|logit| {max_logit:.1f}")
    assert d_lp <= 8 * p_lp + 1e-5, (d_lp, p_lp)  # rounding only (see the KV-cache test)
    assert d_logit <= 8 * p_logit + 1e-5, (d_logit, p_logit)
