"""The KL reference policy is the backbone with the adapters off (DESIGN.md §3), checked against an independent
oracle: an unpatched copy of the model, taken before the routed layers were applied, scored with its own
full-logits ``log_softmax``. Issue 23, item 6: ``kl >= 0`` holds for any reference, so the reference log-probs and
the trainer's KL metric are compared with that copy's values instead."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

import routed_lora as rl  # noqa: E402
from routed_lora.grpo.logprobs import position_ids_for, reference_logprobs, routes_for, token_logprobs  # noqa: E402
from routed_lora.grpo.trainer import AdapterOptimizer, grpo_update, lora_parameters  # noqa: E402
from test_grpo_update import V, _cfg, make_batch, tag_router  # noqa: E402

TARGETS = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")


def _policy_and_backbone(seed=0, r=4):
    """A tiny Qwen2 patched with two adapters whose B is non-zero (so they change every log-prob), and an
    unpatched deep copy of its backbone taken before patching."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    backbone = copy.deepcopy(model)
    rl.apply_routed_lora(model, target_modules=TARGETS, r=r, lora_alpha=2 * r, adapters=("reasoning", "tool"))
    with torch.no_grad():
        for p in lora_parameters(model):
            if p.shape[-1] == r:  # lora_B (E, N, r)
                p.normal_(0, 0.05)
    return model, backbone


def backbone_logprobs(backbone, ids, att, temperature=1.0):
    """log softmax(z / T) at the next token from the unpatched model's own forward (full logits)."""
    with torch.no_grad():
        logits = backbone(input_ids=ids, attention_mask=att, position_ids=position_ids_for(att)).logits
    lp = torch.log_softmax(logits[:, :-1].double() / temperature, -1)
    return lp.gather(-1, ids[:, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_reference_logprobs_are_the_backbone_with_adapters_off(temperature):
    model, backbone = _policy_and_backbone()
    batch = make_batch(seed=1)
    ids, att = batch.input_ids, batch.attention_mask
    real = att[:, 1:].bool() & att[:, :-1].bool()  # a real token predicted from a real position
    want = backbone_logprobs(backbone, ids, att, temperature)
    routes = routes_for(ids, att, router=tag_router)
    for chunk in (None, 0, 5):  # the chunked head, the full logits, small chunks
        ref = reference_logprobs(model, ids, att, temperature=temperature, chunk_tokens=chunk)
        err = (ref.double() - want).abs()[real]
        assert float(err.max()) < 1e-5, (chunk, float(err.max()))
    # the oracle can tell: the policy (adapters on, routed) is far from the backbone on these tokens
    with torch.no_grad():
        pol, _ = token_logprobs(model, ids, att, routes=routes, temperature=temperature)
    assert float((pol.double() - want).abs()[real].max()) > 1e-2
    # and the adapters are on again afterwards
    with torch.no_grad():
        again, _ = token_logprobs(model, ids, att, routes=routes, temperature=temperature)
    assert torch.equal(again, pol)


def test_trainer_kl_metric_is_k3_against_the_backbone():
    """grpo_update's ``kl``: the mean over sampled tokens of k3 = exp(x) - x - 1, x = ref - logp, with logp the
    policy before the update (one optimiser step: every micro-batch is scored before it) and ref the backbone."""
    model, backbone = _policy_and_backbone(seed=2)
    batch = make_batch(seed=3)
    ids, att, mask = batch.input_ids, batch.attention_mask, batch.loss_mask
    routes = routes_for(ids, att, router=tag_router)
    with torch.no_grad():
        logp, _ = token_logprobs(model, ids, att, routes=routes)
    x = backbone_logprobs(backbone, ids, att) - logp.double()
    want = float((torch.expm1(x) - x)[mask].mean())
    cfg = _cfg(beta=0.05, mini_batches=1, epochs=1)
    m = grpo_update(model, model, AdapterOptimizer(model, cfg.adapter_lrs()), batch, routes, cfg)
    assert want > 1e-4  # the adapters moved the policy away from the backbone: a wrong reference shows
    assert abs(m["kl"] - want) <= 1e-5 * want + 1e-8, (m["kl"], want)
