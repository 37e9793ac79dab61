"""Chunked log-probs (grpo/logprobs.py): the output layer computed a chunk of positions at a time gives the same
log-probs, entropies and gradients as the materialised fp32 logits, for odd chunk sizes, temperatures, bf16 and
a trainable head; models that transform logits after the head fall back to the unchunked path."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import routed_lora as rl  # noqa: E402
from routed_lora.grpo.logprobs import chunked_head_logprobs, reference_logprobs, token_logprobs  # noqa: E402

V = 97


def _model(seed=0, dtype=torch.float32, tie=False):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    torch.manual_seed(seed)
    m = Qwen2ForCausalLM(cfg).to(dtype)
    rl.apply_routed_lora(m, target_modules=("q_proj", "v_proj", "down_proj"), r=4, lora_alpha=8)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return m


def _batch(B=3, L=17, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, L), generator=g)
    att = torch.ones(B, L, dtype=torch.long)
    att[0, :3] = 0  # left padding
    att[-1, -4:] = 0  # right padding
    routes = torch.randint(-1, 2, (B, L), generator=g)
    return ids, att, routes


@pytest.mark.parametrize("chunk", [1, 7, 16, 1000, None])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_equals_materialised(one_thread, chunk, temperature):
    model = _model()
    ids, att, routes = _batch()
    w = torch.randn(ids.shape[0], ids.shape[1] - 1, generator=torch.Generator().manual_seed(3))
    res = {}
    for name, c in (("full", 0), ("chunked", chunk)):
        model.zero_grad(set_to_none=True)
        logp, ent = token_logprobs(model, ids, att, routes=routes, temperature=temperature, with_entropy=True,
                                   chunk_tokens=c)
        (logp * w).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        res[name] = (logp.detach(), ent, grads)
    (lf, ef, gf), (lc, ec, gc) = res["full"], res["chunked"]
    assert (lf - lc).abs().max() <= 1e-6, f"logp max diff {(lf - lc).abs().max():.3g}"
    assert (ef - ec).abs().max() <= 1e-6, f"entropy max diff {(ef - ec).abs().max():.3g}"
    assert not ec.requires_grad
    assert gf.keys() == gc.keys() and len(gf) == 6
    for n in gf:
        err = (gf[n] - gc[n]).abs().max() / gf[n].abs().max().clamp_min(1e-30)
        assert err <= 1e-5, f"{n}: relative grad diff {err:.3g}"


def test_reference_pass_chunked(one_thread):
    model = _model()
    ids, att, _ = _batch()
    a = reference_logprobs(model, ids, att, chunk_tokens=0)
    b = reference_logprobs(model, ids, att, chunk_tokens=5)
    assert (a - b).abs().max() <= 1e-6


def test_output_layer_restored(one_thread):
    model = _model()
    ids, att, routes = _batch()
    token_logprobs(model, ids, att, routes=routes, chunk_tokens=4)
    assert "forward" not in model.lm_head.__dict__
    out = model(input_ids=ids, attention_mask=att, routes=routes)
    assert out.logits.shape == (*ids.shape, V)


def test_bf16_model(one_thread):
    model = _model(dtype=torch.bfloat16)
    ids, att, routes = _batch()
    lf, ef = token_logprobs(model, ids, att, routes=routes, with_entropy=True, chunk_tokens=0)
    lc, ec = token_logprobs(model, ids, att, routes=routes, with_entropy=True, chunk_tokens=5)
    assert (lf - lc).abs().max() <= 1e-6 and (ef - ec).abs().max() <= 1e-6


def test_trainable_head_gets_its_gradient(one_thread):
    h = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    W = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (13,))
    lp, _ = chunked_head_logprobs(h, W, b, t, temperature=0.9, chunk_tokens=4)
    z = (h @ W.T + b).float() / 0.9
    ref = torch.log_softmax(z, -1).gather(-1, t[:, None]).squeeze(-1)
    assert torch.allclose(lp, ref, atol=1e-6)
    g = torch.randn(13, dtype=torch.float64)
    dh, dW, db = torch.autograd.grad((lp * g).sum(), (h, W, b))
    rh, rW, rb = torch.autograd.grad((ref * g).sum(), (h, W, b))
    for name, a, r in (("hidden", dh, rh), ("weight", dW, rW), ("bias", db, rb)):
        assert (a - r).abs().max() <= 1e-5 * r.abs().max(), name


def _gemma2(softcap=30.0):
    """A tiny Gemma2 (final_logit_softcapping: its forward applies cap * tanh(z / cap) after the head) with routed
    adapters (B non-zero) and an output layer scaled so the logits reach about 16, as a trained model's do: then
    the cap moves log-probs by several nats (at the init scale of 0.02 the logits stay below 0.5 and a cap of 30
    changes nothing measurable)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                       final_logit_softcapping=softcap, query_pre_attn_scalar=8, sliding_window=8,
                       layer_types=["sliding_attention", "full_attention"], pad_token_id=0,
                       tie_word_embeddings=False)
    torch.manual_seed(0)
    m = Gemma2ForCausalLM(cfg).eval()
    rl.apply_routed_lora(m, target_modules=("q_proj", "v_proj", "down_proj"), r=4, lora_alpha=8)
    with torch.no_grad():
        m.lm_head.weight.mul_(40)
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return m


def _plain_logprobs(model, ids, att, temperature, *, adapters=True):
    """Oracle: the model's own forward (softcapping included), full logits, log_softmax in float64."""
    from routed_lora.grpo.logprobs import position_ids_for

    with torch.no_grad():
        if adapters:
            logits = model(input_ids=ids, attention_mask=att, position_ids=position_ids_for(att)).logits
        else:
            with rl.disable_adapters(model):
                logits = model(input_ids=ids, attention_mask=att, position_ids=position_ids_for(att)).logits
    lp = torch.log_softmax(logits[:, :-1].double() / temperature, -1)
    return lp.gather(-1, ids[:, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logit_softcapping_falls_back(one_thread, temperature):
    """Issue 23, item 8: on a model that softcaps its logits the log-probs (policy and reference, any chunk
    size) equal the model's own capped logits' log-probs; the chunked head, which skips the cap, is not used."""
    pytest.importorskip("transformers", minversion="4.42")  # Gemma2
    model = _gemma2()
    ids, att, routes = _batch()
    real = att[:, 1:].bool() & att[:, :-1].bool()
    rl.set_routes(model, routes)
    want = _plain_logprobs(model, ids, att, temperature)
    want_ref = _plain_logprobs(model, ids, att, temperature, adapters=False)
    rl.clear_routes(model)
    # the oracle can tell: without the cap the log-probs are nats away
    uncapped = _gemma2(softcap=None)
    rl.set_routes(uncapped, routes)
    far = _plain_logprobs(uncapped, ids, att, temperature)
    assert float((far - want).abs()[real].max()) > 0.3
    for chunk in (None, 4, 0):
        lp, _ = token_logprobs(model, ids, att, routes=routes, temperature=temperature, chunk_tokens=chunk)
        err = float((lp.detach().double() - want).abs()[real].max())
        assert err < 1e-5, (chunk, err)
        ref = reference_logprobs(model, ids, att, temperature=temperature, chunk_tokens=chunk)
        err = float((ref.double() - want_ref).abs()[real].max())
        assert err < 1e-5, ("reference", chunk, err)
    assert "forward" not in model.lm_head.__dict__


def test_bad_chunk_tokens(one_thread):
    model = _model()
    ids, att, routes = _batch()
    with pytest.raises(ValueError, match="chunk_tokens"):
        token_logprobs(model, ids, att, routes=routes, chunk_tokens=-1)
