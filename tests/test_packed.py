"""Packed sequences (several sequences in one row, position_ids restarting): the router restarts at every
boundary, so packed and padded batches give the same routes and per-token log-probs, including a <search> span
that ends exactly at a boundary and one cut by it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import routed_lora as rl  # noqa: E402
from routed_lora.grpo.logprobs import routes_for, token_logprobs  # noqa: E402
from routed_lora.router import route_packed, sequence_starts  # noqa: E402
from routed_lora.testing import tiny_model, tiny_tokenizer  # noqa: E402

TEXTS = [
    "who was born in paris ? <search> alice born </search>",  # span closes on the last token
    "the capital of france <search> paris city",  # span cut by the boundary (still open)
    "the river of rome is",  # must be routed as reasoning, not tool
    "<search> bob </search> <information> bob married alice </information> <answer> yes </answer>",
]


def _setup(text_mode=False):
    tok = tiny_tokenizer(special=() if text_mode else tiny_tokenizer.__defaults__[1])
    model = tiny_model("qwen2", vocab_size=len(tok), hidden=32, layers=2, seed=0)
    router = rl.TagRouter(tok)
    rl.apply_routed_lora(model, r=4, lora_alpha=8, router=router)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    seqs = [torch.tensor(tok(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
    return tok, model, router, seqs


def _padded(seqs, pad=0):
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], att[i, :len(s)] = s, 1
    return ids, att


def _packed(seqs):
    ids = torch.cat(seqs).unsqueeze(0)
    pos = torch.cat([torch.arange(len(s)) for s in seqs]).unsqueeze(0)
    cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
    return ids, pos, cu


@pytest.mark.parametrize("text_mode", [False, True], ids=["tokens", "text"])
def test_packed_routes_equal_padded(one_thread, text_mode):
    _, _, router, seqs = _setup(text_mode)
    ids, att = _padded(seqs)
    padded = router(ids, att)
    packed_ids, pos, cu = _packed(seqs)
    expect = torch.cat([padded[i, :len(s)] for i, s in enumerate(seqs)]).unsqueeze(0)
    by_pos = router(packed_ids, position_ids=pos)
    by_cu = router(packed_ids, cu_seqlens=cu)
    assert torch.equal(by_pos, expect) and torch.equal(by_cu, expect)
    # the test can fail: routing the row as one sequence carries the open <search> of sequence 1 into 2
    naive = router(packed_ids)
    b1 = len(seqs[0]) + len(seqs[1])
    assert padded[1, len(seqs[1]) - 1] == 1, "sequence 1 must end inside an open span"
    assert naive[0, b1] == 1 and expect[0, b1] == 0, "the first token after the cut span is reasoning"
    assert padded[0, len(seqs[0]) - 1] == 0, "</search> at the boundary is the reasoning adapter's"


@torch.no_grad()
def test_packed_logprobs_equal_padded(one_thread):
    _, model, router, seqs = _setup()
    ids, att = _padded(seqs)
    routes = routes_for(ids, att, router=router)
    lp_pad, _ = token_logprobs(model, ids, att, routes=routes)
    packed_ids, pos, cu = _packed(seqs)
    proutes = routes_for(packed_ids, None, router=router, position_ids=pos)
    lp_pack, _ = token_logprobs(model, packed_ids, None, routes=proutes, position_ids=pos, chunk_tokens=5)
    # the model routing by itself (its pre-hook sees the restarting position_ids) gives the same
    lp_self, _ = token_logprobs(model, packed_ids, None, routes=None, position_ids=pos)
    off = 0
    worst = 0.0
    for i, s in enumerate(seqs):
        n = len(s)
        a = lp_pad[i, :n - 1]
        for got in (lp_pack[0, off:off + n - 1], lp_self[0, off:off + n - 1]):
            worst = max(worst, float((got - a).abs().max()))
        off += n
    assert worst <= 1e-5, f"packed vs padded log-probs differ by {worst:.3g}"
    # a packed row routed as one sequence gives other log-probs (so the check above can fail)
    wrong = routes_for(packed_ids, None, router=router)
    lp_wrong, _ = token_logprobs(model, packed_ids, None, routes=wrong, position_ids=pos)
    assert float((lp_wrong - lp_pack).abs().max()) > 1e-3


def test_packed_without_boundaries_is_an_error():
    _, _, router, seqs = _setup()
    packed_ids, pos, cu = _packed(seqs)
    with pytest.raises(ValueError, match="position_ids .* or cu_seqlens"):
        router(packed_ids, packed=True)
    with pytest.raises(ValueError, match="position_ids .* or cu_seqlens"):
        routes_for(packed_ids, None, router=router, packed=True)
    with pytest.raises(ValueError, match="cu_seqlens: expected strictly increasing offsets from 0 to"):
        router(packed_ids, cu_seqlens=torch.tensor([0, 5, 3, packed_ids.shape[1]]))
    with pytest.raises(ValueError, match="cu_seqlens.*to %d" % packed_ids.shape[1]):
        router(packed_ids, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="position_ids: expected shape"):
        router(packed_ids, position_ids=pos[:, :-1])
    with pytest.raises(ValueError, match="attention_mask: None is only allowed with position_ids"):
        token_logprobs(_setup()[1], packed_ids, None, routes=torch.zeros_like(packed_ids))


def test_generate_with_left_padding_is_not_packed(one_thread):
    """generate gives left padding position 1 and the first real token 0: not a packed row, the router keeps
    its cache state (decoding steps still route)."""
    tok, model, router, seqs = _setup()
    ids = torch.zeros(2, 8, dtype=torch.long)
    att = torch.zeros_like(ids)
    ids[0, 3:], att[0, 3:] = seqs[2][:5], 1
    ids[1, :], att[1, :] = seqs[0][:8], 1
    out = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 11


def test_sequence_starts_rule():
    pos = torch.tensor([[0, 1, 2, 0, 1, 5, 6]])
    assert sequence_starts(pos.shape, position_ids=pos).tolist() == [[True, False, False, True, False, True, False]]
    cu = torch.tensor([0, 3, 7, 8])
    assert sequence_starts((2, 4), cu_seqlens=cu).tolist() == [[True, False, False, True], [True, False, False, True]]  # rows start sequences too
    # any callable router works
    r = route_packed(lambda i, m: (i == 5).long().cumsum(-1).clamp(max=1), torch.tensor([[5, 1, 1, 2, 5]]),
                     cu_seqlens=torch.tensor([0, 3, 5]))
    assert r.tolist() == [[1, 1, 1, 0, 1]]
