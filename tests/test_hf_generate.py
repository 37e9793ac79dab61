"""A router-driven model routes by itself in generate (KV-cache steps included) exactly as on finished sequences,
and the log-probs recorded while generating equal teacher-forced log-probs."""

import inspect

import pytest
import torch

pytest.importorskip("transformers")

import routed_lora as rl  # noqa: E402
from routed_lora.hf import get_router, routed_layers  # noqa: E402
from routed_lora.testing import tiny_model, tiny_tokenizer  # noqa: E402

# A small vocabulary so that sampling emits tags often.
WORDS = ("<", "</", ">", "search", "a", "b", "c")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(tok, family="qwen2", seed=0):
    model = rl.apply_routed_lora(tiny_model(family, vocab_size=len(tok), seed=seed), router=rl.TagRouter(tok))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in routed_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.5)
    return model


class _Recorder:
    """Records the routes every call of one routed layer used."""

    def __init__(self, layer):
        self.calls = []
        self.handle = layer.register_forward_pre_hook(lambda m, args: self.calls.append(m._routes))

    def routes(self):
        self.handle.remove()
        return torch.cat([r if r.dim() == 2 else r.view(-1, 1) for r in self.calls], dim=1).long()


class _Script:
    """Logits processor forcing given continuations (raw logits, which output_logits records, are untouched)."""

    def __init__(self, tok, texts, start):
        self.ids = [tok(t).input_ids for t in texts]
        self.start = start

    def __call__(self, input_ids, scores):
        t = input_ids.shape[1] - self.start
        forced = torch.full_like(scores, float("-inf"))
        for b, ids in enumerate(self.ids):
            forced[b, ids[t % len(ids)]] = 0.0
        return forced


def _check_generation(tok, prompts, *, do_sample, family="qwen2", new=24, script=None):
    torch.manual_seed(0)
    model = _model(tok, family)
    router = get_router(model)
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    B, L = enc.input_ids.shape
    rec = _Recorder(routed_layers(model)[0][1])
    with torch.no_grad():
        out = model.generate(
            **enc, do_sample=do_sample, max_new_tokens=new, min_new_tokens=new, return_dict_in_generate=True,
            output_logits=True, pad_token_id=tok.pad_token_id, top_k=None, temperature=1.0,
            logits_processor=None if script is None else [_Script(tok, script, L)],
        )
    seq = out.sequences
    assert seq.shape == (B, L + new)
    gen_routes = rec.routes()
    mask = torch.cat([enc.attention_mask, torch.ones(B, new, dtype=enc.attention_mask.dtype)], 1)
    # 1) routes used while generating == the router on the finished sequences (the last token is never fed)
    ref_routes = router(seq, mask)[:, :-1]
    assert gen_routes.shape == ref_routes.shape
    assert torch.equal(gen_routes, ref_routes), (gen_routes, ref_routes)
    # 2) recorded log-probs == teacher-forced log-probs of the same sequences (same routes, same positions)
    step_logp = torch.stack([torch.log_softmax(x.float(), -1) for x in out.logits], 1)  # (B, new, V)
    gen_lp = step_logp.gather(-1, seq[:, L:, None]).squeeze(-1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(seq, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
    tf_lp = torch.log_softmax(logits[:, L - 1 : -1].float(), -1).gather(-1, seq[:, L:, None]).squeeze(-1)
    valid = mask[:, L - 1 : -1].bool()
    torch.testing.assert_close(gen_lp[valid], tf_lp[valid], rtol=1e-4, atol=1e-4)
    # the adapters matter: the backbone gives other log-probs
    with torch.no_grad(), rl.disable_adapters(model):
        base = model(seq, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
    diff = torch.log_softmax(base[:, L - 1 : -1], -1) - torch.log_softmax(logits[:, L - 1 : -1], -1)
    assert diff.abs().max() > 1e-2
    return gen_routes


@pytest.mark.parametrize("do_sample", [True, False], ids=["sample", "greedy"])
def test_generate_routes_and_logprobs_single_token_tags(do_sample):
    tok = tiny_tokenizer(words=WORDS)
    prompts = ["a <search> b", "<search> a </search> c b a <search>", "c"]
    routes = _check_generation(tok, prompts, do_sample=do_sample)
    assert routes.eq(1).any() and routes.eq(0).any()


@pytest.mark.parametrize("do_sample", [True, False], ids=["sample", "greedy"])
def test_generate_routes_and_logprobs_multi_token_tags(do_sample):
    tok = tiny_tokenizer(words=WORDS, special=())  # "<search>" is "<" "search" ">"
    prompts = ["a < search > b", "< search > a </ search > c b < search", "c"]
    routes = _check_generation(tok, prompts, do_sample=do_sample)
    assert routes.eq(1).any() and routes.eq(0).any()


def test_generate_scripted_multi_token_tags_open_and_close_while_decoding():
    tok = tiny_tokenizer(words=WORDS, special=())
    script = ["> a b </ search > c < search > a", "search > b </ search >", "< search > a < / search > </ search"]
    routes = _check_generation(tok, ["a < search", "c <", "b"], do_sample=False, new=20, script=script)
    L = routes.shape[1] - 19
    for b in range(3):  # every row opens and closes a span during decoding
        assert routes[b, L:].eq(1).any() and routes[b, L:].eq(0).any(), routes[b, L:]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_generate_other_families(family):
    tok = tiny_tokenizer(words=WORDS)
    _check_generation(tok, ["a <search> b", "c c"], do_sample=True, family=family, new=8)


def test_manual_cache_loop_routes_by_itself():
    """model(ids, use_cache=True) then model(next, cache=...) steps: the cache is created inside the first call."""
    tok = tiny_tokenizer(words=WORDS)
    model = _model(tok)
    ids = torch.tensor(tok(["a <search> b c </search> a b"]).input_ids)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :3], use_cache=True)
        steps = [out.logits]
        # transformers >= 5.2x names the cache `cache`, 5.10 (veRL's pin) `past_key_values`
        key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        cache = getattr(out, key)
        for t in range(3, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], use_cache=True, **{key: cache})
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    # positional input_ids, 1-D routes never needed: the router handled every step
    with torch.no_grad(), rl.disable_adapters(model):
        assert (model(ids).logits - full).abs().max() > 1e-3


