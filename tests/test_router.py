"""TagRouter: causal routes by tag spans (DESIGN.md §2), token and text modes, batch and streaming forms."""

import random

import pytest
import torch

pytest.importorskip("transformers")

from routed_lora import TagRouter  # noqa: E402
from routed_lora.testing import tiny_tokenizer  # noqa: E402

ADAPTERS = ("reasoning", "tool")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tok_text():
    return tiny_tokenizer(special=())  # tags become several ordinary tokens


def _ids(tok, text):
    return torch.tensor(tok(text).input_ids)


def _oracle(tok_ids, opens, closes, span_routes, default):
    """Plain Python state machine over token ids (token mode)."""
    out, span = [], -1
    for t in tok_ids:
        if t in opens:
            span = opens.index(t)
        elif span >= 0 and t == closes[span]:
            span = -1
        out.append(default if span < 0 else span_routes[span])
    return out


def test_token_mode_rule(tok):
    router = TagRouter(tok, adapters=ADAPTERS)
    assert router.mode == "tokens"
    text = "who <search> paris city </search> <information> paris </information> <answer> paris </answer>"
    ids = _ids(tok, text)
    expect = [0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]  # <search> .. up to, not including, </search>: tool
    assert router(ids).tolist() == expect
    assert router(ids.unsqueeze(0)).tolist() == [expect]
    # stray closing tag and a second span
    ids = _ids(tok, "</search> a <search> b </search> c <search> d")
    assert router(ids).tolist() == [0, 0, 1, 1, 0, 0, 1, 1]


def test_text_mode_multi_token_tags(tok_text):
    router = TagRouter(tok_text, adapters=ADAPTERS)
    assert router.mode == "text"
    ids = _ids(tok_text, "who <search> paris </search> is")
    pieces = tok_text.convert_ids_to_tokens(ids)
    assert pieces == ["who", "<", "search", ">", "paris", "</", "search", ">", "is"]
    # the tag is seen where its last piece is: ">" of <search> opens, ">" of </search> closes
    assert router(ids).tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0]
    # a partial tag never opens a span
    ids = _ids(tok_text, "< search a > search > <")
    assert router(ids).tolist() == [0] * len(ids)


def test_default_none_index_targets_and_several_spans(tok):
    router = TagRouter(tok, spans={1: ("<search>", "</search>"), 0: ("<think>", "</think>")}, default=None)
    ids = _ids(tok, "a <think> b </think> <search> c <think> d </search> </think> e")
    # opening a span replaces the open one; a closing tag of another span is ignored
    assert router(ids).tolist() == [-1, 0, 0, -1, 1, 1, 0, 0, 0, -1, -1]


@pytest.mark.parametrize("mode", ["tokens", "text"])
def test_batch_equals_streaming_and_oracle_random(tok, mode):
    router = TagRouter(tok, spans={"tool": ("<search>", "</search>"), "reasoning": ("<think>", "</think>")},
                       default=None, adapters=ADAPTERS, mode=mode)
    tags = [tok.convert_tokens_to_ids(t) for t in ("<search>", "</search>", "<think>", "</think>")]
    opens, closes = [tags[0], tags[2]], [tags[1], tags[3]]
    rng = random.Random(0)
    B, T = 5, 40
    ids = torch.tensor([[rng.choice(tags + list(range(11, 20))) for _ in range(T)] for _ in range(B)])
    batch = router(ids)
    for b in range(B):
        assert batch[b].tolist() == _oracle(ids[b].tolist(), opens, closes, [1, 0], -1), b
    stream = router.stream(B)
    steps = [stream.step(ids[:, t]) for t in range(T)]
    assert torch.equal(torch.stack(steps, 1), batch)
    stream = router.stream(B)
    chunks = [stream.step(ids[:, a:b]) for a, b in ((0, 7), (7, 8), (8, 8), (8, 30), (30, T))]
    assert torch.equal(torch.cat(chunks, 1), batch)


