"""The first update's ratio is exactly 1 because the no-grad pass (old policy, rollout-free) and the gradient
pass of the update give the same log-probs bit for bit (DESIGN.md §3). Issue 23, item 10: the trainer skips the
first mini-batch's no-grad pass and takes its old log-probs from its own first update forward, so by default
``first_update_max_abs_logratio`` is |logp.detach() - logp.detach()| = 0 by construction and proves nothing.
Here the no-grad pass is run (``_FORCE_OLD_PASS``) and measured against the gradient pass, through the trainer
and directly, with micro-batches small enough (<= 64 tokens) that the layer's per-adapter no-grad path is used."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from routed_lora.grpo import trainer as T  # noqa: E402
from routed_lora.grpo import update as U  # noqa: E402  (where grpo_update reads the patched names)
from routed_lora.grpo.logprobs import routes_for, token_logprobs  # noqa: E402
from test_grpo_update import _cfg, make_batch, make_model, tag_router  # noqa: E402


@pytest.mark.parametrize("mode,temperature", [("dart", 1.0), ("dart", 0.7), ("joint", 1.0)])
def test_no_grad_pass_equals_the_gradient_pass(monkeypatch, mode, temperature):
    joint = mode == "joint"
    model = make_model(seed=7, adapters=("joint",) if joint else ("reasoning", "tool"), r=8 if joint else 4)
    batch = make_batch(seed=8, L=20)
    routes = routes_for(batch.input_ids, batch.attention_mask, joint_adapter=0) if joint else \
        routes_for(batch.input_ids, batch.attention_mask, router=tag_router)
    # directly: one micro-batch of 3 rows (<= 60 tokens), no grad vs grad
    ids, att, rt = batch.input_ids[:3], batch.attention_mask[:3], routes[:3]
    with torch.no_grad():
        a, _ = token_logprobs(model, ids, att, routes=rt, temperature=temperature)
    b, _ = token_logprobs(model, ids, att, routes=rt, temperature=temperature)
    assert b.requires_grad
    m = batch.loss_mask[:3]
    assert torch.equal(a[m], b.detach()[m]), float((a - b.detach())[m].abs().max())
    # through the trainer: the old-policy pass runs for the first mini-batch too, so the metric compares it with
    # the first update forward
    monkeypatch.setattr(U, "_FORCE_OLD_PASS", True)
    cfg = _cfg(mode=mode, micro_batch_size=3, temperature=temperature)
    metrics = T.grpo_update(model, model, T.AdapterOptimizer(model, cfg.adapter_lrs()), batch, routes, cfg)
    assert metrics["first_update_max_abs_logratio"] == 0.0