@pytest.mark.parametrize("tags", ["single", "multi"])
def test_beam_search_follows_cache_reordering(tags):
    """Beam search reorders the KV cache every step; the router state follows it. For each returned sequence,
    the raw logits of the beam it came from at each step (``beam_indices``) equal teacher-forced logits of the
    returned sequence with the router's routes."""
    tok = tiny_tokenizer(words=WORDS) if tags == "single" else tiny_tokenizer(words=WORDS, special=())
    model = _model(tok)
    tok.padding_side = "left"
    prompts = ["a <search> b", "c"] if tags == "single" else ["a < search > b", "c <"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    B, L = enc.input_ids.shape
    new, beams = 12, 3
    with torch.no_grad():
        out = model.generate(**enc, num_beams=beams, num_return_sequences=beams, do_sample=False,
                             max_new_tokens=new, min_new_tokens=new, early_stopping=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    seq = out.sequences
    ones = torch.ones(B * beams, new, dtype=torch.long)
    mask = torch.cat([enc.attention_mask.repeat_interleave(beams, 0), ones], 1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        tf = model(seq, attention_mask=mask, position_ids=position_ids, use_cache=False).logits[:, L - 1 : -1]
    raw = torch.stack(out.logits, 1)  # (B * beams, new, V): running beams at each step
    picked = torch.stack([raw[out.beam_indices[:, t], t] for t in range(new)], 1)
    torch.testing.assert_close(torch.log_softmax(picked, -1), torch.log_softmax(tf, -1), rtol=1e-4, atol=1e-4)
    assert get_router(model)(seq, mask)[:, L:].eq(1).any()


def test_generate_under_disable_adapters_is_the_backbone():
    tok = tiny_tokenizer(words=WORDS)
    model = _model(tok)
    base = tiny_model("qwen2", vocab_size=len(tok))
    enc = tok(["a <search> b", "< c"], return_tensors="pt", padding=True, padding_side="left")
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        with rl.disable_adapters(model):
            ours = model.generate(**enc, **kw)
        ref = base.generate(**enc, **kw)
        adapted = model.generate(**enc, **kw)
    assert torch.equal(ours, ref)
    assert not torch.equal(adapted, ref)