def test_text_mode_streaming_equals_batch(tok_text):
    router = TagRouter(tok_text, adapters=ADAPTERS)
    pieces = ["<", "</", ">", "search", "a", "b"]
    rng = random.Random(1)
    ids = torch.tensor([[tok_text.convert_tokens_to_ids(rng.choice(pieces)) for _ in range(60)] for _ in range(4)])
    batch = router(ids)
    assert batch.eq(1).any() and batch.eq(0).any()
    stream = router.stream(4)
    assert torch.equal(torch.stack([stream.step(ids[:, t]) for t in range(60)], 1), batch)
    # the same routes as a token-level re-spelling of the text: decode, find tags in the joined pieces
    text = ["".join(tok_text.convert_ids_to_tokens(row)) for row in ids.tolist()]
    for b, row in enumerate(ids.tolist()):
        joined, span, expect = "", False, []
        for t in row:
            joined += tok_text.convert_ids_to_tokens(t)
            if joined.endswith("</search>"):
                span = False
            elif joined.endswith("<search>"):
                span = True
            expect.append(int(span))
        assert batch[b].tolist() == expect, text[b]


@pytest.mark.parametrize("mode", ["tokens", "text"])
def test_left_and_right_padding(mode):
    tok = tiny_tokenizer() if mode == "tokens" else tiny_tokenizer(special=())
    router = TagRouter(tok, adapters=ADAPTERS)
    texts = ["who <search> paris", "<search> a b </search> is the capital of france", "a"]
    single = [router(_ids(tok, t)) for t in texts]
    for side in ("left", "right"):
        tok.padding_side = side
        enc = tok(texts, padding=True, return_tensors="pt")
        ids = enc.input_ids.clone()
        # adversarial pad ids: an opening tag piece under the mask must not open a span
        ids[enc.attention_mask == 0] = tok.convert_tokens_to_ids("<search>" if mode == "tokens" else ">")
        routes = router(ids, enc.attention_mask)
        for b, ref in enumerate(single):
            valid = enc.attention_mask[b].bool()
            assert routes[b][valid].tolist() == ref.tolist(), (side, b)
            assert (routes[b][~valid] == 0).all()  # padding gets the default route
    tok.padding_side = "right"


def test_state_carries_across_streaming_calls_with_masks(tok):
    router = TagRouter(tok, adapters=ADAPTERS)
    s = router.stream(2)
    a = s.step(_ids(tok, "a <search>").repeat(2, 1), torch.tensor([[1, 1], [1, 0]]))
    assert a.tolist() == [[0, 1], [0, 0]]
    b = s.step(torch.tensor([tok.convert_tokens_to_ids("paris")] * 2))
    assert b.tolist() == [1, 0]
    c = s.clone()
    assert s.step(_ids(tok, "</search>").repeat(2, 1)).tolist() == [[0], [0]]
    assert c.step(_ids(tok, "b").repeat(2, 1)).tolist() == [[1], [0]]  # clones are independent


def test_bad_inputs(tok):
    with pytest.raises(ValueError, match="distinct"):
        TagRouter(tok, spans={"tool": ("<search>", "<search>")})
    with pytest.raises(ValueError, match="open_tag, close_tag"):
        TagRouter(tok, spans={"tool": "<search>"})
    with pytest.raises(ValueError, match="mode"):
        TagRouter(tok, mode="fast")
    with pytest.raises(ValueError, match="not single tokens"):
        TagRouter(tiny_tokenizer(special=()), mode="tokens")
    with pytest.raises(ValueError, match="unknown adapter"):
        TagRouter(tok, default="planner", adapters=ADAPTERS)
    unbound = TagRouter(tok)
    with pytest.raises(RuntimeError, match="adapter names"):
        unbound(_ids(tok, "a b"))
    router = TagRouter(tok, adapters=ADAPTERS)
    with pytest.raises(ValueError, match="already bound"):
        router.bind(("x", "y"))
    with pytest.raises(TypeError, match="integer"):
        router(torch.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        router(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        router(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(ValueError, match="2 sequences"):
        router.stream(2).step(torch.zeros(3, dtype=torch.long))


def test_import_without_optional_dependencies():
    """``import routed_lora`` (and the router with any tokenizer-like object) works without the hf extra."""
    import subprocess
    import sys

    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('transformers', 'peft', 'safetensors', 'tokenizers'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import torch, routed_lora as rl
class Tok:
    vocab = {'<search>': 5, '</search>': 6}
    unk_token_id = None
    def encode(self, text, add_special_tokens=False):
        return [self.vocab[text]]
r = rl.TagRouter(Tok(), adapters=('reasoning', 'tool'))
print(r(torch.tensor([1, 5, 2, 6, 3])).tolist())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[0, 1, 1, 0, 0]"
